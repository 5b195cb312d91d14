"""Two CPU processes (gloo) under ``accelerate launch`` give the update of one process with the same global
batch: each process rolls out half of the prompts, rewards and keys are gathered before advantages (global
std, seed groups, noise-aware weights over all transitions), and the gradient summed over processes equals
the one-process gradient of every global minibatch (uneven shares, gradient accumulation, a random subset of
steps per sample). Under ``train.sharding=fsdp`` (parameters, gradients and optimizer state sharded over
the two processes) the update is the same, and a sharded run stopped and resumed from its checkpoint ends
bit-identical to an uninterrupted one. TempFlow-GRPO's shared-input minibatches (whole branch-point groups, one
evaluation per distinct input) give the same update and the same counts under DDP and FSDP: a group lives on the
process that rolled out its trunk; the adaptive plan observes the gathered credit identically on every process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.checkpoint import latest_checkpoint
from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME
from alignkit.trainer import Trainer

pytestmark = pytest.mark.integration

COMMON = ["train.epochs=2", "train.prompts_per_epoch=4", "algo.num_seeds=2", "backbone.num_steps=4",
          "train.checkpoint_every=1", "train.sample_every=1000", "device=cpu", "train.learning_rate=1e-2",
          "train.ema.enabled=true", "~reward.jpeg_compressibility",
          "+reward.bright={fn: 'distributed_run:projection', weight: 1.0}"]
RUNS = {
    # 4 prompts x 2 seeds x 3 steps = 24 transitions, 2 of 3 kept per sample = 16; minibatches of 3 split unevenly
    "flow_grpo": ("sd3_tiny_flow_grpo", ["train.rollout_batch_size=4", "train.train_batch_size=3",
                                         "train.gradient_accumulation_steps=2", "algo.timestep_fraction=0.67",
                                         "algo.credit.std=global"]),
    # branch at steps 0..2 with 2 children: 48 one-transition samples, seed groups, noise-aware weights
    # shared inputs: 24 branch points of 2 children, minibatches of 5 groups (10 transitions)
    "tempflow_grpo": ("sd3_tiny_tempflow_grpo", ["train.rollout_batch_size=8", "train.train_batch_size=10",
                                                 "algo.plan.options.children=2", "train.inner_epochs=2"]),
    # sharded, shared inputs: groups of 3 children, one per minibatch of 4 (the other process runs a stand-in);
    # the adaptive plan (2 of the 3 steps per epoch) learns from the gathered credit on both processes; skip_tied on
    "tempflow_grpo_fsdp": ("sd3_tiny_tempflow_grpo", [
        "train.sharding=fsdp", "train.rollout_batch_size=8", "train.train_batch_size=4",
        "train.gradient_accumulation_steps=2", "algo.plan.name=adaptive", "~algo.plan.options.select",
        "algo.plan.options.children=3", "+algo.plan.options.budget=2", "+algo.plan.options.decay=0.5",
        "algo.objective.skip_tied=true"]),
    # sharded: minibatches of 2 rows, so a process often holds none of one (and runs a stand-in of weight 0);
    # held-out evaluation (EMA weights swapped in) samples on both processes every epoch; LoRA also on the
    # root module's own layer (proj_out, outside the sharded blocks); the one-process reference runs unsharded
    "flow_grpo_fsdp": ("sd3_tiny_flow_grpo", ["train.sharding=fsdp", "train.rollout_batch_size=4",
                                              "train.train_batch_size=2", "train.gradient_accumulation_steps=2",
                                              "eval.before_after=true", "eval.every=1", "eval.num_prompts=3",
                                              "backbone.lora.target_modules=[to_q,to_k,to_v,to_out.0,proj_out]"]),
}
RESUMED = "flow_grpo_fsdp"  # also trained by the pair as 1 epoch, then resumed for the second
COMPARED = ("reward/score_mean", "reward/bright_std", "rollout/samples", "rollout/transitions",
            "rollout/nfe", "train/loss", "train/kl", "train/grad_norm", "train/clip_fraction", "train/minibatches",
            "credit/zero_std_fraction", "global_step", "train/transitions_trained", "train/distinct_inputs",
            "train/inputs_evaluated", "train/tied_skipped", "cost/train_inputs", "cost/decodes", "cost/reward_calls",
            "cost/optimizer_steps", "cost/rollout_flops", "cost/decode_flops")


def _overrides(name: str, out: Path, epochs: int = 2, folder: str | None = None) -> list[str]:
    common = [o for o in COMMON if not o.startswith("train.epochs=")]
    return [f"output_dir={out / (folder or name)}", f"train.epochs={epochs}", *common, *RUNS[name][1]]


def _final(out: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    tensors = {f"lora.{k}": v for k, v in load_file(str(ckpt / "trainable" / LORA_WEIGHTS_NAME)).items()}
    tensors.update({k: v for k, v in load_file(str(ckpt / "state.safetensors")).items()
                    if k.startswith(("ema.", "optim."))})
    return tensors


def test_two_processes_match_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None, "accelerate's launcher is not installed next to this Python"
    two = tmp_path / "two"
    runs = [{"recipe": RUNS[n][0], "overrides": _overrides(n, two)} for n in RUNS]
    runs += [{"recipe": RUNS[RESUMED][0], "overrides": _overrides(RESUMED, two, epochs, folder="resumed")}
             for epochs in (1, 2)]
    # the first epoch under DDP, resumed under FSDP: checkpoints hold full tensors whatever the mode
    runs += [{"recipe": RUNS[RESUMED][0], "overrides": [*_overrides(RESUMED, two, epochs, folder="crossed"),
                                                         f"train.sharding={mode}"]}
             for epochs, mode in ((1, "ddp"), (2, "fsdp"))]
    here = Path(__file__).resolve().parent
    # a cache of its own: both processes need the tiny pipeline built (transformers writes model files on rank
    # 0 only once a process group exists, so rank 0 must build it for both)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(here.parent), str(here)]),
               ALIGNKIT_CACHE=str(tmp_path / "cache"))
    # accelerate's --cpu flag runs a single process (multi-CPU there means MPI); its torchrun-based launcher
    # (--multi_gpu) starts the two processes, and device=cpu makes them a gloo group (MULTI_CPU)
    proc = subprocess.Popen(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(Path(__file__).with_name("distributed_run.py")), json.dumps(runs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    one = tmp_path / "one"
    for name in RUNS:  # the one-process reference, in this process while the pair runs
        Trainer(load_run_config(RUNS[name][0], _overrides(name, one)), tensorboard=False).train()
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-5000:]
    assert "process 1 of 2: rolls out 2 of the 4 prompts per epoch" in log, log[-3000:]
    built = tmp_path / "cache" / "tiny-sd3"
    assert list((built / "text_encoder").glob("*.safetensors")) and not list(built.parent.glob("*.tmp*"))

    for name in RUNS:
        every1, every2 = (read_metrics(out / name / "metrics.jsonl") for out in (one, two))
        held = [(r1["eval/bright"], r2["eval/bright"]) for r1, r2 in zip(every1, every2, strict=True)
                if "eval/bright" in r1]
        # held-out evaluation: the processes sample and score 2 and 1 (+1 padding) of the 3 prompts, the means
        # are gathered
        assert len(held) == (3 if name == RESUMED else 0), (name, held)
        assert all(b == pytest.approx(a, rel=1e-4, abs=1e-7) for a, b in held), (name, held)
        for record in ("eval_before", "eval_00001", "eval_after") if name == RESUMED else ():
            # per-sample records: both processes' samples and files, the padding left out
            rec1, rec2 = ([json.loads(x) for x in (out / name / "eval" / f"{record}.jsonl").read_text().splitlines()]
                          for out in (one, two))
            assert [(r["prompt_id"], r["seed"]) for r in rec2] == [(p, 0) for p in range(3)], rec2
            assert all(b["rewards"]["bright"] == pytest.approx(a["rewards"]["bright"], rel=1e-4, abs=1e-7)
                       for a, b in zip(rec1, rec2, strict=True))
            assert all((two / name / "eval" / r["file"]).is_file() for r in rec2)
        rows1, rows2 = ([r for r in rows if r["epoch"] >= 1] for rows in (every1, every2))  # not eval_before
        assert [r["run/processes"] for r in rows2] == [2.0, 2.0] and rows1[0]["run/processes"] == 1.0
        for r1, r2 in zip(rows1, rows2, strict=True):
            for key in COMPARED:  # gathered rewards, global counts, summed gradients (grad_norm is pre-clip)
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-7), (name, key, r1[key], r2[key])
            plan = {k: v for k, v in r1.items() if k.startswith("plan/")}
            assert plan == pytest.approx({k: r2[k] for k in plan}, rel=1e-4, abs=1e-7), name
            if "fsdp" not in name:  # FSDP's stand-in rows (weight 0) are compute too
                assert r2["cost/train_flops"] == pytest.approx(r1["cost/train_flops"], rel=1e-9), name
            if "tempflow" in name:  # one evaluation per branch point, on the process that rolled out its trunk
                assert r1["train/distinct_inputs"] < r1["train/transitions_trained"], name
        a, b = _final(one / name), _final(two / name)
        assert a.keys() == b.keys()
        moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)  # LoRA B starts at 0
        # relative to each tensor's norm; measured ~1e-5: the text encoders' last bits differ with the
        # number of prompts encoded at once (4 on one process, 2 on each of two)
        worst = max((float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)), k) for k in a)
        assert worst[0] <= 1e-4, (name, worst)
        assert moved > 1e-3, (name, moved)

    assert "nothing to shard" in caplog.text, "the one-process fsdp reference should say it runs whole"
    rows = read_metrics(two / RESUMED / "metrics.jsonl")
    assert rows[0]["epoch"] == 0 and "eval/bright" in rows[0] and "eval/bright" in rows[-1]
    resumed, straight = _final(two / "resumed"), _final(two / RESUMED)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "a resumed sharded run differs"
    # the second launch resumed (a fresh start would have appended epochs 0, 1 and 2 again)
    assert [r["epoch"] for r in read_metrics(two / "resumed" / "metrics.jsonl")] == [0, 1, 2]
    crossed = _final(two / "crossed")
    assert [r["epoch"] for r in read_metrics(two / "crossed" / "metrics.jsonl")] == [0, 1, 2]
    worst = max(float((crossed[k] - straight[k]).norm() / straight[k].norm().clamp_min(1e-12)) for k in straight)
    assert worst <= 1e-4, worst  # DDP and FSDP sum the gradients in other orders
