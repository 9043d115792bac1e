"""Text in, text out with a soft prompt: templates filled, rows batched on the decoding engine (engine.py), each
row with its own prompt (or none). Greedy by default; temperature / top-p sampling with a seed; a completion ends
at EOS, a stop string (the "answer" rule: not in its leading whitespace) or the length limit.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch

from .config import GenerateConfig, from_call
from .data import Encoder, Template
from .engine import Engine, PromptEntry
from .engine import Sequence as EngineSequence
from .errors import SoftPromptError
from .model import BaseModel, load_model
from .prompt import SoftPrompt, as_prompt, prompt_base_source
from .sampling import SamplingParams, cut_at_stop

PromptLike = SoftPrompt | torch.Tensor | None


def fill_template(template: Template, text: str) -> str:
    """A user's text -> the prompt's input template: the text fills the template's one field, or a JSON
    object fills several (`'{"premise": "...", "hypothesis": "..."}'`)."""
    names = list(dict.fromkeys(template.fields("input")))
    if len(names) == 1:
        return template.render_input({names[0]: text}, "input")
    if not names:
        return template.input + text
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        raise SoftPromptError(f"this prompt's template needs fields {', '.join(names)}: pass the input as a JSON object")
    return template.render_input(row, "input")


@torch.no_grad()
def generate_ids(
    base: BaseModel,
    inputs: list[list[int]],
    prompts: PromptLike | Sequence[PromptLike] = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    stop: Sequence[str] = (),
    batch_size: int = 32,
) -> list[list[int]]:
    """Token ids in, new token ids out (EOS cut off; a stop string ends a row, its last token kept), one list per
    row. Row i samples with seed `seed + i`, so a row's draw does not depend on the rest of the batch."""
    if not inputs:
        return []
    per_row = isinstance(prompts, (list, tuple))
    given = list(prompts) if per_row else [prompts] * len(inputs)
    if len(given) != len(inputs):
        raise SoftPromptError(f"{len(given)} prompts for {len(inputs)} inputs")
    if base.is_encoder_decoder:
        return _generate_seq2seq(base, inputs, given, max_new_tokens, temperature, top_p, seed)
    entries: dict[int, PromptEntry] = {}  # one entry (and prefix cache) per distinct prompt tensor
    seqs = []
    for i, (ids, p) in enumerate(zip(inputs, given)):
        tensor = getattr(p, "embeddings", p)
        if tensor is not None and id(tensor) not in entries:
            entries[id(tensor)] = PromptEntry(f"prompt{len(entries)}", tensor.detach().to(base.device, base.dtype))
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=None if seed is None else seed + i, stop=tuple(stop), stop_rule="answer")
        seqs.append(EngineSequence(ids, params, entries[id(tensor)] if tensor is not None else None))
    if max_new_tokens <= 0:
        return [[] for _ in inputs]
    Engine(base).run(seqs, max_rows=batch_size)
    for s in seqs:
        if s.error:
            raise SoftPromptError(f"generation failed: {s.error}")
    return [s.generated for s in seqs]


def _generate_seq2seq(base, inputs, prompts, max_new_tokens, temperature, top_p, seed) -> list[list[int]]:
    """Text-to-text models: HF generate on the prompted encoder input (its decoder loop is the standard one; the
    engine batches decoder-only models)."""
    from .sampling import eos_ids

    if seed is not None:
        torch.manual_seed(seed)
    tensors = [getattr(p, "embeddings", p) for p in prompts]
    uniform = all(t is tensors[0] for t in tensors)
    width = max(len(r) for r in inputs)
    ids = torch.full((len(inputs), width), base.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(inputs), width, dtype=torch.long)
    for i, r in enumerate(inputs):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, dtype=torch.long), 1
    prompted = base.prepend_prompts(ids, mask, tensors[0] if uniform else tensors)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = base.model.generate(inputs_embeds=prompted.inputs_embeds, attention_mask=prompted.attention_mask,
                              max_new_tokens=max_new_tokens, pad_token_id=base.tokenizer.pad_token_id, **sampling)
    start, eos = base.model.config.decoder_start_token_id, eos_ids(base.tokenizer, base.model)
    rows = []
    for row in out.tolist():
        row = row[1:] if row and row[0] == start else row
        rows.append(row[:next((i for i, t in enumerate(row) if t in eos), len(row))])
    return rows  # stop strings are cut from the decoded text by the callers (cut_at_stop)


def generate(
    texts: GenerateConfig | dict | str | list[str] | None = None,
    prompt: str | os.PathLike | SoftPrompt | None | Sequence[str | os.PathLike | SoftPrompt | None] = None,
    *,
    base: BaseModel | None = None,
    template: Template | None = None,
    **kwargs: Any,
) -> str | list[str]:
    """Generate continuations of `texts` with a soft prompt (a path, a SoftPrompt, None, or one per text).

    Takes a GenerateConfig (or a dict of its fields; `text` holds the texts), or the texts, the prompt and any other
    field as keyword arguments. `base` reuses a loaded model; `template` replaces the prompt's saved one.
    Each text fills the prompt's saved input template (unless `raw` or a `template` is given), so
    `generate("a gripping film", "runs/sentiment")` asks exactly what the prompt was trained on.
    """
    cfg = from_call(GenerateConfig, texts, "text", {"prompt": prompt}, kwargs)
    texts, prompt, model, max_new_tokens, temperature, top_p, seed, raw, batch_size, dtype, device = (
        cfg.text, cfg.prompt, cfg.model, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, cfg.raw,
        cfg.batch_size, cfg.dtype, cfg.device)
    stop = cfg.stop or ()
    if texts is None:
        raise SoftPromptError("no input text to generate from")
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    per_row = isinstance(prompt, (list, tuple))
    prompt_list = list(prompt) if per_row else [prompt] * len(texts)
    if per_row and len(prompt_list) != len(texts):
        raise SoftPromptError(f"{len(prompt_list)} prompts for {len(texts)} texts")
    if base is None:
        first = next((p for p in prompt_list if p is not None), None)
        base = load_model(model if model is not None else prompt_base_source(first), dtype=dtype, device=device)
    cache: dict[Any, SoftPrompt | None] = {}
    loaded = []
    for p in prompt_list:
        key = id(p) if isinstance(p, SoftPrompt) else p
        if key not in cache:
            cache[key] = as_prompt(p, base)
        loaded.append(cache[key])
    rows = []
    for text, p in zip(texts, loaded):
        tmpl = template or (Template.from_dict(p.template) if p is not None and p.template else None)
        if raw or tmpl is None:
            rows.append(Encoder(base.tokenizer, Template()).input_ids(text))
        else:
            rows.append(Encoder(base.tokenizer, tmpl).input_ids(fill_template(tmpl, text)))
    ids = generate_ids(base, rows, [p.embeddings if p is not None else None for p in loaded],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                       batch_size=batch_size)
    results = [cut_at_stop(base.tokenizer.decode(r, skip_special_tokens=True), stop) for r in ids]
    return results[0] if single else results
