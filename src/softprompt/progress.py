"""Quiet, honest progress: one line of ours for model loading ("loading model X ... done in 21s") instead of the
raw bars of the libraries underneath (transformers' GGUF dequantisation bar printed a screenful into every log),
and our own bars redrawn at most every 30 s when they go to a file or pipe rather than a terminal.

The line goes through the `softprompt.load` logger: the CLI shows it (`show_load_progress`), the Python API stays
silent unless the caller configures logging. Errors are not touched: they propagate, and the line says "failed".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from typing import Callable, Iterator

LOAD_LOG = logging.getLogger("softprompt.load")
LOG_FILE_BAR_SECONDS = 30.0  # a bar written to a file or pipe: one line per this many seconds, not per step


def progress_bar(*args, **kwargs):
    """`tqdm(...)` that, when stderr is not a terminal (a log file, CI, `nohup`), redraws at most every 30 s (a
    10-minute training run otherwise writes a line per step into the log) and leaves out transient bars
    (`leave=False`: erased on a terminal, but in a file their erasing spaces run into the next output)."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_FILE_BAR_SECONDS)
        if kwargs.get("leave") is False:
            kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextlib.contextmanager
def quiet_gguf_bar() -> Iterator[None]:
    """transformers dequantises GGUF tensors under its own `tqdm` (not its logging's bar, which
    `disable_progress_bar` turns off): swap in a disabled one for the duration."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def announce_loading(default_name: str) -> Callable:
    """Decorator for `load_model(model, ...)`: the one progress line around it, and the GGUF bar silenced."""

    def wrap(load):
        @functools.wraps(load)
        def loader(model=None, *args, **kwargs):
            name = str(model) if model else f"embedded {default_name}"
            LOAD_LOG.info("loading model %s ...", name, extra={"line": "open"})
            started, result = time.perf_counter(), None
            try:
                with quiet_gguf_bar():
                    result = load(model, *args, **kwargs)
                return result
            finally:
                choice = getattr(result, "dtype_choice", None)
                dtype = f"; dtype auto: {choice.reason}" if choice is not None and choice.auto else ""
                LOAD_LOG.info("done in %.0fs%s" % (time.perf_counter() - started, dtype) if result is not None
                              else "failed", extra={"line": "close"})

        return loader

    return wrap


class LoadLineHandler(logging.Handler):
    """Writes an "open" record without a newline and its "close" record after it on the same line."""

    def emit(self, record: logging.LogRecord) -> None:
        line = getattr(record, "line", None)
        message = record.getMessage()
        stream = sys.stderr  # looked up now: tests and callers may have replaced it
        stream.write(f"softprompt: {message}" if line == "open" else f" {message}\n" if line == "close"
                     else f"softprompt: {message}\n")
        stream.flush()


def show_load_progress() -> None:
    """Show the loading line on stderr (the CLI does this once; repeated calls add nothing)."""
    if not any(isinstance(h, LoadLineHandler) for h in LOAD_LOG.handlers):
        LOAD_LOG.addHandler(LoadLineHandler())
    LOAD_LOG.setLevel(logging.INFO)
    LOAD_LOG.propagate = False  # not again through a root handler (serve configures one)
