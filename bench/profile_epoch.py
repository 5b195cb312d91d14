"""Where the default epoch spends its CPU time, and how close it runs to the machine's matmul throughput.

One warm-up epoch of the default recipe, then ``--epochs`` epochs under ``torch.profiler`` (self CPU time per
operator, grouped into matrix products, element-wise ops, attention, normalisation, convolutions (the VAE) and
the rest). The roofline is the best fp32 matmul throughput of square products (512-2048) at the run's thread
count; the epoch's throughput is its model FLOPs (``cost/flops``, counted by alignkit.cost) over its wall time,
measured in separate epochs without the profiler.

    python bench/profile_epoch.py [--epochs 2] [--out bench/results/profile_epoch.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from alignkit.cpu_threads import prepare_openmp

prepare_openmp()  # before torch loads, as the alignkit command does

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from alignkit.compose import load_run_config  # noqa: E402
from alignkit.metrics import read_metrics  # noqa: E402
from alignkit.provenance import environment  # noqa: E402
from alignkit.trainer import Trainer  # noqa: E402

logger = logging.getLogger("bench.profile_epoch")

CATEGORIES = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::softmax", "aten::_softmax"),
    "normalisation": ("aten::native_layer_norm", "aten::native_group_norm", "aten::native_layer_norm_backward",
                      "aten::native_group_norm_backward"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "element-wise": ("aten::copy_", "aten::mul", "aten::add", "aten::gelu", "aten::silu", "aten::cat", "aten::fill_",
                     "aten::div", "aten::sub", "aten::add_", "aten::mul_", "aten::where", "aten::exp", "aten::neg",
                     "aten::sum", "aten::mean", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::clamp",
                     "aten::gelu_backward", "aten::silu_backward", "aten::index", "aten::_index_put_impl_"),
}


def category(op: str) -> str:
    for name, prefixes in CATEGORIES.items():
        if op.startswith(prefixes):
            return name
    return "other"


def matmul_roofline(threads: int) -> dict[str, float]:
    """GFLOP/s of fp32 square matmuls at ``threads`` threads (best of 512, 1024, 2048)."""
    out: dict[str, float] = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        reps = max(3, int(4e9 / (2 * n ** 3)))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[str(n)] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timed-epochs", type=int, default=4, help="epochs timed without the profiler")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_epoch.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        total = 1 + args.timed_epochs + args.epochs
        cfg = load_run_config("default", [f"output_dir={tmp}/run", "train.resume=false", f"train.epochs={total}",
                                          "eval.before_after=false", "eval.every=100000",
                                          f"train.checkpoint_every={total}", f"train.sample_every={total}"])
        trainer = Trainer(cfg, tensorboard=False)
        env = environment()
        cfg.train.epochs = 1 + args.timed_epochs
        trainer.train()  # warm-up and timed epochs
        rows = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "time/epoch_s" in r][1:]
        epoch_s = sorted(r["time/epoch_s"] for r in rows)[len(rows) // 2]
        flops = rows[-1]["cost/flops"]
        cfg.train.epochs = total
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
    ops = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in ops)
    shares: dict[str, float] = {}
    for e in ops:
        shares[category(e.key)] = shares.get(category(e.key), 0.0) + e.self_cpu_time_total / self_total
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:20]
    roof = matmul_roofline(torch.get_num_threads())
    best = max(roof.values())
    report = {
        "epoch_s_median": epoch_s, "flops_per_epoch": flops, "gflops_per_s": flops / epoch_s / 1e9,
        "matmul_roofline_gflops_per_s": roof, "fraction_of_roofline": flops / epoch_s / 1e9 / best,
        "self_cpu_share": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top],
        "environment": env, "load_average_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    logger.info("%.2f s per epoch, %.0f GFLOP/s = %.0f%% of %.0f GFLOP/s; shares %s; written %s", epoch_s,
                report["gflops_per_s"], 100 * report["fraction_of_roofline"], best,
                {k: round(v, 3) for k, v in report["self_cpu_share"].items()}, args.out)


if __name__ == "__main__":
    main()
