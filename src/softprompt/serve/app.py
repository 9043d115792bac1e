"""The HTTP app: one small handler per route over the server's state (`ServerState`, at `app.state.server`).

    app = create_app(load_model(None), "prompts/")      # an ASGI app (Starlette); run it with uvicorn
    run_server(base, "prompts/", ServeConfig(port=8000))  # or let this do it (binds 127.0.0.1 by default)

ServeConfig (config.py) holds every option and limit: the `serve` command's flags.
Starlette is imported only when an app is made (it is the optional `serve` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ServeConfig, from_kwargs
from ..engine import Event, PromptEntry, Sequence
from ..errors import SoftPromptError
from ..model import BaseModel
from ..scheduler import QueueFull, Scheduler, ShuttingDown
from .api import (ApiError, GenRequest, Limits, check_input_lengths, chunk_body, completion_body, error_body, new_id,
                  parse_chat, parse_completion, parse_json_body, request_inputs, sse, usage, usage_chunk)
from .guard import Guard, check_exposure, read_api_key
from .metrics import Metrics, prometheus_text
from .registry import PromptRegistry

log = logging.getLogger("softprompt.serve")


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


def server_state(request) -> ServerState:
    return request.app.state.server


def json_response(body: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


# ---- generation: /v1/completions, /v1/chat/completions ---------------------------------------------------------


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is over `max_bytes`, whatever its Content-Length says."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise ApiError(413, f"request body over this server's limit of {max_bytes} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ApiError(413, f"request body over this server's limit of {max_bytes} bytes", code="body_too_large")
    return bytes(body)


async def completions(request):
    return await generate(request, "completion")


async def chat_completions(request):
    return await generate(request, "chat")


async def generate(request, kind: str):
    """Parse, tokenise and check a request, queue its sequences (n per input), and answer: a stream of events, or
    one body once every sequence finished (or 499 if the client left first: its sequences are cancelled)."""
    from starlette.responses import Response, StreamingResponse

    state = server_state(request)
    cfg = state.config
    body = parse_json_body(await read_body(request, cfg.max_body_bytes))
    req = parse_chat(body, state.limits) if kind == "chat" else parse_completion(body, state.limits)
    entry = state.resolve(req.model)
    if sum(len(t) for t in req.texts) > 20_000:
        inputs = await asyncio.to_thread(request_inputs, state.base, req, entry)
    else:
        inputs = request_inputs(state.base, req, entry)
    check_input_lengths(inputs, req, entry, state.limits, state.base.max_positions)
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
            seqs.append(Sequence(ids, params, entry, sink, index=p * req.n + j, deadline=deadline, stream=req.stream))
    if state.shutting_down:
        raise ApiError(503, "the server is shutting down", code="shutting_down")
    try:
        state.scheduler.submit(seqs)
    except QueueFull as e:
        raise ApiError(429, f"server busy: {e}; retry shortly", code="server_busy", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", code="shutting_down") from None
    rid = new_id(kind)
    prompt_tokens = sum(len(ids) for ids in inputs)
    if req.stream:
        return StreamingResponse(stream_events(kind, rid, req, seqs, queue, deadline, prompt_tokens),
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
    return json_response(completion_body(kind, rid, req.model, texts, reasons, usage(prompt_tokens, completion_tokens)))


async def next_event(queue: asyncio.Queue, deadline: float) -> Event:
    try:  # the scheduler enforces the deadline; this is the backstop should it not answer at all
        return await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()) + 5.0)
    except asyncio.TimeoutError:
        return Event("error", 0, text="the request timed out", status=504)


async def gather(seqs: list[Sequence], queue: asyncio.Queue, deadline: float):
    """Every sequence's text, finish reason, and the generated tokens in all, for a non-streamed answer."""
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


async def wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def stream_events(kind, rid, req: GenRequest, seqs, queue, deadline, prompt_tokens):
    """The server-sent events of a streamed answer, as OpenAI sends them, ending with `data: [DONE]`."""
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


# ---- models, health, metrics ----------------------------------------------------------------------------------


def model_card(state: ServerState, model_id: str, entry: PromptEntry | None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": int(state.started), "owned_by": "softprompt",
            "root": state.model_name, "parent": None if entry is None else state.model_name}
    if entry is not None:
        card["soft_prompt"] = {"name": entry.name, "n_virtual_tokens": entry.n_virtual_tokens, "version": entry.version}
    return card


async def list_models(request):
    state = server_state(request)
    cards = [model_card(state, state.model_name, None)]
    cards += [model_card(state, f"{state.model_name}:{name}", e) for name, e in sorted(state.registry.entries.items())]
    return json_response({"object": "list", "data": cards})


async def get_model(request):
    state = server_state(request)
    model = request.path_params["model"]
    entry = state.resolve(model)
    return json_response(model_card(state, model if entry is None else f"{state.model_name}:{entry.name}", entry))


async def health(request):
    state = server_state(request)
    body = {"status": "shutting_down" if state.shutting_down else "ok", "model": state.model_name,
            "prompts": len(state.registry.entries), "running": state.scheduler.n_running,
            "waiting": state.scheduler.n_waiting}
    return json_response(body, status=503 if state.shutting_down else 200)


async def metrics(request):
    from starlette.responses import PlainTextResponse

    state = server_state(request)
    return PlainTextResponse(prometheus_text(state.metrics, state.scheduler, state.registry),
                             media_type="text/plain; version=0.0.4")


# ---- admin: the loaded prompts ---------------------------------------------------------------------------------


async def admin_list(request):
    registry = server_state(request).registry
    return json_response({"directory": str(registry.directory),
                          "prompts": [{"name": n, "n_virtual_tokens": e.n_virtual_tokens, "version": e.version}
                                      for n, e in sorted(registry.entries.items())],
                          "errors": dict(registry.errors)})


async def admin_reload(request):
    return json_response(await asyncio.to_thread(server_state(request).registry.scan))


async def admin_add(request):
    name = request.path_params["name"]
    try:
        entry = await asyncio.to_thread(server_state(request).registry.add, name)
    except FileNotFoundError as e:
        raise ApiError(404, str(e), code="prompt_not_found") from None
    except Exception as e:  # noqa: BLE001  whatever is in the folder, the answer is "this prompt is bad"
        raise ApiError(400, f"prompt {name!r} not loaded: {e}", code="prompt_invalid") from None
    return json_response({"name": entry.name, "n_virtual_tokens": entry.n_virtual_tokens, "version": entry.version})


async def admin_remove(request):
    name = request.path_params["name"]
    if not server_state(request).registry.remove(name):
        raise ApiError(404, f"prompt {name!r} is not loaded", code="prompt_not_found")
    return json_response({"removed": name})


# ---- errors -----------------------------------------------------------------------------------------------------


async def on_api_error(request, exc: ApiError):
    return json_response(exc.body(), status=exc.status, headers=exc.headers)


async def on_http_error(request, exc):
    return json_response(error_body(exc.status_code, str(exc.detail) if exc.detail else "error"),
                         status=exc.status_code, headers=getattr(exc, "headers", None))


async def on_error(request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return json_response(error_body(500, f"internal server error: {type(exc).__name__}"), status=500)


# ---- lifespan: the scheduler thread and the directory watch -----------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app):
    state: ServerState = app.state.server
    state.scheduler.start()
    watcher = asyncio.ensure_future(watch(state)) if state.config.watch_interval > 0 and state.registry.directory else None
    try:
        yield
    finally:
        state.shutting_down = True
        if watcher is not None:
            watcher.cancel()
        await asyncio.to_thread(state.scheduler.shutdown, drain=True, timeout=state.config.request_timeout + 5)


async def watch(state: ServerState):
    while True:
        await asyncio.sleep(state.config.watch_interval)
        try:
            await asyncio.to_thread(state.registry.scan)
        except Exception:  # a vanished directory, a permission change: log, keep serving what is loaded
            log.exception("prompts directory scan failed")


# ---- the app ------------------------------------------------------------------------------------------------------


def create_app(base: BaseModel, prompts_dir: str | os.PathLike | None = None, config: ServeConfig | dict | None = None,
               **overrides):
    """The ASGI app. The scheduler thread starts on the first request (or at lifespan startup); the prompts
    directory (else `config.prompts`) is scanned now, then every `watch_interval` seconds while the app's lifespan
    runs. `config`: a ServeConfig or a dict; `overrides`: its fields as keyword arguments (they win)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    cfg = from_kwargs(ServeConfig, config, **overrides)  # a new object: the caller's config is left as it was
    if cfg.api_key_file:
        cfg = from_kwargs(ServeConfig, cfg, api_key=read_api_key(cfg.api_key, cfg.api_key_file), api_key_file=None)
    prompts_dir = prompts_dir if prompts_dir is not None else cfg.prompts
    registry = PromptRegistry(base, prompts_dir, max_prompt_bytes=cfg.max_prompt_bytes,
                              max_virtual_tokens=cfg.max_virtual_tokens)
    base.fingerprint()  # hashes the embedding table once, now, not inside the first reload
    registry.scan()
    scheduler = Scheduler(base, max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                          max_prefill_tokens=cfg.max_prefill_tokens, prefill_wait_steps=cfg.prefill_wait_steps)
    limits = Limits(max_input_tokens=cfg.max_input_tokens, max_output_tokens=cfg.max_output_tokens, max_n=cfg.max_n)
    state = ServerState(base, registry, scheduler, cfg, cfg.served_model_name or default_model_name(base), limits)
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
    return Guard(app, cfg.api_key, state.metrics)


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
        from ..model import load_model

        base = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    app = create_app(base, prompts_dir, cfg)
    limit = cfg.max_connections or (cfg.max_running + cfg.max_waiting + 16)
    uv = uvicorn.Config(app, host=cfg.host, port=cfg.port, lifespan="on", limit_concurrency=limit,
                        timeout_graceful_shutdown=int(cfg.request_timeout) + 5, log_level="info", access_log=False)
    server = uvicorn.Server(uv)
    # The model runs on this (main) thread, HTTP on another (see Scheduler.run_forever); signals reach the main
    # thread only, so they are passed on to uvicorn, whose graceful shutdown then drains the scheduler.
    failed: list[BaseException] = []

    def serve_http() -> None:
        try:
            server.run()
        except BaseException as e:  # uvicorn exits (SystemExit) when it cannot bind
            failed.append(e)

    http = threading.Thread(target=serve_http, name="softprompt-http", daemon=True)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app.state.server.scheduler.run_forever(alive=http.is_alive, before=http.start)
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise SoftPromptError(f"the HTTP server did not start on {cfg.host}:{cfg.port} (see the message above)")
