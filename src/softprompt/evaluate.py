"""Honest numbers: token loss on the answers, and accuracy by ranking each label's total log-likelihood.

Classification never parses generated text: for every row, each candidate label (possibly several tokens)
is scored as a continuation of the input, and the most likely one is the prediction.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import Encoded, Encoder, Template, collate, label_set, read_rows
from .errors import SoftPromptError
from .model import BaseModel, load_model
from .prompt import SoftPrompt


@dataclass
class EvalSet:
    """Rows encoded once, reusable for every prompt (and baseline) evaluated on them."""

    examples: list[Encoded]  # input + gold output, for the loss
    inputs: list[list[int]]  # input ids per row, for label scoring
    labels: list[str] | None  # candidate label texts (classification) or None
    label_ids: list[list[int]] | None  # tokenised candidates
    gold: list[int] | None  # index into labels per row


def prepare(base: BaseModel, template: Template, rows: list[dict[str, Any]], *, source: str = "data",
            max_length: int = 512, labels: list[str] | None = None) -> EvalSet:
    encoder = Encoder(base.tokenizer, template, max_length=max_length)
    examples = encoder.encode_rows(rows, source)
    labels = labels if labels is not None else label_set(template, rows)
    if not labels:
        return EvalSet(examples, [], None, None, None)
    inputs = [e.input_ids[: e.n_input] for e in examples]
    # Rank classification scores the label's own tokens, without EOS: fair to an untuned model, which
    # has no reason to stop right after the label.
    label_ids = [Encoder(base.tokenizer, template, append_eos=False).output_ids(text) for text in labels]
    if any(not ids for ids in label_ids):
        raise SoftPromptError(f"{source}: a label tokenises to nothing: {labels}")
    gold = []
    for i, row in enumerate(rows, 1):
        answer = template.render_output(row, f"{source}: row {i}")
        gold.append(labels.index(answer) if answer in labels else -1)
    return EvalSet(examples, inputs, labels, label_ids, gold)


def _prompt_tensor(prompt: SoftPrompt | torch.Tensor | None) -> torch.Tensor | None:
    return prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt


@torch.no_grad()
def token_loss(base: BaseModel, prompt, examples: list[Encoded], batch_size: int = 16, progress: bool = False) -> float:
    """Mean NLL per answer token over all examples (token-weighted, as in training)."""
    tensor, nll, count = _prompt_tensor(prompt), 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in tqdm(range(0, len(order), batch_size), desc="loss", disable=not progress, leave=False):
        batch = collate([examples[i] for i in order[s:s + batch_size]], base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        row_nll, row_count = base.sequence_nll(prompted)
        nll += row_nll.sum().item()
        count += row_count.sum().item()
    return nll / max(count, 1)


@torch.no_grad()
def label_scores(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Total log-likelihood of each candidate label after each input: [rows, labels]."""
    assert evalset.label_ids is not None
    tensor = _prompt_tensor(prompt)
    pairs = [(i, j) for i in range(len(evalset.inputs)) for j in range(len(evalset.label_ids))]
    pairs.sort(key=lambda p: len(evalset.inputs[p[0]]) + len(evalset.label_ids[p[1]]))
    scores = torch.empty(len(evalset.inputs), len(evalset.label_ids))
    for s in tqdm(range(0, len(pairs), batch_size), desc="labels", disable=not progress, leave=False):
        chunk = pairs[s:s + batch_size]
        examples = [Encoded(evalset.inputs[i] + evalset.label_ids[j],
                            [-100] * len(evalset.inputs[i]) + evalset.label_ids[j], len(evalset.inputs[i]))
                    for i, j in chunk]
        batch = collate(examples, base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        row_nll, _ = base.sequence_nll(prompted)
        for (i, j), v in zip(chunk, row_nll.tolist()):
            scores[i, j] = -v
    return scores


def score(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """{'loss', 'perplexity', 'n'} and, for a label set, {'accuracy', 'predictions'}."""
    loss = token_loss(base, prompt, evalset.examples, batch_size, progress)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(evalset.examples)}
    if evalset.labels:
        predictions = label_scores(base, prompt, evalset, batch_size * 2, progress).argmax(1).tolist()
        result["accuracy"] = sum(p == g for p, g in zip(predictions, evalset.gold)) / len(predictions)
        result["labels"] = evalset.labels
        result["predictions"] = [evalset.labels[p] for p in predictions]
    return result


def evaluate(
    data: str,
    prompt: str | os.PathLike | SoftPrompt | None = None,
    *,
    model: str | None = None,
    base: BaseModel | None = None,
    input_template: str | None = None,
    output_template: str | None = None,
    label_map: str | None = None,
    chat: bool | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a soft prompt (or, without one, the untuned model with the same template) on `data`.

    The template comes from the prompt's artifact unless given here. Returns loss, perplexity and, when the
    outputs form a small label set, accuracy.
    """
    rows = read_rows(data)[:limit] if limit else read_rows(data)
    if base is None:
        base = load_model(model if model is not None else _prompt_model(prompt), dtype=dtype, device=device)
    loaded = SoftPrompt.load(prompt, base) if isinstance(prompt, (str, os.PathLike)) else prompt
    saved = dict(loaded.template) if loaded is not None else {}
    overrides = {"input": input_template, "output": output_template, "label_map": label_map, "chat": chat}
    template = Template.from_dict({**saved, **{k: v for k, v in overrides.items() if v is not None}})
    evalset = prepare(base, template, rows, source=str(data), max_length=max_length)
    result = score(base, loaded, evalset, batch_size, progress)
    result["prompt"] = None if loaded is None else str(prompt if not isinstance(prompt, SoftPrompt) else loaded.meta.get("name"))
    return result


def _prompt_model(prompt) -> str | None:
    """The base model a prompt artifact names, so `eval --prompt X` needs no --model."""
    if prompt is None:
        return None
    if isinstance(prompt, SoftPrompt):
        return (prompt.meta.get("base") or {}).get("source")
    try:
        return (SoftPrompt.load(prompt).meta.get("base") or {}).get("source")
    except SoftPromptError:
        raise
