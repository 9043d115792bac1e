"""Who may use the server: the API-key middleware (which also counts every response for /metrics), the key's
sources, and the refusal to serve beyond this machine without one."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from pathlib import Path

from ..config import ServeConfig
from ..errors import SoftPromptError
from .api import error_body
from .metrics import Metrics

log = logging.getLogger("softprompt.serve")


class Guard:
    """Outermost ASGI layer: API-key check (all but /health) and response accounting for /metrics."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self._key = api_key.encode() if api_key else None

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
            self.metrics.record(path, 401, 0.0)
            return await response(scope, receive, send)
        start, status = time.monotonic(), [500]

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.record(path, status[0], time.monotonic() - start)

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
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
