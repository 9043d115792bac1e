"""Model loading prints one line of ours on the command line, no library progress bars, and errors still show."""

import re

import pytest

from softprompt import load_model
from softprompt.cli import main
from softprompt.progress import LOAD_LOG, quiet_gguf_bar

LINE = re.compile(r"^softprompt: loading model (.+) \.\.\. done in \d+s(; dtype auto: .+)?$")


@pytest.fixture(autouse=True)
def fresh_logger():
    """Each test starts with the loading logger as a fresh process has it (conftest restores it afterwards)."""
    LOAD_LOG.handlers.clear()


def test_the_gguf_dequantisation_bar_is_silenced_only_while_loading(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    with quiet_gguf_bar():
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert "de-quantizing" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))  # restored afterwards
    assert "de-quantizing" in capfd.readouterr().err


def test_cli_prints_one_loading_line(tiny_model_dir, sentiment_files, capsys):
    assert main(["eval", "--data", str(sentiment_files[1]), "--model", str(tiny_model_dir), "--json", "--limit", "4"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and LINE.match(err[0]) and LINE.match(err[0]).group(1) == str(tiny_model_dir)


def test_a_failed_load_says_so_and_the_error_still_shows(tmp_path, sentiment_files, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--data", str(sentiment_files[1]), "--model", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"softprompt: loading model {missing} ... failed"
    assert err[-1] == f"softprompt: error: model path not found: {missing}"


def test_the_python_api_stays_silent(tiny_model_dir, capfd):
    load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    captured = capfd.readouterr()
    assert "loading model" not in captured.err  # logging not configured: the INFO line is dropped
    assert "%|" not in captured.err  # no progress bar


@pytest.mark.slow
def test_loading_the_embedded_gguf_model_prints_no_bar(capfd):
    load_model(None, dtype="float32", device="cpu")
    err = capfd.readouterr().err
    assert "de-quantizing" not in err and "%|" not in err, err[:500]


def test_bars_going_to_a_file_redraw_at_most_every_30_seconds(monkeypatch):
    """A log file or pipe gets a bar line per 30 s instead of one per training step; a terminal keeps tqdm's own."""
    import io
    import sys

    from softprompt.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, interval in ((io.StringIO(), 30.0), (Terminal(), 0.1)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(range(200), desc="train", file=stream)
        assert bar.mininterval == interval
        assert list(bar) == list(range(200))
        if interval == 30.0:  # the opening line and the closing one, nothing per step
            assert stream.getvalue().count("\r") <= 2
        transient = progress_bar(range(3), desc="labels", leave=False, file=stream)
        assert transient.disable == (interval == 30.0)  # erased on a terminal; in a file, left out
