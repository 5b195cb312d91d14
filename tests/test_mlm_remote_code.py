"""Masked diffusion LMs as they ship (LLaDA-style): model code in the checkpoint folder (``auto_map`` registering only
AutoModel / AutoModelForCausalLM), the mask id in config.json and none in the tokenizer; loaded with
trust_remote_code only when the recipe sets it."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from alignkit.cli import main
from alignkit.compose import load_run_config
from alignkit.config import ConfigError, RewardTermConfig, RunConfig
from alignkit.evaluation import evaluate
from alignkit.modalities.discrete.mlm import MaskedLMSampler, encode_prefix
from alignkit.prompts import PromptSet
from alignkit.reward_set import RewardSet

MASK = "[MDM]"  # a plain vocabulary entry, as LLaDA's <|mdm_mask|>: the tokenizer does not name it its mask token
SPECIALS = ("[PAD]", "[UNK]", "[EOS]", "[BOS]", "[U]", "[A]")
CHARS = "0123456789+-=? abcdefghijklmnopqrstuvwxyz"

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyDLMConfig(PretrainedConfig):
    model_type = "tiny_dlm"

    def __init__(self, vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_sequence_length=64, mask_token_id=None,
                 **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tinydlm import TinyDLMConfig


class Block(nn.Module):
    """Pre-norm bidirectional attention and MLP, with LLaDA's layer names."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ff_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.ff_proj, self.ff_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, keep):
        b, n, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # no causal mask: bidirectional
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.ff_out(F.gelu(self.ff_proj(self.ff_norm(x))))


class TinyDLMModelLM(PreTrainedModel):
    config_class = TinyDLMConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_sequence_length, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        keep = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for block in self.blocks:
            x = block(x, keep)
        return CausalLMOutputWithPast(logits=self.lm_head(self.ln_f(x)))
'''


def _tokenizer() -> PreTrainedTokenizerFast:
    """Character tokenizer whose vocabulary holds the mask token without naming it; a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab[MASK] = len(vocab)
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([*SPECIALS, MASK])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  bos_token="[BOS]", padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = ("{% for m in messages %}{{ bos_token }}[U]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[A]{% endif %}")
    return tok


def write_remote_dlm(folder: Path, seed: int = 0) -> Path:
    """A checkpoint folder as LLaDA ships one: its own configuration_*.py / modeling_*.py, ``auto_map`` registering
    AutoModel and AutoModelForCausalLM only, ``mask_token_id`` in config.json, safetensors weights, a tokenizer
    without a mask token. The weights are drawn here by running the folder's own code."""
    folder.mkdir(parents=True)
    (folder / "configuration_tinydlm.py").write_text(textwrap.dedent(CONFIGURATION))
    (folder / "modeling_tinydlm.py").write_text(textwrap.dedent(MODELING))
    tok = _tokenizer()
    tok.save_pretrained(folder)
    config = {"model_type": "tiny_dlm", "architectures": ["TinyDLMModelLM"], "vocab_size": len(tok), "d_model": 32,
              "n_heads": 4, "n_layers": 2, "max_sequence_length": 64, "mask_token_id": tok.convert_tokens_to_ids(MASK),
              "auto_map": {"AutoConfig": "configuration_tinydlm.TinyDLMConfig",
                           "AutoModel": "modeling_tinydlm.TinyDLMModelLM",
                           "AutoModelForCausalLM": "modeling_tinydlm.TinyDLMModelLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig, AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                      trust_remote_code=True)
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def remote_dlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_remote_dlm(tmp_path_factory.mktemp("remote") / "tiny-llada")


def _overrides(folder: Path, out: Path, *extra: str) -> list[str]:
    return [f"backbone.pretrained={folder}", "backbone.max_sequence_length=12", "backbone.num_steps=4",
            "backbone.options.gen_length=4", "backbone.options.end_token='[EOS]'",
            "backbone.lora.target_modules=[q_proj,k_proj,v_proj,attn_out]", f"output_dir={out}", *extra]


def _trusted(folder: Path, out: Path, *extra: str) -> RunConfig:
    overrides = _overrides(folder, out, "backbone.trust_remote_code=true", *extra)
    return load_run_config("arithmetic_tempflow_grpo", overrides)


def _own_code_imported() -> list[str]:
    return [name for name in sys.modules if "modeling_tinydlm" in name]


def test_refused_without_trust_remote_code_before_its_code_runs(remote_dlm: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_run_config("arithmetic_tempflow_grpo", _overrides(remote_dlm, tmp_path))
    assert cfg.backbone.trust_remote_code is False
    before = _own_code_imported()
    with pytest.raises(ValueError) as info:
        MaskedLMSampler.from_config(cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    msg = str(info.value)
    assert "backbone.trust_remote_code=true" in msg and "modeling_tinydlm.TinyDLMModelLM" in msg
    assert "nothing was run" in msg
    assert _own_code_imported() == before  # the folder's Python code never ran
    # the command line: one error line, exit status 2, no traceback
    code = main(["eval", "arithmetic_tempflow_grpo", *_overrides(remote_dlm, tmp_path / "cli"), "eval.num_prompts=2"])
    assert code == 2
    assert "backbone.trust_remote_code=true" in caplog.text and "Traceback" not in caplog.text


def test_loads_with_trust_remote_code_and_takes_the_mask_id_from_the_config(remote_dlm: Path, tmp_path: Path) -> None:
    cfg = _trusted(remote_dlm, tmp_path)
    sampler = MaskedLMSampler.from_config(cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    config = json.loads((remote_dlm / "config.json").read_text())
    assert type(sampler.model).__name__ == "TinyDLMModelLM"  # the folder's own class, through AutoModel
    assert sampler.tokenizer.mask_token_id is None
    assert sampler.mask_id == config["mask_token_id"]
    state = sampler.initial_state([torch.Generator().manual_seed(0)] * 2)
    assert torch.equal(state, torch.full((2, 4), config["mask_token_id"]))
    # a greedy rollout reveals every position, never the mask id, and decodes to text
    prompts = PromptSet(["12+3=", "7-2="], [{"answer": 15}, {"answer": 5}])
    rewards = RewardSet.from_config({"num": RewardTermConfig(fn="numeric_match")}, "sum_then_normalize")
    rollout, table = evaluate(sampler, rewards, prompts, seed=0, seeds_per_prompt=1, batch_size=2)
    assert not bool((rollout.final_state == sampler.mask_id).any())
    assert all(isinstance(t, str) for t in rollout.samples) and table.raw["num"].shape == (2,)


def test_prompts_in_the_chat_template(remote_dlm: Path) -> None:
    tok = PreTrainedTokenizerFast.from_pretrained(remote_dlm)
    ids, mask = encode_prefix(tok, ["1+1="], 10, fill=2, chat_template=True)
    expected = tok.convert_tokens_to_ids(["[BOS]", "[U]", "1", "+", "1", "=", "[A]"])
    assert ids[0, -7:].tolist() == expected and mask[0].tolist() == [0, 0, 0] + [1] * 7
    plain, _ = encode_prefix(tok, ["1+1="], 10, fill=2)
    assert plain[0, -4:].tolist() == tok.convert_tokens_to_ids(["1", "+", "1", "="])


def test_bad_mask_tokens_are_refused(remote_dlm: Path, tmp_path: Path) -> None:
    cfg = _trusted(remote_dlm, tmp_path)
    from alignkit.modalities.discrete.mlm import load_masked_lm

    model, tok = load_masked_lm(cfg.backbone)
    model.config.mask_token_id = None
    with pytest.raises(ValueError, match="no mask token: the tokenizer has none"):
        MaskedLMSampler(model, tok, cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    tok.mask_token = "[U]"
    model.config.mask_token_id = tok.convert_tokens_to_ids(MASK)
    with pytest.raises(ValueError, match="differs from the model config's mask_token_id"):
        MaskedLMSampler(model, tok, cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")


def test_evaluation_with_more_steps(remote_dlm: Path, tmp_path: Path) -> None:
    cfg = _trusted(remote_dlm, tmp_path, "backbone.options.schedule=linear")
    sampler = MaskedLMSampler.from_config(cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    assert sampler.num_steps == 4 and sampler.reveal_counts.tolist() == [2, 1, 1, 0]
    with sampler.eval_settings(num_steps=5):
        assert sampler.num_steps == 5 and sampler.reveal_counts.tolist() == [1, 1, 1, 1, 0]
    assert sampler.num_steps == 4 and sampler.reveal_counts.tolist() == [2, 1, 1, 0]
    with pytest.raises(ConfigError, match=r"eval\.guidance=2\.0: the MaskedLMSampler backbone cannot"):
        with sampler.eval_settings(guidance=2.0):
            pass
    # before any model loads: a step count the generated region cannot take, and a setting text has no use for
    with pytest.raises(ConfigError) as info:
        _trusted(remote_dlm, tmp_path, "eval.resolution=[64,64]")
    assert "eval.resolution=[64, 64]: the MaskedLMSampler backbone cannot sample with another resolution" in str(
        info.value)
    with pytest.raises(ConfigError) as info:
        _trusted(remote_dlm, tmp_path, "eval.num_steps=9")
    msg = str(info.value)
    assert "evaluation sampling: eval.num_steps=9: each step" in msg and "use 2..5 steps" in msg


def digit_count(samples: list[str], prompts: list[str], metadata: list[dict]) -> list[float]:
    """A reward that varies between the random model's samples (so advantages are not all 0): digits written."""
    return [float(sum(c.isdigit() for c in s)) for s in samples]


def test_trains_lora_on_the_remote_model(remote_dlm: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "gsm.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n"
                               for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]))
    out = tmp_path / "run"
    code = main(["train", "arithmetic_tempflow_grpo", *_overrides(
        remote_dlm, out, "backbone.trust_remote_code=true", "prompts.source=file", f"prompts.train_file={prompts}",
        "reward=exact_match", "~reward.exact", "+reward.digits={fn: 'test_mlm_remote_code:digit_count'}",
        "train.epochs=1",
        "train.prompts_per_epoch=2", "train.rollout_batch_size=8", "train.train_batch_size=8", "eval.num_prompts=2",
        "eval.before_after=false", "algo.num_seeds=2", "algo.plan.options.children=2", "-q")])
    assert code == 0
    adapter = next((out / "checkpoints").iterdir()) / "trainable" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(adapter))
    assert weights and all(".q_proj." in k or ".k_proj." in k or ".v_proj." in k or ".attn_out." in k for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # the update moved LoRA B


def test_gradient_checkpointing_is_applied_or_refused(remote_dlm: Path, tmp_path: Path) -> None:
    cfg = _trusted(remote_dlm, tmp_path, "backbone.gradient_checkpointing=true")
    with pytest.raises(ValueError, match=r"backbone\.gradient_checkpointing=true: TinyDLMModelLM does not support"):
        MaskedLMSampler.from_config(cfg.backbone, step_kind="masked_confidence", noise_level=1.0, device="cpu")
    arithmetic = load_run_config("arithmetic_tempflow_grpo", ["backbone.gradient_checkpointing=true"])
    sampler = MaskedLMSampler.from_config(arithmetic.backbone, step_kind="masked_confidence", noise_level=1.0,
                                          device="cpu")
    assert sampler.model.is_gradient_checkpointing
