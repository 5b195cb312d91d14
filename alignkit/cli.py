"""The ``alignkit`` command.

    alignkit train [RECIPE] [key=value ...]    train (default recipe: ``default``)
    alignkit eval  [RECIPE] [key=value ...]    deterministic sampling of held-out prompts, reward table, grid
    alignkit list  [recipes|samplers|rewards|plans|steps|credit]
    alignkit serve-reward NAME [--host H] [--port P] [--kwargs JSON]    serve a reward over HTTP
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path

from alignkit.compose import DEFAULT_RECIPE, list_recipes, load_run_config
from alignkit.config import ConfigError
from alignkit.errors import AlignkitError, Interrupted

logger = logging.getLogger("alignkit")


def _split(args: list[str]) -> tuple[str, list[str]]:
    """First positional without ``=`` is the recipe; the rest are hydra overrides."""
    if args and "=" not in args[0] and not args[0].startswith(("~", "+")):
        return args[0], args[1:]
    return DEFAULT_RECIPE, args


def _register_plugins() -> None:
    """Import the core modules that register built-in plans, step kinds, credit and prompt sources."""
    import alignkit.credit
    import alignkit.flow
    import alignkit.plans
    import alignkit.prompts  # noqa: F401


def cmd_train(args: list[str]) -> int:
    from alignkit.checkpoint import latest_checkpoint
    from alignkit.trainer import Trainer

    recipe, overrides = _split(args)
    cfg = load_run_config(recipe, overrides)
    logger.info("recipe %s -> %s", recipe, cfg.output_dir)
    try:
        state = Trainer(cfg).train()
    except Interrupted as exc:  # stopped at a safe point by SIGINT / SIGTERM
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second signal, or one before training began
        last = latest_checkpoint(Path(cfg.output_dir))
        where = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written"
        logger.error("aborted; %s; rerun the same command to resume", where)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    last = state.history[-1] if state.history else {}
    logger.info("done: epoch %d, step %d, last reward %.4g; outputs in %s", state.epoch, state.global_step,
                last.get("reward/score_mean", math.nan), cfg.output_dir)
    return 0


def cmd_eval(args: list[str]) -> int:
    import torch

    from alignkit.build import build_sampler, resolve_device
    from alignkit.evaluation import evaluate
    from alignkit.prompts import load_prompts
    from alignkit.reward_set import RewardSet

    recipe, overrides = _split(args)
    cfg = load_run_config(recipe, overrides)
    _, eval_prompts = load_prompts(cfg.prompts)
    sampler = build_sampler(cfg, resolve_device(cfg.device))
    if cfg.eval.checkpoint:
        ckpt = Path(cfg.eval.checkpoint)
        sampler.load_trainable(ckpt / "trainable" if (ckpt / "trainable").is_dir() else ckpt)
    rewards = RewardSet.from_config({**cfg.reward, **cfg.eval.rewards}, cfg.algo.reward_aggregation)
    rollout, table = evaluate(sampler, rewards, eval_prompts, seed=cfg.eval.seed,
                              seeds_per_prompt=cfg.eval.seeds_per_prompt, batch_size=cfg.eval.batch_size,
                              limit=cfg.eval.num_prompts)
    out = Path(cfg.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(rollout.sample_prompts):
        rows.append({"prompt": prompt, **{k: float(v[i]) for k, v in table.raw.items()}})
    summary = {k: float(torch.nanmean(v)) for k, v in table.raw.items()}
    (out / "rewards.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    name = next(iter(table.raw))
    caps = [f"{p} | {name}={float(table.raw[name][i]):.3g}" for i, p in enumerate(rollout.sample_prompts)]
    sampler.save_samples(rollout.samples, caps, out / "grid.png")
    width = max(len(k) for k in summary)
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in summary.items()))  # noqa: T201 - the command's output
    logger.info("eval table and grid in %s", out)
    return 0


def cmd_list(args: list[str]) -> int:
    from alignkit import registry

    _register_plugins()
    what = args[0] if args else "recipes"
    tables = {"samplers": registry.SAMPLERS, "rewards": registry.REWARDS, "plans": registry.EXPLORATION_PLANS,
              "steps": registry.STEP_KINDS, "credit": registry.CREDIT_ASSIGNERS}
    if what == "recipes":
        names = list_recipes()
    elif what in tables:
        names = tables[what].names()
    else:
        raise ValueError(f"alignkit list {what!r}: choose one of recipes, {', '.join(tables)}")
    print("\n".join(names))  # noqa: T201 - the command's output
    return 0


def cmd_serve_reward(args: list[str]) -> int:
    from alignkit.config import RewardTermConfig
    from alignkit.reward_server import DEFAULT_MAX_REQUEST_BYTES, serve
    from alignkit.reward_set import resolve_reward

    parser = argparse.ArgumentParser(prog="alignkit serve-reward",
                                     description="Serve a reward over HTTP (protocol: alignkit.reward_protocol).")
    parser.add_argument("name", help="registry name (alignkit list rewards) or 'package.module:callable'")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8900, help="port to listen on (0: any free port)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="largest request body accepted, in MiB")
    ns = parser.parse_args(args)
    try:
        kwargs = json.loads(ns.kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kwargs {ns.kwargs!r} is not JSON ({exc}); e.g. '{{\"quality\": 90}}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--kwargs {ns.kwargs!r} must be a JSON object of keyword arguments")
    reward = resolve_reward(ns.name, RewardTermConfig(fn=ns.name, kwargs=kwargs))
    try:
        serve(reward, ns.host, ns.port, ns.name, max_request_bytes=int(ns.max_request_mb * 2**20))
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s; choose another --port or --host", ns.host, ns.port, exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignkit", description="RL alignment of diffusion and flow models.")
    parser.add_argument("command", choices=["train", "eval", "list", "serve-reward"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[RECIPE] [key=value ...]")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if ns.command in ("train", "eval") and ns.args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(__doc__ + "\nRECIPE is a name from `alignkit list recipes`; key=value pairs are hydra "
                         "overrides of any recipe field (e.g. train.epochs=4 algo=flow_grpo reward.jpeg.weight=0.5).\n")
        return 0
    _register_plugins()
    try:
        return {"train": cmd_train, "eval": cmd_eval, "list": cmd_list,
                "serve-reward": cmd_serve_reward}[ns.command](ns.args)
    except (ConfigError, AlignkitError, ValueError, FileNotFoundError, ImportError, KeyError) as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 128 + signal.SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
