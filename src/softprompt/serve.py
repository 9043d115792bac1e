"""`softprompt serve`: many soft prompts on one frozen model behind an OpenAI-compatible HTTP API.

    app = create_app(load_model(None), "prompts/")      # an ASGI app (Starlette); run it with uvicorn
    run_server(base, "prompts/", ServeConfig(port=8000))  # or let this do it (binds 127.0.0.1 by default)

ServeConfig (config.py, also importable from here) holds every option and limit: the `serve` command's flags.

A request picks its soft prompt with the `model` field: `BASE:PROMPT` (or just `PROMPT`), and plain `BASE` for
none. Requests with different prompts share every forward pass (see scheduler.py). Prompts are the folders of
the prompts directory (our artifacts or PEFT prompt-tuning adapters, safetensors only), rescanned while serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ServeConfig, from_kwargs
from .data import Encoder, Template
from .errors import SoftPromptError
from .model import BaseModel
from .prompt import META_FILE, TENSOR_FILE, SoftPrompt
from .scheduler import Event, PromptEntry, QueueFull, Scheduler, Sequence, ShuttingDown
from .serve_api import (ApiError, GenRequest, Limits, chunk_body, completion_body, error_body, new_id,
                        parse_chat, parse_completion, sse, usage, usage_chunk)

log = logging.getLogger("softprompt.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ---- prompts on disk ----------------------------------------------------------------------------------


class PromptRegistry:
    """The prompts directory as loaded prompts. Lookups are lock-free reads of an immutable dict; scans, adds and
    removals build a new dict, so a request admitted with a prompt keeps it whatever happens on disk."""

    def __init__(self, base: BaseModel, directory: str | os.PathLike | None, *, max_prompt_bytes: int = 64 << 20,
                 max_virtual_tokens: int = 1024):
        self.base = base
        self.directory = Path(directory).expanduser().resolve() if directory is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise SoftPromptError(f"prompts directory not found: {directory}")
        self.max_prompt_bytes = max_prompt_bytes
        self.max_virtual_tokens = max_virtual_tokens
        self.entries: dict[str, PromptEntry] = {}
        self.errors: dict[str, str] = {}  # name -> why its last load failed
        self._signatures: dict[str, tuple] = {}
        self._disabled: set[str] = set()  # removed by an admin: not reloaded by scans until added again
        self._lock = threading.Lock()
        self._version = 0

    def get(self, name: str) -> PromptEntry | None:
        return self.entries.get(name)

    def _path(self, name: str) -> Path:
        if not NAME_RE.match(name) or ".." in name:
            raise SoftPromptError(f"invalid prompt name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
        assert self.directory is not None
        path = self.directory / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.directory):
            raise SoftPromptError(f"prompt {name!r} is a link outside the prompts directory")
        return path

    @staticmethod
    def _signature(path: Path) -> tuple | None:
        sig = []
        for f in (TENSOR_FILE, META_FILE, *PEFT_FILES):
            try:
                st = (path / f).stat()
            except OSError:
                continue
            sig.append((f, st.st_size, st.st_mtime_ns))
        return tuple(sig) or None

    def _load(self, name: str, path: Path) -> PromptEntry:
        for f in (TENSOR_FILE, PEFT_FILES[1]):
            if (path / f).is_symlink() and not (path / f).resolve().is_relative_to(self.directory):
                raise SoftPromptError(f"{name}/{f} is a link outside the prompts directory")
            if (path / f).exists() and (path / f).stat().st_size > self.max_prompt_bytes:
                raise SoftPromptError(f"{name}/{f} is over {self.max_prompt_bytes} bytes")
        prompt = SoftPrompt.load(path, self.base, strict=True)  # safetensors only, never pickle
        if prompt.n_virtual_tokens > self.max_virtual_tokens:
            raise SoftPromptError(f"{name}: {prompt.n_virtual_tokens} virtual tokens, over the limit of {self.max_virtual_tokens}")
        self._version += 1
        emb = prompt.embeddings.detach().to(self.base.device, self.base.dtype)
        return PromptEntry(name=name, embeddings=emb, version=self._version, meta=dict(prompt.meta))

    def scan(self) -> dict[str, list[str]]:
        """Bring the loaded set in line with the directory: load new or changed prompts, drop deleted ones.
        A prompt that fails to load keeps its previous version (if any) and its error is recorded."""
        report: dict[str, list[str]] = {"added": [], "updated": [], "removed": [], "failed": []}
        if self.directory is None:
            return report
        with self._lock:
            entries = dict(self.entries)
            seen = set()
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if name.startswith(".") or not path.is_dir() or name in self._disabled:
                    continue
                try:
                    path = self._path(name)
                except SoftPromptError as e:
                    if name not in self.errors:  # report (and log) a bad folder once, not on every scan
                        log.warning("skipping %s", e)
                        report["failed"].append(name)
                    self.errors[name] = str(e)
                    continue
                sig = self._signature(path)
                if sig is None:
                    continue  # not (yet) a prompt
                seen.add(name)
                if self._signatures.get(name) == sig:
                    continue
                self._signatures[name] = sig
                try:
                    entries[name] = self._load(name, path)
                except Exception as e:  # noqa: BLE001  one bad folder never blocks the others (or the server)
                    self.errors[name] = str(e) if isinstance(e, SoftPromptError) else f"{type(e).__name__}: {e}"
                    report["failed"].append(name)
                    log.warning("prompt %s not loaded: %s", name, e)
                    continue
                self.errors.pop(name, None)
                report["updated" if name in self.entries else "added"].append(name)
            for name in list(entries):
                if name not in seen:
                    del entries[name]
                    self._signatures.pop(name, None)
                    report["removed"].append(name)
            for name in list(self.errors):
                if not (self.directory / name).exists():
                    del self.errors[name]
            self.entries = entries
        if any(report.values()):
            log.info("prompts: %s", ", ".join(f"{k} {v}" for k, v in report.items() if v))
        return report

    def add(self, name: str) -> PromptEntry:
        """Load (or reload) one prompt by name from the directory; re-enables a removed one."""
        if self.directory is None:
            raise SoftPromptError("no prompts directory")
        with self._lock:
            path = self._path(name)
            if not path.is_dir():
                raise FileNotFoundError(f"no prompt folder {name!r} in the prompts directory")
            entry = self._load(name, path)
            self._disabled.discard(name)
            self._signatures[name] = self._signature(path)
            self.errors.pop(name, None)
            self.entries = {**self.entries, name: entry}
        return entry

    def remove(self, name: str) -> bool:
        """Unload a prompt (requests already admitted finish with it); later scans skip it until add()."""
        with self._lock:
            if name not in self.entries:
                return False
            self._disabled.add(name)
            self._signatures.pop(name, None)
            self.entries = {k: v for k, v in self.entries.items() if k != name}
        return True


# ---- metrics --------------------------------------------------------------------------------------------


class Metrics:
    """Counters for /metrics (Prometheus text format). Fixed-size: nothing grows per request."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin")

    def __init__(self):
        self.lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.latency = [0] * len(self.BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record(self, path: str, status: int, seconds: float) -> None:
        route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")
        with self.lock:
            self.responses[(route, status)] = self.responses.get((route, status), 0) + 1
            if route in ("/v1/completions", "/v1/chat/completions") and status == 200:
                for i, b in enumerate(self.BUCKETS):
                    if seconds <= b:
                        self.latency[i] += 1
                self.latency_sum += seconds
                self.latency_count += 1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---- the app -----------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    base: BaseModel
    registry: PromptRegistry
    scheduler: Scheduler
    config: ServeConfig
    model_name: str
    limits: Limits
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)
    shutting_down: bool = False

    def resolve(self, model: str) -> PromptEntry | None:
        """`model` -> the prompt it names (None: the plain base); 404 for anything else."""
        if model == self.model_name:
            return None
        name = model[len(self.model_name) + 1:] if model.startswith(self.model_name + ":") else model
        entry = self.registry.get(name)
        if entry is None:
            raise ApiError(404, f"model {model!r} not found: use {self.model_name!r} or {self.model_name + ':PROMPT'!r} "
                                "with a prompt listed by GET /v1/models", param="model", code="model_not_found")
        return entry


def default_model_name(base: BaseModel) -> str:
    source = str(base.source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return path.stem
    return path.resolve().name if path.exists() else source


def create_app(base: BaseModel, prompts_dir: str | os.PathLike | None, config: ServeConfig | None = None, **overrides):
    """The ASGI app. The scheduler thread starts on the first request (or at lifespan startup); the prompts
    directory (else `config.prompts`) is scanned now, then every `watch_interval` seconds while the app's lifespan
    runs. `config`: a ServeConfig or a dict; `overrides`: its fields as keyword arguments (they win)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    cfg = from_kwargs(ServeConfig, config, **overrides)  # a new object: the caller's config is left as it was
    if cfg.api_key_file:
        cfg = from_kwargs(ServeConfig, cfg, api_key=read_api_key(cfg.api_key, cfg.api_key_file), api_key_file=None)
    prompts_dir = prompts_dir if prompts_dir is not None else cfg.prompts
    registry = PromptRegistry(base, prompts_dir, max_prompt_bytes=cfg.max_prompt_bytes,
                              max_virtual_tokens=cfg.max_virtual_tokens)
    base._embedding_hash  # noqa: B018  (hash the embedding table once, now, not inside the first reload)
    registry.scan()
    scheduler = Scheduler(base, max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                          max_prefill_tokens=cfg.max_prefill_tokens)
    limits = Limits(max_input_tokens=cfg.max_input_tokens, max_output_tokens=cfg.max_output_tokens, max_n=cfg.max_n)
    state = ServerState(base, registry, scheduler, cfg, cfg.served_model_name or default_model_name(base), limits)

    def error(status: int, message: str, *, headers: dict | None = None, **kw) -> JSONResponse:
        return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            raise ApiError(413, f"request body over this server's limit of {cfg.max_body_bytes} bytes",
                           code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise ApiError(413, f"request body over this server's limit of {cfg.max_body_bytes} bytes",
                               code="body_too_large")
        if not body.strip():
            raise ApiError(400, "empty request body: send a JSON object", code="invalid_json")
        try:
            obj = json.loads(body)
            # A lone surrogate ("\ud800") parses, but no tokenizer or response can encode it: refuse it here.
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate (e.g. \\ud800): not valid Unicode text",
                           code="invalid_json") from None
        except ValueError as e:  # e.g. an integer over Python's 4,300-digit conversion limit
            raise ApiError(400, f"malformed JSON in the request body: {e}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "malformed JSON in the request body: nested too deeply", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return obj

    # ---- generation ----

    def encode(req: GenRequest, entry: PromptEntry | None) -> list[list[int]]:
        tok = base.tokenizer
        if req.kind == "chat":
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
            try:
                rendered = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the template's own checks (e.g. role order) raise plain exceptions
                raise ApiError(400, f"messages: the chat template rejected them ({e})", param="messages") from None
            return [tok(rendered, add_special_tokens=False)["input_ids"]]
        if req.token_prompts:
            for ids in req.token_prompts:
                if any(t < 0 or t >= base.vocab_size for t in ids):
                    raise ApiError(400, f"prompt: token ids must be in [0, {base.vocab_size})", param="prompt")
            return req.token_prompts
        try:
            template = Template.from_dict(entry.meta.get("template")) if req.use_template and entry and entry.meta.get("template") else None
        except (SoftPromptError, TypeError, AttributeError, ValueError) as e:  # a hand-edited template
            raise ApiError(400, f"use_template: this prompt's saved template is invalid ({e})", param="use_template") from None
        if req.use_template and template is None:
            raise ApiError(400, "use_template: this prompt has no saved template", param="use_template")
        if template is not None:
            from .generate import fill_template

            try:
                return [Encoder(tok, template).input_ids(fill_template(template, t)) for t in req.texts]
            except Exception as e:  # noqa: BLE001  the saved template or its chat template rejected this input
                raise ApiError(400, f"prompt: {e}", param="prompt") from None
        encoder = Encoder(tok, Template())
        return [encoder.input_ids(t) for t in req.texts]

    def check_lengths(inputs: list[list[int]], req: GenRequest, entry: PromptEntry | None) -> None:
        virtual = entry.n_virtual_tokens if entry else 0
        for ids in inputs:
            if not ids and (entry is None or entry.embeddings.dim() != 2):
                raise ApiError(400, "prompt is empty: only an input-embedding soft prompt can be continued from "
                                    "nothing (not the base model, not a deep prompt)", param="prompt", code="empty_prompt")
            if len(ids) > cfg.max_input_tokens:
                raise ApiError(400, f"the input is {len(ids)} tokens, over this server's limit of {cfg.max_input_tokens} "
                                    "(--max-input-tokens)", param="prompt" if req.kind == "completion" else "messages",
                               code="input_too_long")
            total = virtual + len(ids) + req.params.max_tokens
            if total > base.max_positions:
                raise ApiError(400, f"{virtual} virtual + {len(ids)} input + {req.params.max_tokens} max_tokens = {total} "
                                    f"tokens, over the model's context of {base.max_positions}: lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")

    async def generate(request: Request, kind: str):
        body = await read_json(request)
        req = parse_chat(body, limits) if kind == "chat" else parse_completion(body, limits)
        entry = state.resolve(req.model)
        if sum(len(t) for t in req.texts) > 20_000:
            inputs = await asyncio.to_thread(encode, req, entry)
        else:
            inputs = encode(req, entry)
        check_lengths(inputs, req, entry)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        deadline = time.monotonic() + cfg.request_timeout
        seqs = []
        for p, ids in enumerate(inputs):
            for j in range(req.n):
                params = req.params
                if params.seed is not None and req.n > 1:
                    params = type(params)(**{**params.__dict__, "seed": (params.seed + j) % 2**63})
                seqs.append(Sequence(ids, params, entry, sink, index=p * req.n + j, deadline=deadline))
        if state.shutting_down:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry shortly", code="server_busy", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        rid = new_id(kind)
        prompt_tokens = sum(len(ids) for ids in inputs)
        if req.stream:
            return StreamingResponse(stream(kind, rid, req, seqs, queue, deadline, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        collect = asyncio.ensure_future(gather(seqs, queue, deadline))
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client went away (or this handler was cancelled): stop its sequences
                collect.cancel()
                for s in seqs:
                    s.cancel()
        if not collect.done() or collect.cancelled():
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await collect
            return Response(status_code=499)  # client closed the request; nobody reads this
        texts, reasons, completion_tokens = collect.result()
        return JSONResponse(completion_body(kind, rid, req.model, texts, reasons, usage(prompt_tokens, completion_tokens)))

    async def next_event(queue: asyncio.Queue, deadline: float) -> Event:
        try:  # the scheduler enforces the deadline; this is the backstop should it not answer at all
            return await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()) + 5.0)
        except asyncio.TimeoutError:
            return Event("error", 0, text="the request timed out", status=504)

    async def gather(seqs: list[Sequence], queue: asyncio.Queue, deadline: float):
        texts = [""] * len(seqs)
        reasons: list[str | None] = [None] * len(seqs)
        tokens, pending = 0, len(seqs)
        try:
            while pending:
                ev = await next_event(queue, deadline)
                if ev.kind == "delta":
                    texts[ev.index] += ev.text
                elif ev.kind == "finish":
                    reasons[ev.index] = ev.finish_reason
                    tokens += ev.completion_tokens
                    pending -= 1
                else:
                    raise ApiError(ev.status or 500, ev.text, code="timeout" if ev.status == 504 else None)
        finally:
            for s in seqs:
                s.cancel()  # no-op for finished ones; frees the batch slots of the rest on error
        return texts, reasons, tokens

    async def wait_disconnect(request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    async def stream(kind, rid, req: GenRequest, seqs, queue, deadline, prompt_tokens):
        created = int(time.time())
        tokens, pending = 0, len(seqs)
        try:
            if kind == "chat":
                for s in seqs:
                    yield sse(chunk_body(kind, rid, created, req.model, s.index, role=True))
            while pending:
                ev = await next_event(queue, deadline)
                if ev.kind == "delta":
                    yield sse(chunk_body(kind, rid, created, req.model, ev.index, text=ev.text))
                elif ev.kind == "finish":
                    pending -= 1
                    tokens += ev.completion_tokens
                    yield sse(chunk_body(kind, rid, created, req.model, ev.index, finish_reason=ev.finish_reason))
                else:
                    status = ev.status or 500
                    yield sse(error_body(status, ev.text, code="timeout" if status == 504 else None))
                    break
            if req.include_usage:
                yield sse(usage_chunk(kind, rid, created, req.model, usage(prompt_tokens, tokens)))
            yield b"data: [DONE]\n\n"
        finally:
            for s in seqs:
                s.cancel()

    # ---- routes ----

    async def completions(request: Request):
        return await generate(request, "completion")

    async def chat_completions(request: Request):
        return await generate(request, "chat")

    def model_card(model_id: str, entry: PromptEntry | None) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": int(state.started), "owned_by": "softprompt",
                "root": state.model_name, "parent": None if entry is None else state.model_name}
        if entry is not None:
            card["soft_prompt"] = {"name": entry.name, "n_virtual_tokens": entry.n_virtual_tokens, "version": entry.version}
        return card

    async def list_models(request: Request):
        cards = [model_card(state.model_name, None)]
        cards += [model_card(f"{state.model_name}:{name}", e) for name, e in sorted(registry.entries.items())]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(request: Request):
        model = request.path_params["model"]
        entry = state.resolve(model)
        return JSONResponse(model_card(model if entry is None else f"{state.model_name}:{entry.name}", entry))

    async def health(request: Request):
        body = {"status": "shutting_down" if state.shutting_down else "ok", "model": state.model_name,
                "prompts": len(registry.entries), "running": scheduler.n_running, "waiting": scheduler.n_waiting}
        return JSONResponse(body, status_code=503 if state.shutting_down else 200)

    async def metrics(request: Request):
        st, m = scheduler.stats, state.metrics
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP softprompt_{name} {help_}")
            lines.append(f"# TYPE softprompt_{name} {kind}")
            for labels, value in samples:
                lines.append(f"softprompt_{name}{labels} {value}")

        metric("running_sequences", "gauge", "sequences in the decode batch", [("", scheduler.n_running)])
        metric("waiting_sequences", "gauge", "sequences queued", [("", scheduler.n_waiting)])
        metric("prompts_loaded", "gauge", "soft prompts loaded", [("", len(registry.entries))])
        metric("prompt_load_errors", "gauge", "prompt folders that failed to load", [("", len(registry.errors))])
        for key, help_ in [("generated_tokens", "tokens generated"), ("prompt_tokens", "input tokens prefilled"),
                           ("decode_steps", "decode forward passes"), ("decode_rows", "rows summed over decode steps"),
                           ("prefills", "prefill forward passes"), ("prefix_cache_hits", "prefix cache hits"),
                           ("prefix_cache_misses", "prefix cache misses (prefix computed)"),
                           ("sequences_finished", "sequences finished"), ("sequences_cancelled", "sequences cancelled"),
                           ("sequences_timed_out", "sequences timed out"), ("sequences_failed", "sequences failed")]:
            stat = {"sequences_finished": "finished", "sequences_cancelled": "cancelled",
                    "sequences_timed_out": "timeouts", "sequences_failed": "errors"}.get(key, key)
            metric(f"{key}_total", "counter", help_, [("", st[stat])])
        with m.lock:
            metric("http_responses_total", "counter", "HTTP responses by route and status",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(m.responses.items())])
            lines.append("# HELP softprompt_request_seconds latency of successful generation requests")
            lines.append("# TYPE softprompt_request_seconds histogram")
            for b, n in zip(m.BUCKETS, m.latency):
                lines.append(f'softprompt_request_seconds_bucket{{le="{"+Inf" if b == float("inf") else b}"}} {n}')
            lines.append(f"softprompt_request_seconds_sum {m.latency_sum:.6f}")
            lines.append(f"softprompt_request_seconds_count {m.latency_count}")
        metric("resident_memory_bytes", "gauge", "resident memory of the server process", [("", _rss_bytes())])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def admin_list(request: Request):
        return JSONResponse({"directory": str(registry.directory),
                             "prompts": [{"name": n, "n_virtual_tokens": e.n_virtual_tokens, "version": e.version}
                                         for n, e in sorted(registry.entries.items())],
                             "errors": dict(registry.errors)})

    async def admin_reload(request: Request):
        return JSONResponse(await asyncio.to_thread(registry.scan))

    async def admin_add(request: Request):
        name = request.path_params["name"]
        try:
            entry = await asyncio.to_thread(registry.add, name)
        except FileNotFoundError as e:
            raise ApiError(404, str(e), code="prompt_not_found") from None
        except Exception as e:  # noqa: BLE001  whatever is in the folder, the answer is "this prompt is bad"
            raise ApiError(400, f"prompt {name!r} not loaded: {e}", code="prompt_invalid") from None
        return JSONResponse({"name": entry.name, "n_virtual_tokens": entry.n_virtual_tokens, "version": entry.version})

    async def admin_remove(request: Request):
        name = request.path_params["name"]
        if not registry.remove(name):
            raise ApiError(404, f"prompt {name!r} is not loaded", code="prompt_not_found")
        return JSONResponse({"removed": name})

    async def on_api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def on_http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail) if exc.detail else "error", headers=getattr(exc, "headers", None))

    async def on_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal server error: {type(exc).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        watcher = asyncio.ensure_future(watch()) if cfg.watch_interval > 0 and registry.directory else None
        try:
            yield
        finally:
            state.shutting_down = True
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(scheduler.shutdown, drain=True, timeout=cfg.request_timeout + 5)

    async def watch():
        while True:
            await asyncio.sleep(cfg.watch_interval)
            try:
                await asyncio.to_thread(registry.scan)
            except Exception:  # a vanished directory, a permission change: log, keep serving what is loaded
                log.exception("prompts directory scan failed")

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/prompts", admin_list, methods=["GET"]),
        Route("/admin/reload", admin_reload, methods=["POST"]),
        Route("/admin/prompts/{name}", admin_add, methods=["POST", "PUT"]),
        Route("/admin/prompts/{name}", admin_remove, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error})
    app.state.server = state
    return _Guard(app, state)


class _Guard:
    """Outermost ASGI layer: API-key check (all but /health) and response accounting for /metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self._server = app, state
        key = state.config.api_key
        self._key = key.encode() if key else None

    def __getattr__(self, name):  # app.state, app.routes ... reach the Starlette app
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self._key is not None and path != "/health" and not self._authorised(scope):
            from starlette.responses import JSONResponse

            body = error_body(401, "missing or invalid API key: send Authorization: Bearer KEY", code="invalid_api_key")
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            self._server.metrics.record(path, 401, 0.0)
            return await response(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self._server.metrics.record(path, status[0], time.monotonic() - start)

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(cfg: ServeConfig) -> None:
    """Refuse to serve beyond this machine without an API key, unless told the network is trusted."""
    if is_loopback(cfg.host) or cfg.api_key:
        return
    if not cfg.allow_no_api_key:
        raise SoftPromptError(f"--host {cfg.host} without an API key would let anyone who can reach this address use "
                              "the server: set --api-key-file FILE or $SOFTPROMPT_API_KEY, or pass --allow-no-api-key "
                              "if the network is trusted")
    log.warning("serving on %s without an API key (--allow-no-api-key): anyone who can reach it can use it", cfg.host)


def read_api_key(api_key: str | None = None, api_key_file: str | os.PathLike | None = None) -> str | None:
    """The key from --api-key, else --api-key-file (first line), else $SOFTPROMPT_API_KEY; a file or the environment
    keeps it out of the process list."""
    if api_key and api_key_file:
        raise SoftPromptError("give --api-key or --api-key-file, not both")
    if api_key_file:
        path = Path(api_key_file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SoftPromptError(f"--api-key-file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        if not key or "\n" in key:
            raise SoftPromptError(f"--api-key-file {path}: expected the key alone on one line")
        return key
    return api_key or os.environ.get("SOFTPROMPT_API_KEY") or None


def run_server(base: BaseModel | None = None, prompts_dir: str | os.PathLike | None = None,
               config: ServeConfig | dict | None = None, **overrides) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let in-flight requests finish, and exit.

    What `softprompt serve` runs: the API key from `api_key`, else `api_key_file`, else $SOFTPROMPT_API_KEY; the
    exposure check (before the model loads); then `base` (else `model` is loaded) and `prompts_dir` (else
    `prompts`). `overrides` are ServeConfig fields."""
    import uvicorn

    cfg = from_kwargs(ServeConfig, config, **overrides)
    cfg = from_kwargs(ServeConfig, cfg, api_key=read_api_key(cfg.api_key, cfg.api_key_file), api_key_file=None)
    check_exposure(cfg)  # before the model load, not 20 s later
    if base is None:
        from .model import load_model

        base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    app = create_app(base, prompts_dir, cfg)
    limit = cfg.max_connections or (cfg.max_running + cfg.max_waiting + 16)
    uv = uvicorn.Config(app, host=cfg.host, port=cfg.port, lifespan="on", limit_concurrency=limit,
                        timeout_graceful_shutdown=int(cfg.request_timeout) + 5, log_level="info", access_log=False)
    uvicorn.Server(uv).run()
