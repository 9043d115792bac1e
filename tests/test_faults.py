"""Fault injection on training, artifacts and data files: torn logs, full disks, diverging runs, corrupt or foreign
files. Each fault gives one line naming the file (and line or field), loses nothing, and a resume is bit-exact.
The long randomised trials (SIGKILL inside every write, 20+ runs) are bench/reliability.py."""

from __future__ import annotations

import json
import os
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt import SoftPrompt, SoftPromptError, train
from softprompt.data import Encoder, Template, read_rows
from softprompt.peft_io import export_peft, read_peft_prompt

from conftest import cli_error


def _train(base, files, out, **kw):
    args = dict(data=str(files[0]), output=str(out), steps=10, batch_size=8, lr=0.1, virtual_tokens=4,
                progress=False, save_every=4)
    args.update(kw)
    return train(base=base, **args)


def _log_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tiny_base, tmp_path_factory):
    """The uninterrupted reference run every faulty run must reproduce bit for bit."""
    from conftest import sentiment_rows, write_jsonl

    d = tmp_path_factory.mktemp("full")
    files = (write_jsonl(d / "train.jsonl", sentiment_rows(48, 1)),)
    return files, _train(tiny_base, files, d / "run")


# ---- training: torn log, full disk, stale temp files, divergence ------------------------------------------------


def test_a_torn_last_log_line_does_not_block_resume(tiny_base, full_run, tmp_path):
    files, full = full_run

    def interrupt(step, record):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, files, tmp_path / "cut", on_step=interrupt)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "epoch": 0, "lo')  # what a full disk or a kill mid-append leaves
    resumed = _train(tiny_base, files, tmp_path / "cut", resume=True)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)
    assert _log_steps(tmp_path / "cut") == list(range(1, 11))


def test_file_size_limit_during_a_log_append_names_the_log_and_resumes(tiny_base, full_run, tmp_path):
    """`ulimit -f` reached inside an append: half a line is written, then EFBIG. One line naming the log; the
    resume drops the torn line and reproduces the uninterrupted run."""
    files, full = full_run
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit_disk(step, record):
        if step == 5:
            resource.setrlimit(resource.RLIMIT_FSIZE, ((run / "metrics.jsonl").stat().st_size + 20, hard))

    try:
        with pytest.raises(SoftPromptError, match=r"cannot write .*metrics\.jsonl: File too large"):
            _train(tiny_base, files, run, on_step=limit_disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # the torn line is there
    resumed = _train(tiny_base, files, run, resume=True)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)
    assert _log_steps(run) == list(range(1, 11))


def test_file_size_limit_during_a_checkpoint_keeps_the_previous_one(tiny_base, full_run, tmp_path):
    """RLIMIT_FSIZE (what `ulimit -f` sets; Python ignores SIGXFSZ, so writes fail with EFBIG) from step 5 on: the
    step-8 checkpoint cannot be written. One line naming it, the step-4 checkpoint intact, no temp file left, and
    the resume reproduces the uninterrupted run."""
    files, full = full_run
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit_disk(step, record):
        if step == 5:
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # the log fits, a checkpoint (~3 KB) not

    try:
        with pytest.raises(SoftPromptError, match=r"cannot write .*checkpoint\.safetensors: File too large .*"
                                                  r"\(the previous checkpoint\.safetensors is unchanged\)"):
            _train(tiny_base, files, run, on_step=limit_disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not [f for f in os.listdir(run) if ".tmp-" in f]
    from safetensors import safe_open

    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"])["step"] == 4
    resumed = _train(tiny_base, files, run, resume=True)
    assert torch.equal(full.prompt.embeddings, resumed.prompt.embeddings)


def test_stale_temp_files_of_dead_writers_are_removed(tiny_base, full_run, tmp_path):
    files, _ = full_run
    run = tmp_path / "run"
    run.mkdir()
    dead = run / ".checkpoint.safetensors.tmp-999999999"  # over any pid_max: that writer is gone
    alive = run / f".prompt.safetensors.tmp-{os.getppid()}"  # a live process: maybe still writing, left alone
    dead.write_bytes(b"half")
    alive.write_bytes(b"busy")
    _train(tiny_base, files, run, steps=2)
    assert not dead.exists() and alive.exists()


def test_a_diverging_run_stops_with_the_last_good_checkpoint(tiny_base, full_run, tmp_path):
    files, _ = full_run
    run = tmp_path / "run"

    def diverge(step, record):
        if step == 5:
            record["prompt"].fill_(float("nan"))  # shares the parameter's storage: the next loss is NaN

    with pytest.raises(SoftPromptError, match=r"step 6: the loss is nan .*last good checkpoint is .*checkpoint"):
        _train(tiny_base, files, run, on_step=diverge)
    assert not (run / "prompt.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # valid JSON only
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    ckpt = load_file(str(run / "checkpoint.safetensors"))
    assert all(torch.isfinite(t).all() for t in ckpt.values())


def test_an_absurd_learning_rate_never_saves_an_absurd_prompt(tiny_base, full_run, tmp_path):
    files, _ = full_run
    with pytest.raises(SoftPromptError, match=r"step 1: the prompt holds non-finite or huge values"):
        _train(tiny_base, files, tmp_path / "run", lr=1e30, warmup=0)
    assert not (tmp_path / "run" / "prompt.safetensors").exists()
    with pytest.raises(SoftPromptError, match="lr must be a finite number >= 0, got inf"):
        _train(tiny_base, files, tmp_path / "run2", lr=float("inf"))


@pytest.mark.parametrize("flags, needle", [
    (["--save-every", "0"], "save_every must be >= 1, got 0"),
    (["--steps", "-3"], "steps must be >= 1, got -3"),
    (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    (["--epochs", "0"], "epochs must be a positive number"),
])
def test_bad_numbers_are_one_line(capsys, tmp_path, flags, needle):
    (tmp_path / "d.jsonl").write_text('{"input": "a", "output": "b"}\n')
    err = cli_error(capsys, ["train", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o"), *flags])
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_of_another_shape_is_named(tiny_base, full_run, tmp_path):
    files, _ = full_run
    run = tmp_path / "run"

    def interrupt(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, files, run, on_step=interrupt)
    ckpt = run / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    tensors = {k: torch.zeros(5, *v.shape[1:]) for k, v in load_file(str(ckpt)).items()}  # 5 tokens, not 4
    save_file(tensors, str(ckpt), metadata=meta)
    with pytest.raises(SoftPromptError, match=r"checkpoint\.safetensors: tensor 'param/embeddings' is \(5, 4, 16\), "
                                              r"this run needs \(4, 4, 16\)"):  # a deep prompt: 2 x layers, kv_dim
        _train(tiny_base, files, run, resume=True)


# ---- artifacts: corrupt, foreign, half-saved, non-finite ------------------------------------------------------


@pytest.fixture()
def good_prompt(tiny_base, tmp_path):
    return SoftPrompt.initialise(tiny_base, 3, "random", seed=0).save(tmp_path / "good")


@pytest.mark.parametrize("meta, needle", [
    ([], "must hold a JSON object, got list"),
    ({"base": "x"}, "field 'base' must be an object, got str"),
    ({"template": 5}, "field 'template' must be an object, got int"),
    ({"template": {"input": 7}}, "template field 'input' must be a string"),
    ("9" * 5000, "is not valid JSON"),
])
def test_a_foreign_softprompt_json_is_one_line(tiny_base, good_prompt, meta, needle):
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (good_prompt / "softprompt.json").write_text(text)
    with pytest.raises(SoftPromptError, match="softprompt.json") as e:
        SoftPrompt.load(good_prompt, tiny_base)
    assert needle in str(e.value)


@pytest.mark.parametrize("values, needle", [
    (float("nan"), "NaN or infinite values"),
    (float("inf"), "NaN or infinite values"),
    (1e30, "values up to 1e+30"),
])
def test_non_finite_or_absurd_prompts_are_refused(tiny_base, good_prompt, values, needle):
    save_file({"prompt_embeddings": torch.full((3, 32), values)}, str(good_prompt / "prompt.safetensors"))
    with pytest.raises(SoftPromptError, match="prompt.safetensors") as e:
        SoftPrompt.load(good_prompt, tiny_base)
    assert needle in str(e.value)
    with pytest.raises(SoftPromptError, match="NaN or infinite|values up to"):
        SoftPrompt(torch.full((3, 32), values)).save(good_prompt.parent / "again")


def test_a_half_saved_artifact_needs_the_file_named(tiny_base, good_prompt):
    (good_prompt / "softprompt.json").unlink()  # the tensor is written first: a kill in between leaves this
    with pytest.raises(SoftPromptError, match="prompt.safetensors without softprompt.json .*interrupted save"):
        SoftPrompt.load(good_prompt, tiny_base)
    assert SoftPrompt.load(good_prompt / "prompt.safetensors", tiny_base).n_virtual_tokens == 3  # said explicitly
    assert SoftPrompt.load(good_prompt).n_virtual_tokens == 3  # no base: nothing to check against anyway


def test_files_from_two_saves_are_refused(tiny_base, good_prompt):
    meta = json.loads((good_prompt / "softprompt.json").read_text())
    (good_prompt / "softprompt.json").write_text(json.dumps({**meta, "n_virtual_tokens": 7}))
    with pytest.raises(SoftPromptError, match="says 7 virtual tokens, prompt.safetensors has 3"):
        SoftPrompt.load(good_prompt, tiny_base)


def test_bad_peft_adapters_are_one_line(tiny_base, tmp_path):
    adapter = export_peft(SoftPrompt.initialise(tiny_base, 2, "random"), tmp_path / "a")
    (adapter / "adapter_config.json").write_text("[]")
    with pytest.raises(SoftPromptError, match=r"adapter_config.json must hold a JSON object"):
        read_peft_prompt(adapter)
    adapter = export_peft(SoftPrompt.initialise(tiny_base, 2, "random"), tmp_path / "b")
    save_file({"prompt_embeddings": torch.zeros(0, 32)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SoftPromptError, match="no virtual tokens"):
        read_peft_prompt(adapter)
    save_file({"prompt_embeddings": torch.full((2, 32), float("nan"))}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(SoftPromptError, match="NaN or infinite"):
        SoftPrompt.load(adapter, tiny_base)


def test_cli_names_the_bad_artifact(capsys, tiny_model_dir, good_prompt):
    (good_prompt / "softprompt.json").write_text("[]")
    err = cli_error(capsys, ["generate", "--model", str(tiny_model_dir), "--prompt", str(good_prompt), "hello"])
    assert "softprompt.json must hold a JSON object" in err


# ---- data files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, needle", [
    ("bad.jsonl", b'{"input": "a", "output": "b"}\n{"input": "\xff\xfe", "output": "c"}\n',
     r"bad\.jsonl:2: not UTF-8 text \(byte 0xff\)"),
    ("utf16.jsonl", '{"input": "a", "output": "b"}\n'.encode("utf-16"), r"utf16\.jsonl: the file is UTF-16 text"),
    ("blob.csv", b"\x00\x01\x02\x9f\x00" * 50, r"blob\.csv:1: binary data, not text"),
    ("big.jsonl", b'{"input": ' + b"9" * 5000 + b', "output": "b"}\n', r"big\.jsonl:1: invalid JSON"),
])
def test_undecodable_data_files_name_file_and_line(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SoftPromptError, match=needle):
        read_rows(tmp_path / name)


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t"), (".jsonl", None)])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, suffix, sep):
    path = tmp_path / f"bom{suffix}"
    text = f"input{sep}output\nhello{sep}world\n" if sep else '{"input": "hello", "output": "world"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_rows(path) == [{"input": "hello", "output": "world"}]


@pytest.mark.parametrize("line, needle", [
    ('{"input": "a", "output": null}', "row 2: field 'output' is null"),
    ('{"input": NaN, "output": "b"}', "row 2: field 'input' is nan"),
    ('{"input": "a", "output": Infinity}', "row 2: field 'output' is inf"),
    ('{"input": {"x": 1}, "output": "b"}', "row 2: field 'input' is a nested object"),
    ('{"input": "a", "output": ["b"]}', "row 2: field 'output' is a nested list"),
])
def test_values_that_are_not_text_are_refused_with_the_row(tiny_base, tmp_path, line, needle):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "ok", "output": "fine"}\n' + line + "\n")
    rows = read_rows(path)
    with pytest.raises(SoftPromptError, match="d.jsonl") as e:
        Encoder(tiny_base.tokenizer, Template()).encode_rows(rows, str(path))
    assert needle in str(e.value)
