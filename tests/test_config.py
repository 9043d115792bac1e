"""One typed config per command (train, distill, eval, generate, inspect, serve): the same config from flags, from a
--config file (JSON, YAML, TOML) and from the Python API; flags win; bad files fail on one line naming file and key."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from conftest import cli_error

from softprompt.cli import build_parser, main
from softprompt.config import (DistillConfig, EvalConfig, GenerateConfig, InspectConfig, ServeConfig, TrainConfig,
                               config_from_args)
from softprompt.errors import SoftPromptError

COMMANDS = {"train": TrainConfig, "distill": DistillConfig, "eval": EvalConfig, "generate": GenerateConfig,
            "inspect": InspectConfig, "serve": ServeConfig}


def write_config(path, values: dict):
    """`values` as a config file in the format its suffix names."""
    if path.suffix == ".json":
        path.write_text(json.dumps(values))
    elif path.suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        def toml_value(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, list):
                return "[" + ", ".join(toml_value(x) for x in v) + "]"
            return json.dumps(v)  # strings (escapes included) and numbers read the same in TOML

        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def parsed(command: str, argv: list[str], extras=None):
    args = build_parser().parse_args([command, *argv])
    return config_from_args(COMMANDS[command], args, extras), args


# command, file format, flags, the same settings as file keys (either spelling: the flag's or the field's)
CASES = [
    ("train", "json",
     ["--data", "d.jsonl", "--output", "o", "--input-template", r"Review: {x}\nSentiment:", "--no-chat", "--steps", "7",
      "--lr", "0.05", "--warmup", "3", "--report-to", "tensorboard"],
     {"data": "d.jsonl", "output": "o", "input-template": "Review: {x}\nSentiment:", "chat": False, "steps": 7,
      "lr": 0.05, "warmup": 3, "report_to": "tensorboard"}),
    ("distill", "toml",
     ["--teacher", "t.txt", "--data", "d.jsonl", "--output", "o", "--separator", r"\n---\n", "--deep", "--top-k", "16",
      "--epochs", "2"],
     {"teacher": "t.txt", "data": "d.jsonl", "output": "o", "separator": "\n---\n", "deep": True, "top_k": 16,
      "epochs": 2}),
    ("eval", "yaml",
     ["--data", "dev.jsonl", "--prompt", "runs/a", "--prompt", "runs/b", "--baselines", "untuned,kshot", "--stop", "END",
      "--stop", "###", "--task", "classification", "--instruction", r"Say\n", "--no-progress", "--limit", "5",
      "--chat"],
     {"data": "dev.jsonl", "prompt": ["runs/a", "runs/b"], "baselines": "untuned,kshot", "stop": ["END", "###"],
      "task": "classification", "instruction": "Say\n", "progress": False, "limit": 5, "chat": True}),
    ("generate", "json",
     ["--prompt", "runs/a", "--max-new-tokens", "5", "--temperature", "0.7", "--stop", "END", "--raw", "--seed", "3",
      "hello", "a second text"],
     {"text": ["hello", "a second text"], "prompt": "runs/a", "max-new-tokens": 5, "temperature": 0.7, "stop": "END",
      "raw": True, "seed": 3}),
    ("inspect", "toml",
     ["runs/a", "-k", "3", "--compare", "runs/b", "--dtype", "float32"],
     {"prompt": "runs/a", "top-k": 3, "compare": "runs/b", "dtype": "float32"}),
    ("serve", "yaml",
     ["--prompts", "p", "--host", "0.0.0.0", "--timeout", "30", "--max-prefill-tokens", "128", "--watch-interval", "0",
      "--allow-no-api-key", "--api-key-file", "k.txt", "--max-n", "2", "--max-connections", "40"],
     {"prompts": "p", "host": "0.0.0.0", "request_timeout": 30, "max_prefill_tokens": 128, "watch_interval": 0,
      "allow_no_api_key": True, "api_key_file": "k.txt", "max_n": 2, "max-connections": 40}),
]


@pytest.mark.parametrize("command,fmt,flags,values", CASES, ids=[c[0] for c in CASES])
def test_a_config_file_gives_the_same_config_as_the_flags(command, fmt, flags, values, tmp_path):
    from_flags, _ = parsed(command, flags)
    from_file, _ = parsed(command, ["--config", str(write_config(tmp_path / f"c.{fmt}", values))])
    assert from_file == from_flags
    # ... and it is not the defaults: every setting arrived (the two agree on something real)
    defaults = dataclasses.asdict(COMMANDS[command]())
    changed = {k for k, v in dataclasses.asdict(from_flags).items() if v != defaults[k]}
    assert changed == {k.replace("-", "_") for k in values}


def test_list_and_text_fields_read_as_a_user_means_them(tmp_path):
    cfg, _ = parsed("eval", ["--data", "d", "--stop", r"\n", "--baselines", "all"])
    assert cfg.stop == ["\\n"] and cfg.baselines == ["all"]  # --stop is taken literally, as before
    cfg, _ = parsed("generate", ["--prompt", "p", ""])  # an empty text is a text (an --lm prompt writes from nothing)
    assert cfg.text == [""]
    cfg, args = parsed("generate", ["--prompt", "p"])  # no text: read from standard input by the command
    assert cfg.text is None and args.compare is None


@pytest.mark.parametrize("command,file_values,flags,field,expected", [
    ("train", {"data": "d", "output": "o", "lr": 0.05, "steps": 9}, ["--lr", "0.07"], "lr", 0.07),
    ("distill", {"teacher": "t", "data": "d", "output": "o", "top_k": 8}, ["--top-k", "4"], "top_k", 4),
    ("eval", {"data": "d", "stop": ["A", "B"]}, ["--stop", "C"], "stop", ["C"]),
    ("generate", {"text": ["from the file"]}, ["from the flags"], "text", ["from the flags"]),
    ("inspect", {"prompt": "runs/file"}, ["runs/flag"], "prompt", "runs/flag"),
    ("serve", {"prompts": "p", "max_running": 8, "request_timeout": 5}, ["--timeout", "9"], "request_timeout", 9.0),
])
def test_flags_win_over_the_file(command, file_values, flags, field, expected, tmp_path):
    path = write_config(tmp_path / "c.json", file_values)
    cfg, _ = parsed(command, ["--config", str(path), *flags])
    assert getattr(cfg, field) == expected
    others = {k: v for k, v in file_values.items() if k != field}
    assert all(getattr(cfg, k) == v for k, v in others.items())  # the rest still comes from the file


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_key_is_an_error_naming_the_file_and_the_key(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # nothing may get as far as reading input
    path = write_config(tmp_path / "settings.yaml", {"max_new_tokns": 4, "model": "./no/such/model"})
    err = cli_error(capsys, [command, "--config", str(path)])
    assert str(path) in err and "unknown key 'max_new_tokns'" in err
    if command in ("distill", "eval", "generate"):
        assert "did you mean 'max_new_tokens'" in err


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    wrong_type = write_config(tmp_path / "s.json", {"prompts": "p", "max_running": "32"})
    assert f"{wrong_type}: max_running must be an integer, got '32'" in cli_error(capsys, ["serve", "--config", str(wrong_type)])
    broken = tmp_path / "b.toml"
    broken.write_text("steps = \n")
    assert f"{broken}: cannot parse config" in cli_error(capsys, ["train", "--config", str(broken)])
    assert "config file not found" in cli_error(capsys, ["eval", "--config", str(tmp_path / "none.json")])
    assert "missing required field(s): prompt" in cli_error(capsys, ["inspect", "--config", str(write_config(tmp_path / "i.json", {"top_k": 2}))])


def test_every_serve_config_field_has_a_flag():
    for f in dataclasses.fields(ServeConfig):
        if f.type in ("bool",):
            value, argv = (not f.default), [("--no-" if f.default else "--") + f.name.replace("_", "-")]
        else:
            kind = f.type.split(" |")[0]
            value = {"int": 7, "float": 3.5, "str": "x-value"}[kind]
            argv = ["--" + f.name.replace("_", "-"), str(value)]
        assert value != f.default
        cfg, _ = parsed("serve", argv)
        assert getattr(cfg, f.name) == value, f.name


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_field(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config FILE" in out
    for f in dataclasses.fields(COMMANDS[command]):
        spelled = f"\n  {f.name.upper()} " if f.metadata.get("positional") else "--" + f.name.replace("_", "-") + " "
        assert spelled in out, f.name
        assert "".join(f.metadata["help"].split())[:30] in "".join(out.split()), f.name  # with its help


# ---- the Python API: a config object and today's call forms run the same code --------------------------------


@pytest.fixture
def prompt_dir(tiny_base, tmp_path):
    from softprompt import SoftPrompt

    p = SoftPrompt.initialise(tiny_base, 4, "text", init_text="Review: the film was great")
    p.meta["template"] = {"input": "Review: {input} .\nSentiment:", "output": " {output}"}
    p.save(tmp_path / "p")
    return tmp_path / "p"


def test_evaluate_generate_inspect_take_their_config(tiny_base, prompt_dir, sentiment_files):
    from softprompt import evaluate, generate
    from softprompt.probe import inspect_prompt

    dev = str(sentiment_files[1])
    by_args = evaluate(dev, str(prompt_dir), base=tiny_base, limit=8, progress=False)
    by_config = evaluate(EvalConfig(data=dev, prompt=[str(prompt_dir)], limit=8, progress=False), base=tiny_base)
    by_dict = evaluate({"data": dev, "limit": 8, "progress": False}, str(prompt_dir), base=tiny_base)
    assert by_args["loss"] == by_config["loss"] == by_dict["loss"] and by_args["accuracy"] == by_config["accuracy"]
    untuned = evaluate(EvalConfig(data=dev, limit=8, progress=False), base=tiny_base, input_template="Review: {input} .\nSentiment:")
    assert untuned["prompt"] is None and untuned["loss"] != by_args["loss"]

    texts = ["the film was", "the meal was"]
    by_args = generate(texts, str(prompt_dir), base=tiny_base, max_new_tokens=4)
    assert generate(GenerateConfig(text=texts, prompt=str(prompt_dir), max_new_tokens=4), base=tiny_base) == by_args
    assert generate(texts[0], str(prompt_dir), base=tiny_base, max_new_tokens=4) == by_args[0]  # one text: one str
    raw = generate(GenerateConfig(text=texts, prompt=str(prompt_dir), max_new_tokens=4), base=tiny_base, raw=True)
    assert raw != by_args  # keyword arguments override the config's fields
    with pytest.raises(SoftPromptError, match="unknown GenerateConfig field"):
        generate(texts, str(prompt_dir), base=tiny_base, max_tokens=4)

    report = inspect_prompt(InspectConfig(prompt=str(prompt_dir), top_k=2), base=tiny_base)
    assert report == inspect_prompt(str(prompt_dir), k=2, base=tiny_base) and report["k"] == 2


def test_cli_config_file_runs_like_the_flags(tiny_model_dir, sentiment_files, tmp_path, capsys):
    dev = str(sentiment_files[1])
    flags = ["--data", dev, "--model", str(tiny_model_dir), "--input-template", r"Review: {input} .\nSentiment:",
             "--limit", "6", "--dtype", "float32", "--device", "cpu", "--json"]
    assert main(["eval", *flags]) == 0
    want = json.loads(capsys.readouterr().out)
    path = write_config(tmp_path / "eval.toml", {"data": dev, "model": str(tiny_model_dir), "limit": 6,
                                                 "input_template": "Review: {input} .\nSentiment:", "dtype": "float32",
                                                 "device": "cpu", "json": True})
    assert main(["eval", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == want  # `json: true` in the file prints JSON as --json does

    assert main(["generate", "--model", str(tiny_model_dir), "--max-new-tokens", "3", "--dtype", "float32", "--device",
                 "cpu", "the film was"]) == 0
    want = capsys.readouterr().out
    path = write_config(tmp_path / "gen.yaml", {"text": ["the film was"], "model": str(tiny_model_dir),
                                                "max_new_tokens": 3, "dtype": "float32", "device": "cpu"})
    assert main(["generate", "--config", str(path)]) == 0
    assert capsys.readouterr().out == want and want.strip()


# ---- serve: the config reaches the app and uvicorn; the safety rules hold with a file too -----------------------


def test_create_app_takes_a_config_and_overrides_without_changing_it(tiny_base, tmp_path):
    pytest.importorskip("starlette")
    from softprompt.serve import ServeConfig as FromServe
    from softprompt.serve import create_app

    assert FromServe is ServeConfig
    cfg = ServeConfig(max_n=3, watch_interval=0)
    app = create_app(tiny_base, None, cfg, max_n=2, served_model_name="tiny")
    state = app.state.server
    assert state.limits.max_n == 2 and state.model_name == "tiny" and cfg.max_n == 3 and cfg.served_model_name is None
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert create_app(tiny_base, None, ServeConfig(api_key_file=str(key), watch_interval=0)).state.server.config.api_key == "s3cret"
    with pytest.raises(SoftPromptError, match="unknown ServeConfig field"):
        create_app(tiny_base, None, cfg, max_batch=4)


def test_serve_refuses_an_exposed_host_from_a_file_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    path = write_config(tmp_path / "serve.yaml", {"prompts": str(tmp_path), "host": "0.0.0.0", "model": "./no/such/model"})
    err = cli_error(capsys, ["serve", "--config", str(path)])
    assert "--host 0.0.0.0 without an API key" in err and "model path not found" not in err
    assert "serve needs --prompts" in cli_error(capsys, ["serve", "--model", "./no/such/model"])


def test_serve_command_passes_its_config_to_the_server(tiny_model_dir, tiny_base, prompt_dir, tmp_path, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    path = write_config(tmp_path / "serve.toml", {
        "prompts": str(prompt_dir.parent), "model": str(tiny_model_dir), "dtype": "float32", "device": "cpu",
        "host": "0.0.0.0", "api-key-file": str(key), "max_running": 4, "max_waiting": 10, "request_timeout": 30,
        "watch_interval": 0, "max_virtual_tokens": 16, "max_n": 5})
    assert main(["serve", "--config", str(path), "--port", "9123", "--max-n", "2"]) == 0
    (uv,) = started
    assert (uv.host, uv.port, uv.limit_concurrency, uv.timeout_graceful_shutdown) == ("0.0.0.0", 9123, 4 + 10 + 16, 35)
    state = uv.app.state.server
    assert state.config.api_key == "s3cret" and state.config.api_key_file is None
    assert state.limits.max_n == 2 and state.scheduler.max_running == 4 and state.registry.max_virtual_tokens == 16
    assert list(state.registry.entries) == ["p"]
