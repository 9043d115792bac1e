"""`softprompt serve`: many soft prompts on one frozen model behind an OpenAI-compatible HTTP API.

    app = create_app(load_model(None), "prompts/")      # an ASGI app (Starlette); run it with uvicorn
    run_server(base, "prompts/", ServeConfig(port=8000))  # or let this do it (binds 127.0.0.1 by default)

A request picks its soft prompt with the `model` field: `BASE:PROMPT` (or just `PROMPT`), and plain `BASE` for
none. Requests with different prompts share every forward pass (see scheduler.py). Prompts are the folders of
the prompts directory (our artifacts or PEFT prompt-tuning adapters, safetensors only), rescanned while serving.

The package, by job: `api` (OpenAI request parsing and response shapes, no web framework), `registry` (the
prompts directory as loaded prompts), `metrics` (/metrics counters and text), `guard` (API key, exposure),
`app` (the routes' handlers over `ServerState`, `create_app`, `run_server`).
"""

from .api import ApiError, GenRequest, Limits
from ..config import ServeConfig
from .app import ServerState, create_app, default_model_name, run_server
from .guard import Guard, check_exposure, is_loopback, read_api_key
from .metrics import Metrics
from .registry import PromptRegistry

__all__ = ["ApiError", "GenRequest", "Guard", "Limits", "Metrics", "PromptRegistry", "ServeConfig", "ServerState",
           "check_exposure", "create_app", "default_model_name", "is_loopback", "read_api_key", "run_server"]
