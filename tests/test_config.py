"""Recipes compose and validate; bad settings fail early with messages that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import alignkit.credit
import alignkit.flow
import alignkit.plans  # noqa: F401  (registers the exploration plans)
from alignkit.compose import (
    DEFAULT_RECIPE,
    compose_recipe,
    list_recipes,
    load_run_config,
    read_run_config,
    write_run_config,
)
from alignkit.config import ConfigError, RunConfig, build_config, to_dict
from alignkit.registry import (
    CREDIT_ASSIGNERS,
    EXPLORATION_PLANS,
    REWARDS,
    SAMPLERS,
    STEP_KINDS,
    Registry,
    RegistryError,
)

RECIPES = list_recipes()


def test_default_recipe_exists():
    assert DEFAULT_RECIPE == "default"
    assert DEFAULT_RECIPE in RECIPES
    # group files (backbone/, reward/, ...) are not recipes
    assert not any(name.split("/")[0] in ("backbone", "reward", "algo", "train", "prompts") for name in RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name: str):
    cfg = load_run_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == name
    assert cfg.reward
    # every component a recipe names is registered (names only: entry points are not imported here)
    assert cfg.backbone.name in SAMPLERS
    assert cfg.algo.step_kind in STEP_KINDS
    assert cfg.algo.credit.name in CREDIT_ASSIGNERS
    assert cfg.algo.plan.name in EXPLORATION_PLANS
    for term in cfg.reward.values():
        assert term.fn in REWARDS


def test_overrides_apply():
    cfg = load_run_config("default", ["algo.num_seeds=2", "train.epochs=3", "algo.objective.beta=0"])
    assert cfg.algo.num_seeds == 2 and cfg.train.epochs == 3
    assert cfg.algo.objective.beta == 0.0 and isinstance(cfg.algo.objective.beta, float)


def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config("sd3_tiny_flow_grpo", overrides)
    assert info.value.problems
    return str(info.value)


def test_unknown_recipe_lists_available():
    with pytest.raises(ValueError) as info:
        load_run_config("no_such_recipe")
    msg = str(info.value)
    assert "no_such_recipe" in msg and "Available recipes" in msg
    for name in RECIPES:
        assert name in msg
    with pytest.raises(ValueError, match="Did you mean sd3_tiny_flow_grpo"):
        compose_recipe("sd3_tiny_flow_grpoo")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["+train.foo=1"], ["train.foo", "unknown setting", "epochs", "learning_rate", "rollout_batch_size"]),
        (["+algo.credit.normalise=true"], ["algo.credit.normalise", "unknown setting", "group_by", "noise_aware"]),
        (["+colour=red"], ["colour", "unknown setting", "backbone", "reward"]),
        (["train.epochs=abc"], ["train.epochs", "'abc'", "expected int"]),
        (["algo.noise_level=high"], ["algo.noise_level", "'high'", "expected float"]),
        (["train.resume=maybe"], ["train.resume", "'maybe'", "true or false"]),
        (["train.adam_betas=0.9"], ["train.adam_betas", "expected a list"]),
        (["algo.num_seeds=1"], ["algo.num_seeds=1", ">= 2", "2 or more"]),
        (["train.rollout_batch_size=5"], ["train.rollout_batch_size=5", "16 samples", "prompts_per_epoch=4",
                                          "num_seeds=4", "divisor"]),
        (["backbone.num_steps=1"], ["backbone.num_steps=1", ">= 2"]),
        (["~reward.jpeg_compressibility"], ["reward is empty", "reward=jpeg_compressibility"]),
    ],
)
def test_bad_settings_are_explained(overrides: list[str], words: list[str]):
    msg = _problems(overrides)
    for word in words:
        assert word in msg, (word, msg)


def test_all_problems_reported_at_once():
    overrides = [
        "algo.num_seeds=1", "backbone.num_steps=1", "algo.noise_level=-1", "reward.jpeg_compressibility.weight=0",
        "algo.credit.group_by=step", "algo.objective.clip_range=0", "backbone.height=30", "device=tpu",
    ]
    with pytest.raises(ConfigError) as info:
        load_run_config("sd3_tiny_flow_grpo", overrides)
    problems = info.value.problems
    expected = {
        "algo.num_seeds=1": ["2 or more"],
        "backbone.num_steps=1": [">= 2"],
        "algo.noise_level=-1": ["> 0"],
        "reward: every weight is 0": ["weight > 0"],
        "algo.credit.group_by='step'": ["'prompt'", "'seed'"],
        "algo.objective.clip_range=0": ["(0, 1)"],
        "backbone.height=30": ["multiple of 8"],
        "device='tpu'": ["cuda"],
    }
    assert len(problems) == len(expected), problems
    for start, words in expected.items():
        match = [p for p in problems if p.startswith(start)]
        assert len(match) == 1, (start, problems)
        for word in words:
            assert word in match[0], (word, match[0])
    assert f"{len(expected)} problems" in str(info.value)


def test_override_keys_are_checked_before_hydra():
    # an unknown key is alignkit's problem list (closest key, valid keys), not hydra's advice to add '+'
    with pytest.raises(ConfigError) as info:
        load_run_config("default", ["train.foo=1", "train.epoch=3", "algoo=flow_grpo", "algo=flow_grp"])
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["train.foo=1", "train.epoch=3", "algoo=flow_grpo", "algo=flow_grp"]
    assert "Did you mean train.epochs?" in problems[1] and "learning_rate" in problems[1]
    assert "Did you mean 'algo'" in problems[2] and "backbone, reward, algo, train, prompts" in problems[2]
    assert "Did you mean algo=flow_grpo?" in problems[3] and "tempflow_grpo" in problems[3]
    assert "To append" not in str(info.value) and "+train" not in str(info.value)
    # a composition failure hydra finds still names the recipe and the overrides
    with pytest.raises(ValueError, match=r"(?s)recipe 'default' with overrides \['\+train.epochs=3'\].*train.epochs=3"):
        load_run_config("default", ["+train.epochs=3"])


def test_reward_overrides_replace_add_or_refuse_a_merge():
    def names(overrides: list[str]) -> list[str]:
        return list(load_run_config("sd3_tiny_flow_grpo", overrides).reward)

    assert names(["reward=jpeg_incompressibility"]) == ["jpeg_incompressibility"]  # a group option replaces
    assert names(["reward=shapeeval_compressible"]) == ["shapeeval", "jpeg"]
    added = ["jpeg_compressibility", "inc"]
    assert names(["reward.inc={fn: jpeg_incompressibility, weight: 0.5}"]) == added  # one term added
    assert names(["+reward.inc={fn: jpeg_incompressibility, weight: 0.5}"]) == added
    assert names(["~reward", "+reward={inc: {fn: jpeg_incompressibility}}"]) == ["inc"]  # dropped, then given
    for merge in ("+reward={inc: {fn: jpeg_incompressibility}}", "reward={inc: {fn: jpeg_incompressibility}}"):
        with pytest.raises(ConfigError) as info:
            load_run_config("sd3_tiny_flow_grpo", [merge])
        msg = str(info.value)
        for words in (merge, "merged", "jpeg_compressibility", "reward=OPTION", "reward.inc={fn: ..., weight: ...}"):
            assert words in msg, (words, msg)
    with pytest.raises(ConfigError, match=r"there is no reward 'jpeg' in reward \(it has: jpeg_compressibility\)"
                                          r".*reward.jpeg=\{fn: NAME"):
        load_run_config("sd3_tiny_flow_grpo", ["reward.jpeg.weight=0.5"])


def test_build_config_binds_types():
    data = compose_recipe("default")
    cfg = build_config(data)
    assert isinstance(cfg.algo.objective.clip_range, float)
    data["train"]["learning_rate"] = 1  # an int where a float is expected is accepted as a float
    assert build_config(data).train.learning_rate == 1.0
    data["algo"] = "flow_grpo"
    with pytest.raises(ConfigError, match="algo: expected a mapping for AlgoConfig"):
        build_config(data)


def test_unknown_registry_name_lists_valid_names():
    with pytest.raises(RegistryError) as info:
        SAMPLERS.get("nope")
    msg = str(info.value)
    assert "'nope'" in msg and "Valid names" in msg
    for name in SAMPLERS.names():
        assert name in msg
    assert "sd3" in msg and "package.module:name" in msg
    with pytest.raises(RegistryError, match="Did you mean 'flow_grpo'"):
        STEP_KINDS.get("flow_grp")


def test_registering_a_taken_name_raises():
    with pytest.raises(RegistryError, match="'ode' is already registered"):
        STEP_KINDS.register("ode")(lambda *args: None)
    reg: Registry = Registry("test_kind")
    first, second = object(), object()
    reg.add("thing", first)
    reg.add("thing", first)  # re-registering the same object is harmless
    with pytest.raises(RegistryError, match="choose another name"):
        reg.add("thing", second)
    assert reg.get("thing") is first


def test_registering_a_name_taken_by_an_entry_point_raises():
    reg: Registry = Registry("samplers")  # fresh registry over the installed alignkit.samplers entry points
    with pytest.raises(RegistryError):
        reg.add("sd3", object())
    from alignkit.modalities.image.sd3 import SD3Sampler

    reg.add("sd3", SD3Sampler)  # the entry point's own class may register itself
    assert reg.get("sd3") is SD3Sampler


def test_multi_objective_recipe_weights_and_drops_from_the_command_line() -> None:
    cfg = load_run_config("shapes_multi_objective", ["reward.jpeg.weight=0.5"])
    assert {k: (t.fn, t.weight) for k, t in cfg.reward.items()} == {
        "shapeeval": ("shapeeval", 1.0), "jpeg": ("jpeg_compressibility", 0.5)}
    assert cfg.algo.reward_aggregation == "normalize_then_sum"
    assert list(load_run_config("shapes_multi_objective", ["~reward.jpeg"]).reward) == ["shapeeval"]


def test_run_config_written_atomically_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert read_run_config(out) is None  # nothing written yet
    overrides = ["train.epochs=3", "reward.jpeg_compressibility.weight=0.5"]
    cfg = load_run_config("sd3_tiny_flow_grpo", overrides)
    write_run_config(out, cfg, overrides)
    saved = read_run_config(out)
    assert saved is not None and saved.overrides == overrides
    assert saved.config == to_dict(cfg) and saved.run_config() == cfg
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "overrides.yaml"]  # no temporary files left
    write_run_config(out, load_run_config("sd3_tiny_flow_grpo"), [])  # rewritten in place
    again = read_run_config(out)
    assert again is not None and again.overrides == [] and again.config["train"]["epochs"] == 12
    (out / "config.yaml").write_text("train: {epochs: 3\n")
    with pytest.raises(ValueError, match=r"config\.yaml is not readable YAML"):
        read_run_config(out)
