"""The server's scheduler: a bounded queue, admission, and the one thread that drives the decoding engine.

Each round the thread drops cancelled and expired sequences, admits waiting ones (bounded by running rows and
by prompt tokens per prefill), and runs ONE engine step: the newcomers' prefill into the running batch and a
decode step for every running sequence, whatever its soft prompt (or none) and length, in one pass of the
weights. Model work, sampling, stop rules
and events are the engine's (engine.py); this module holds no tensors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from .engine import Engine, Event, PromptEntry, Sequence, internal_error
from .model import BaseModel
from .sampling import SamplingParams

__all__ = ["Event", "PromptEntry", "QueueFull", "SamplingParams", "Scheduler", "Sequence", "ShuttingDown"]

log = logging.getLogger("softprompt.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 429 at once."""


class ShuttingDown(Exception):
    """The scheduler no longer admits requests (graceful shutdown): the caller answers 503."""


class Scheduler:
    """Queue, admission and the engine's thread. Thread-safe `submit`."""

    def __init__(self, base: BaseModel, *, max_running: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, prefill_wait_steps: int = 0, idle_wait: float = 0.05,
                 autostart: bool = True):
        self.engine = Engine(base)  # refuses encoder-decoder and non-full-attention models
        self.base = base
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        # Newcomers join in a decode step's pass, each joining step a longer pass: while others decode, they wait
        # (up to `prefill_wait_steps` steps) for a group of `prefill_group` to join together.
        self.prefill_wait_steps = prefill_wait_steps
        self.prefill_group = max(1, max_running // 8)
        self._waited = 0  # decode steps the oldest waiting sequence has waited
        self.idle_wait = idle_wait
        self.autostart = autostart  # False: nothing runs until start() or step() (tests drive steps by hand)
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._done = threading.Event()  # the loop has exited

    # ---- the request side (any thread) -----------------------------------------------------------

    def submit(self, seqs: Sequence | list[Sequence]) -> None:
        """Queue sequences (all or none). Raises QueueFull over the bound, ShuttingDown after shutdown began."""
        seqs = [seqs] if isinstance(seqs, Sequence) else list(seqs)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_waiting:
                raise QueueFull(f"the request queue is full ({self.max_waiting} waiting)")
            self._waiting.extend(seqs)
            self._cond.notify()
        if self.autostart:
            self.start()

    @property
    def stats(self) -> dict[str, int]:
        return self.engine.stats

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self.engine.rows)

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="softprompt-scheduler", daemon=True)
                self._thread.start()

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with `drain`, let waiting and running sequences finish first (up to `timeout`)."""
        with self._cond:
            self._stopping = True
            if not drain:
                self._closed = True
            thread = self._thread
            if thread is None:  # never started: nothing runs, so fail what waits here
                self._closed = True
                self._fail_all("the server is shutting down", 503)
            self._cond.notify_all()
        if thread is not None:
            if not self._done.wait(timeout):  # drain took too long: the loop fails what is left at its next step
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                self._done.wait(30)

    def run_forever(self, alive: Callable[[], bool] = lambda: True, before: Callable[[], None] = lambda: None) -> None:
        """Drive the scheduler in the calling thread until shutdown, or until `alive()` turns false while idle.

        `run_server` runs it on the main thread, with HTTP in a thread of its own: torch's OpenMP pool then stays
        the main thread's. A second thread running torch starts a second pool, and with more OpenMP threads than
        cores libgomp stops spinning between parallel regions: measured 1.4 of 2 cores busy and 20-30 % fewer
        tokens/s for the same decode loop on a scheduler thread. `before` runs once the loop is claimed (start the
        HTTP thread there: its lifespan's start() must not start a scheduler thread of its own)."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler is already running")
            self._thread = threading.current_thread()  # from now on start() starts nothing
        before()
        self._loop(alive)

    # ---- the scheduler thread ---------------------------------------------------------------------

    def _loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        try:
            self._run(alive)
        finally:
            self._done.set()

    def _run(self, alive: Callable[[], bool]) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._waiting and not self.engine.rows:
                        if self._stopping or self._closed or not alive():
                            break
                        self._cond.wait(self.idle_wait)
                        continue
                    if self._closed:
                        self._fail_all("the server is shutting down", 503)
                        break
                try:
                    self.step()
                except Exception as e:  # last resort: never let one bad step kill the server
                    log.exception("scheduler step failed")
                    self.engine.fail(self.engine.rows, internal_error(e), 500)
                    self.engine.reset()

    def step(self) -> None:
        """One scheduling round: drop cancelled/expired rows, admit newcomers, and one engine step (their prefill
        and a decode step for every running row, in one pass where it can). A failing prefill fails only the
        sequences it admitted; a failing decode fails the running batch. Either way they get a 500 error event and
        the server goes on with the others."""
        with torch.inference_mode():
            self._reap()
            admitted = self._admit()
            if not admitted and not self.engine.rows:
                return
            try:
                self.engine.step(admitted)
            except Exception as e:
                merged = any(s in self.engine.rows for s in admitted)
                if admitted and not merged:  # the prefill failed before its rows joined: only they fail
                    log.exception("prefill failed")
                    self.engine.fail(admitted, internal_error(e), 500)
                else:  # the decode step (or a prefill after merging): the batch's state is unknown
                    log.exception("decode step failed")
                    self.engine.fail(self.engine.rows, internal_error(e), 500)
                    self.engine.reset()

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Drive the scheduler synchronously (tests, benchmarks without a thread)."""
        for _ in range(max_steps):
            if not self._waiting and not self.engine.rows:
                return
            self.step()
        raise RuntimeError("scheduler did not become idle")

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cond:
            kept = deque()
            for s in self._waiting:
                if s.cancelled:
                    self.engine.cancel(s)
                elif s.deadline is not None and now > s.deadline:
                    self.engine.time_out(s)
                else:
                    kept.append(s)
            self._waiting = kept
        for s in self.engine.rows:
            if s.finished:
                continue
            if s.cancelled:
                self.engine.cancel(s)
            elif s.deadline is not None and now > s.deadline:
                self.engine.time_out(s)
        self.engine.retire()

    def _admit(self) -> list[Sequence]:
        out: list[Sequence] = []
        with self._cond:
            free = self.max_running - len(self.engine.rows)
            if not self._waiting or free <= 0:
                return out
            if self.engine.rows and len(self._waiting) < min(free, self.prefill_group) and self._waited < self.prefill_wait_steps:
                self._waited += 1
                return out
            self._waited = 0
            budget = self.max_prefill_tokens
            while self._waiting and len(self.engine.rows) + len(out) < self.max_running:
                s = self._waiting[0]
                cost = s.n_past
                if out and cost > budget:
                    break
                budget -= cost
                out.append(self._waiting.popleft())
        return out

    def _fail_all(self, message: str, status: int) -> None:
        """Fail every waiting and running sequence (caller holds the lock) and reset the batch."""
        self.engine.fail(list(self._waiting) + self.engine.rows, message, status)
        self._waiting.clear()
        self.engine.reset()
