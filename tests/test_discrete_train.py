"""A tiny random masked LM trained for a few epochs through the Trainer: real effects, checkpoints peft loads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForMaskedLM
from weight_checks import lora_tensors

from alignkit.checkpoint import latest_checkpoint
from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.modalities.discrete.tiny import build_char_tokenizer, build_tiny_masked_lm, save_masked_lm
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.trainer import Trainer

pytestmark = pytest.mark.integration


def ones_fraction(samples: Sequence[str], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> list[float]:
    """A reward a random model already spreads: the fraction of '1' characters in the answer."""
    return [s.count("1") / max(len(s), 1) for s in samples]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = build_char_tokenizer()
    return save_masked_lm(build_tiny_masked_lm(tok, hidden=32, layers=1, heads=2, seed=0), tok,
                          tmp_path_factory.mktemp("mlm"))


def _trainer(recipe: str, model_dir: Path, out: Path, *extra: str) -> Trainer:
    overrides = [f"output_dir={out}", f"backbone.pretrained={model_dir}", "train.epochs=2",
                 "train.prompts_per_epoch=3", "train.rollout_batch_size=64", "train.train_batch_size=8",
                 "train.learning_rate=1e-2", "eval.before_after=false", "train.checkpoint_every=2",
                 "prompts.options.train_size=20", "prompts.options.eval_size=8", *extra]
    cfg = load_run_config(recipe, overrides)
    return Trainer(cfg, reward_set=RewardSet([RewardTerm("ones", ones_fraction, 1.0)]), tensorboard=False)


def _split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lora = lora_tensors(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, frozen


def test_tempflow_lora_run_trains_only_the_adapter(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = _trainer("arithmetic_tempflow_grpo", model_dir, out, "algo.objective.beta=0.05",
                       "backbone.options.scale=entropy")
    lora0, frozen0 = _split(trainer.sampler.model)
    assert lora0 and all(not p.requires_grad for n, p in trainer.sampler.model.named_parameters() if "lora_" not in n)
    state = trainer.train()
    assert state.epoch == 2 and state.global_step >= 4
    lora1, frozen1 = _split(trainer.sampler.model)
    unchanged = [n for n in lora0 if torch.equal(lora0[n], lora1[n])]
    assert not unchanged, f"LoRA tensors that did not train: {unchanged}"
    assert all(torch.equal(frozen0[n], frozen1[n]) for n in frozen0)
    rows = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in rows)
    assert rows[0]["train/first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["train/kl"] > 0  # the adapter moved the policy away from the reference
    # 3 prompts x 2 seeds x 4 branch steps x 4 children; trunk 4 + children 4 x (4 + 3 + 2 + 1) evaluations per seed
    assert rows[0]["rollout/samples"] == 96 and rows[0]["rollout/transitions"] == 96
    assert rows[0]["rollout/nfe"] == 6 * (4 + 4 * 10)

    # the checkpoint is a peft adapter: PeftModel loads it onto the base model and reproduces the policy
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    base = AutoModelForMaskedLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, ckpt / "trainable")
    ids = torch.tensor([[0, 0, 7, 11, 14, 8, 2, 2, 2, 2]])
    with torch.no_grad():
        expected = trainer.sampler.model(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected)
    # and the sampler's own loader restores it into a fresh sampler
    fresh = _trainer("arithmetic_tempflow_grpo", model_dir, tmp_path / "fresh")
    fresh.sampler.load_trainable(ckpt / "trainable")
    with torch.no_grad():
        torch.testing.assert_close(fresh.sampler.model(input_ids=ids).logits, expected)


def test_flow_grpo_full_finetune_keeps_the_reference_frozen(model_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer("arithmetic_flow_grpo", model_dir, tmp_path / "ft", "backbone.lora.enabled=false",
                       "algo.num_seeds=4", "algo.objective.beta=0.05")
    ref = trainer.sampler._reference_copy
    assert ref is not None
    before = {n: p.detach().clone() for n, p in trainer.sampler.model.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer.train()
    after = dict(trainer.sampler.model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved and len(moved) > len(before) // 2
    assert all(torch.equal(ref_before[n], p) for n, p in ref.named_parameters())
    rows = read_metrics(tmp_path / "ft" / "metrics.jsonl")
    # all-stochastic: 3 prompts x 4 seeds samples, each storing its 4 reveal steps (not the final identity step)
    assert rows[0]["rollout/samples"] == 12 and rows[0]["rollout/transitions"] == 48
    assert all(math.isfinite(r["train/loss"]) for r in rows) and rows[1]["train/kl"] > 0
    # the full fine-tune checkpoint (save_pretrained) loads back into a fresh sampler exactly
    fresh = _trainer("arithmetic_flow_grpo", model_dir, tmp_path / "fresh", "backbone.lora.enabled=false")
    fresh.sampler.load_trainable(latest_checkpoint(tmp_path / "ft") / "trainable")
    assert all(torch.equal(p, after[n].detach()) for n, p in fresh.sampler.model.named_parameters())
