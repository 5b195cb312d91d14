"""Metrics reach accelerate's trackers (``train.log_with``, TensorBoard by default) besides ``metrics.jsonl``:
TensorBoard's own reader finds every scalar of ``metrics.jsonl`` at its epoch, once, also after a resume
that trains epochs again. Unknown trackers and uninstalled ones are refused in validation."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from alignkit.checkpoint import list_checkpoints
from alignkit.compose import load_run_config
from alignkit.config import ConfigError
from alignkit.metrics import read_metrics
from alignkit.trainer import Trainer

RECIPE = "sd3_tiny_flow_grpo"


def _scalars(folder: Path) -> dict[str, dict[int, list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(tag, {}).setdefault(event.step, []).append(event.value)
    return out


@pytest.mark.integration
def test_tensorboard_scalars_equal_metrics_jsonl_also_after_a_resume(tmp_path: Path) -> None:
    run = [f"output_dir={tmp_path}", "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4",
           "train.train_batch_size=3", "backbone.num_steps=3", "train.checkpoint_every=2",
           "train.sample_every=1000", "eval.before_after=true", "eval.num_prompts=2"]
    Trainer(load_run_config(RECIPE, [*run, "train.epochs=3"])).train()  # default train.log_with: [tensorboard]
    # a crash after epoch 3's metrics were logged but before its checkpoint: the resume trains epoch 3 again
    shutil.rmtree(list_checkpoints(tmp_path)[-1])
    Trainer(load_run_config(RECIPE, [*run, "train.epochs=4"])).train()

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    events = _scalars(tmp_path / "tensorboard" / "alignkit")
    expected = {(k, r["step"]): v for r in rows for k, v in r.items() if k != "step"}
    found = {(tag, step): values for tag, by_step in events.items() for step, values in by_step.items()}
    assert found.keys() == expected.keys()
    for (tag, step), values in found.items():
        assert len(values) == 1, (tag, step, values)  # the first run's epoch 3 was superseded
        want = float(np.float32(expected[tag, step]))  # TensorBoard stores float32
        assert values[0] == want or (math.isnan(want) and math.isnan(values[0])), (tag, step, values[0], want)
    assert {"reward/score_mean", "train/loss", "eval/jpeg_compressibility", "time/epoch_s"} <= events.keys()


@pytest.mark.parametrize(("log_with", "words"), [
    ("[tensorboard,mlflw]", ["train.log_with", "unknown tracker 'mlflw'", "mlflow"]),
    ("[tensorboard,tensorboard]", ["train.log_with", "named twice"]),
])
def test_unknown_trackers_are_refused(log_with: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(RECIPE, [f"train.log_with={log_with}"])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_uninstalled_tracker_names_the_extra_to_install() -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"train\.log_with: the wandb tracker needs the wandb package.*"
                                          r"pip install 'alignkit\[wandb\]'"):
        load_run_config(RECIPE, ["train.log_with=[wandb]"])
    assert load_run_config(RECIPE, ["train.log_with=[]"]).train.log_with == []
