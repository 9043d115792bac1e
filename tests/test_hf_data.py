"""Hugging Face datasets as --data / --validation: folders written by save_to_disk, folders load_dataset reads, and
hub ids (the network path runs for real up to the point where no network answers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt import SoftPromptError, train
from softprompt.data import read_rows
from softprompt.evaluate import evaluate
from softprompt.hf_data import parse_source

from conftest import SUBJECTS, WORDS_NEG, WORDS_POS

datasets = pytest.importorskip("datasets")


def _sentiment_dict(n_train=48, n_val=16):
    """A DatasetDict shaped like GLUE SST-2: a sentence and an integer ClassLabel."""
    import random

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def rows(n, seed):
        rng = random.Random(seed)
        labels = [rng.random() < 0.5 for _ in range(n)]
        return {"sentence": [f"{rng.choice(SUBJECTS)} was {rng.choice(WORDS_POS if y else WORDS_NEG)} ." for y in labels],
                "label": [int(y) for y in labels]}

    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(n_train, 1), features=features),
                                 "validation": datasets.Dataset.from_dict(rows(n_val, 2), features=features)})


@pytest.fixture
def saved_dict(tmp_path):
    data = _sentiment_dict()
    data.save_to_disk(str(tmp_path / "sst2"))
    return tmp_path / "sst2", data


def test_save_to_disk_folders_read_as_rows(saved_dict, tmp_path):
    folder, data = saved_dict
    assert read_rows(folder) == data["train"].to_list()  # default split: train
    assert read_rows(f"{folder}@validation") == data["validation"].to_list()
    assert read_rows(folder)[0]["label"] in (0, 1)  # ClassLabel stays an integer, as in GLUE's TSV
    data["validation"].save_to_disk(str(tmp_path / "single"))  # a Dataset, not a DatasetDict
    assert read_rows(tmp_path / "single") == data["validation"].to_list()


def test_folders_load_dataset_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,label\ngood film,1\nbad film,0\n")
    (folder / "test.csv").write_text("sentence,label\nfine film,1\n")
    assert read_rows(folder) == [{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}]
    assert read_rows(f"{folder}@test") == [{"sentence": "fine film", "label": 1}]


def test_bad_splits_and_sources_are_clear_errors(saved_dict, tmp_path):
    folder, data = saved_dict
    with pytest.raises(SoftPromptError, match=r"sst2@test: no split 'test'; it has train, validation"):
        read_rows(f"{folder}@test")
    data["train"].save_to_disk(str(tmp_path / "single"))
    with pytest.raises(SoftPromptError, match="holds one dataset.*drop @validation"):
        read_rows(f"{tmp_path / 'single'}@validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoftPromptError, match="could not read .*empty as a Hugging Face dataset"):
        read_rows(tmp_path / "empty")
    for bad in ("hf:", "hf:glue:", "hf:glue:sst2@"):
        with pytest.raises(SoftPromptError, match=r"hf:ID\[:CONFIG\]\[@SPLIT\]"):
            read_rows(bad)


def test_parse_source_tells_datasets_from_files(tmp_path):
    (tmp_path / "d").mkdir()
    assert parse_source(tmp_path / "d").folder == tmp_path / "d"
    assert parse_source(f"{tmp_path / 'd'}@validation").split == "validation"
    hub = parse_source("hf:nyu-mll/glue:sst2@validation")
    assert (hub.hub_id, hub.config, hub.split) == ("nyu-mll/glue", "sst2", "validation")
    assert parse_source("hf:stanfordnlp/imdb").config is None
    assert parse_source(tmp_path / "rows@v2.jsonl") is None  # an ordinary file, even with an @ in its name
    assert parse_source("missing@train") is None  # no such folder: the file reader reports it


def test_missing_datasets_package_names_the_extra(saved_dict, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SoftPromptError, match=r"needs the `datasets` package: pip install 'softprompt\[datasets\]'"):
        read_rows(saved_dict[0])


def test_hub_id_offline_is_one_clear_line_naming_the_id(tmp_path):
    # The real hub path (load_dataset with id, config and split), offline: no traceback, the id in the message.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "softprompt", "eval", "--data", "hf:glue:sst2@validation"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("softprompt: error: hf:glue:sst2@validation: could not load the hub dataset glue "
                                "(config sst2)"), proc.stderr


def test_train_and_eval_on_saved_datasets_with_templates_and_label_map(tiny_base, saved_dict, tmp_path):
    folder, data = saved_dict
    template = dict(input_template="Review: {sentence}\nSentiment:", output_template=" {label}",
                    label_map="0=negative,1=positive")
    result = train(base=tiny_base, data=str(folder), validation=f"{folder}@validation", output=str(tmp_path / "run"),
                   steps=4, batch_size=8, virtual_tokens=4, progress=False, **template)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 4 and "val_accuracy" in log[-1]
    assert result.metrics["examples_seen"] == 32
    report = evaluate(f"{folder}@validation", [str(tmp_path / "run")], base=tiny_base, baselines=())
    assert report["task"] == "classification" and report["labels"] == [" negative", " positive"]
    assert report["n"] == 16 and report["data"] == f"{folder}@validation"
    # Template errors name the dataset and the row, as for files.
    with pytest.raises(SoftPromptError, match=r"sst2@validation: row 1: template field 'text' is missing"):
        evaluate(f"{folder}@validation", None, base=tiny_base, input_template="{text}",
                 output_template=" {label}", baselines=())
