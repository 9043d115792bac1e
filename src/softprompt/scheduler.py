"""Continuous batching of generation requests that use different soft prompts, on one frozen model.

One scheduler thread owns the model. Each step it
  1. admits waiting sequences (bounded), prefills them together on top of their prompts' cached prefix, and
  2. runs ONE decode forward for every running sequence, whatever its soft prompt (or none) and length.

Batch cache layout, one row per running sequence, left-padded so every row's newest token is the last column:

    [pad | virtual tokens of its prompt (prefix KV, copied from the prompt's cache) | pad | input | generated]

The attention mask hides the pads; position ids count real tokens only, exactly as `BaseModel.prepend_prompts`
lays out [pad | virtual | tokens], so a row's tokens do not depend on what else is in the batch.

Prefix cache: the key/value states of a prompt's virtual tokens (positions 0..n-1) are computed once per loaded
prompt and reused by every request that uses it; a request prefills only its own tokens on top.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import SoftPromptError
from .generate import as_list, cache_of, pick_token
from .model import BaseModel

log = logging.getLogger("softprompt.serve")


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 429 at once."""


class ShuttingDown(Exception):
    """The scheduler no longer admits requests (graceful shutdown): the caller answers 503."""


@dataclass
class PromptEntry:
    """A loaded soft prompt as the server uses it. Immutable once made: a reload makes a new entry, so requests
    already admitted keep the prompt they started with."""

    name: str
    embeddings: torch.Tensor  # [P, d] on the model's device and dtype
    version: int = 0
    meta: dict = field(default_factory=dict)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)  # prefix cache, per layer
    next_logits: torch.Tensor | None = field(default=None, repr=False)  # [V] the last virtual token's prediction

    @property
    def n_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """What a sequence reports to its request: text deltas, then one finish (or one error)."""

    kind: str  # "delta" | "finish" | "error"
    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0  # for errors: the HTTP status to report


class Sequence:
    """One completion being generated. `sink(Event)` is called from the scheduler thread."""

    def __init__(self, input_ids: list[int], params: SamplingParams, prompt: PromptEntry | None,
                 sink: Callable[[Event], None], *, index: int = 0, deadline: float | None = None):
        self.input_ids = list(input_ids)
        self.params = params
        self.prompt = prompt
        self.sink = sink
        self.index = index
        self.deadline = deadline
        self.generated: list[int] = []
        self.emitted = ""  # text already reported
        self.finished = False
        self.cancelled = False  # set by the request's side (client gone); read at step boundaries
        self.pending: int | None = None  # the sampled token the next decode step feeds
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


class _Batch:
    """The running rows and their padded batch cache."""

    def __init__(self):
        self.rows: list[Sequence] = []
        self.cache: Any = None  # a transformers Cache holding [B, H, L, D] per layer
        self.mask: torch.Tensor | None = None  # [B, L] long
        self.next_pos: torch.Tensor | None = None  # [B] position of the token fed next


class Scheduler:
    """Owns the model: admission, prefill, decode steps, sampling, stop handling. Thread-safe `submit`."""

    def __init__(self, base: BaseModel, *, max_running: int = 32, max_waiting: int = 256,
                 max_prefill_tokens: int = 4096, idle_wait: float = 0.05, autostart: bool = True):
        if base.is_encoder_decoder:
            raise SoftPromptError("serve supports decoder-only models; this one is encoder-decoder")
        layer_types = getattr(base.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise SoftPromptError(f"serve supports full-attention models only; this one has layer types {sorted(set(layer_types))}")
        self.base = base
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.idle_wait = idle_wait
        self.autostart = autostart  # False: nothing runs until start() or step() (tests drive steps by hand)
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        gen_eos = getattr(getattr(base.model, "generation_config", None), "eos_token_id", None)
        self.eos = {t for t in [tok.eos_token_id, *as_list(gen_eos)] if t is not None}
        params = inspect.signature(base.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._waiting: deque[Sequence] = deque()
        self._batch = _Batch()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.stats = {"decode_steps": 0, "decode_rows": 0, "prefills": 0, "prefill_rows": 0, "max_batch_rows": 0,
                      "prefix_cache_hits": 0, "prefix_cache_misses": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0}

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
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._batch.rows)

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
            thread.join(timeout)
            if thread.is_alive():  # drain took too long: the thread fails what is left at its next step
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                thread.join(30)

    # ---- the scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._waiting and not self._batch.rows:
                        if self._stopping or self._closed:
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
                    self._fail(self._batch.rows, _internal(e), 500)
                    self._batch = _Batch()

    def step(self) -> None:
        """One scheduling round: drop cancelled/expired rows, admit and prefill newcomers, one decode step.
        A failing prefill fails only the sequences it admitted; a failing decode fails the running batch. Either
        way they get a 500 error event and the server goes on with the others."""
        with torch.inference_mode():
            self._reap()
            admitted = self._admit()
            if admitted:
                try:
                    self._prefill(admitted)
                except Exception as e:
                    log.exception("prefill failed")
                    self._fail(admitted, _internal(e), 500)
                    if any(s in admitted for s in self._batch.rows):  # failed after merging: batch state unknown
                        self._fail(self._batch.rows, _internal(e), 500)
                        self._batch = _Batch()
            if self._batch.rows:
                try:
                    self._decode()
                except Exception as e:
                    log.exception("decode step failed")
                    self._fail(self._batch.rows, _internal(e), 500)
                    self._batch = _Batch()

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Drive the scheduler synchronously (tests, benchmarks without a thread)."""
        for _ in range(max_steps):
            if not self._waiting and not self._batch.rows:
                return
            self.step()
        raise RuntimeError("scheduler did not become idle")

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cond:
            kept = deque()
            for s in self._waiting:
                if s.cancelled:
                    self._finish(s, None, cancelled=True)
                elif s.deadline is not None and now > s.deadline:
                    self._timeout(s)
                else:
                    kept.append(s)
            self._waiting = kept
        for s in self._batch.rows:
            if s.finished:
                continue
            if s.cancelled:
                self._finish(s, None, cancelled=True)
            elif s.deadline is not None and now > s.deadline:
                self._timeout(s)
        self._retire()

    def _admit(self) -> list[Sequence]:
        out: list[Sequence] = []
        with self._cond:
            budget = self.max_prefill_tokens
            while self._waiting and len(self._batch.rows) + len(out) < self.max_running:
                s = self._waiting[0]
                cost = len(s.input_ids) + (s.prompt.n_virtual_tokens if s.prompt else 0)
                if out and cost > budget:
                    break
                budget -= cost
                out.append(self._waiting.popleft())
        return out

    # ---- model work ---------------------------------------------------------------------------------

    def _forward(self, input_ids, mask, positions, cache):
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.base.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              **kwargs, **self._extra)
        return out.logits[:, -1], cache_of(out)

    def prefix_kv(self, entry: PromptEntry) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prompt's virtual-token key/values (positions 0..n-1), computed once per entry. A deep prompt IS
        its key/values: they are only laid out per layer."""
        if entry.kv is not None:
            self.stats["prefix_cache_hits"] += 1
            return entry.kv
        self.stats["prefix_cache_misses"] += 1
        if entry.embeddings.dim() == 3:  # [P, 2 * layers, kv_dim]
            entry.kv = [(k.contiguous(), v.contiguous()) for k, v in self.base.prefix_layers(entry.embeddings[None])]
            return entry.kv
        with torch.inference_mode():
            emb = entry.embeddings.to(self.base.device, self.base.dtype)[None]  # [1, P, d]
            n = emb.shape[1]
            out = self.base.model(inputs_embeds=emb, attention_mask=torch.ones(1, n, dtype=torch.long, device=emb.device),
                                  position_ids=torch.arange(n, device=emb.device)[None], use_cache=True, **self._extra)
            entry.kv = [(k.clone(), v.clone()) for k, v in _layers(cache_of(out))]
            entry.next_logits = out.logits[0, -1].clone()  # what an empty input continues from
        return entry.kv

    def _prefill(self, seqs: list[Sequence]) -> None:
        dev = self.base.device
        n = len(seqs)
        plen = [s.prompt.n_virtual_tokens if s.prompt else 0 for s in seqs]
        tlen = [len(s.input_ids) for s in seqs]
        pmax, tmax = max(plen), max(tlen)
        ids = torch.full((n, tmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, pmax + tmax, dtype=torch.long)
        pos = torch.zeros(n, tmax, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, tmax - tlen[i]:] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[i, pmax - plen[i]:pmax] = 1
            mask[i, pmax + tmax - tlen[i]:] = 1
            pos[i, tmax - tlen[i]:] = torch.arange(plen[i], plen[i] + tlen[i])
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        cache = None
        if pmax:  # the batch's past: each row's prompt prefix from the prefix cache, left-padded to pmax
            prefixes = [self.prefix_kv(s.prompt) if s.prompt else None for s in seqs]
            ref = next(p for p in prefixes if p is not None)
            layers = []
            for li, (rk, rv) in enumerate(ref):
                ks = [_left_pad(p[li][0] if p else rk[:, :, :0], pmax) for p in prefixes]
                vs = [_left_pad(p[li][1] if p else rv[:, :, :0], pmax) for p in prefixes]
                layers.append((torch.cat(ks), torch.cat(vs)))
            cache = _make_cache(layers)
        # An empty input continues from its prompt's last virtual token (input-embedding prompts only).
        if tmax:
            logits, out_cache = self._forward(ids, mask, pos, cache)
            for i, s in enumerate(seqs):
                if not tlen[i]:
                    logits[i] = s.prompt.next_logits
        else:  # every row empty: nothing to run, the prefixes are the whole past
            logits, out_cache = torch.stack([s.prompt.next_logits for s in seqs]), cache
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += n
        self.stats["prompt_tokens"] += sum(tlen)
        now = time.monotonic()
        for s in seqs:
            s.t_first = now
            if s.params.temperature > 0:
                seed = s.params.seed if s.params.seed is not None else secrets.randbits(63)
                s.generator = torch.Generator(device=dev).manual_seed(seed)
        tokens = self._sample(seqs, logits)
        # Zero the states of padded columns: they are masked, but must never hold NaN or garbage.
        kv = [(k * mask[:, None, :, None].to(k.dtype), v * mask[:, None, :, None].to(v.dtype)) for k, v in _layers(out_cache)]
        self._merge(seqs, kv, mask, torch.tensor([p + t for p, t in zip(plen, tlen)], device=dev))
        for s, t in zip(seqs, tokens):
            self._advance(s, t)
        self._retire()

    def _merge(self, seqs, kv, mask, next_pos) -> None:
        b = self._batch
        if not b.rows:
            b.rows, b.mask, b.next_pos, b.cache = list(seqs), mask, next_pos, _make_cache(kv)
        else:
            old = _layers(b.cache)
            width = max(b.mask.shape[1], mask.shape[1])
            layers = [(torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                       torch.cat([_left_pad(v0, width), _left_pad(v1, width)])) for (k0, v0), (k1, v1) in zip(old, kv)]
            b.mask = torch.cat([_left_pad_mask(b.mask, width), _left_pad_mask(mask, width)])
            b.next_pos = torch.cat([b.next_pos, next_pos])
            b.rows = b.rows + list(seqs)
            b.cache = _make_cache(layers)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(b.rows))

    def _decode(self) -> None:
        b = self._batch
        dev = self.base.device
        ids = torch.tensor([s.pending for s in b.rows], dtype=torch.long, device=dev)[:, None]
        b.mask = torch.cat([b.mask, torch.ones(len(b.rows), 1, dtype=b.mask.dtype, device=dev)], dim=1)
        logits, b.cache = self._forward(ids, b.mask, b.next_pos[:, None], b.cache)
        b.next_pos = b.next_pos + 1
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(b.rows)
        for s, t in zip(b.rows, self._sample(b.rows, logits)):
            self._advance(s, t)
        self._retire()

    def _retire(self) -> None:
        """Drop finished rows from the batch cache, and columns that are padding in every remaining row."""
        b = self._batch
        if not b.rows or all(not s.finished for s in b.rows):
            return
        keep = [i for i, s in enumerate(b.rows) if not s.finished]
        if not keep:
            b.rows, b.cache, b.mask, b.next_pos = [], None, None, None
            return
        idx = torch.tensor(keep, device=b.mask.device)
        mask = b.mask.index_select(0, idx)
        first = int(mask.any(0).long().argmax())  # leading columns that are padding everywhere
        b.mask = mask[:, first:]
        b.next_pos = b.next_pos.index_select(0, idx)
        b.rows = [b.rows[i] for i in keep]
        b.cache = _make_cache([(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                               for k, v in _layers(b.cache)])

    # ---- tokens -> text ------------------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """[B, V] logits -> one token per row. A row that cannot be sampled (non-finite logits: a NaN prompt) fails
        alone; its token is a placeholder that `_advance` ignores and `_retire` drops with the row."""
        out = logits.argmax(-1).tolist()  # greedy rows
        # NaN anywhere, or nothing finite (a -inf mask on every token is fine only if some token is left)
        broken = (logits.isnan().any(-1) | ~logits.isfinite().any(-1) | (logits == float("inf")).any(-1)).tolist()
        for i, s in enumerate(seqs):
            if broken[i]:
                log.warning("request row produced non-finite logits (prompt %s): failing it alone",
                            s.prompt.name if s.prompt else "none")
                self._fail([s], "internal error during generation: the model produced non-finite logits for this "
                                "request", 500)
                continue
            if s.params.temperature > 0:
                try:
                    out[i] = int(pick_token(logits[i:i + 1], s.params.temperature, s.params.top_p, s.generator)[0])
                except Exception as e:  # this row's sampling only: the rest of the batch goes on
                    log.exception("sampling failed for one row")
                    self._fail([s], _internal(e), 500)
        return out

    def _advance(self, s: Sequence, token: int) -> None:
        """Take one sampled token: EOS, stop strings and the length limit end the sequence; report new text."""
        if s.finished:
            return
        if token in self.eos:
            if s.generated:  # flush text held back as a possible stop-string start
                self._emit(s, self.base.tokenizer.decode(s.generated, skip_special_tokens=True))
            self._finish(s, "stop")
            return
        s.generated.append(token)
        s.pending = token
        self.stats["generated_tokens"] += 1
        text = self.base.tokenizer.decode(s.generated, skip_special_tokens=True)
        stops = s.params.stop
        if stops:  # OpenAI's rule: a stop string ends the text wherever it appears, even first
            start = max(0, len(s.emitted) - max(len(x) for x in stops))
            hits = [i for i in (text.find(x, start) for x in stops) if i >= 0]
            if hits:
                self._emit(s, text[: min(hits)])
                self._finish(s, "stop")
                return
        if len(s.generated) >= s.params.max_tokens:
            self._emit(s, text)
            self._finish(s, "length")
            return
        hold = _held_back(text, stops)
        self._emit(s, text[: len(text) - hold])

    def _emit(self, s: Sequence, text: str) -> None:
        if len(text) > len(s.emitted) and text.startswith(s.emitted):
            delta, s.emitted = text[len(s.emitted):], text
            self._send(s, Event("delta", s.index, text=delta))

    def _finish(self, s: Sequence, reason: str | None, *, cancelled: bool = False) -> None:
        s.finished = True
        if cancelled:
            self.stats["cancelled"] += 1
            return
        self.stats["finished"] += 1
        self._send(s, Event("finish", s.index, finish_reason=reason, prompt_tokens=len(s.input_ids),
                            completion_tokens=len(s.generated)))

    def _timeout(self, s: Sequence) -> None:
        s.finished = True
        self.stats["timeouts"] += 1
        self._send(s, Event("error", s.index, text="the request timed out", status=504))

    def _fail(self, seqs: list[Sequence], message: str, status: int) -> None:
        for s in seqs:
            if not s.finished:
                s.finished = True
                self.stats["errors"] += 1
                self._send(s, Event("error", s.index, text=message, status=status))

    def _fail_all(self, message: str, status: int) -> None:
        """Fail every waiting and running sequence (caller holds the lock) and reset the batch."""
        self._fail(list(self._waiting) + self._batch.rows, message, status)
        self._waiting.clear()
        self._batch = _Batch()

    @staticmethod
    def _send(s: Sequence, event: Event) -> None:
        try:
            s.sink(event)
        except Exception:  # the request side is gone (closed loop): nothing to tell
            pass


def _internal(e: Exception) -> str:
    return f"internal error during generation: {type(e).__name__}: {e}"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters to hold back: an incomplete character, or a possible start of a stop string."""
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), hold, -1):
            if text.endswith(x[:k]):
                hold = k
                break
    return hold


# ---- cache plumbing (transformers 4.56+ / 5.x Cache objects) ------------------------------------------


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuple of tuples


def _make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zeros in front."""
    extra = width - x.shape[2]
    if extra <= 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], extra, x.shape[3]), x], dim=2)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - m.shape[1]
    return m if extra <= 0 else torch.cat([m.new_zeros(m.shape[0], extra), m], dim=1)
