"""The one decoding engine under `generate`, eval's generation and the server.

A batch of running sequences, each with its own soft prompt (or none), decoded together:

  add(seqs)  prefill newcomers behind their prompts' cached keys/values (the prefix cache), sample their first
             token, merge them into the batch;
  decode()   ONE forward for every running row, whatever its prompt and length; sample; stop rules;
  step(seqs) both in ONE pass of the weights: newcomers' inputs packed with the running rows' next tokens
             (what the server and `run` call);
  retire     drop finished rows from the batch cache.

Batch cache layout (batch_cache.py), one row per running sequence, left-padded so every row's newest token is
the last column:

    [pad | its prompt's virtual tokens (keys/values from the prefix cache) | pad | input | generated]

The attention mask hides the pads and position ids count real tokens only, as `BaseModel.prepend_prompts` lays
out [pad | virtual | tokens]: a row's tokens do not depend on what else is in the batch (tests check the engine
against a naive loop over `prepend_prompts` + full forwards). The engine knows no queue, thread or HTTP: the
server's scheduler decides what to admit and when; `generate` drives it synchronously with `run`.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .batch_cache import DecodeBatch
from .errors import SoftPromptError
from .model import BaseModel, NewTokens, cache_layers, cache_of
from .sampling import SamplingParams, eos_ids, find_stop, greedy_and_finite, held_back, pick_token

log = logging.getLogger("softprompt.engine")


@dataclass
class PromptEntry:
    """A soft prompt as the engine uses it. Immutable once made (a server reload makes a new entry), so sequences
    already running keep the prompt they started with; its prefix cache is filled on first use."""

    name: str
    embeddings: torch.Tensor  # [P, d] input embeddings or [P, 2*layers, kv_dim] deep prompt, on the model's device
    version: int = 0
    meta: dict = field(default_factory=dict)
    kv: torch.Tensor | None = field(default=None, repr=False)  # [2, layers, H, P, D] keys, values
    next_logits: torch.Tensor | None = field(default=None, repr=False)  # [V] the last virtual token's prediction

    @property
    def n_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def is_deep(self) -> bool:
        return self.embeddings.dim() == 3


@dataclass
class Event:
    """What a sequence reports to whoever waits on it: text deltas, then one finish (or one error)."""

    kind: str  # "delta" | "finish" | "error"
    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0  # for errors: the HTTP status to report


class Sequence:
    """One completion being generated. `sink(Event)`, if given, hears its text as it grows (called from the thread
    that drives the engine)."""

    def __init__(self, input_ids: list[int], params: SamplingParams, prompt: PromptEntry | None = None,
                 sink: Callable[[Event], None] | None = None, *, index: int = 0, deadline: float | None = None,
                 stream: bool = True):
        self.input_ids = list(input_ids)
        self.stream = stream  # report text as it grows; False: one delta with the whole text at the end
        self.params = params
        self.prompt = prompt
        self.sink = sink
        self.index = index
        self.deadline = deadline
        self.generated: list[int] = []
        self.emitted = ""  # text already reported
        self.finished = False
        self.finish_reason: str | None = None  # "stop" | "length" | None (cancelled, failed)
        self.error: str | None = None
        self.cancelled = False  # set by the request's side (client gone); read at step boundaries
        self.pending: int | None = None  # the sampled token the next decode step feeds
        self.t_submit = time.monotonic()
        self.t_first: float | None = None
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def n_past(self) -> int:
        """Columns this row needs in the batch cache before decoding: its prompt and its input."""
        return (self.prompt.n_virtual_tokens if self.prompt else 0) + len(self.input_ids)


@dataclass
class _Prefill:
    """Newcomers with rows opened for them: their span's mask [n, span], next positions [n], input lengths and the
    block of their input tokens (None when every input is empty)."""

    seqs: list[Sequence]
    mask: torch.Tensor
    next_pos: torch.Tensor
    tlen: list[int]
    block: NewTokens | None


class Engine:
    """Owns the model work of decoding: the prefix cache, prefill, decode steps, sampling, stop rules, events.
    Not thread-safe: one thread drives it (the server's scheduler thread, or the caller of `run`)."""

    def __init__(self, base: BaseModel):
        if base.is_encoder_decoder:
            raise SoftPromptError("the decoding engine is for decoder-only models; this one is encoder-decoder")
        if not base.has_plain_kv_cache:
            raise SoftPromptError(f"model {base.source!r} has attention layers without a plain key/value cache "
                                  "(sliding window or linear attention): batched decoding supports full attention only")
        self.base = base
        tok = base.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eos = eos_ids(tok, base.model)
        self.batch = self._empty_batch()
        self.stats = {"decode_steps": 0, "decode_rows": 0, "prefills": 0, "prefill_rows": 0, "max_batch_rows": 0,
                      "prefix_cache_hits": 0, "prefix_cache_misses": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0}

    @property
    def rows(self) -> list[Sequence]:
        return self.batch.rows

    # ---- model work ---------------------------------------------------------------------------------

    def prompt_kv(self, entry: PromptEntry) -> torch.Tensor:
        """The keys/values [2, layers, H, P, D] a prompt leaves at positions 0..P-1, computed once per entry (the
        prefix cache). A deep prompt IS keys/values: they are only laid out. The prompt meets the model through
        BaseModel."""
        if entry.kv is not None:
            self.stats["prefix_cache_hits"] += 1
            return entry.kv
        self.stats["prefix_cache_misses"] += 1
        base = self.base
        with torch.inference_mode():
            if entry.is_deep:
                layers = base.prefix_layers(entry.embeddings[None].to(base.dtype))
            else:
                empty = torch.zeros(1, 0, dtype=torch.long)
                out = base.forward(base.prepend_prompts(empty, empty, entry.embeddings), use_cache=True,
                                   **base.last_logits_kw())
                layers = cache_layers(cache_of(out))
                entry.next_logits = out.logits[0, -1].clone()  # what an empty input continues from
            entry.kv = torch.stack([torch.stack([k[0] for k, _ in layers]), torch.stack([v[0] for _, v in layers])])
        return entry.kv

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` together, straight into new rows of the batch cache behind their prompts' cached
        keys/values, sample each one's first token and make them running rows."""
        prefill = self._open(seqs, ahead=0)
        if prefill.block is not None:
            logits = self.base.forward_in_place(self.batch.kv, prefill.block)[0]
        else:  # every row empty: nothing to run, the prefixes are the whole past
            logits = torch.stack([s.prompt.next_logits for s in seqs])
        self._join(prefill, logits)
        self.retire()

    @torch.inference_mode()
    def decode(self) -> None:
        """One forward for every running row: feed each its last sampled token, sample the next."""
        b = self.batch
        if not b.rows:
            return
        block = self._decode_block()
        b.grow(1)
        logits = self.base.forward_in_place(b.kv, block)[0]  # writes column `width`
        self._decoded(block.mask, logits)
        self.retire()

    @torch.inference_mode()
    def step(self, newcomers: list[Sequence] = ()) -> None:
        """Admit `newcomers` (may be none) and advance every running row one token, in ONE pass of the weights:
        the newcomers' inputs and the running rows' next tokens packed together (a prefill alone costs about a
        decode step on CPU: weights streamed and layers called once more). With nothing running, a prefill and a
        decode step as `add` + `decode`. If the joint pass fails, prefill and decode are retried apart, so an
        error stays with whoever caused it (a failing prefill raises from `add` before its rows join)."""
        if not newcomers or not self.batch.rows:
            if newcomers:
                self.add(newcomers)
            self.decode()
            return
        prefill = self._open(newcomers, ahead=1)  # their inputs end at the column the running rows write next
        block = self._decode_block()
        try:
            blocks = [block] if prefill.block is None else [block, prefill.block]
            logits = self.base.forward_in_place(self.batch.kv, *blocks)
        except Exception:
            log.warning("a joint prefill + decode pass failed: running them apart", exc_info=True)
            self.add(newcomers)
            self.decode()
            return
        self._decoded(block.mask, logits[0])
        self._join(prefill, logits[1] if prefill.block is not None else
                   torch.stack([s.prompt.next_logits for s in newcomers]))
        self.retire()

    # ---- the pieces of add / decode / step ----

    def _open(self, seqs: list[Sequence], ahead: int) -> _Prefill:
        """Validate newcomers, open rows for them (their spans end `ahead` columns past the batch's width), place
        their prompts' keys/values from the prefix cache; the block of their input tokens (None: all empty)."""
        for s in seqs:
            if not s.input_ids and (s.prompt is None or s.prompt.is_deep):
                raise SoftPromptError("empty input: give some text to continue (only an input-embedding soft prompt "
                                      "can be continued from nothing; a deep prompt or no prompt cannot)")
        dev, n = self.base.device, len(seqs)
        plen = [s.prompt.n_virtual_tokens if s.prompt else 0 for s in seqs]
        tlen = [len(s.input_ids) for s in seqs]
        pmax, tmax = max(plen), max(tlen)
        ids = torch.full((n, tmax), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, pmax + tmax, dtype=torch.long)  # [n, pad | virtual | pad | input]
        pos = torch.zeros(n, tmax, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, tmax - tlen[i]:] = torch.tensor(s.input_ids, dtype=torch.long)
            mask[i, pmax - plen[i]:pmax] = 1
            mask[i, pmax + tmax - tlen[i]:] = 1
            pos[i, tmax - tlen[i]:] = torch.arange(plen[i], plen[i] + tlen[i])
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        row, col = self.batch.open(n, pmax + tmax, ahead)
        for i, s in enumerate(seqs):  # each row's prompt from the prefix cache, right-aligned at column col + pmax
            if plen[i]:
                self.batch.kv[:, :, row + i, :, col + pmax - plen[i]:col + pmax] = self.prompt_kv(s.prompt)
        block = NewTokens(ids, mask, pos, slice(row, row + n), col, pmax) if tmax else None
        return _Prefill(seqs, mask, torch.tensor([p + t for p, t in zip(plen, tlen)], device=dev), tlen, block)

    def _join(self, prefill: _Prefill, logits: torch.Tensor) -> None:
        """The prefilled rows' logits [n, V]: sample their first tokens and make them running rows."""
        seqs = prefill.seqs
        for i, s in enumerate(seqs):
            if not prefill.tlen[i]:  # an empty input continues from its prompt's last virtual token
                logits[i] = s.prompt.next_logits
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += len(seqs)
        self.stats["prompt_tokens"] += sum(prefill.tlen)
        now = time.monotonic()
        for s in seqs:
            s.t_first = now
            if not s.params.greedy:
                seed = s.params.seed if s.params.seed is not None else secrets.randbits(63)
                s.generator = torch.Generator(device=self.base.device).manual_seed(seed)
        tokens = self._sample(seqs, logits)
        self.batch.join(seqs, prefill.mask, prefill.next_pos)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self.batch))
        for s, t in zip(seqs, tokens):
            self._advance(s, t)

    def _decode_block(self) -> NewTokens:
        """The running rows' next tokens [B, 1] behind their past (columns [0, width))."""
        b, dev = self.batch, self.base.device
        ids = torch.tensor([s.pending for s in b.rows], dtype=torch.long, device=dev)[:, None]  # [B, 1]
        mask = torch.cat([b.mask, torch.ones(len(b.rows), 1, dtype=b.mask.dtype, device=dev)], dim=1)
        return NewTokens(ids, mask, b.next_pos[:, None], slice(0, len(b.rows)), 0, b.width)

    def _decoded(self, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """The running rows' decode logits [B, V]: the batch takes the new column; sample and advance each row."""
        b = self.batch
        rows = list(b.rows)
        b.commit(1, mask)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        for s, t in zip(rows, self._sample(rows, logits)):
            self._advance(s, t)

    def retire(self) -> None:
        """Drop finished rows from the batch."""
        if any(s.finished for s in self.batch.rows):
            self.batch.keep([i for i, s in enumerate(self.batch.rows) if not s.finished])

    def reset(self) -> None:
        """Forget the running batch (after a failed step: its state is unknown)."""
        self.batch = self._empty_batch()

    def _empty_batch(self) -> DecodeBatch:
        return DecodeBatch(*self.base.kv_layout, dtype=self.base.dtype, device=self.base.device)

    def run(self, seqs: Iterable[Sequence], max_rows: int = 32) -> None:
        """Decode `seqs` to the end synchronously, at most `max_rows` at a time; a finished row's place goes to the
        next waiting sequence at once (continuous batching, as in the server)."""
        waiting = list(seqs)[::-1]
        while waiting or self.batch.rows:
            room = max_rows - len(self.batch)
            self.step([waiting.pop() for _ in range(min(room, len(waiting)))] if waiting and room > 0 else [])

    # ---- tokens -> text -------------------------------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """[B, V] logits -> one token per row. A row that cannot be sampled (non-finite logits: a NaN prompt) fails
        alone; its token is a placeholder that `_advance` ignores and `retire` drops with the row."""
        out, finite = greedy_and_finite(logits)
        for i, s in enumerate(seqs):
            if not finite[i]:
                log.warning("a row produced non-finite logits (prompt %s): failing it alone",
                            s.prompt.name if s.prompt else "none")
                self.fail([s], "internal error during generation: the model produced non-finite logits for this "
                               "request", 500)
            elif not s.params.greedy:
                try:
                    out[i] = int(pick_token(logits[i:i + 1], s.params.temperature, s.params.top_p, s.generator)[0])
                except Exception as e:  # this row's sampling only: the rest of the batch goes on
                    log.exception("sampling failed for one row")
                    self.fail([s], internal_error(e), 500)
        return out

    def _advance(self, s: Sequence, token: int) -> None:
        """Take one sampled token: EOS, stop strings and the length limit end the sequence; report new text."""
        if s.finished:
            return
        if token in self.eos:
            if s.generated and s.sink is not None:  # flush text held back as a possible stop-string start
                self._emit(s, self.base.tokenizer.decode(s.generated, skip_special_tokens=True))
            self._finish(s, "stop")
            return
        s.generated.append(token)
        s.pending = token
        self.stats["generated_tokens"] += 1
        stops = s.params.stop
        if (s.sink is None or not s.stream) and not stops:  # nobody reads text as it grows: decode once at the end
            if len(s.generated) >= s.params.max_tokens:
                if s.sink is not None:
                    self._emit(s, self.base.tokenizer.decode(s.generated, skip_special_tokens=True))
                self._finish(s, "length")
            return
        text = self.base.tokenizer.decode(s.generated, skip_special_tokens=True)
        if stops:
            cut = find_stop(text, stops, s.params.stop_rule, start=max(0, len(s.emitted) - max(map(len, stops))))
            if cut is not None:
                self._emit(s, text[:cut])
                self._finish(s, "stop")
                return
        if len(s.generated) >= s.params.max_tokens:
            self._emit(s, text)
            self._finish(s, "length")
            return
        self._emit(s, text[: len(text) - held_back(text, stops)])

    def _emit(self, s: Sequence, text: str) -> None:
        if len(text) > len(s.emitted) and text.startswith(s.emitted):
            delta, s.emitted = text[len(s.emitted):], text
            send(s, Event("delta", s.index, text=delta))

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finished, s.finish_reason = True, reason
        self.stats["finished"] += 1
        send(s, Event("finish", s.index, finish_reason=reason, prompt_tokens=len(s.input_ids),
                      completion_tokens=len(s.generated)))

    # ---- ends other than a finish (the caller's decisions) ---------------------------------------------

    def cancel(self, s: Sequence) -> None:
        """The client is gone: end quietly."""
        s.finished = True
        self.stats["cancelled"] += 1

    def time_out(self, s: Sequence) -> None:
        s.finished, s.error = True, "the request timed out"
        self.stats["timeouts"] += 1
        send(s, Event("error", s.index, text=s.error, status=504))

    def fail(self, seqs: list[Sequence], message: str, status: int) -> None:
        for s in seqs:
            if not s.finished:
                s.finished, s.error = True, message
                self.stats["errors"] += 1
                send(s, Event("error", s.index, text=message, status=status))


def send(s: Sequence, event: Event) -> None:
    if s.sink is None:
        return
    try:
        s.sink(event)
    except Exception:  # the request side is gone (closed loop): nothing to tell
        pass


def internal_error(e: Exception) -> str:
    return f"internal error during generation: {type(e).__name__}: {e}"
