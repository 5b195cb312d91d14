"""CPU epochs on shared cores: the default epoch and the ``sd3_tiny`` epoch, idle and beside competing processes.

Each measurement is a fresh ``python -m alignkit train RECIPE`` process (the OpenMP wait policy is fixed when
torch loads), timed by the run's own per-epoch clock (``time/epoch_s``; the median over the epochs after the
first). Competitors are single-threaded busy processes (a 384x384 fp32 matmul and tanh in a loop). Settings:

* ``alignkit``: nothing set; the ``alignkit`` command chooses threads (the usable CPUs) and OpenMP waiting
  (passive when other processes keep the CPUs busy at start; alignkit.cpu_threads);
* ``one_thread``: ``OMP_NUM_THREADS=1``;
* ``libgomp``: ``ALIGNKIT_OPENMP_CHOICE`` set so alignkit leaves libgomp's default waiting (the behaviour before
  alignkit.cpu_threads), measured beside two competitors only and in the first ``--libgomp-reps`` repetitions,
  to show what the choice fixes.

Repetitions are interleaved (every condition and setting once per repetition, the settings in a rotating order)
and ratios are paired within a repetition: ``alignkit / one_thread`` in each condition and ``alignkit beside k /
alignkit idle``. Each ratio's geometric mean and 95% interval come from a t interval on the log ratios.
Targets (issue 25): beside two competitors, alignkit / one_thread <= 1.0 at the interval's upper end and
alignkit beside two / alignkit idle <= 2.2.

    python bench/contention.py [--reps 5] [--recipes default sd3_tiny] [--out bench/results/contention.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from alignkit.provenance import environment
from alignkit.stats import mean_estimate

logger = logging.getLogger("bench.contention")

RECIPES: dict[str, list[str]] = {
    # the default recipe's epoch (no held-out evaluation inside the timed epochs)
    "default": ["default", "train.epochs=3", "eval.before_after=false", "eval.every=1000"],
    "sd3_tiny": ["sd3_tiny_flow_grpo", "train.epochs=6", "eval.before_after=false"],
}
SETTINGS: dict[str, dict[str, str]] = {
    "alignkit": {},
    "one_thread": {"OMP_NUM_THREADS": "1"},
    # before alignkit.cpu_threads: every usable CPU, libgomp's default waiting
    "libgomp": {"ALIGNKIT_OPENMP_CHOICE": "libgomp default (bench/contention.py)", "ALIGNKIT_CPUS_BUSY": "0"},
}
CONDITIONS = (0, 1, 2)  # competing busy processes
BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = torch.tanh(a @ a)\n"
CLEAN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ALIGNKIT_OPENMP_CHOICE", "ALIGNKIT_CPUS_BUSY",
         "MKL_NUM_THREADS")


def epoch_seconds(recipe: str, setting: str, workdir: Path) -> dict[str, float | str]:
    """One training process; the median epoch time after the first epoch, its thread settings and the load."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(SETTINGS[setting])
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "alignkit", "-q", "train", *RECIPES[recipe][:1], f"output_dir={out}",
           "train.resume=false", *RECIPES[recipe][1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "load_1min": load}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["time/epoch_s"] for r in rows if "time/epoch_s" in r]
    threads = json.loads((out / "environment.jsonl").read_text().splitlines()[-1])["threads"]
    return {"epoch_s": statistics.median(epochs[1:]), "epochs_s": epochs, "threads": threads["intra_op"],
            "wait": threads["wait"], "load_1min": load}


def ratio(pairs: list[tuple[float, float]]) -> dict[str, float | int | list[float] | None]:
    """Geometric mean of ``a / b`` over paired measurements with a t-based 95% interval on the log ratios."""
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    e = mean_estimate(logs)
    lo, hi = e.ci95

    def fin(v: float) -> float | None:
        return None if math.isnan(v) else round(math.exp(v), 4)

    return {"ratio": fin(e.mean), "ci95": [fin(lo), fin(hi)], "n": e.n, "per_rep": [round(a / b, 4) for a, b in pairs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--libgomp-reps", type=int, default=2,
                        help="repetitions that also time libgomp's default waiting (slow: 5-15x the others)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/contention.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = [(c, s) for c in CONDITIONS for s in ("alignkit", "one_thread")] + [(2, "libgomp")]
    results: dict[str, list[dict]] = {r: [] for r in args.recipes}
    env_start = environment()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for recipe in args.recipes:
                row: dict[str, dict] = {}
                for condition in CONDITIONS:
                    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(condition)]
                    try:
                        time.sleep(1.0 if busy else 0.0)
                        settings = [s for c, s in plan if c == condition
                                    and (s != "libgomp" or rep < args.libgomp_reps)]
                        k = rep % len(settings)
                        for setting in settings[k:] + settings[:k]:  # rotating order
                            m = epoch_seconds(recipe, setting, Path(tmp))
                            row[f"{setting}@{condition}"] = m
                            logger.info("rep %d %s %s beside %d: %s", rep, recipe, setting, condition,
                                        m.get("epoch_s", m.get("error")))
                    finally:
                        for p in busy:
                            p.kill()
                            p.wait()
                results[recipe].append(row)
                args.out.write_text(json.dumps({"partial": True, "runs": results}, indent=1))
    summary: dict[str, dict] = {}
    for recipe, rows in results.items():
        def pairs(a: str, b: str, rows: list[dict] = rows) -> list[tuple[float, float]]:
            return [(r[a]["epoch_s"], r[b]["epoch_s"]) for r in rows
                    if "epoch_s" in r.get(a, {}) and "epoch_s" in r.get(b, {})]

        s = {f"alignkit/one_thread beside {c}": ratio(pairs(f"alignkit@{c}", f"one_thread@{c}")) for c in CONDITIONS}
        s.update({f"alignkit beside {c} / alignkit idle": ratio(pairs(f"alignkit@{c}", "alignkit@0"))
                  for c in CONDITIONS[1:]})
        s["libgomp default/alignkit beside 2"] = ratio(pairs("libgomp@2", "alignkit@2"))
        s["median epoch_s"] = {key: statistics.median(r[key]["epoch_s"] for r in rows if "epoch_s" in r.get(key, {}))
                               for key in rows[0]}
        s["failures"] = sum("error" in m for r in rows for m in r.values())
        upper_t1 = s["alignkit/one_thread beside 2"]["ci95"][1]
        idle_ratio = s["alignkit beside 2 / alignkit idle"]["ratio"]
        s["targets"] = {"never slower than one thread beside 2 (CI upper end <= 1.0)":
                        upper_t1 is not None and upper_t1 <= 1.0,
                        "beside 2 within 2.2x idle": idle_ratio is not None and idle_ratio <= 2.2}
        summary[recipe] = s
    report = {"summary": summary, "runs": results, "reps": args.reps, "settings": SETTINGS, "recipes": RECIPES,
              "competitor": BUSY, "environment_start": env_start, "load_average_end": list(os.getloadavg())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    logger.info("%s\nwritten %s", json.dumps(summary, indent=1), args.out)


if __name__ == "__main__":
    main()
