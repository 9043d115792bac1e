"""OpenAI-compatible request parsing (body -> request -> token ids, every limit checked) and response shapes for
`softprompt serve` (no web framework here).

Every bad request becomes an `ApiError` whose message names the field and the limit, answered as OpenAI does:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..data import Encoder, Template
from ..engine import PromptEntry
from ..errors import SoftPromptError
from ..generate import fill_template
from ..model import BaseModel
from ..sampling import GREEDY_BELOW, SamplingParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A request body -> the JSON object it must hold; anything else is a 400 saying what is wrong."""
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


# ---- field readers ------------------------------------------------------------------------------------


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def get_int(body: dict, name: str, default: int | None, *, lo: int | None = None, hi: int | None = None,
            hi_hint: str = "") -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"expected an integer, got {_type_name(v)}")
    if lo is not None and v < lo:
        raise _bad(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ApiError(400, f"{name}: {v} is over this server's limit of {hi}{hi_hint}", param=name,
                       code="limit_exceeded")
    return v


def get_number(body: dict, name: str, default: float, *, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"expected a number, got {_type_name(v)}")
    if not math.isfinite(v):
        raise _bad(name, f"must be a finite number, got {v}")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"expected true or false, got {_type_name(v)}")
    return v


def get_str(body: dict, name: str, *, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise ApiError(400, f"{name} is required", param=name, code="missing_field")
        return None
    if not isinstance(v, str):
        raise _bad(name, f"expected a string, got {_type_name(v)}")
    return v


def reject_unsupported(body: dict, names: dict[str, Any]) -> None:
    """Fields we do not implement: accepted only at their no-op value, never silently ignored."""
    for name, ok in names.items():
        v = body.get(name)
        if v is None or v == ok or (isinstance(ok, tuple) and v in ok):
            continue
        raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


@dataclass
class Limits:
    max_input_tokens: int
    max_output_tokens: int
    max_n: int = 8
    max_stop: int = 8
    max_stop_chars: int = 256
    max_prompts_per_request: int = 16


@dataclass
class GenRequest:
    """A parsed /v1/completions or /v1/chat/completions request."""

    model: str
    kind: str  # "completion" | "chat"
    texts: list[str] = field(default_factory=list)  # completion prompts (one choice group each)
    token_prompts: list[list[int]] = field(default_factory=list)  # completion prompts given as token ids
    messages: list[dict[str, str]] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    use_template: bool = False


def _sampling(body: dict, limits: Limits, max_tokens_names: tuple[str, ...], default_max_tokens: int) -> SamplingParams:
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = get_int(body, name, None, lo=1, hi=limits.max_output_tokens, hi_hint=" (--max-output-tokens)")
        if max_tokens is not None:
            break
    if max_tokens is None:
        max_tokens = min(default_max_tokens, limits.max_output_tokens)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        stops = tuple(stop)
    else:
        raise _bad("stop", f"expected a string or an array of strings, got {_type_name(stop)}")
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"stop: {len(stops)} stop sequences, over this server's limit of {limits.max_stop}",
                       param="stop", code="limit_exceeded")
    for x in stops:
        if not x:
            raise _bad("stop", "stop sequences must not be empty")
        if len(x) > limits.max_stop_chars:
            raise _bad("stop", f"a stop sequence is {len(x)} characters, over the limit of {limits.max_stop_chars}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed", f"expected an integer, got {_type_name(seed)}")
    if seed is not None and not (-(2**63) <= seed < 2**63):
        raise _bad("seed", "must fit in 64 bits")
    temperature = get_number(body, "temperature", 1.0, lo=0.0, hi=2.0)
    return SamplingParams(max_tokens=max_tokens,
                          temperature=0.0 if temperature < GREEDY_BELOW else temperature,  # 1e-300 is greedy
                          top_p=get_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
                          seed=None if seed is None else seed % 2**63, stop=stops)


def _stream_options(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", f"expected an object, got {_type_name(opts)}")
    return get_bool(opts, "include_usage", False)


_UNSUPPORTED_COMMON = {"logprobs": (False,), "top_logprobs": 0, "logit_bias": {}, "presence_penalty": (0, 0.0),
                       "frequency_penalty": (0, 0.0)}


def parse_completion(body: dict, limits: Limits) -> GenRequest:
    model = get_str(body, "model", required=True)
    reject_unsupported(body, {**_UNSUPPORTED_COMMON, "echo": False, "best_of": 1, "suffix": ""})
    prompt = body.get("prompt")
    req = GenRequest(model=model, kind="completion")
    if prompt is None:
        raise ApiError(400, "prompt is required", param="prompt", code="missing_field")
    if isinstance(prompt, str):
        req.texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        req.texts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        req.token_prompts = [list(prompt)]
    elif isinstance(prompt, list) and not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="empty_prompt")
    else:
        raise _bad("prompt", "expected a string, an array of strings or an array of token ids")
    if len(req.texts) > limits.max_prompts_per_request:
        raise ApiError(400, f"prompt: {len(req.texts)} prompts in one request, over this server's limit of "
                            f"{limits.max_prompts_per_request}", param="prompt", code="limit_exceeded")
    req.params = _sampling(body, limits, ("max_tokens",), 16)  # OpenAI's default for completions
    req.n = get_int(body, "n", 1, lo=1, hi=limits.max_n)
    req.stream = get_bool(body, "stream", False)
    req.include_usage = _stream_options(body)
    req.use_template = get_bool(body, "use_template", False)
    return req


CHAT_ROLES = ("system", "developer", "user", "assistant")


def parse_chat(body: dict, limits: Limits) -> GenRequest:
    model = get_str(body, "model", required=True)
    reject_unsupported(body, {**_UNSUPPORTED_COMMON, "tools": [], "functions": [], "tool_choice": "none",
                              "response_format": ({"type": "text"},)})
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages is required", param="messages", code="missing_field")
    if not isinstance(messages, list):
        raise _bad("messages", f"expected an array of messages, got {_type_name(messages)}")
    if not messages:
        raise ApiError(400, "messages is empty", param="messages", code="empty_prompt")
    if len(messages) > 256:
        raise ApiError(400, "messages: more than 256 messages", param="messages", code="limit_exceeded")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"expected an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"expected one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:40]}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"{where}.content", f"expected a string, got {_type_name(content)}")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "messages: every message is empty", param="messages", code="empty_prompt")
    req = GenRequest(model=model, kind="chat", messages=out)
    # chat has no small default: up to the output limit (or the model's end of turn)
    req.params = _sampling(body, limits, ("max_completion_tokens", "max_tokens"), limits.max_output_tokens)
    req.n = get_int(body, "n", 1, lo=1, hi=limits.max_n)
    req.stream = get_bool(body, "stream", False)
    req.include_usage = _stream_options(body)
    return req


# ---- request -> token ids -------------------------------------------------------------------------------


def request_inputs(base: BaseModel, req: GenRequest, entry: PromptEntry | None) -> list[list[int]]:
    """The token ids of each input of a parsed request: a chat rendered by the model's chat template, token ids as
    given (checked against the vocabulary), or texts (through the prompt's saved template with `use_template`)."""
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
        try:
            return [Encoder(tok, template).input_ids(fill_template(template, t)) for t in req.texts]
        except Exception as e:  # noqa: BLE001  the saved template or its chat template rejected this input
            raise ApiError(400, f"prompt: {e}", param="prompt") from None
    encoder = Encoder(tok, Template())
    return [encoder.input_ids(t) for t in req.texts]


def check_input_lengths(inputs: list[list[int]], req: GenRequest, entry: PromptEntry | None, limits: Limits,
                        max_positions: int) -> None:
    """Refuse an empty input that nothing can continue, an input over --max-input-tokens, and virtual + input +
    max_tokens over the model's context."""
    virtual = entry.n_virtual_tokens if entry else 0
    for ids in inputs:
        if not ids and (entry is None or entry.embeddings.dim() != 2):
            raise ApiError(400, "prompt is empty: only an input-embedding soft prompt can be continued from "
                                "nothing (not the base model, not a deep prompt)", param="prompt", code="empty_prompt")
        if len(ids) > limits.max_input_tokens:
            raise ApiError(400, f"the input is {len(ids)} tokens, over this server's limit of {limits.max_input_tokens} "
                                "(--max-input-tokens)", param="prompt" if req.kind == "completion" else "messages",
                           code="input_too_long")
        total = virtual + len(ids) + req.params.max_tokens
        if total > max_positions:
            raise ApiError(400, f"{virtual} virtual + {len(ids)} input + {req.params.max_tokens} max_tokens = {total} "
                                f"tokens, over the model's context of {max_positions}: lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")


# ---- response shapes -----------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, texts: list[str], reasons: list[str | None],
                    use: dict[str, int]) -> dict[str, Any]:
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "system_fingerprint": None,
            "choices": choices, "usage": use}


def chunk_body(kind: str, rid: str, created: int, model: str, index: int, *, text: str | None = None,
               role: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
            "choices": [choice]}


def usage_chunk(kind: str, rid: str, created: int, model: str, use: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
