"""Finding and composing recipes (hydra configs shipped in the ``recipes`` package)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, RunConfig, build_config

CONFIG_GROUPS = ("backbone", "reward", "algo", "train", "prompts")
DEFAULT_RECIPE = "default"
BASE_CONFIG = "alignkit_defaults"
"""Every field of :class:`RunConfig` with its default; recipes list ``/alignkit_defaults`` first in their
defaults so that any field can be overridden on the command line without hydra's ``+``."""


def _store_base_config() -> None:
    import dataclasses

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=BASE_CONFIG, node=OmegaConf.create(dataclasses.asdict(RunConfig())))


def recipes_dir() -> Path:
    from alignkit import recipes

    return Path(recipes.__file__).parent


def list_recipes(root: Path | None = None) -> list[str]:
    """Recipe names (paths under ``recipes/`` without ``.yaml``), found recursively; group files excluded."""
    root = root or recipes_dir()
    names = []
    for path in root.rglob("*.yaml"):
        rel = path.relative_to(root)
        if rel.parts[0] in CONFIG_GROUPS:
            continue
        names.append(rel.with_suffix("").as_posix())
    return sorted(names)


def compose_recipe(name: str, overrides: list[str] | None = None, root: Path | None = None) -> dict[str, Any]:
    """Compose recipe ``name`` with hydra command-line ``overrides`` into a plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    root = root or recipes_dir()
    _store_base_config()
    known = list_recipes(root)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Available recipes: {', '.join(known)} (alignkit list)")
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3", job_name="alignkit"):
            composed = compose(config_name=name, overrides=list(overrides or []))
        data = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ValueError(f"recipe {name!r} with overrides {overrides or []}: {exc}") from exc
    assert isinstance(data, dict)
    data["recipe"] = name
    return data


def check_names(cfg: RunConfig) -> list[str]:
    """Problems with component names (sampler, rewards, plan, step family, credit), each listing valid names."""
    import alignkit.credit
    import alignkit.flow
    import alignkit.plans
    import alignkit.prompts
    from alignkit import registry

    checks = [
        ("backbone.name", cfg.backbone.name, registry.SAMPLERS),
        ("algo.plan.name", cfg.algo.plan.name, registry.EXPLORATION_PLANS),
        ("algo.step_kind", cfg.algo.step_kind, registry.STEP_KINDS),
        ("algo.credit.name", cfg.algo.credit.name, registry.CREDIT_ASSIGNERS),
        ("prompts.source", cfg.prompts.source, registry.PROMPT_SOURCES),
    ] + [(f"reward.{n}.fn", t.fn, registry.REWARDS) for n, t in cfg.reward.items()] + [
        (f"eval.rewards.{n}.fn", t.fn, registry.REWARDS) for n, t in cfg.eval.rewards.items()]
    problems = []
    for path, value, reg in checks:
        if value in reg or (registry.is_import_path(value) and reg is registry.REWARDS):
            continue
        problems.append(f"{path}={value!r}: unknown {reg.kind} name; valid: {', '.join(reg.names())}")
    if cfg.backbone.name in registry.SAMPLERS:
        check = getattr(registry.SAMPLERS.get(cfg.backbone.name), "check_config", None)
        if check is not None:
            problems += check(cfg.backbone, "backbone")
    if cfg.algo.plan.name in registry.EXPLORATION_PLANS:
        try:
            plan = alignkit.plans.build_plan(cfg.algo.plan.name, cfg.algo.plan.options)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            problems += plan.validate(cfg.backbone.num_steps)
    return problems


def load_run_config(name: str, overrides: list[str] | None = None, root: Path | None = None) -> RunConfig:
    """Compose and validate: raises :class:`alignkit.config.ConfigError` before any model loads."""
    cfg = build_config(compose_recipe(name, overrides, root))
    problems = check_names(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
