"""Hand a soft prompt to vLLM for scale: build `/v1/completions` request bodies whose `prompt_embeds` hold the
virtual tokens followed by the input's token embeddings, exactly what softprompt's own forward feeds the model.

vLLM (>= 0.11, `vllm serve MODEL --enable-prompt-embeds`) decodes each `prompt_embeds` string with
`torch.load(io.BytesIO(pybase64.b64decode(s, validate=True)), weights_only=True, map_location="cpu")`, densifies
it, drops a leading batch dimension of 1 and wants `[tokens, hidden_size]` in float32 / bfloat16 / float16
(vllm/entrypoints/renderer.py, `CompletionRenderer.load_prompt_embeds`, in 0.11; later
vllm/renderers/embed_utils.py, `safe_load_prompt_embeds`, which also casts to the server's dtype). It adds no
BOS and no template of its own: the tensor is the whole prompt. See docs/vllm.md.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Sequence

import torch

from .data import Encoder, Template
from .errors import SoftPromptError
from .generate import fill_template
from .model import BaseModel, load_model, split_prompts
from .prompt import SoftPrompt, as_prompt, prompt_base_source

EMBEDS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def input_ids_for(base: BaseModel, prompt: SoftPrompt | None, text: str, raw: bool = False) -> list[int]:
    """The input's token ids as `softprompt generate` builds them: the prompt's saved template filled with the
    text (chat template included), or the bare text with `raw` / no saved template."""
    template = Template.from_dict(prompt.template) if prompt is not None and prompt.template else None
    if raw or template is None:
        return Encoder(base.tokenizer, Template()).input_ids(text)
    return Encoder(base.tokenizer, template).input_ids(fill_template(template, text))


@torch.no_grad()
def prompt_embeds(base: BaseModel, prompt: SoftPrompt | None, text: str, raw: bool = False) -> torch.Tensor:
    """[virtual_tokens + input tokens, hidden_size] on the CPU, in the model's dtype: the row softprompt feeds
    its model as `inputs_embeds` (virtual tokens before BOS and any chat template)."""
    if prompt is not None:
        shallow, deep = split_prompts(prompt.embeddings)
        if deep is not None:
            raise SoftPromptError("a deep prompt (keys/values at every layer) cannot be sent as prompt_embeds: vLLM "
                                  "takes input embeddings only; serve it with `softprompt serve`")
        if base.is_encoder_decoder:
            raise SoftPromptError("prompt_embeds on vLLM are for decoder-only models")
    ids = input_ids_for(base, prompt, text, raw)
    if not ids and prompt is None:
        raise SoftPromptError("empty input: give some text (or a prompt to continue from)")
    token_embeds = base.model.get_input_embeddings()(torch.tensor([ids], device=base.device))[0]  # [T, d]
    if prompt is None:
        return token_embeds.cpu()
    virtual = prompt.embeddings.to(base.device, token_embeds.dtype)  # [P, d]
    return torch.cat([virtual, token_embeds], dim=0).cpu()


def encode_embeds(tensor: torch.Tensor, dtype: str = "float32") -> str:
    """torch.save + base64, as vLLM's `tensor2base64` (vllm/utils/serial_utils.py) and its server expect."""
    if dtype not in EMBEDS_DTYPES:
        raise SoftPromptError(f"embeds dtype {dtype!r}: choose {', '.join(EMBEDS_DTYPES)}")
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu", EMBEDS_DTYPES[dtype]).contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def completion_request(
    texts: str | Sequence[str],
    prompt: str | os.PathLike | SoftPrompt | None,
    *,
    base: BaseModel | None = None,
    model: str | None = None,
    served_model_name: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    raw: bool = False,
    embeds_dtype: str = "float32",
    dtype: str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """A `/v1/completions` body for vLLM: one `prompt_embeds` entry per text (one choice each, in order).

    `served_model_name` is the `model` field (vLLM's --served-model-name, by default the id it serves); it
    defaults to the prompt's base model source.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if not texts:
        raise SoftPromptError("no input text")
    if base is None:
        if model is None:  # the base the artifact names, as `generate` picks it
            model = prompt_base_source(prompt)
        base = load_model(model, dtype=dtype, device=device)
    loaded = as_prompt(prompt, base)
    encoded = [encode_embeds(prompt_embeds(base, loaded, t, raw), embeds_dtype) for t in texts]
    body: dict[str, Any] = {
        "model": served_model_name or base.source,
        "prompt_embeds": encoded[0] if single else encoded,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    if stop:
        body["stop"] = list(stop)
    return body
