"""The ``alignkit`` command as a user runs it: what it prints, its exit status, what it writes.

Most tests call the real entry point :func:`alignkit.cli.main` in-process; the ones about tracebacks, progress
bars and the working directory on ``sys.path`` run the installed console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.compose import describe, group_options, list_recipes, load_run_config, read_run_config, recipes_dir
from alignkit.config import to_dict

RECIPE = "sd3_tiny_flow_grpo"
SCRIPT = Path(sys.executable).with_name("alignkit")
TINY = ["train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4", "train.train_batch_size=4",
        "backbone.num_steps=3", "train.sample_every=1", "train.checkpoint_every=1"]


def _run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# --- show -------------------------------------------------------------------------------------------------


def test_show_prints_the_composed_validated_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", RECIPE, "train.epochs=3", "algo=tempflow_grpo"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_run_config(RECIPE, ["train.epochs=3", "algo=tempflow_grpo"]))
    assert shown["train"]["epochs"] == 3 and shown["algo"]["name"] == "tempflow_grpo"
    assert shown["recipe"] == RECIPE and shown["train"]["adam_betas"] == [0.9, 0.999]  # defaults filled in


def test_show_refuses_invalid_settings_like_train(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    bad = [f"output_dir={tmp_path / 'run'}", "algo.num_seeds=1", "backbone.num_steps=1"]
    assert main(["show", RECIPE, *bad]) == 2
    shown = _errors(caplog)
    assert capsys.readouterr().out == ""
    caplog.clear()
    assert main(["train", RECIPE, *bad]) == 2
    assert _errors(caplog) == shown
    assert "2 problems" in shown and "algo.num_seeds=1" in shown and "backbone.num_steps=1" in shown
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


# --- the command line itself ------------------------------------------------------------------------------


def test_without_arguments_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2  # argparse's status for a missing command: a bare `alignkit` no longer trains
    err = capsys.readouterr().err
    assert err.startswith("usage: alignkit")
    for command in ("train", "eval", "show", "list", "serve-reward"):
        assert command in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"alignkit {version('alignkit')}\n"


def test_unknown_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian", RECIPE]) == 2
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err


def test_options_before_and_after_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory joins sys.path (logged at debug level with -v)
    caplog.set_level("DEBUG")
    for argv in (["-v", "show", RECIPE, "train.epochs=2"], ["show", "-v", RECIPE, "train.epochs=2"],
                 ["show", RECIPE, "-v", "train.epochs=2"], ["show", "train.epochs=2", RECIPE, "--verbose"]):
        caplog.clear()
        assert main(argv) == 0, argv
        assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 2
        assert f"added the working directory {tmp_path}" in caplog.text, argv
    caplog.clear()
    assert main(["show", RECIPE, "train.epochs=2"]) == 0  # without -v: no debug lines
    assert "added the working directory" not in caplog.text
    assert main(["train", RECIPE, "ode", "-q"]) == 2  # two recipes
    assert "give one recipe, got 2: sd3_tiny_flow_grpo, ode" in _errors(caplog)


# --- recipe files -----------------------------------------------------------------------------------------

USER_RECIPE = """\
# my own recipe: the shipped groups, one of my own, and a field of my own choosing
defaults:
  - /alignkit_defaults
  - backbone: sd3_tiny
  - reward: jpeg_compressibility
  - algo: mine
  - train: cpu_tiny
  - prompts: simple_objects
  - speed: slow
  - _self_
output_dir: outputs/mine
train: {epochs: 5}
"""
SPEED = "# @package _global_\n# {what}\ntrain: {{sample_every: {every}}}\n"


def test_recipe_file_resolves_shipped_and_own_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "recipes" / "algo").mkdir(parents=True)
    (tmp_path / "recipes" / "mine.yaml").write_text(USER_RECIPE)
    (tmp_path / "recipes" / "algo" / "mine.yaml").write_text("defaults: [flow_grpo, _self_]\nnum_seeds: 8\n")
    (tmp_path / "recipes" / "speed").mkdir()  # a group of the user's own
    (tmp_path / "recipes" / "speed" / "slow.yaml").write_text(SPEED.format(what="samples rarely", every=50))
    (tmp_path / "recipes" / "speed" / "fast.yaml").write_text(SPEED.format(what="samples often", every=1))
    monkeypatch.chdir(tmp_path)
    assert main(["show", "recipes/mine.yaml"]) == 0  # relative to the working directory
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["recipe"] == str(tmp_path / "recipes" / "mine.yaml")
    assert shown["backbone"]["pretrained"] == "builtin:tiny-sd3" and shown["train"]["epochs"] == 5
    assert shown["algo"]["num_seeds"] == 8 and shown["algo"]["step_kind"] == "flow_grpo"  # own group, shipped base
    assert main(["show", str(tmp_path / "recipes" / "mine.yaml"), "algo=tempflow_grpo", "train.epochs=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algo"]["name"] == "tempflow_grpo" and shown["train"]["epochs"] == 2
    assert shown["train"]["sample_every"] == 50
    assert main(["show", "recipes/mine.yaml", "algo=flow_grpo", "speed=fast"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["sample_every"] == 1 and shown["algo"]["num_seeds"] == 4
    assert main(["show", "recipes/mine.yaml", "algo=mine"]) == 0  # an option only the file's folder has
    assert yaml.safe_load(capsys.readouterr().out)["algo"]["num_seeds"] == 8


def test_shown_config_is_a_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "shapes_multi_objective", "reward.jpeg.weight=0.5"]) == 0
    first = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(first)
    assert main(["show", str(tmp_path / "run.yaml")]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again.pop("recipe") == str(tmp_path / "run.yaml")
    expected = yaml.safe_load(first)
    expected.pop("recipe")
    assert again == expected


def test_missing_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "nothere.yaml"]) == 2
    msg = _errors(caplog)
    assert "recipe file 'nothere.yaml' not found" in msg and str(tmp_path / "nothere.yaml") in msg
    assert "alignkit list" in msg


@pytest.mark.integration
def test_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("defaults:\n  - /alignkit_defaults\n  - backbone: sd3_tiny\ntrain: {epochs: 3\nseed: 1\n")
    proc = _run_script(["train", "broken.yaml"], tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert f"recipe file {bad}: YAML syntax error at line 5" in errors[0]
    assert "(while parsing a flow mapping at line 4" in errors[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# --- typos ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "words"), [
    ("algoo=flow_grpo", ["unknown setting or config group 'algoo'", "Did you mean 'algo' (algo=flow_grpo)?",
                         "backbone, reward, algo, train, prompts", "output_dir", "seed"]),
    ("train.epoch=3", ["unknown setting 'epoch' of train", "Did you mean train.epochs?", "learning_rate"]),
    ("algo=flow_grp", ["config group algo has no option 'flow_grp'", "Did you mean algo=flow_grpo?", "mixgrpo"]),
    ("reward.jpeg_compressibility.wieght=2", ["Did you mean reward.jpeg_compressibility.weight?", "fn, kwargs"]),
    ("~reward.jpeg_compresibility", ["there is no reward 'jpeg_compresibility' in reward",
                                     "Did you mean reward.jpeg_compressibility?"]),
])
def test_misspelt_override_gets_the_closest_name(override: str, words: list[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert main(["train", RECIPE, override]) == 2
    msg = _errors(caplog)
    for word in words:
        assert word in msg, (word, msg)
    assert "To append" not in msg and f"+{override}" not in msg  # not hydra's advice to add '+'


# --- reward overrides -------------------------------------------------------------------------------------


def _shown_rewards(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert main(["show", RECIPE, *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)["reward"]


def test_reward_replace_and_add_forms(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(_shown_rewards(["reward=jpeg_incompressibility"], capsys)) == ["jpeg_incompressibility"]
    added = _shown_rewards(["reward.inc={fn: jpeg_incompressibility, weight: 0.25}"], capsys)
    assert list(added) == ["jpeg_compressibility", "inc"] and added["inc"]["weight"] == 0.25
    assert list(_shown_rewards(["+reward.inc={fn: jpeg_incompressibility}"], capsys)) == ["jpeg_compressibility",
                                                                                          "inc"]
    assert list(_shown_rewards(["~reward", "+reward={inc: {fn: jpeg_incompressibility}}"], capsys)) == ["inc"]


def test_reward_set_merge_is_refused_naming_both_forms(capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert main(["show", RECIPE, "+reward={inc: {fn: jpeg_incompressibility, weight: 0.3}}"]) == 2
    assert capsys.readouterr().out == ""
    msg = _errors(caplog)
    for words in ("merged with the recipe's reward (jpeg_compressibility)", "would use jpeg_compressibility, inc",
                  "reward=OPTION", "reward.inc={fn: ..., weight: ...}"):
        assert words in msg, (words, msg)


def test_reward_module_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cli_cwd_reward.py").write_text(
        "def score(samples, prompts, metadata):\n    return [0.0] * len(samples)\n")
    override = 'reward.mine={fn: "cli_cwd_reward:score", weight: 0.5}'
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["show", RECIPE, override]) == 2  # checked before any model loads
    assert "no module named 'cli_cwd_reward'" in _errors(caplog) and str(elsewhere) in _errors(caplog)
    monkeypatch.chdir(tmp_path)
    assert main(["show", RECIPE, override]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["reward"]["mine"]["fn"] == "cli_cwd_reward:score"
    assert str(tmp_path) not in sys.path  # put back when the command ends


# --- list -------------------------------------------------------------------------------------------------


def test_list_without_kind_shows_recipes_and_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in list_recipes():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        assert describe(recipes_dir() / f"{name}.yaml") in row
    assert any("Flow-GRPO on a tiny random SD3 pipeline" in line for line in lines)
    assert "config groups, chosen with GROUP=OPTION: backbone, reward, algo, train, prompts" in out
    assert "samplers, rewards, plans, steps, credit" in out


@pytest.mark.parametrize("group", ["backbone", "reward", "algo", "train", "prompts"])
def test_list_group_shows_options_with_their_first_comment(group: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", group]) == 0
    lines = capsys.readouterr().out.splitlines()
    options = group_options(group)
    assert [line.split()[0] for line in lines] == list(options)
    for line, path in zip(lines, options.values()):
        first = next(t for t in path.read_text().splitlines() if t.startswith("#")).lstrip("#").strip()
        assert line.endswith(first), (line, first)


def test_list_registry_kinds_and_unknown_kind(capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert main(["list", "samplers"]) == 0
    assert {"sd3", "flux", "wan"} <= set(capsys.readouterr().out.split())
    assert main(["list", "credit"]) == 0 and "group" in capsys.readouterr().out.split()
    assert main(["list", "algos"]) == 2
    msg = _errors(caplog)
    assert "\n" not in msg and "unknown kind (did you mean algo?)" in msg
    assert "recipes, backbone, reward, algo, train, prompts, samplers, rewards, plans, steps, credit" in msg


# --- refused launches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_sharding_modes_are_refused(var: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(var, "true")
    assert main(["train", RECIPE, f"output_dir={tmp_path / 'run'}"]) == 2
    msg = _errors(caplog)
    assert f"{var}=true" in msg and "train.sharding=fsdp" in msg and "not supported" in msg
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(var, "false")
    assert main(["show", RECIPE]) == 0


# --- a real run -------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_train_from_a_user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console script from the user's folder: a reward module there, the run's config recorded, only
    alignkit's progress bar, and log lines that do not break it."""
    (tmp_path / "cli_user_reward.py").write_text(
        "def brightness(samples, prompts, metadata):\n    return [float(s.mean()) for s in samples]\n")
    overrides = ["output_dir=run", "train.epochs=2", *TINY, 'reward.bright={fn: "cli_user_reward:brightness"}']
    proc = _run_script(["train", RECIPE, *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "reward/bright_mean" in rows[-1]

    saved = read_run_config(run)
    assert saved is not None and saved.overrides == overrides
    monkeypatch.chdir(tmp_path)  # composed there: the relative output_dir, the reward module
    monkeypatch.syspath_prepend(str(tmp_path))
    assert saved.config == to_dict(load_run_config(RECIPE, overrides))
    assert saved.run_config().reward["bright"].fn == "cli_user_reward:brightness"

    for bar in ("Loading pipeline components", "Loading weights", "Loading checkpoint shards"):
        assert bar not in proc.stderr
    assert "alignkit:" in proc.stderr  # alignkit's own bar
    # a log line written while the bar is up starts on a line of its own (the bar is cleared first)
    pieces = [piece for line in proc.stderr.split("\n") for piece in line.split("\r")]
    logged = [p for p in pieces if " INFO " in p]
    assert any("checkpoint written" in p for p in logged)
    assert all(p.lstrip().startswith(("2", "[")) for p in logged), logged
