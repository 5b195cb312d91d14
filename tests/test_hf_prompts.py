"""prompts.source=hf: prompts (and metadata columns) from a Hugging Face datasets dataset, offline: a saved dataset
folder (load_from_disk), a local data file or a folder of them (load_dataset); bad columns, splits and options are
refused naming the setting and the valid values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.compose import load_run_config
from alignkit.config import PromptsConfig
from alignkit.prompts import hf_source, load_prompts

datasets = pytest.importorskip("datasets")

TRAIN = {"question": ["What is 2+3?", "What is 7-4?", "What is 6*2?"], "answer": ["#### 5", "#### 3", "#### 12"],
         "level": [1, 1, 2]}
TEST = {"question": ["What is 9+9?"], "answer": ["#### 18"], "level": [3]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict written by save_to_disk (train and test splits)."""
    folder = tmp_path_factory.mktemp("hf") / "gsm_like"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(TRAIN),
                          "test": datasets.Dataset.from_dict(TEST)}).save_to_disk(str(folder))
    return folder


def _hf(**options: object) -> PromptsConfig:
    return PromptsConfig(source="hf", options=dict(options))


def test_saved_dataset_dict_splits_column_and_metadata(saved: Path) -> None:
    train, held_out = hf_source(_hf(path=str(saved), split="train", eval_split="test", column="question",
                                    metadata_columns=["answer", "level"]))
    assert train.prompts == TRAIN["question"]
    assert train.metadata[2] == {"answer": "#### 12", "level": 2}
    assert held_out.prompts == ["What is 9+9?"] and held_out.metadata == [{"answer": "#### 18", "level": 3}]
    # defaults: split train, no held-out split (the training prompts), no metadata
    train, held_out = load_prompts(_hf(path=str(saved), column="question"))
    assert held_out is train and train.metadata == [{}, {}, {}]


def test_saved_single_dataset_local_file_and_data_folder(tmp_path: Path) -> None:
    single = tmp_path / "single"
    datasets.Dataset.from_dict(TEST).save_to_disk(str(single))
    train, _ = hf_source(_hf(path=str(single), column="question"))
    assert train.prompts == TEST["question"]
    with pytest.raises(ValueError, match=r"prompts\.options\.split='train': .* holds one dataset without splits"):
        hf_source(_hf(path=str(single), column="question", split="train"))

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in
                             zip(TRAIN["question"], TRAIN["answer"], strict=True)))
    train, _ = hf_source(_hf(path=str(jsonl), metadata_columns=["answer"]))
    assert train.prompts == TRAIN["question"] and train.metadata[0] == {"answer": "#### 5"}

    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("text,tag\na red bus,colors\ntwo cups,counting\n")
    (folder / "test.csv").write_text("text,tag\nthree cats,counting\n")
    train, held_out = hf_source(_hf(path=str(folder), column="text", eval_split="test", metadata_columns=["tag"]))
    assert train.prompts == ["a red bus", "two cups"] and held_out.metadata == [{"tag": "counting"}]


@pytest.mark.parametrize(("options", "words"), [
    ({"column": "caption"}, ["prompts.options.column='caption'", "no column 'caption'",
                             "its columns: question, answer, level", "set prompts.options.column to one of them"]),
    ({"column": "question", "metadata_columns": ["answer", "solution"]},
     ["prompts.options.metadata_columns=['answer', 'solution']", "no column 'solution'", "question, answer, level"]),
    ({"column": "question", "eval_split": "validation"},
     ["prompts.options.eval_split='validation'", "no split 'validation'", "its splits: train, test"]),
    ({"column": "level"}, ["prompts.options.column='level'", "row 0", "int, not text"]),
    ({"column": "question", "colum": "x"}, ["prompts.options.colum: unknown option", "metadata_columns"]),
    ({"column": "question", "metadata_columns": "answer"}, ["prompts.options.metadata_columns='answer'",
                                                            "a list of column names"]),
])
def test_bad_options_name_the_setting_and_the_valid_values(saved: Path, options: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        hf_source(_hf(path=str(saved), **options))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_missing_or_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"prompts\.options\.path=None: required with prompts\.source=hf"):
        hf_source(_hf())
    with pytest.raises(ValueError, match=r"prompts\.options\.path='.*nope\.jsonl': no such file or folder"):
        hf_source(_hf(path=str(tmp_path / "nope.jsonl")))
    odd = tmp_path / "prompts.xyz"
    odd.write_text("a\n")
    with pytest.raises(ValueError, match=r"a \.xyz file is not a data file datasets reads"):
        hf_source(_hf(path=str(odd)))


def test_without_datasets_installed_the_error_names_the_extra(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'alignkit\[data\]'"):
        hf_source(_hf(path=str(saved), column="question"))


def test_datasets_is_imported_only_when_the_source_is_used() -> None:
    code = ("import sys, alignkit.prompts, alignkit.compose, alignkit.evaluation\n"
            "assert 'datasets' not in sys.modules, 'datasets imported without prompts.source=hf'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_recipe_trains_and_evaluates_on_a_local_dataset(saved: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    opts = ["prompts.source=hf", f"+prompts.options={{path: '{saved}', column: question, eval_split: test}}"]
    cfg = load_run_config("sd3_tiny_flow_grpo", opts)
    assert cfg.prompts.options["path"] == str(saved)
    out = tmp_path / "run"
    assert main(["eval", "sd3_tiny_flow_grpo", *opts, f"output_dir={out}", "backbone.num_steps=2",
                 "eval.num_prompts=4", "-q"]) == 0
    rows = [json.loads(line) for line in (out / "eval" / "rewards.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == TEST["question"]
    # a bad column through the command line: exit 2, one message naming the setting, nothing written
    bad = ["prompts.source=hf", f"+prompts.options={{path: '{saved}', column: text}}"]
    assert main(["eval", "sd3_tiny_flow_grpo", *bad, f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "prompts.options.column='text'" in caplog.text and "its columns: question, answer, level" in caplog.text
    assert not (tmp_path / "bad").exists()
