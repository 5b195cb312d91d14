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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import alignkit.checkpoint as ckpt_mod
from alignkit.checkpoint import latest_checkpoint, load_checkpoint
from alignkit.cli import main
from alignkit.compose import list_recipes, load_run_config
from alignkit.config import ConfigError, CreditConfig
from alignkit.credit import GroupCredit
from alignkit.distributed import Shard
from alignkit.errors import CheckpointError, DistributedError, ModelLoadError, RewardError, RunFolderError
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.rewards.remote import RemoteReward
from alignkit.trainer import Trainer
from alignkit.types import SampleKeys

RECIPE = "sd3_tiny_flow_grpo"

# --- configuration: rejected before any model loads ----------------------------------------------------------

CONFIG_CASES: list[tuple[str, str, list[str], list[str]]] = [
    # (id, recipe, overrides, words the message must contain: the field, the bad value, the fix)
    ("unknown_config_group_option", RECIPE, ["algo=flow_grpp"],
     ["algo/flow_grpp", "Available options in 'algo'", "flow_grpo", "tempflow_grpo"]),
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
    ("missing_prompt_file", lambda tmp, m: ["prompts.source=file", f"prompts.train_file={tmp}/nope.txt"],
     FileNotFoundError, ["prompts.train_file=", "nope.txt", "no such file"]),
    ("bad_jsonl_prompt_row", lambda tmp, m: ["prompts.source=file",
                                             "prompts.train_file=" + _prompt_file(tmp, "p.jsonl", JSONL_BAD_ROW)],
     ValueError, ["p.jsonl:2", "'prompt' key"]),
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
    ("wrong_length", lambda: lambda s, p, m: [0.5] * (len(p) - 1), ValueError,
     ["reward 'r'", "returned 3 scores for 4 samples", "one per sample"]),
    ("strings", lambda: lambda s, p, m: ["good"] * len(p), ValueError,
     ["reward 'r'", "'good' (str) for sample 0", "return a float, or None"]),
    ("bools", lambda: lambda s, p, m: [True] * len(p), ValueError, ["reward 'r'", "(bool)"]),
    ("a_scalar", lambda: lambda s, p, m: 0.5, ValueError, ["reward 'r'", "returned float", "list of 4 floats"]),
    ("a_2d_tensor", lambda: lambda s, p, m: torch.zeros(len(p), 2), ValueError,
     ["reward 'r'", "shape (4, 2)", "return shape [4]"]),
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
