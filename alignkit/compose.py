"""Finding and composing recipes (hydra configs shipped in the ``recipes`` package, or a user's YAML file).

A recipe is a shipped name (``alignkit list``) or a path to a YAML file ending in ``.yaml`` / ``.yml``; a
file's defaults list resolves the shipped config groups (``backbone``, ``reward``, ...) after any group
folders beside it. Command-line overrides are checked against :class:`alignkit.config.RunConfig` before hydra
sees them, so a misspelt group or key gets the closest valid name instead of hydra's advice to add ``+``.

Reward overrides (issue 24): ``reward=OPTION`` replaces the reward set with a group option;
``reward.NAME={fn: ..., weight: ...}`` (or ``+reward.NAME=...``) sets or adds one term. A mapping given for
the whole set (``+reward={...}``) is merged by hydra with the recipe's rewards; that is refused unless the
composed names are exactly the ones given (e.g. after ``~reward``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, RewardTermConfig, RunConfig, build_config, to_dict

logger = logging.getLogger(__name__)

CONFIG_GROUPS = ("backbone", "reward", "algo", "train", "prompts")
DEFAULT_RECIPE = "default"
RECIPE_SUFFIXES = (".yaml", ".yml")
BASE_CONFIG = "alignkit_defaults"
"""Every field of :class:`RunConfig` with its default; recipes list ``/alignkit_defaults`` first in their
defaults so that any field can be overridden on the command line without hydra's ``+``."""
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))
RUN_CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"


def _store_base_config() -> None:
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


def group_options(group: str, dirs: list[Path] | None = None) -> dict[str, Path]:
    """Options of config group ``group`` (name -> file), the first of ``dirs`` (default: the shipped
    recipes) that has an option winning, as in hydra's search path."""
    options: dict[str, Path] = {}
    for root in dirs or [recipes_dir()]:
        folder = root / group
        if folder.is_dir():
            for path in sorted(folder.rglob("*.yaml")):
                options.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return dict(sorted(options.items()))


_COMMAND_LINE = re.compile(r"^alignkit\s+\w+(\s+[\w./-]+)?")


def describe(path: Path) -> str:
    """A YAML file's first comment line. Recipes start with the command that runs them
    (``# alignkit train NAME (notes)``): for them, the notes in parentheses, or else the next comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        text = line.lstrip("#").strip()
        match = _COMMAND_LINE.match(text)
        if match:
            text = text[match.end():].strip()
            text = text if text.startswith("(") else ""
        if text:
            return text
    return ""


# --- where a recipe comes from ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeSource:
    """A recipe resolved to hydra's terms.

    Attributes:
        name: what ``RunConfig.recipe`` records: the shipped name, or the file's absolute path.
        config_dir: hydra's primary config folder (the shipped recipes, or the file's folder).
        config_name: the recipe's name inside ``config_dir`` (no suffix).
        search_dirs: folders whose config groups the recipe may use, in lookup order.
    """

    name: str
    config_dir: Path
    config_name: str
    search_dirs: tuple[Path, ...]


def is_recipe_file(recipe: str) -> bool:
    """Whether ``recipe`` names a YAML file (by its suffix) rather than a shipped recipe."""
    return recipe.endswith(RECIPE_SUFFIXES)


def resolve_recipe(recipe: str, root: Path | None = None) -> RecipeSource:
    """A shipped recipe name or a YAML file path (relative to the working directory) as a :class:`RecipeSource`.

    Raises:
        ValueError: an unknown recipe name (with the closest names), or a recipe file that is not valid YAML
            (with the file, line and column) or not a mapping.
        FileNotFoundError: a recipe file that does not exist.
    """
    root = root or recipes_dir()
    if not is_recipe_file(recipe):
        known = list_recipes(root)
        if recipe not in known:
            close = difflib.get_close_matches(recipe, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown recipe {recipe!r}.{hint} Available recipes: {', '.join(known)} "
                             "(alignkit list), or give a path to your own recipe file ending in .yaml")
        return RecipeSource(recipe, root, recipe, (root,))
    path = Path(recipe).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe file {recipe!r} not found (looked for {path}); give the path of an existing YAML file "
            "(relative paths start at the working directory) or a recipe name from `alignkit list`")
    _check_yaml(path)
    return RecipeSource(str(path), path.parent, path.stem, (path.parent, root))


def _check_yaml(path: Path) -> None:
    """Refuse a recipe file that is not a YAML mapping, naming the file, line and column of a syntax error."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"recipe file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        def at(mark: Any) -> str:
            return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

        problem_at, context_at = at(getattr(exc, "problem_mark", None)), at(getattr(exc, "context_mark", None))
        what = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f" ({context} at {context_at})" if context and context_at else ""
        where = f" at {problem_at}" if problem_at else ""
        raise ValueError(f"recipe file {path}: YAML syntax error{where}: {what}{detail}") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must be a YAML mapping of settings (with an optional defaults "
                         f"list), not a {type(data).__name__}; see `alignkit show sd3_tiny_flow_grpo` for one")


# --- checking command-line overrides against RunConfig ---------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One key segment of an override: ``field`` of a dataclass, ``entry`` of a mapping, or ``free`` (Any)."""

    kind: str
    tp: Any


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else Any
    return tp


def _fields(tp: Any) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(tp)[f.name] for f in dataclasses.fields(tp)}


def _closest(word: str, candidates: list[str]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _walk(parts: list[str], line: str) -> tuple[list[_Step], str | None]:
    """Follow ``parts`` through :class:`RunConfig`'s types; a problem naming the first segment that is not a
    setting (with the closest one) ends the walk."""
    tp: Any = RunConfig
    steps: list[_Step] = []
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            fields = _fields(tp)
            if part not in fields:
                valid = sorted(f for f in fields if not (i == 0 and f == "recipe"))  # recipe: the RECIPE argument
                return steps, _unknown_setting(line, parts, i, valid)
            tp = fields[part]
            steps.append(_Step("field", tp))
        elif origin is dict:
            tp = typing.get_args(tp)[1]
            steps.append(_Step("entry", tp))
        elif origin is list:
            if not part.isdigit():
                return steps, f"{line}: {here} is a list; address an item by its index ({here}.0) or set the whole list"
            tp = typing.get_args(tp)[0]
            steps.append(_Step("entry", tp))
        elif tp is Any:
            steps.append(_Step("free", Any))
        else:
            return steps, (f"{line}: {here} is a single value ({getattr(tp, '__name__', tp)}), it has no "
                           f"setting {part!r}; write {here}=VALUE")
    return steps, None


def _unknown_setting(line: str, parts: list[str], i: int, valid: list[str]) -> str:
    part, here = parts[i], ".".join(parts[:i])
    close = _closest(part, valid)
    if i == 0:
        groups = ", ".join(CONFIG_GROUPS)
        hint = f" Did you mean {close!r} ({line.lstrip('+').replace(part, close, 1)})?" if close else ""
        return (f"{line}: unknown setting or config group {part!r}.{hint} Config groups (GROUP=OPTION, options: "
                f"alignkit list GROUP): {groups}; valid settings of the run (KEY=VALUE or KEY.FIELD=VALUE): "
                f"{', '.join(valid)}")
    hint = f" Did you mean {here}.{close}?" if close else ""
    return f"{line}: unknown setting {part!r} of {here}.{hint} Valid settings of {here}: {', '.join(valid)}"


def _is_reward_set(tp: Any) -> bool:
    return typing.get_origin(tp) is dict and typing.get_args(tp)[1] is RewardTermConfig


@dataclass(frozen=True)
class _SetCheck:
    """A mapping given for a whole reward set: the composed names must be exactly these."""

    line: str
    key: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class _Override:
    """A command-line override: as given (``line``), as handed to hydra (``hydra``), and its ``key``."""

    line: str
    hydra: str
    key: str


def _prepare_overrides(overrides: list[str], source: RecipeSource) -> tuple[list[_Override], list[_SetCheck]]:
    """Check every override's key against RunConfig and each group option against the group's files.

    Returns the overrides for hydra (``KEY=VALUE`` that sets a mapping or one of its entries, e.g.
    ``reward.NAME={...}``, becomes ``++KEY=VALUE``: the same merge, allowed to add entries) and the reward-set
    mappings to compare after composition.

    Raises:
        ConfigError: every problem found, each with the override, the valid names and the closest one.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    problems: list[str] = []
    prepared: list[_Override] = []
    checks: list[_SetCheck] = []
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as exc:
            reason = str(exc).splitlines()[0]
            problems.append(f"{line}: not a valid override ({reason}); write KEY=VALUE, e.g. train.epochs=3, "
                            "and quote values with spaces or brackets")
            continue
        key = override.key_or_group
        if override.is_sweep_override():
            problems.append(f"{line}: sweeps (several values) are not supported; give one value")
            continue
        root_key = key.split(".")[0]
        own_group = root_key not in RUN_FIELDS and any((d / root_key).is_dir() for d in source.search_dirs)
        if root_key == "hydra" or override.package is not None or own_group:
            prepared.append(_Override(line, line, key))  # hydra's settings, packages, a recipe file's own groups
            continue
        if key == "recipe":
            problems.append(f"{line}: recipe is set from the RECIPE argument (alignkit train RECIPE ...), "
                            "not by an override")
            continue
        value = None if override.is_delete() else override.value()
        if key in CONFIG_GROUPS and not override.is_delete() and not isinstance(value, dict):
            problem = _group_option_problem(line, key, value, source)
            if problem:
                problems.append(problem)
            else:
                prepared.append(_Override(line, line, key))
            continue
        steps, problem = _walk(key.split("."), line)
        if problem:
            problems.append(problem)
            continue
        last = steps[-1]
        if _is_reward_set(last.tp) and isinstance(value, dict):
            checks.append(_SetCheck(line, key, tuple(str(k) for k in value)))
        sets_mapping = last.kind != "field" or typing.get_origin(_unwrap_optional(last.tp)) is dict
        hydra_line = "++" + line if override.type == OverrideType.CHANGE and sets_mapping else line
        prepared.append(_Override(line, hydra_line, key))
    if problems:
        raise ConfigError(problems)
    return prepared, checks


def _group_option_problem(line: str, group: str, value: Any, source: RecipeSource) -> str | None:
    options = group_options(group, list(source.search_dirs))
    if isinstance(value, list):
        chosen = value
    elif isinstance(value, str):
        chosen = [value]
    else:
        return (f"{line}: choose an option of config group {group} ({', '.join(options)}; alignkit list {group}), "
                f"or drop the group with '~{group}'")
    for option in chosen:
        if option not in options:
            close = _closest(str(option), list(options))
            hint = f" Did you mean {group}={close}?" if close else ""
            return (f"{line}: config group {group} has no option {option!r}.{hint} Options: {', '.join(options)} "
                    f"(alignkit list {group})")
    return None


def _reward_set_problems(data: dict[str, Any], checks: list[_SetCheck]) -> list[str]:
    problems = []
    for check in checks:
        node: Any = data
        for part in check.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        composed = [k for k, v in (node or {}).items() if v is not None]
        extra = [k for k in composed if k not in check.names]
        if extra:
            given = ", ".join(check.names)
            first = check.names[0] if check.names else "NAME"
            problems.append(
                f"{check.line}: a mapping given for {check.key} is merged with the recipe's {check.key} "
                f"({', '.join(extra)}), so the run would use {', '.join(composed)}, not only {given}. To replace "
                f"them, choose a group option ({check.key}=OPTION, see alignkit list reward) or drop them first "
                f"('~{check.key}' '+{check.key}={{...}}'); to add one term, write it on its own: "
                f"{check.key}.{first}={{fn: ..., weight: ...}}")
    return problems


# --- composing -------------------------------------------------------------------------------------------


def _hydra_compose(source: RecipeSource, overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    _store_base_config()
    extra = [f"hydra.searchpath=[{','.join('file://' + str(d) for d in source.search_dirs[1:])}]"] \
        if len(source.search_dirs) > 1 else []
    with initialize_config_dir(config_dir=str(source.config_dir), version_base="1.3", job_name="alignkit"):
        composed = compose(config_name=source.config_name, overrides=[*overrides, *extra])
    data = OmegaConf.to_container(composed, resolve=True)
    assert isinstance(data, dict)
    return data


_HYDRA_KEY = re.compile(r"Could not (?:override|delete from config\.) '([^']+)'")


def _missing_key_problem(override: _Override, source: RecipeSource, prepared: list[_Override]) -> str | None:
    """Explain hydra's "Could not override / delete KEY": which part of KEY the composed recipe lacks."""
    groups = [o.hydra for o in prepared if o.key in CONFIG_GROUPS and o.hydra == o.line]
    try:
        node: Any = _hydra_compose(source, groups)
    except Exception:  # best effort: the caller falls back to hydra's own message
        return None
    parts = override.key.split(".")
    steps, _ = _walk(parts, override.line)
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        here = ".".join(parts[:i])
        if i < len(steps) and steps[i].kind == "field":
            return (f"{override.line}: recipe {source.name} does not set {override.key} and does not list "
                    f"/{BASE_CONFIG} in its defaults, so it cannot be overridden: add '- /{BASE_CONFIG}' as the "
                    "first entry of the recipe's defaults list")
        have = sorted(node) if isinstance(node, dict) else []
        close = _closest(part, have)
        hint = f" Did you mean {here}.{close}?" if close else ""
        reward = bool(i) and _is_reward_set(steps[i - 1].tp)
        add = "" if override.line.startswith("~") else (
            f" To add one: {here}.{part}={{fn: NAME, weight: 1.0}}" if reward else f" To add one: {here}.{part}=VALUE")
        return (f"{override.line}: there is no {'reward' if reward else 'entry'} {part!r} in {here} (it has: "
                f"{', '.join(have) or 'none'}).{hint}{add}")
    return None


def compose_recipe(name: str, overrides: list[str] | None = None, root: Path | None = None) -> dict[str, Any]:
    """Compose recipe ``name`` (a shipped name or a YAML file path) with hydra command-line ``overrides``
    into a plain dict.

    Raises:
        ConfigError: overrides naming unknown groups, options or settings, or merging reward sets.
        ValueError: an unknown recipe, a recipe file that is not YAML, or another composition failure.
        FileNotFoundError: a recipe file that does not exist.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    source = resolve_recipe(name, root)
    prepared, checks = _prepare_overrides(overrides, source)
    try:
        data = _hydra_compose(source, [o.hydra for o in prepared])
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        text = str(exc)
        match = _HYDRA_KEY.search(text)
        failed = next((o for o in prepared if match and o.key == match.group(1)), None)
        problem = _missing_key_problem(failed, source, prepared) if failed else None
        if problem:
            raise ConfigError([problem]) from None
        text = re.sub(r"\n?To append to your config use \+\S.*", "", text).strip()
        raise ValueError(f"recipe {source.name!r} with overrides {overrides}: {text}") from None
    problems = _reward_set_problems(data, checks)
    if problems:
        raise ConfigError(problems)
    data["recipe"] = source.name
    return data


def check_names(cfg: RunConfig) -> list[str]:
    """Problems with component names (sampler, rewards, plan, step family, credit), each listing valid names;
    a reward given as ``module:attr`` must name a module that can be found (the working directory included)."""
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
        if value in reg:
            continue
        if registry.is_import_path(value) and reg is registry.REWARDS:
            problem = _module_problem(path, value)
            if problem:
                problems.append(problem)
            continue
        problems.append(f"{path}={value!r}: unknown {reg.kind} name; valid: {', '.join(reg.names())}")
    if cfg.backbone.name in registry.SAMPLERS:
        sampler = registry.SAMPLERS.get(cfg.backbone.name)
        check = getattr(sampler, "check_config", None)
        if check is not None:
            problems += check(cfg.backbone, "backbone")
        check_eval = getattr(sampler, "check_eval_settings", None)
        if check_eval is not None:
            from alignkit.interfaces import EvalSettings

            problems += check_eval(EvalSettings.from_config(cfg.eval), cfg.backbone)
    problems += _eval_prompts_source_problems(cfg.eval.prompts)
    if cfg.algo.plan.name in registry.EXPLORATION_PLANS:
        try:
            plan = alignkit.plans.build_plan(cfg.algo.plan.name, cfg.algo.plan.options)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            problems += plan.validate(cfg.backbone.num_steps)
    return problems


def _eval_prompts_source_problems(value: str | None) -> list[str]:
    """``eval.prompts`` that is not a file must name a registered prompt source (other than list / file, which
    :meth:`alignkit.config.EvalConfig.validate` refuses)."""
    from alignkit import registry
    from alignkit.config import is_prompt_file, left_to_user

    if value is None or not value.strip() or value in ("list", "file") or left_to_user(value) or is_prompt_file(value):
        return []
    if value in registry.PROMPT_SOURCES:
        return []
    sources = [n for n in registry.PROMPT_SOURCES.names() if n not in ("list", "file")]
    return [f"eval.prompts={value!r}: neither a prompt file (.txt, .jsonl or .json; no such file here) nor a prompt "
            f"source; give a file path or one of the sources: {', '.join(sources)}"]


def _module_problem(path: str, value: str) -> str | None:
    """Whether the module of import path ``value`` can be found, without running it (its parent packages are
    imported)."""
    import importlib.util

    module = value.partition(":")[0] if ":" in value else value.rpartition(".")[0]
    if not module:
        return f"{path}={value!r}: not an import path; write it as 'package.module:name' (e.g. 'my_rewards:score')"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"{path}={value!r}: no module named {module!r} (searched the working directory {os.getcwd()} and the "
            "installed packages); check the spelling, run alignkit from the folder that holds it, or install it")


def load_run_config(name: str, overrides: list[str] | None = None, root: Path | None = None) -> RunConfig:
    """Compose and validate: raises :class:`alignkit.config.ConfigError` before any model loads."""
    cfg = build_config(compose_recipe(name, overrides, root))
    problems = check_names(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


# --- the run folder's record of its configuration --------------------------------------------------------


def config_yaml(cfg: RunConfig) -> str:
    """The configuration as YAML (what ``alignkit show`` prints and ``config.yaml`` holds)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(to_dict(cfg))


@dataclass(frozen=True)
class SavedRunConfig:
    """What :func:`write_run_config` wrote into a run folder.

    Attributes:
        config: the composed, validated configuration as a plain dict (``dataclasses.asdict(RunConfig)``).
        overrides: the command-line overrides as given, in order.
    """

    config: dict[str, Any]
    overrides: list[str]

    def run_config(self) -> RunConfig:
        """The configuration bound to :class:`RunConfig` (and validated)."""
        return build_config(self.config)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_config(out: Path | str, cfg: RunConfig, overrides: list[str]) -> None:
    """Write ``<out>/config.yaml`` (the composed configuration) and ``<out>/overrides.yaml`` (the command-line
    overrides), each atomically; creates ``out``. Read them back with :func:`read_run_config`."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / RUN_CONFIG_FILE, config_yaml(cfg))
    _write_atomic(out / OVERRIDES_FILE, yaml.safe_dump(list(overrides), default_flow_style=False, sort_keys=False))


def read_run_config(out: Path | str) -> SavedRunConfig | None:
    """What :func:`write_run_config` wrote into run folder ``out``; None when it holds no ``config.yaml``.

    Raises:
        ValueError: a file that is not the YAML written there (naming the file).
    """
    import yaml

    out = Path(out)
    if not (out / RUN_CONFIG_FILE).is_file():
        return None
    read: dict[str, Any] = {}
    for name, tp in ((RUN_CONFIG_FILE, dict), (OVERRIDES_FILE, list)):
        path = out / name
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else tp()
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not readable YAML ({exc}); it was not written by alignkit") from None
        if not isinstance(value, tp):
            raise ValueError(f"{path} holds a {type(value).__name__}, expected a {tp.__name__}")
        read[name] = value
    return SavedRunConfig(read[RUN_CONFIG_FILE], [str(o) for o in read[OVERRIDES_FILE]])
