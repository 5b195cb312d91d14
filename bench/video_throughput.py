"""Video rollout and training throughput, and peak memory, with gradient checkpointing on and off.

For each model size, one Flow-GRPO epoch (every step but the last an SDE step; one prompt group of
``seeds`` clips per prompt) runs through :class:`alignkit.trainer.Trainer` with
``backbone.gradient_checkpointing`` false and true, alternating, each case in a fresh process (so that
one case's memory does not hide another's). Reported per case:

* rollout: clips/s and NFE/s of ``Trainer.rollout`` (sampling and VAE decoding, no grad);
* training: transitions/s of ``Trainer.optimize`` (policy forward with grad and CFG, reference forward for
  the KL, backward, optimiser step);
* peak memory of each phase above the memory held once the model is loaded (so the training peak includes
  the rollout's stored states), the highest over all epochs of the case: on CUDA
  ``torch.cuda.max_memory_allocated`` (reset before the phase), on CPU the resident set size sampled every
  2 ms by a thread (RSS: it also counts pages the allocator keeps after freeing them). "Per clip" divides
  the rollout peak by the clips sampled at once (``train.rollout_batch_size``) and the training peak by the
  transitions in one minibatch (``train.train_batch_size``).

Sizes: ``tiny`` (the moving-shapes model's architecture, 32 px, 9 frames), ``mid`` (a random Wan of 8 blocks
of width 384, 128 px, 33 frames; ``alignkit.modalities.video.tiny.WAN_MID``) and, with ``--wan-1-3b``, a random
Wan2.1-T2V-1.3B-sized model (30 blocks, 12 heads x 128, FFN 8960, text width 4096, 480 x 832 px, 81
frames; meant for a GPU). A case that runs out of memory is recorded as such. The ratios
``checkpointing on / off`` of training speed and memory are written with the results.

    python bench/video_throughput.py [--sizes tiny mid] [--wan-1-3b] [--reps N] [--threads 1]
                                     [--out bench/results/video_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench.video_throughput")

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"height": 32, "width": 32, "frames": 9, "steps": 8, "prompts": 2, "seeds": 4, "rollout_batch": 8,
             "train_batch": 8},
    "mid": {"height": 128, "width": 128, "frames": 33, "steps": 4, "prompts": 1, "seeds": 2, "rollout_batch": 2,
            "train_batch": 2},
    "wan-1.3b": {"height": 480, "width": 832, "frames": 81, "steps": 4, "prompts": 1, "seeds": 2,
                 "rollout_batch": 2, "train_batch": 1},
}


def build_pipeline(size: str) -> Any:
    """The random pipeline of ``size`` (flow-matching Euler scheduler), on CPU in float32."""
    from alignkit.modalities.video.tiny import WAN_1_3B, WAN_MID, build_tiny_wan_pipeline

    if size == "tiny":
        from alignkit.worlds.moving_shapes.model import build_shapes_video_pipeline

        return build_shapes_video_pipeline(seed=0)
    spec = {"mid": WAN_MID, "wan-1.3b": WAN_1_3B}[size]
    return build_tiny_wan_pipeline(seed=0, scheduler="euler", transformer_kwargs=spec["transformer"],
                                   vae_kwargs=spec["vae"])


class PeakMemory:
    """Peak memory (bytes) during a block above ``base``: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device, base: int) -> None:
        self.device = device
        self.base = base
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def current(device: torch.device) -> int:
        """Bytes held now: allocated CUDA memory, or the resident set size."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._max = self.current(self.device)

            def poll() -> None:
                while not self._stop.wait(0.002):
                    self._max = max(self._max, self.current(self.device))

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            top = max(self._max, self.current(self.device))
        self.peak = top - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(size: str, folder: str, checkpointing: bool, device: str, dtype: str, threads: int, reps: int,
             warmup: int) -> dict[str, Any]:
    """One (size, checkpointing) case in this process: ``warmup`` + ``reps`` epochs, medians of the reps."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    spec = SIZES[size]
    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config("shapes_video_tempflow_grpo", [
            f"backbone.pretrained={folder}", f"backbone.height={spec['height']}", f"backbone.width={spec['width']}",
            f"backbone.num_frames={spec['frames']}", f"backbone.num_steps={spec['steps']}",
            f"backbone.gradient_checkpointing={str(checkpointing).lower()}", f"backbone.dtype={dtype}",
            "backbone.max_sequence_length=16", "algo=flow_grpo", f"algo.num_seeds={spec['seeds']}",
            "reward=video_jpeg_compressibility", f"train.prompts_per_epoch={spec['prompts']}",
            f"train.rollout_batch_size={spec['rollout_batch']}", f"train.train_batch_size={spec['train_batch']}",
            "train.ema.enabled=false", "train.resume=false", "train.overlap_rewards=false",
            "eval.before_after=false", "eval.every=0", f"device={device}", f"output_dir={out}",
        ])
        trainer = Trainer(cfg, tensorboard=False)
        dev = torch.device(trainer.device)
        base = PeakMemory.current(dev)  # the loaded model (and, on CPU, the interpreter and libraries)
        rows = []
        for rep in range(warmup + reps):
            with PeakMemory(dev, base) as mem_rollout:
                t0 = time.perf_counter()
                rolled = trainer.rollout(rep)
                rollout = rolled.rollout
                _sync(dev)
                t_rollout = time.perf_counter() - t0
            gathered = trainer.score(rolled)
            credit = trainer.assign_credit(gathered).credit
            with PeakMemory(dev, base) as mem_train:
                t0 = time.perf_counter()
                trainer.optimize(rollout, gathered, credit, rep)
                _sync(dev)
                t_train = time.perf_counter() - t0
            clips, transitions = rollout.samples.shape[0], len(rollout.transitions)
            rows.append({"rollout_s": t_rollout, "train_s": t_train, "clips": clips, "transitions": transitions,
                         "nfe": rollout.nfe, "rollout_peak": mem_rollout.peak, "train_peak": mem_train.peak})
            del rolled, rollout, gathered, credit
    timed = rows[warmup:]
    med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    # memory: the highest level over every epoch (the first one allocates; later ones reuse freed pages)
    med["rollout_peak"] = max(r["rollout_peak"] for r in rows)
    med["train_peak"] = max(r["train_peak"] for r in rows)
    mb = 2.0**20
    return {
        "size": size, "gradient_checkpointing": checkpointing, "device": str(dev), "dtype": dtype,
        "threads": threads, "reps": reps, "transformer_params": sum(p.numel() for p in
                                                                    trainer.sampler.pipe.transformer.parameters()),
        "clips": med["clips"], "transitions": med["transitions"], "nfe": med["nfe"],
        "rollout_s": med["rollout_s"], "train_s": med["train_s"],
        "rollout_clips_per_s": med["clips"] / med["rollout_s"], "rollout_nfe_per_s": med["nfe"] / med["rollout_s"],
        "train_transitions_per_s": med["transitions"] / med["train_s"],
        "rollout_peak_mb": med["rollout_peak"] / mb, "train_peak_mb": med["train_peak"] / mb,
        "rollout_peak_mb_per_clip": med["rollout_peak"] / mb / spec["rollout_batch"],
        "train_peak_mb_per_clip": med["train_peak"] / mb / spec["train_batch"],
    }


def _child(queue: Any, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(run_case(**kwargs))
    except torch.cuda.OutOfMemoryError as exc:
        queue.put({"size": kwargs["size"], "gradient_checkpointing": kwargs["checkpointing"], "error": "out of memory",
                   "detail": str(exc).splitlines()[0]})
    except Exception as exc:  # reported in the results; the other cases still run
        queue.put({"size": kwargs["size"], "gradient_checkpointing": kwargs["checkpointing"],
                   "error": f"{type(exc).__name__}: {exc}"})


def run_in_process(**kwargs: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def ratios(off: dict[str, Any], on: dict[str, Any]) -> dict[str, float]:
    """Checkpointing on / off: training speed, training memory, rollout speed (expected ~1: no grad)."""
    if "error" in off or "error" in on:
        return {}
    return {
        "train_speed_on_over_off": on["train_transitions_per_s"] / off["train_transitions_per_s"],
        "train_memory_on_over_off": on["train_peak_mb"] / off["train_peak_mb"] if off["train_peak_mb"] > 0
        else float("nan"),
        "rollout_speed_on_over_off": on["rollout_clips_per_s"] / off["rollout_clips_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--wan-1-3b", action="store_true", help="add the Wan2.1-1.3B-sized random model (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--reps", type=int, default=None, help="measured epochs per case, median (default: 3 tiny, 1 "
                        "larger)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured epochs first (default: 1 tiny / CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results/video_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    sizes = list(args.sizes) + (["wan-1.3b"] if args.wan_1_3b else [])
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    results: dict[str, Any] = {"device": args.device, "dtype": dtype, "threads": args.threads, "sizes": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / size
            build_pipeline(size).save_pretrained(folder, safe_serialization=True)
            warmup = args.warmup if args.warmup is not None else int(size == "tiny" or args.device != "cpu")
            cases = {}
            for ckpt in (False, True):
                cases["on" if ckpt else "off"] = r = run_in_process(
                    size=size, folder=str(folder), checkpointing=ckpt, device=args.device, dtype=dtype,
                    threads=args.threads, reps=args.reps or (3 if size == "tiny" else 1), warmup=warmup)
                if "error" in r:
                    logger.info("%-8s ckpt %-3s %s", size, "on" if ckpt else "off", r["error"])
                else:
                    logger.info("%-8s ckpt %-3s rollout %6.2f clips/s  train %6.2f transitions/s  peak/clip "
                                "rollout %7.1f MB train %7.1f MB", size, "on" if ckpt else "off",
                                r["rollout_clips_per_s"], r["train_transitions_per_s"],
                                r["rollout_peak_mb_per_clip"], r["train_peak_mb_per_clip"])
            cases["ratios"] = ratios(cases["off"], cases["on"])
            logger.info("%-8s on/off: %s", size, json.dumps({k: round(v, 3) for k, v in cases["ratios"].items()}))
            results["sizes"][size] = cases
            shutil.rmtree(folder)
    results["seconds"] = time.perf_counter() - t_all
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    logger.info("written %s in %.0f s", args.out, results["seconds"])


if __name__ == "__main__":
    main()
