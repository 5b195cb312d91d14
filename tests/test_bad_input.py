"""A catalogue of malformed inputs: each ends in a clear error that names what is wrong and how to fix it,
or (NaN / inf / None rewards) is masked and counted; no failure loses a checkpoint already written.

    pytest tests/test_bad_input.py                       # all (the trainer cases build the tiny SD3 pipeline)
    pytest tests/test_bad_input.py -m "not integration"  # configuration and reward cases only
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import alignkit.checkpoint as ckpt_mod
from alignkit.checkpoint import latest_checkpoint, load_checkpoint
from alignkit.cli import main
from alignkit.compose import list_recipes, load_run_config
from alignkit.config import ConfigError, CreditConfig, PromptsConfig, RewardTermConfig
from alignkit.credit import GroupCredit
from alignkit.distributed import Shard
from alignkit.errors import CheckpointError, DistributedError, ModelLoadError, RewardError, RunFolderError
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.prompts import load_prompts
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.rewards.remote import RemoteReward
from alignkit.trainer import Trainer
from alignkit.types import SampleKeys

RECIPE = "sd3_tiny_flow_grpo"

# --- configuration: rejected before any model loads ----------------------------------------------------------

CONFIG_CASES: list[tuple[str, str, list[str], list[str]]] = [
    # (id, recipe, overrides, words the message must contain: the field, the bad value, the fix)
    ("unknown_config_group_option", RECIPE, ["algo=flow_grpp"],
     ["algo=flow_grpp", "no option 'flow_grpp'", "Did you mean algo=flow_grpo?", "tempflow_grpo"]),
    ("unknown_setting", RECIPE, ["+train.epoch=3"], ["train.epoch", "unknown setting", "epochs"]),
    ("unknown_top_level_setting", RECIPE, ["+seeds=3"], ["seeds", "unknown setting", "seed"]),
    ("int_given_a_word", RECIPE, ["train.epochs=ten"], ["train.epochs", "'ten'", "expected int"]),
    ("float_given_a_word", RECIPE, ["train.learning_rate=fast"], ["train.learning_rate", "'fast'", "expected float"]),
    ("bool_given_a_word", RECIPE, ["train.resume=sometimes"], ["train.resume", "'sometimes'", "true or false"]),
    ("list_given_a_scalar", RECIPE, ["train.adam_betas=0.9"], ["train.adam_betas", "expected a list", "[a,b]"]),
    ("mapping_given_a_scalar", RECIPE, ["++algo.credit=seed"], ["algo.credit", "expected a mapping"]),
    ("negative_learning_rate", RECIPE, ["train.learning_rate=-0.001"], ["train.learning_rate=-0.001", "> 0"]),
    ("group_size_1", RECIPE, ["algo.num_seeds=1"], ["algo.num_seeds=1", ">= 2 samples", "2 or more"]),
    ("unknown_sharding", RECIPE, ["train.sharding=zero3"], ["train.sharding='zero3'", "ddp", "fsdp"]),
    ("fsdp_with_fp16", RECIPE, ["train.sharding=fsdp", "train.mixed_precision=fp16"],
     ["train.mixed_precision=fp16", "train.sharding=fsdp", "use bf16"]),
    ("rollout_batch_not_dividing_groups", RECIPE, ["train.rollout_batch_size=5"],
     ["train.rollout_batch_size=5", "16 samples", "prompts_per_epoch=4", "num_seeds=4", "pick a divisor"]),
    ("branch_step_outside_schedule", "sd3_tiny_tempflow_grpo",
     ["algo.plan.options.select=fixed", "+algo.plan.options.steps=[2,9]", "backbone.num_steps=6"],
     ["algo.plan.options.steps=[2, 9]", "outside the schedule", "0..4", "backbone.num_steps=6"]),
    ("one_sampling_step", RECIPE, ["backbone.num_steps=1"], ["backbone.num_steps=1", ">= 2 steps"]),
    ("resolution_not_multiple_of_8", RECIPE, ["backbone.height=100"], ["backbone.height=100", "multiple of 8"]),
    ("unknown_sampler", RECIPE, ["backbone.name=sd4"], ["backbone.name='sd4'", "unknown", "sd3", "flux"]),
    ("unknown_reward", RECIPE, ["reward.jpeg_compressibility.fn=jpeg_compressability"],
     ["reward.jpeg_compressibility.fn='jpeg_compressability'", "unknown", "jpeg_compressibility"]),
    ("unknown_step_kind", RECIPE, ["algo.step_kind=sde"], ["algo.step_kind='sde'", "flow_grpo", "cps"]),
    ("unknown_group_by", RECIPE, ["algo.credit.group_by=batch"], ["algo.credit.group_by='batch'", "'prompt'"]),
    ("clip_range_out_of_range", RECIPE, ["algo.objective.clip_range=1.5"], ["algo.objective.clip_range=1.5", "(0, 1)"]),
    ("timestep_fraction_zero", RECIPE, ["algo.timestep_fraction=0"], ["algo.timestep_fraction=0.0", "(0, 1]"]),
    ("negative_nonfinite_limit", RECIPE, ["train.max_nonfinite_steps=-1"],
     ["train.max_nonfinite_steps=-1", ">= 0", "NaN"]),
    ("keep_no_checkpoints", RECIPE, ["train.keep_checkpoints=0"], ["train.keep_checkpoints=0", ">= 1"]),
    ("unknown_mixed_precision", RECIPE, ["train.mixed_precision=fp8"], ["train.mixed_precision='fp8'", "bf16"]),
    ("unknown_device", RECIPE, ["device=tpu"], ["device='tpu'", "cuda"]),
    ("all_reward_weights_zero", RECIPE, ["reward.jpeg_compressibility.weight=0"], ["every weight is 0", "weight > 0"]),
    ("no_reward", RECIPE, ["~reward.jpeg_compressibility"], ["reward is empty", "reward=jpeg_compressibility"]),
    ("file_source_without_file", RECIPE, ["prompts.source=file"], ["prompts.train_file is required"]),
    # numbers: NaN passes `x <= 0` checks, so every range check and a walk over every float catch it
    ("nan_kl_weight", RECIPE, ["algo.objective.beta=nan"], ["algo.objective.beta=nan", "must be >= 0"]),
    ("inf_learning_rate", RECIPE, ["train.learning_rate=inf"], ["train.learning_rate=inf", "finite number"]),
    ("minus_inf_learning_rate", RECIPE, ["train.learning_rate=-inf"], ["train.learning_rate=-inf", "> 0"]),
    ("nan_reward_weight", RECIPE, ["reward.jpeg_compressibility.weight=nan"],
     ["reward.jpeg_compressibility.weight=nan", "finite number"]),
    ("nan_in_adam_betas", RECIPE, ["train.adam_betas=[nan,0.999]"], ["train.adam_betas=[nan, 0.999]", "[0, 1)"]),
    ("nan_noise_level", RECIPE, ["algo.noise_level=nan"], ["algo.noise_level=nan", "> 0"]),
    ("nan_guidance_scale", RECIPE, ["backbone.guidance_scale=nan"], ["backbone.guidance_scale=nan", ">= 0"]),
    ("nan_credit_eps", RECIPE, ["algo.credit.eps=nan"], ["algo.credit.eps=nan", "> 0"]),
    ("inf_max_grad_norm", RECIPE, ["train.max_grad_norm=inf"], ["train.max_grad_norm=inf", "finite number"]),
    ("nan_in_reward_kwargs", RECIPE, ["++reward.jpeg_compressibility.kwargs.quality=nan"],
     ["reward.jpeg_compressibility.kwargs.quality=nan", "finite number"]),
    ("int_too_large_for_a_float", RECIPE, ["train.learning_rate=1" + "0" * 400],
     ["train.learning_rate", "too large for a float"]),
    ("negative_seed", RECIPE, ["seed=-1"], ["seed=-1", "0..4294967295"]),
    ("seed_beyond_numpy", RECIPE, ["seed=4294967296"], ["seed=4294967296", "0..4294967295"]),
    ("negative_eval_seed", RECIPE, ["eval.seed=-5"], ["eval.seed=-5", "0..4294967295"]),
    ("zero_text_length", RECIPE, ["backbone.max_sequence_length=0"], ["backbone.max_sequence_length=0", ">= 1"]),
    ("cps_noise_level_above_1", RECIPE, ["algo.step_kind=cps", "algo.noise_level=1.5"],
     ["algo.noise_level=1.5", "step_kind=cps", "(0, 1]"]),
    ("reward_timeout_not_positive", RECIPE, ["+reward.jpeg_compressibility.timeout=0"],
     ["reward.jpeg_compressibility.timeout=0.0", "> 0", "null for no limit"]),
    ("reward_timeout_inf", RECIPE, ["+reward.jpeg_compressibility.timeout=inf"],
     ["reward.jpeg_compressibility.timeout=inf", "> 0"]),
    # devices
    ("device_gpu", RECIPE, ["device=gpu"], ["device='gpu'", "auto", "cpu", "cuda:N"]),
    ("device_cuda_x", RECIPE, ["device=cuda:x"], ["device='cuda:x'", "cuda:N"]),
    ("device_cpu_0_1", RECIPE, ["device=cpu:0:1"], ["device='cpu:0:1'", "cuda:N"]),
    # paths and prompts
    ("empty_output_dir", RECIPE, ["output_dir="], ["output_dir=''", "empty", "output_dir=outputs/my_run"]),
    ("missing_eval_checkpoint", RECIPE, ["eval.checkpoint=/no/such/checkpoint"],
     ["eval.checkpoint='/no/such/checkpoint'", "no such file or folder", "checkpoints/step-"]),
    ("missing_prompt_file", RECIPE, ["prompts.source=file", "prompts.train_file=/no/such/prompts.txt"],
     ["prompts.train_file='/no/such/prompts.txt'", "no such file", ".txt", ".jsonl", ".json"]),
    ("missing_eval_prompt_file", RECIPE, ["prompts.source=file", "prompts.train_file=/etc/hostname",
                                          "prompts.eval_file=/no/such/eval.jsonl"],
     ["prompts.eval_file='/no/such/eval.jsonl'", "no such file"]),
    ("prompt_file_is_a_folder", RECIPE, ["prompts.source=file", "prompts.train_file=/tmp"],
     ["prompts.train_file='/tmp'", "is a folder, not a file"]),
    ("blank_inline_prompt", RECIPE, ["prompts.train=[a red cube,' ',a cat]"],
     ["prompts.train[1]=' '", "blank prompt", "item 2", "remove it"]),
    ("empty_inline_eval_prompt", RECIPE, ["+prompts.eval=[a red cube,'']"], ["prompts.eval[1]=''", "blank prompt"]),
]


@pytest.mark.parametrize(("recipe", "overrides", "words"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_configuration_is_explained(recipe: str, overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:  # ConfigError is a ValueError, as are hydra composition errors
        load_run_config(recipe, overrides)
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)


def test_unknown_recipe_lists_the_recipes() -> None:
    with pytest.raises(ValueError) as info:
        load_run_config("sd3_tiny_flowgrpo")
    msg = str(info.value)
    assert "unknown recipe 'sd3_tiny_flowgrpo'" in msg and "Did you mean sd3_tiny_flow_grpo" in msg
    assert all(name in msg for name in list_recipes())


def test_prompts_not_divisible_by_the_processes() -> None:
    with pytest.raises(DistributedError) as info:
        Shard(rank=0, world_size=3).block(list(range(8)), "train.prompts_per_epoch")
    msg = str(info.value)
    for word in ("train.prompts_per_epoch=8", "3 processes", "multiple of 3", "6 or 9"):
        assert word in msg, (word, msg)


# --- run time, before training: model folder, prompt files, rewards' settings ---------------------------------


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import alignkit.modalities.image.sd3  # noqa: F401 - registers builtin:tiny-sd3 (else only a recipe's check does)

    root = tmp_path_factory.mktemp("models")
    source = Path(resolve_pretrained("builtin:tiny-sd3"))
    folders = {"empty": root / "empty"}
    folders["empty"].mkdir()
    for name in ("truncated", "garbage"):
        folders[name] = root / name
        shutil.copytree(source, folders[name])
        weights = next((folders[name] / "transformer").glob("*.safetensors"))
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3] if name == "truncated" else os.urandom(len(data)))
    return folders


def _prompt_file(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text(body)
    return str(path)


JSONL_BAD_ROW = '{"prompt": "a cat"}\n{"text": 1}\n'

RUNTIME_CASES: list[tuple[str, Callable[[Path, dict[str, Path]], list[str]], type[Exception], list[str]]] = [
    ("missing_model_folder", lambda tmp, m: [f"backbone.pretrained={tmp}/no_such_model"], FileNotFoundError,
     ["backbone.pretrained=", "no_such_model", "no such folder", "model_index.json"]),
    ("model_folder_without_index", lambda tmp, m: [f"backbone.pretrained={m['empty']}"], ModelLoadError,
     ["backbone.pretrained=", "model_index.json", "complete pipeline folder"]),
    ("truncated_safetensors", lambda tmp, m: [f"backbone.pretrained={m['truncated']}"], ModelLoadError,
     ["backbone.pretrained=", "diffusion_pytorch_model.safetensors", "re-download or re-save"]),
    ("corrupt_safetensors", lambda tmp, m: [f"backbone.pretrained={m['garbage']}"], ModelLoadError,
     ["backbone.pretrained=", "diffusion_pytorch_model.safetensors", "corrupt"]),
    ("empty_prompt_file", lambda tmp, m: ["prompts.source=file",
                                          f"prompts.train_file={_prompt_file(tmp, 'empty.txt', chr(10) * 3)}"],
     ValueError, ["prompts.train_file=", "empty.txt", "holds no prompts", "one prompt per line"]),
    ("bad_jsonl_prompt_row", lambda tmp, m: ["prompts.source=file",
                                             "prompts.train_file=" + _prompt_file(tmp, "p.jsonl", JSONL_BAD_ROW)],
     ValueError, ["prompts.train_file=", "p.jsonl", "line 2", "'prompt' key"]),
    ("reward_kwargs_that_do_not_fit", lambda tmp, m: ["+reward.jpeg_compressibility.kwargs.qualty=90"], ValueError,
     ["reward.jpeg_compressibility.kwargs=", "'qualty'", "do not fit"]),
    ("remote_reward_url_without_scheme", lambda tmp, m: ["+reward.r={fn: remote, kwargs: {url: 'scorer:8900'}}"],
     ValueError, ["url='scorer:8900'", "http://127.0.0.1:8900"]),
    ("lora_targets_matching_nothing", lambda tmp, m: ["backbone.lora.target_modules=[q_proj]"], ValueError,
     ["backbone.lora.target_modules=['q_proj']", "matched no layer", "to_q"]),
]


@pytest.mark.integration
@pytest.mark.parametrize(("make", "exc", "words"), [c[1:] for c in RUNTIME_CASES], ids=[c[0] for c in RUNTIME_CASES])
def test_bad_runtime_input_is_explained(make, exc: type[Exception], words: list[str], tmp_path: Path,
                                        model_folders: dict[str, Path]) -> None:
    cfg = load_run_config(RECIPE, [f"output_dir={tmp_path / 'run'}", *make(tmp_path, model_folders)])
    with pytest.raises(exc) as info:
        Trainer(cfg, tensorboard=False)
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)
    assert latest_checkpoint(tmp_path / "run") is None


# --- rewards: wrong outputs raise naming the reward; unscorable samples are masked and counted ---------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raises(samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
    raise KeyError("caption")


REWARD_ERRORS: list[tuple[str, Callable[[], Any], type[Exception], list[str]]] = [
    ("wrong_length", lambda: lambda s, p, m: [0.5] * (len(p) - 1), RewardError,
     ["reward 'r'", "returned 3 scores for 4 samples", "one per sample"]),
    ("strings", lambda: lambda s, p, m: ["good"] * len(p), RewardError,
     ["reward 'r'", "'good' (str) for sample 0", "return a float, or None"]),
    ("bools", lambda: lambda s, p, m: [True] * len(p), RewardError, ["reward 'r'", "(bool)"]),
    ("a_scalar", lambda: lambda s, p, m: 0.5, RewardError, ["reward 'r'", "returned float", "list of 4 floats"]),
    ("a_2d_tensor", lambda: lambda s, p, m: torch.zeros(len(p), 2), RewardError,
     ["reward 'r'", "shape (4, 2)", "return shape [4]"]),
    ("int_too_large_for_a_float", lambda: lambda s, p, m: [1.0, 10**400, 2.0, 3.0], RewardError,
     ["reward 'r'", "too large for a float for sample 1", "1329 bits", "return a float"]),
    ("nothing_returned", lambda: lambda s, p, m: None, RewardError,
     ["reward 'r'", "returned NoneType", "list of 4 floats"]),
    ("a_string_of_as_many_characters", lambda: lambda s, p, m: "good", RewardError,
     ["reward 'r'", "returned str", "list of 4 floats"]),
    ("a_dict", lambda: lambda s, p, m: {i: 1.0 for i in range(len(p))}, RewardError,
     ["reward 'r'", "returned dict", "list of 4 floats"]),
    ("complex_numbers", lambda: lambda s, p, m: [1j] * len(p), RewardError, ["reward 'r'", "1j (complex)"]),
    ("raises", lambda: _raises, RewardError, ["reward 'r' raised KeyError", "caption"]),
    ("remote_server_down", lambda: RemoteReward(f"http://127.0.0.1:{_free_port()}", retries=1, backoff=0.0,
                                                timeout=2.0), RewardError,
     ["reward 'r' raised RemoteRewardError", "http://127.0.0.1:", "/score failed 2 attempt(s)", "Connection"]),
]


@pytest.mark.parametrize(("make", "exc", "words"), [c[1:] for c in REWARD_ERRORS], ids=[c[0] for c in REWARD_ERRORS])
def test_bad_reward_output_is_explained(make, exc: type[Exception], words: list[str]) -> None:
    with pytest.raises(exc) as info:
        RewardSet([RewardTerm("r", make(), 1.0)]).score(torch.rand(4, 3, 8, 8), ["a"] * 4, [{}] * 4)
    msg = str(info.value)
    for word in words:
        assert word in msg, (word, msg)


class _Hangs:
    """A reward that blocks until released (a stuck lock or network call)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, samples: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        self.release.wait(60)
        self.finished.set()
        return [0.0] * len(prompts)


def test_hanging_reward_stops_at_its_timeout_naming_the_setting() -> None:
    hangs = _Hangs()
    (term,) = RewardSet.from_config({"judge": RewardTermConfig(fn="jpeg_compressibility", timeout=0.2)},
                                    "sum_then_normalize").terms
    assert term.timeout == 0.2  # the setting reaches the reward set
    rs = RewardSet([RewardTerm("judge", hangs, 1.0, timeout=0.2)])
    try:
        with pytest.raises(RewardError) as info:
            rs.score(torch.rand(4, 3, 8, 8), ["a"] * 4, [{}] * 4)
        msg = str(info.value)
        for word in ("reward 'judge' gave no scores within 0.2 s", "reward.judge.timeout=0.2", "cannot be killed"):
            assert word in msg, (word, msg)
        assert not hangs.finished.is_set()  # the caller stopped waiting; the call itself is still blocked
    finally:
        hangs.release.set()
    assert hangs.finished.wait(10)
    fast = RewardSet([RewardTerm("r", lambda s, p, m: [1.0] * len(p), 1.0, timeout=5.0)])
    assert fast.score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}]).raw["r"].tolist() == [1.0, 1.0]


def test_reward_call_with_timeout_keeps_the_callers_grad_mode() -> None:
    seen: list[bool] = []
    rs = RewardSet([RewardTerm("r", lambda s, p, m: seen.append(torch.is_grad_enabled()) or [1.0] * len(p), 1.0, 5.0)])
    with torch.no_grad():
        rs.score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
    rs.score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
    assert seen == [False, True]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None], ids=["nan", "inf", "-inf", "none"])
def test_unscorable_samples_are_masked_and_counted(bad: float | None) -> None:
    rs = RewardSet([RewardTerm("r", lambda s, p, m: [1.0, bad, 3.0, bad], 1.0)])
    table = rs.score(torch.rand(4, 3, 8, 8), ["a", "a", "b", "b"], [{}] * 4)
    assert table.invalid == {"r": 2}
    assert torch.isnan(table.raw["r"][[1, 3]]).all() and table.raw["r"][[0, 2]].tolist() == [1.0, 3.0]
    keys = SampleKeys(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0]), torch.full((4,), -1))
    credit = GroupCredit(CreditConfig())
    score = rs.aggregate(table, credit.groups(keys))
    from alignkit.types import Transitions

    tr = Transitions(torch.zeros(4, 1), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4),
                     torch.ones(4), torch.arange(4))
    c = credit.assign(score, keys, tr)
    assert c.mask.tolist() == [True, False, True, False]  # the masked samples' transitions do not train
    assert torch.isfinite(c.advantage).all()


# --- failures during a run ------------------------------------------------------------------------------------


def _run_overrides(out: Path, epochs: int) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=6", "backbone.num_steps=3",
            "train.checkpoint_every=1", "train.sample_every=1000", "train.keep_checkpoints=3"]


class Flaky:
    """A brightness reward that raises, or returns ``bad`` for some samples, from call ``start`` on."""

    def __init__(self, start: int, bad: str) -> None:
        self.start, self.bad, self.calls = start, bad, 0

    def __call__(self, samples: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> list[Any]:
        self.calls += 1
        scores: list[Any] = samples.flatten(1).mean(dim=1).tolist()
        if self.calls >= self.start:
            if self.bad == "raise":
                raise RuntimeError("scoring service returned HTTP 503")
            scores[0] = math.nan
            scores[1] = math.inf
        return scores


@pytest.mark.integration
def test_reward_that_raises_mid_run_stops_it_and_keeps_checkpoints(tmp_path: Path) -> None:
    cfg = load_run_config(RECIPE, _run_overrides(tmp_path, 3))
    trainer = Trainer(cfg, reward_set=RewardSet([RewardTerm("flaky", Flaky(2, "raise"), 1.0)]), tensorboard=False)
    with pytest.raises(RewardError, match=r"reward 'flaky' raised RuntimeError: scoring service returned HTTP 503"):
        trainer.train()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and load_checkpoint(ckpt)[1]["epoch"] == 1


@pytest.mark.integration
def test_nan_and_inf_rewards_during_a_run_are_masked_and_counted(tmp_path: Path) -> None:
    cfg = load_run_config(RECIPE, _run_overrides(tmp_path, 2))
    trainer = Trainer(cfg, reward_set=RewardSet([RewardTerm("flaky", Flaky(2, "nan"), 1.0)]), tensorboard=False)
    trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["reward/flaky_invalid"] for r in rows] == [0.0, 2.0]
    assert [r["credit/masked_transitions"] for r in rows] == [0.0, 2.0 * 2]  # 2 samples x 2 trained steps
    assert all(math.isfinite(r["reward/flaky_mean"]) and math.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.integration
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = ckpt_mod.save_file
    writes = {"n": 0}

    def fills_up(tensors: dict[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any) -> None:
        writes["n"] += 1
        if writes["n"] >= 2:
            with open(filename, "wb") as f:  # a partial file, then the disk is full
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_file", fills_up)
    code = main(["train", RECIPE, *_run_overrides(tmp_path, 3)])
    assert code == 2
    first = tmp_path / "checkpoints" / "step-00000002"  # 2 optimizer steps per epoch
    for words in ("could not write checkpoint step-00000004", "No space left on device", str(first), "intact",
                  "free disk space"):
        assert words in caplog.text, words
    assert "Traceback" not in caplog.text
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert latest_checkpoint(tmp_path) == first
    tensors, meta = load_checkpoint(first)
    assert meta["epoch"] == 1 and any(k.startswith("optim.") for k in tensors)


@pytest.mark.integration
def test_corrupt_checkpoint_weights_on_resume(tmp_path: Path) -> None:
    Trainer(load_run_config(RECIPE, _run_overrides(tmp_path, 1)), tensorboard=False).train()
    ckpt = latest_checkpoint(tmp_path)
    lora = ckpt / "trainable" / LORA_WEIGHTS_NAME
    lora.write_bytes(b"\x07" * lora.stat().st_size)  # same size: the manifest cannot tell
    with pytest.raises(CheckpointError) as info:  # when the trainer opens the checkpoint, before any work
        Trainer(load_run_config(RECIPE, _run_overrides(tmp_path, 2)), tensorboard=False)
    msg = str(info.value)
    assert str(ckpt) in msg and "trainable weights cannot be loaded" in msg and "delete the folder" in msg


@pytest.mark.integration
def test_resume_with_other_prompts_is_refused(tmp_path: Path) -> None:
    """Changed prompts: in the configuration, the resume check lists the field; in a prompt file whose path is
    unchanged, the checkpoint's prompt fingerprint catches it. Either way nothing trains, and the fixes are a
    new output_dir or an explicit train.resume=force."""
    Trainer(load_run_config(RECIPE, _run_overrides(tmp_path, 1)), tensorboard=False).train()
    cfg = load_run_config(RECIPE, [*_run_overrides(tmp_path, 2), "prompts.train=[a red cube,a blue cone]"])
    with pytest.raises(RunFolderError) as info:
        Trainer(cfg, tensorboard=False)
    msg = str(info.value)
    assert "prompts.train" in msg and "a red cube" in msg and "new folder" in msg and "train.resume=force" in msg

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na green pear\n")
    run = [*_run_overrides(tmp_path / "file", 1), "prompts.source=file", f"prompts.train_file={prompts}"]
    Trainer(load_run_config(RECIPE, run), tensorboard=False).train()
    prompts.write_text("a red cube\na blue cone\n")  # the same setting, other prompts
    run = [*_run_overrides(tmp_path / "file", 2), "prompts.source=file", f"prompts.train_file={prompts}"]
    with pytest.raises(CheckpointError) as info:
        Trainer(load_run_config(RECIPE, run), tensorboard=False)
    msg = str(info.value)
    assert "other training prompts" in msg and "new output_dir" in msg and "train.resume=force" in msg


def test_config_error_type() -> None:
    """Configuration problems are reported all at once, as one ConfigError."""
    with pytest.raises(ConfigError) as info:
        load_run_config(RECIPE, ["algo.num_seeds=1", "train.keep_checkpoints=0"])
    assert len(info.value.problems) == 2


def test_every_non_finite_number_is_listed_once_and_together() -> None:
    overrides = ["algo.objective.beta=nan", "train.learning_rate=inf", "reward.jpeg_compressibility.weight=-inf",
                 "algo.objective.adv_clip=nan", "device=gpu", "seed=-1"]
    with pytest.raises(ConfigError) as info:
        load_run_config(RECIPE, overrides)
    problems = info.value.problems
    starts = ["algo.objective.beta=nan", "train.learning_rate=inf", "reward.jpeg_compressibility.weight=-inf",
              "algo.objective.adv_clip=nan", "device='gpu'", "seed=-1"]
    assert sorted(p.split(":")[0] for p in problems) == sorted(starts), problems


# --- paths and devices, checked before any model loads ----------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_one_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for out, words in ((afile, ["is a file, not a folder"]), (afile / "run", ["cannot be created", "is a file"])):
        with pytest.raises(ConfigError) as info:
            load_run_config(RECIPE, [f"output_dir={out}"])
        assert f"output_dir='{out}'" in str(info.value) and "choose another output_dir" in str(info.value)
        for word in words:
            assert word in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_output_dir_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"output_dir='.*locked/run' is not writable .*you can write to"):
            load_run_config(RECIPE, [f"output_dir={locked / 'run'}"])
    finally:
        locked.chmod(0o700)


def test_tilde_is_expanded_once_for_the_checks_and_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts.txt").write_text("a red cube\ntwo dogs\n")
    (tmp_path / "ckpt").mkdir()
    # hydra's override grammar needs a leading ~ quoted (unquoted, ~key deletes a key)
    cfg = load_run_config(RECIPE, ["output_dir='~/runs/a'", "prompts.source=file",
                                   "prompts.train_file='~/prompts.txt'", "eval.checkpoint='~/ckpt'"])
    assert cfg.output_dir == str(tmp_path / "runs" / "a")
    assert cfg.prompts.train_file == str(tmp_path / "prompts.txt") and cfg.eval.checkpoint == str(tmp_path / "ckpt")
    assert load_prompts(cfg.prompts)[0].prompts == ["a red cube", "two dogs"]
    with pytest.raises(ConfigError, match=r"prompts.train_file='.*/nope.txt': no such file"):
        load_run_config(RECIPE, ["prompts.source=file", "prompts.train_file='~/nope.txt'"])


def test_cuda_without_a_gpu_is_an_error_not_a_cpu_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            load_run_config(RECIPE, [f"device={device}"])
        msg = str(info.value)
        for word in (f"device='{device}'", "no usable CUDA GPU", "device=cpu", "device=auto"):
            assert word in msg, (word, msg)
    assert load_run_config(RECIPE, ["device=auto"]).device == "auto"


def test_cuda_index_beyond_the_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device='cuda:2': this machine has 2 CUDA GPUs \(cuda:0..cuda:1\)"):
        load_run_config(RECIPE, ["device=cuda:2"])
    assert load_run_config(RECIPE, ["device=cuda:1"]).device == "cuda:1"


# --- prompt files: read what the user meant, or say which line is wrong ----------------------------------------


PROMPT_FILE_CASES: list[tuple[str, str, bytes, list[str]]] = [
    # (id, file name, content, words of the message besides the setting and the file)
    ("not_utf8", "latin1.txt", "a red cube\nun caf\xe9\n".encode("latin-1"),
     ["not UTF-8", "byte 0xe9 on line 2", "save the file as UTF-8"]),
    ("blank_line_between_prompts", "gap.txt", b"a red cube\n\ntwo dogs\n", ["line 2 is blank", "remove it"]),
    ("whitespace_line", "spaces.txt", b"a red cube\n   \ntwo dogs", ["line 2 is blank"]),
    ("jsonl_empty_prompt", "p.jsonl", b'{"prompt": "a cat"}\n{"prompt": ""}\n', ["line 2", "blank"]),
    ("jsonl_blank_line", "gap.jsonl", b'{"prompt": "a"}\n\n{"prompt": "b"}\n', ["line 2 is blank"]),
    ("jsonl_row_not_an_object", "list.jsonl", b'["a cat"]\n', ["line 1", "'prompt' key", "got list"]),
    ("json_object", "obj.json", b'{"prompts": ["a cat"]}', ["must hold an array", "got dict"]),
    ("json_numbers", "nums.json", b"[1, 2]", ["item 1", "expected a prompt string", "got int"]),
    ("json_blank_prompt", "blank.json", b'["a cat", " "]', ["item 2", "blank"]),
    ("json_without_prompt_key", "keys.json", b'[{"text": "a cat"}]', ["item 1", "'prompt' key", "found keys: text"]),
    ("json_invalid", "broken.json", b'["a cat",', ["invalid JSON", "array of strings"]),
    ("json_empty_array", "empty.json", b"[]", ["holds no prompts", "add prompts to its array"]),
]


@pytest.mark.parametrize(("name", "content", "words"), [c[1:] for c in PROMPT_FILE_CASES],
                         ids=[c[0] for c in PROMPT_FILE_CASES])
def test_bad_prompt_file_is_explained_by_the_command(name: str, content: bytes, words: list[str], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code = main(["train", RECIPE, f"output_dir={tmp_path / 'run'}", "prompts.source=file",
                 f"prompts.train_file={path}"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Traceback" not in caplog.text, caplog.text
    for word in [f"prompts.train_file='{path}'", *words]:
        assert word in errors[0], (word, errors[0])
    assert not (tmp_path / "run").exists()  # refused before the run folder or any model


def test_prompt_files_with_bom_json_arrays_and_trailing_blank_lines(tmp_path: Path) -> None:
    bom = "\ufeff".encode()
    files = {
        "bom.txt": bom + b"a red cube\r\ntwo dogs\r\n\r\n",
        "bom.jsonl": bom + b'{"prompt": "a red cube"}\n{"prompt": "two dogs", "tag": "counting"}\n\n',
        "strings.json": bom + b'["a red cube", "two dogs"]',
        "objects.json": b'[{"prompt": "a red cube"}, {"prompt": "two dogs", "tag": "counting"}]',
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        cfg = PromptsConfig(source="file", train_file=str(tmp_path / name))
        train, evaluation = load_prompts(cfg)
        assert train.prompts == ["a red cube", "two dogs"], name
        assert evaluation is train
        if name in ("bom.jsonl", "objects.json"):
            assert train.metadata == [{}, {"tag": "counting"}]


# --- user reward code: one line naming the setting, the module and the cause -----------------------------------


USER_CODE_CASES: list[tuple[str, str, list[str]]] = [
    ("syntax_error", "def score(samples, prompts, metadata):\n    return [1.0 for _ in prompts]\nx = (\n",
     ["has a syntax error at", "{file}:3", "never closed", "fix the file"]),
    ("raises_at_import", "import math\nSCALE = 1 / 0\n\ndef score(samples, prompts, metadata):\n    return []\n",
     ["raised ZeroDivisionError while it was imported", "{file}:2", "division by zero", "fix the module"]),
    ("exits_at_import", "import sys\nsys.exit('run me as a script')\n",
     ["raised SystemExit while it was imported", "{file}:2", "run me as a script"]),
    ("missing_attribute", "def other(samples, prompts, metadata):\n    return []\n\ndef helper():\n    pass\n",
     ["has no attribute 'score'", "it defines: helper, other"]),
    ("missing_dependency", "import alignkit_no_such_dependency\n",
     ["it imports 'alignkit_no_such_dependency'", "not installed", "{file}:1", "install it"]),
]


@pytest.mark.parametrize(("source", "words"), [c[1:] for c in USER_CODE_CASES], ids=[c[0] for c in USER_CODE_CASES])
def test_broken_user_reward_code_is_one_clear_line(source: str, words: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    module = f"alignkit_user_reward_{abs(hash(source)) % 10**8}"
    path = tmp_path / f"{module}.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", RECIPE, f"output_dir={tmp_path / 'run'}", f"+reward.mine={{fn: '{module}:score'}}"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text, caplog.text
    for word in [f"reward.mine.fn='{module}:score'", f"module '{module}'", *words]:
        word = word.replace("{file}", str(path))
        assert word in errors[0], (word, errors[0])


def test_missing_user_module_in_the_current_folder_says_how_to_import_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alignkit_cwd_reward.py").write_text("def score(s, p, m):\n    return [0.0] * len(p)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ImportError) as info:
        RewardSet.from_config({"mine": RewardTermConfig(fn="alignkit_cwd_reward:score")}, "sum_then_normalize")
    msg = str(info.value)
    for word in ("reward.mine.fn='alignkit_cwd_reward:score'", "no module named 'alignkit_cwd_reward'",
                 "is in the current folder", "PYTHONPATH=."):
        assert word in msg, (word, msg)


def test_user_function_kwargs_that_do_not_fit_are_refused_when_built(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alignkit_kw_reward.py").write_text("def score(samples, prompts, metadata, target=0.5):\n"
                                                    "    return [target] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    term = RewardTermConfig(fn="alignkit_kw_reward:score", kwargs={"targte": 0.7})
    with pytest.raises(ValueError, match=r"reward.mine.kwargs=\{'targte': 0.7\} do not fit .*'targte'"):
        RewardSet.from_config({"mine": term}, "sum_then_normalize")


# --- secrets: env:VAR kwargs are read when the reward is built and never saved ----------------------------------


def test_env_kwargs_are_resolved_at_build_time_and_the_config_keeps_the_reference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alignkit_env_reward.py").write_text(
        "class Keyed:\n    def __init__(self, key, opts):\n        self.key, self.opts = key, opts\n"
        "    def __call__(self, samples, prompts, metadata):\n        return [float(len(self.key))] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "s3cret-value")
    term = RewardTermConfig(fn="alignkit_env_reward:Keyed",
                            kwargs={"key": "env:ALIGNKIT_TEST_KEY", "opts": {"nested": ["env:ALIGNKIT_TEST_KEY"]}})
    reward = RewardSet.from_config({"mine": term}, "sum_then_normalize").terms[0].fn
    assert reward.key == "s3cret-value" and reward.opts == {"nested": ["s3cret-value"]}
    assert term.kwargs["key"] == "env:ALIGNKIT_TEST_KEY"  # the configuration keeps the reference
    monkeypatch.delenv("ALIGNKIT_TEST_KEY")
    with pytest.raises(ValueError) as info:
        RewardSet.from_config({"mine": term}, "sum_then_normalize")
    msg = str(info.value)
    for word in ("reward.mine.kwargs.key='env:ALIGNKIT_TEST_KEY'", "ALIGNKIT_TEST_KEY is not set",
                 "export ALIGNKIT_TEST_KEY="):
        assert word in msg, (word, msg)
