"""Batched generation with a KV cache; each row may use a different soft prompt (or none).

Rows are left-padded, so every row's next token is read from the last column. Greedy by default;
temperature / top-p sampling with a seed; stop at EOS or any stop string.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Sequence

import torch

from .config import GenerateConfig, from_call
from .data import Encoder, Template
from .errors import SoftPromptError
from .model import BaseModel, cache_of, load_model, split_prompts
from .prompt import SoftPrompt, prompt_base_source

PromptLike = SoftPrompt | torch.Tensor | None
# Below this a temperature is greedy: sampling tends to argmax as T -> 0, and logits / 1e-300 overflow float32 to
# inf (then NaN probabilities) instead.
GREEDY_BELOW = 1e-5


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


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits.float()
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


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
) -> list[list[int]]:
    """Token ids in, new token ids out (EOS and stop strings cut off), one list per row."""
    if not inputs:
        return []
    if any(not row for row in inputs):
        # The first new token is read from the last position: with no input that must be a virtual token. A deep
        # prompt has none (it is keys/values only), and neither has a row without a prompt.
        shallow, _ = split_prompts(prompts)
        per_row = [shallow] * len(inputs) if shallow is None or isinstance(shallow, torch.Tensor) else list(shallow)
        if any(not row and p is None for row, p in zip(inputs, per_row)):
            raise SoftPromptError("empty input: give some text to continue (only an input-embedding soft prompt "
                                  "can be continued from nothing; a deep prompt or no prompt cannot)")
    tok = base.tokenizer
    eos = {t for t in [tok.eos_token_id, *(as_list(getattr(base.model.generation_config, "eos_token_id", None)))] if t is not None}
    ids, mask = _left_pad(inputs, tok.pad_token_id)
    prompted = base.prepend_prompts(ids, mask, prompts)
    if base.is_encoder_decoder:
        return _generate_seq2seq(base, prompted, eos, max_new_tokens, temperature, top_p, seed, stop)
    gen = torch.Generator(device=base.device).manual_seed(seed) if seed is not None and temperature > 0 else None
    params = inspect.signature(base.model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
    out = base.forward(prompted, use_cache=True, **extra)
    attn, position = prompted.attention_mask, prompted.position_ids[:, -1]
    done = torch.zeros(len(inputs), dtype=torch.bool, device=base.device)
    new: list[list[int]] = [[] for _ in inputs]
    for _ in range(max_new_tokens):
        nxt = pick_token(out.logits[:, -1], temperature, top_p, gen)  # [B]
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t in eos:
                    done[i] = True
                else:
                    new[i].append(t)
                    if stop and _hits_stop(tok, new[i], stop):
                        done[i] = True
        if bool(done.all()):
            break
        nxt = nxt.masked_fill(done, tok.pad_token_id)
        attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
        position = position + 1
        out = base.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=position[:, None],
                         use_cache=True, **{cache_kw: cache_of(out)})
    return new


def _generate_seq2seq(base, prompted, eos, max_new_tokens, temperature, top_p, seed, stop) -> list[list[int]]:
    """Text-to-text models: HF generate on the prompted encoder input (its decoder loop is the standard one)."""
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    out = base.model.generate(inputs_embeds=prompted.inputs_embeds, attention_mask=prompted.attention_mask,
                              max_new_tokens=max_new_tokens, pad_token_id=base.tokenizer.pad_token_id, **sampling)
    start = base.model.config.decoder_start_token_id
    rows = []
    for row in out.tolist():
        row = row[1:] if row and row[0] == start else row
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        row = row[:cut]
        rows.append(row)
    return rows  # stop strings are cut from the decoded text by the callers (cut_at_stop)


def as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _hits_stop(tok, ids: list[int], stop: Sequence[str]) -> bool:
    if not any(s in tok.decode(ids[-16:], skip_special_tokens=True) for s in stop):
        return False  # the cheap check first: most tokens end nothing
    text = tok.decode(ids, skip_special_tokens=True)
    return len(cut_at_stop(text, stop)) < len(text)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string. A stop string ends an answer once it has begun: in the leading
    whitespace it does not count (a model that opens with "\nThe answer" is not answering ""). The server
    follows OpenAI's literal rule instead (scheduler.py)."""
    start = len(text) - len(text.lstrip())
    cuts = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


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
            cache[key] = SoftPrompt.load(p, base) if isinstance(p, (str, os.PathLike)) else p
        loaded.append(cache[key])
    rows = []
    for text, p in zip(texts, loaded):
        tmpl = template or (Template.from_dict(p.template) if p is not None and p.template else None)
        if raw or tmpl is None:
            rows.append(Encoder(base.tokenizer, Template()).input_ids(text))
        else:
            rows.append(Encoder(base.tokenizer, tmpl).input_ids(fill_template(tmpl, text)))
    results: list[str] = []
    for s in range(0, len(rows), batch_size):
        chunk_prompts = [p.embeddings if p is not None else None for p in loaded[s:s + batch_size]]
        uniform = all(q is chunk_prompts[0] for q in chunk_prompts)
        ids = generate_ids(base, rows[s:s + batch_size], chunk_prompts[0] if uniform else chunk_prompts,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        results += [cut_at_stop(base.tokenizer.decode(r, skip_special_tokens=True), stop) for r in ids]
    return results[0] if single else results
