"""The CLI as a user runs it: real commands through main(), exit codes and one-line errors."""

import json

import pytest

from conftest import cli_error as _error

from softprompt.cli import main


@pytest.fixture
def trained(tiny_model_dir, sentiment_files, tmp_path):
    train_file, dev_file = sentiment_files
    rc = main(["train", "--data", str(train_file), "--validation", str(dev_file), "--output", str(tmp_path / "run"),
               "--model", str(tiny_model_dir), "--steps", "6", "--batch-size", "8", "--virtual-tokens", "4",
               "--no-progress"])
    assert rc == 0
    return tmp_path / "run"


def test_train_eval_generate_export(trained, tiny_model_dir, sentiment_files, tmp_path, capsys):
    dev = str(sentiment_files[1])
    capsys.readouterr()
    assert main(["eval", "--prompt", str(trained), "--data", dev, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"loss", "accuracy"} and 0 <= result["accuracy"] <= 1
    # Without --prompt: the untuned model, same template.
    assert main(["eval", "--data", dev, "--model", str(tiny_model_dir), "--json"]) == 0
    untuned = json.loads(capsys.readouterr().out)
    assert untuned["prompt"] is None and untuned["loss"] != result["loss"]
    assert main(["generate", "--prompt", str(trained), "--max-new-tokens", "4", "--compare", "Review: the film was great .\nSentiment:"]) == 0
    out = capsys.readouterr().out
    assert "untuned:" in out and "tuned:" in out
    assert main(["export", "--prompt", str(trained), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    assert main(["import", str(tmp_path / "peft"), "--output", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "prompt.safetensors").exists()


def test_config_file_and_flags(tiny_model_dir, sentiment_files, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": str(sentiment_files[0]), "model": str(tiny_model_dir), "steps": 2,
                               "batch_size": 4, "virtual_tokens": 3, "lr": 0.05}))
    assert main(["train", "--config", str(cfg), "--output", str(tmp_path / "r"), "--lr", "0.07", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "r" / "softprompt.json").read_text())
    assert meta["training"]["lr"] == 0.07 and meta["training"]["steps"] == 2 and meta["n_virtual_tokens"] == 3


def test_errors_are_one_line(tiny_model_dir, trained, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "y"}\n{"input": \n')
    assert "bad.jsonl:2" in _error(capsys, ["train", "--data", str(bad), "--output", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"text": "x"}\n')
    assert "'input' is missing" in _error(capsys, ["train", "--data", str(missing), "--output", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    assert "model path not found" in _error(capsys, ["train", "--data", str(missing), "--output", str(tmp_path / "o"), "--model", "./no/such/model"])
    (trained / "prompt.safetensors").write_bytes(b"garbage")
    assert "not a readable safetensors" in _error(capsys, ["generate", "--prompt", str(trained), "--model", str(tiny_model_dir), "hi"])
    assert "already holds a run" in _error(capsys, ["train", "--data", str(missing), "--output", str(trained), "--model", str(tiny_model_dir)])
    assert not (tmp_path / "o").exists()


def test_prompt_for_another_model_is_an_error(trained, tmp_path, capsys):
    from conftest import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=3)
    assert "was trained for model" in _error(capsys, ["generate", "--prompt", str(trained), "--model", str(other), "hi"])


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export", "import", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: softprompt " + command in capsys.readouterr().out
