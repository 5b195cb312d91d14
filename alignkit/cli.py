"""The ``alignkit`` command.

    alignkit train [RECIPE] [KEY=VALUE ...]    train (default recipe: ``default``)
    alignkit eval  [RECIPE] [KEY=VALUE ...]    deterministic sampling of held-out prompts, reward table, grid
    alignkit show  [RECIPE] [KEY=VALUE ...]    print the composed, validated configuration as YAML
    alignkit list  [KIND]                      recipes, config group options, registered components
    alignkit serve-reward NAME [--host H] [--port P] [--kwargs JSON]    serve a reward over HTTP
    alignkit report RUN_DIR [-o HTML]          a self-contained report.html of a run
    alignkit compare RUN [RUN ...] [--axis epoch|nfe|flops|time|cpu]    runs grouped by recipe, at equal compute
    alignkit --version

RECIPE is a shipped recipe name (``alignkit list``) or a path to your own YAML recipe file; options
(``-q``, ``-v``) go before or after it. Without arguments the command prints its help and exits with status 2
(argparse's convention for a missing command: a script that ran a bare ``alignkit`` must not look successful).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alignkit.compose import (
    CONFIG_GROUPS,
    DEFAULT_RECIPE,
    config_yaml,
    describe,
    group_options,
    list_recipes,
    load_run_config,
    recipes_dir,
    write_run_config,
)
from alignkit.config import ConfigError
from alignkit.distributed import end_process_group
from alignkit.errors import AlignkitError, Interrupted

logger = logging.getLogger("alignkit")

REGISTRY_KINDS = ("samplers", "rewards", "plans", "steps", "credit")
RECIPE_COMMANDS = {
    "train": "train a recipe: rollouts, rewards, credit, policy updates, checkpoints",
    "eval": "deterministic sampling of the held-out prompts: reward table and captioned grid",
    "show": "print the composed, validated configuration as YAML (nothing is loaded)",
}
COMMANDS = {
    **RECIPE_COMMANDS,
    "list": "list recipes (no KIND), a config group's options or a registry's components",
    "serve-reward": "serve a reward over HTTP",
    "report": "write a self-contained report.html of a run: held-out table, curves, before/after samples",
    "compare": "compare runs grouped by recipe: curves on one compute axis, scores at equal compute, paired "
               "held-out differences",
}
OVERRIDES_HELP = """\
RECIPE: a name from `alignkit list` or a path to your own YAML recipe file (ending in .yaml; its defaults
list may use the shipped config groups). KEY=VALUE pairs override any field (`alignkit show RECIPE` prints
them all):
  train.epochs=4 algo.objective.beta=0         set fields
  algo=flow_grpo backbone=sd3_tiny             choose a config group option (alignkit list algo)
  reward=jpeg_incompressibility                replace the rewards by a reward group option
  reward.ocr={fn: ocr, weight: 0.3}            add one reward term (or change one: reward.jpeg.weight=0.5)
  '~reward.jpeg'                               drop one reward term
A mapping for the whole reward set (+reward={...}) would be merged with the recipe's rewards and is refused
unless the recipe's are dropped first ('~reward' '+reward={...}').
"""
ACCELERATE_MODES = {
    "ACCELERATE_USE_FSDP": "accelerate's FSDP (accelerate launch --use_fsdp)",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (accelerate launch --use_deepspeed)",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM (accelerate launch --use_megatron_lm)",
}


def _split(args: list[str]) -> tuple[str, list[str]]:
    """The one word that is not an override (no ``=``, no ``~``/``+`` prefix) is the recipe, wherever it
    stands; the rest are hydra overrides.

    Raises:
        ValueError: more than one such word.
    """
    recipes = [a for a in args if "=" not in a and not a.startswith(("~", "+"))]
    if len(recipes) > 1:
        raise ValueError(f"give one recipe, got {len(recipes)}: {', '.join(recipes)}; overrides are KEY=VALUE "
                         "(e.g. train.epochs=3) and deletions ~KEY")
    return (recipes[0] if recipes else DEFAULT_RECIPE), [a for a in args if a not in recipes]


def _register_plugins() -> None:
    """Import the core modules that register built-in plans, step kinds, credit and prompt sources."""
    import alignkit.credit
    import alignkit.flow
    import alignkit.plans
    import alignkit.prompts  # noqa: F401


def _is_main_process() -> bool:
    """Whether this is the first (or only) process: ``accelerate launch`` / torchrun set ``RANK`` per process."""
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args: list[str]) -> int:
    from alignkit.checkpoint import latest_checkpoint
    from alignkit.trainer import Trainer

    recipe, overrides = _split(args)
    cfg = load_run_config(recipe, overrides)
    logger.info("recipe %s -> %s", recipe, cfg.output_dir)
    try:
        trainer = Trainer(cfg)  # prompts, rewards, model, the lock and the resume check: refused input writes nothing
        if _is_main_process():
            write_run_config(cfg.output_dir, cfg, overrides)
        state = trainer.train()
        end_process_group()
    except Interrupted as exc:  # stopped at a safe point by SIGINT / SIGTERM
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # a second signal, or one before training began
        last = latest_checkpoint(Path(cfg.output_dir))
        where = f"the last checkpoint is {last}" if last is not None else "no checkpoint was written"
        logger.error("aborted; %s; rerun the same command to resume", where)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    logger.info("done: epoch %d, step %d; outputs in %s (alignkit report %s writes report.html)", state.epoch,
                state.global_step, cfg.output_dir, cfg.output_dir)
    return 0


def cmd_eval(args: list[str]) -> int:
    from alignkit.build import build_sampler, resolve_device
    from alignkit.evaluation import evaluate, evaluation_prompts, summarize, write_report
    from alignkit.interfaces import EvalSettings
    from alignkit.prompts import load_prompts
    from alignkit.reward_set import RewardSet

    recipe, overrides = _split(args)
    cfg = load_run_config(recipe, overrides)  # eval settings the backbone cannot sample are refused here
    _, heldout = load_prompts(cfg.prompts)
    eval_prompts = evaluation_prompts(cfg.eval, heldout)  # before any model loads
    settings = EvalSettings.from_config(cfg.eval)
    sampler = build_sampler(cfg, resolve_device(cfg.device))
    if cfg.eval.checkpoint:
        ckpt = Path(cfg.eval.checkpoint)
        sampler.load_trainable(ckpt / "trainable" if (ckpt / "trainable").is_dir() else ckpt)
    rewards = RewardSet.from_config({**cfg.reward, **cfg.eval.rewards}, cfg.algo.reward_aggregation)
    rollout, table = evaluate(sampler, rewards, eval_prompts, seed=cfg.eval.seed,
                              seeds_per_prompt=cfg.eval.seeds_per_prompt, batch_size=cfg.eval.batch_size,
                              limit=cfg.eval.num_prompts, settings=settings)
    info = {"recipe": cfg.recipe, "checkpoint": cfg.eval.checkpoint,
            "prompts": cfg.eval.prompts or f"held-out split of prompts (source {cfg.prompts.source})",
            "num_prompts": min(cfg.eval.num_prompts, len(eval_prompts)), "seeds_per_prompt": cfg.eval.seeds_per_prompt,
            "seed": cfg.eval.seed, "settings": settings.describe(cfg.backbone)}
    summary = summarize(table, rollout.sample_metadata, rollout.sample_prompts, info)
    out = Path(cfg.output_dir) / "eval"
    write_report(out, rollout, table, summary)
    name = next(iter(table.raw))
    caps = [f"{p} | {name}={float(table.raw[name][i]):.3g}" for i, p in enumerate(rollout.sample_prompts)]
    sampler.save_samples(rollout.samples, caps, out / "grid.png")
    sys.stdout.write(summary.markdown())  # the command's output: the table
    logger.info("eval table (table.md, summary.json), per-sample rewards and grid in %s", out)
    return 0


def cmd_show(args: list[str]) -> int:
    recipe, overrides = _split(args)
    cfg = load_run_config(recipe, overrides)
    sys.stdout.write(config_yaml(cfg))
    return 0


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max((len(name) for name, _ in rows), default=0)
    return "".join(f"{name:<{width}}  {text}".rstrip() + "\n" for name, text in rows)


def cmd_list(args: list[str]) -> int:
    from alignkit import registry

    kinds = ["recipes", *CONFIG_GROUPS, *REGISTRY_KINDS]
    what = args[0] if args else None
    if what is None or what == "recipes":
        root = recipes_dir()
        text = _rows([(name, describe(root / f"{name}.yaml")) for name in list_recipes(root)])
        if what is None:
            text = ("recipes (alignkit train|eval|show RECIPE):\n" + text +
                    "\nalignkit list KIND lists more; KIND is one of\n"
                    "  recipes\n"
                    f"  config groups, chosen with GROUP=OPTION: {', '.join(CONFIG_GROUPS)}\n"
                    f"  registered components, named inside recipes: {', '.join(REGISTRY_KINDS)}\n")
    elif what in CONFIG_GROUPS:
        text = _rows([(name, describe(path)) for name, path in group_options(what).items()])
    elif what in REGISTRY_KINDS:
        _register_plugins()
        tables = {"samplers": registry.SAMPLERS, "rewards": registry.REWARDS, "plans": registry.EXPLORATION_PLANS,
                  "steps": registry.STEP_KINDS, "credit": registry.CREDIT_ASSIGNERS}
        text = "".join(f"{name}\n" for name in tables[what].names())
    else:
        close = difflib.get_close_matches(what, kinds, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"alignkit list {what}: unknown kind{hint}; choose one of {', '.join(kinds)}")
    sys.stdout.write(text)
    return 0


def cmd_serve_reward(ns: argparse.Namespace) -> int:
    """``alignkit serve-reward``: the arguments, limits and server live in :mod:`alignkit.reward_server`."""
    from alignkit.reward_server import run

    return run(ns)


def cmd_report(ns: argparse.Namespace) -> int:
    """``alignkit report``: the page is built by :mod:`alignkit.report`."""
    from alignkit.report import write_report

    path = write_report(ns.run_dir, ns.output, samples=ns.samples)
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    """``alignkit compare``: the numbers come from :mod:`alignkit.compare`."""
    from alignkit.compare import compare_runs, format_comparison, write_comparison_html, write_curves_png

    comparison = compare_runs(ns.runs, axis=ns.axis, reward=ns.reward)
    sys.stdout.write(format_comparison(comparison) + "\n")
    sys.stdout.flush()
    logger.info("comparison page written to %s", write_comparison_html(comparison, ns.output))
    if ns.figure:
        logger.info("curves written to %s", write_curves_png(comparison, ns.figure))
    return 0


def _version() -> str:
    try:
        return version("alignkit")
    except PackageNotFoundError:  # a source tree on sys.path without an installed distribution
        from alignkit import __version__

        return __version__


def _add_common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """-q / -v, accepted before the command and after it (a command's copy leaves the top level's value)."""
    default = False if top else argparse.SUPPRESS
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="also alignkit's debug messages")


def build_parser() -> argparse.ArgumentParser:
    """The top level: options, then COMMAND and its arguments (parsed by :func:`command_parser`)."""
    commands = "\n".join(f"  {name:<13} {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="alignkit", description="RL alignment of diffusion and flow models (Flow-GRPO, TempFlow-GRPO, ...).",
        epilog=f"commands:\n{commands}\n\n`alignkit COMMAND -h` explains one. Examples:\n"
               "  alignkit list\n  alignkit show sd3_tiny_flow_grpo train.epochs=4\n"
               "  alignkit train sd3_tiny_flow_grpo train.epochs=4\n  alignkit train ./my_recipe.yaml -q",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"alignkit {_version()}")
    _add_common_options(parser, top=True)
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command's arguments (options may come before or after the positionals)."""
    if command == "serve-reward":
        from alignkit.reward_server import build_parser as server_parser

        parser = server_parser()
    elif command == "list":
        parser = argparse.ArgumentParser(
            prog="alignkit list", allow_abbrev=False, description=COMMANDS["list"] + ".",
            epilog=f"KIND: recipes | {' | '.join(CONFIG_GROUPS)} (config groups) | {' | '.join(REGISTRY_KINDS)} "
                   "(registered components)")
        parser.add_argument("kind", nargs="?", metavar="KIND", help="what to list (default: recipes and the kinds)")
    elif command == "report":
        parser = argparse.ArgumentParser(prog="alignkit report", allow_abbrev=False, description=COMMANDS["report"]
                                         + ". An unfinished run is reported as far as it got, and says so.")
        parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
        parser.add_argument("-o", "--output", default=None, help="the HTML file (default: RUN_DIR/report.html)")
        parser.add_argument("--samples", type=int, default=4,
                            help="held-out samples shown among those that changed most, and least (default 4)")
    elif command == "compare":
        parser = argparse.ArgumentParser(
            prog="alignkit compare", allow_abbrev=False, description=COMMANDS["compare"] + ". Runs of one recipe "
            "(configurations equal but for seed and output_dir) are pooled; the first run's group is the baseline.")
        parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (output_dir of alignkit train)")
        parser.add_argument("--axis", default="nfe", metavar="AXIS",
                            help="compute axis of the curves and of equal compute: epoch, nfe (rollout model "
                                 "evaluations, default), flops (total model FLOPs), time (training seconds) or cpu "
                                 "(process CPU seconds)")
        parser.add_argument("--reward", default="aggregate",
                            help="held-out score compared: aggregate (weighted sum of the training rewards, default) "
                                 "or a reward's name")
        parser.add_argument("-o", "--output", default="compare.html", help="the HTML page (default: compare.html)")
        parser.add_argument("--figure", default=None, metavar="PNG",
                            help="also write the curves as a PNG file (for a README or a paper)")
    else:
        parser = argparse.ArgumentParser(prog=f"alignkit {command}", description=RECIPE_COMMANDS[command] + ".",
                                         usage=f"alignkit {command} [-h] [-q] [-v] [RECIPE] [KEY=VALUE ...]",
                                         epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                                         allow_abbrev=False)
        parser.add_argument("words", nargs="*", metavar="RECIPE KEY=VALUE",
                            help=f"the recipe (default: {DEFAULT_RECIPE}) and overrides, in any order")
    _add_common_options(parser, top=False)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Both levels of the command line; argparse's SystemExit (help, --version, usage errors) passes."""
    top = build_parser()
    if not argv:
        top.print_help(sys.stderr)
        raise SystemExit(2)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        top.error(f"unknown command {command!r}{hint}; choose one of {', '.join(COMMANDS)}")
    ns = top.parse_args(argv)
    return command_parser(ns.command).parse_intermixed_args(ns.args, namespace=ns)


def _configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    logger.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    for noisy in ("httpx", "urllib3", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_libraries() -> None:
    """Only alignkit's progress bar: diffusers' and transformers' bars (pipeline and weight loading) off and
    their verbosity at warning; their records go to the root logger's handlers (so through tqdm) instead of
    their own stderr handlers. Download bars of huggingface_hub stay on: a first multi-GB download must not
    look hung, and it ends before alignkit's bar starts."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils
    import transformers.utils.logging as transformers_logging

    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()  # transformers' also turns off huggingface_hub's bars
        lib.set_verbosity_warning()
        lib.disable_default_handler()
        lib.enable_propagation()
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()


def _unsupported_launch() -> str | None:
    """Why accelerate's own sharding modes (set by ``accelerate launch`` in the environment) are refused."""
    from accelerate.utils import parse_flag_from_env

    for var, what in ACCELERATE_MODES.items():
        try:
            on = parse_flag_from_env(var)
        except ValueError:  # not a truth value: accelerate itself reports it
            continue
        if on:
            return (f"{what} is not supported ({var}={os.environ[var]}): alignkit shards the model itself. Launch "
                    "plain data parallel processes (accelerate launch --multi_gpu --num_processes N -m alignkit "
                    "train RECIPE, without --use_fsdp / --use_deepspeed, and no FSDP or DeepSpeed in `accelerate "
                    "config`) and set train.sharding=fsdp to shard parameters, gradients and optimizer state")
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status (0, or 2 for bad
    input and refused runs: the message is logged as one error, without a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ns = _parse(argv)
    except SystemExit as exc:  # help and --version (0), usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError as exc:  # a command's own argument checks (serve-reward's limits, port, token)
        _configure_logging(False, False)
        logger.error("%s", exc)
        return 2
    _configure_logging(ns.quiet, ns.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm

    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # as with `python -m`: rewards given as fn: "my_module:attr" are found in the working directory
        sys.path.insert(0, cwd)
        logger.debug("added the working directory %s to sys.path", cwd)
    handlers = {"train": lambda: cmd_train(ns.words), "eval": lambda: cmd_eval(ns.words),
                "show": lambda: cmd_show(ns.words), "list": lambda: cmd_list([ns.kind] if ns.kind else []),
                "serve-reward": lambda: cmd_serve_reward(ns), "report": lambda: cmd_report(ns),
                "compare": lambda: cmd_compare(ns)}
    try:
        with logging_redirect_tqdm():
            refused = _unsupported_launch()
            if refused:
                logger.error("%s", refused)
                return 2
            if ns.command in ("train", "eval"):
                _quiet_libraries()
            _register_plugins()
            return handlers[ns.command]()
    except (ConfigError, AlignkitError, ValueError, ImportError, KeyError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 128 + signal.SIGINT
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


if __name__ == "__main__":
    raise SystemExit(main())
