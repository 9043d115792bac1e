"""Prompt ensembles (Lester et al. 2021, Table 3): several prompts for one task, scored in the same batches
(one frozen model, a different prompt per row) and combined by majority vote or mean log-probability.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .data import Encoded, collate
from .evaluate import EvalSet, _prompt_tensor
from .model import BaseModel


@torch.no_grad()
def ensemble_label_scores(base: BaseModel, prompts: Sequence, evalset: EvalSet, batch_size: int = 32,
                          progress: bool = False) -> torch.Tensor:
    """Log-likelihood of every label after every input under every prompt: [prompts, rows, labels].

    All (prompt, row, label) triples go through the same batches, each row with its own prompt: the
    mixed-prompt batching the server uses, so K prompts cost one pass over K times the rows.
    """
    assert evalset.label_ids is not None, "ensembles need a classification task (a small label set)"
    tensors = [_prompt_tensor(p) for p in prompts]
    triples = [(k, i, j) for k in range(len(tensors)) for i in range(len(evalset.inputs))
               for j in range(len(evalset.label_ids))]
    triples.sort(key=lambda t: len(evalset.inputs[t[1]]) + len(evalset.label_ids[t[2]]))
    scores = torch.empty(len(tensors), len(evalset.inputs), len(evalset.label_ids))
    for s in tqdm(range(0, len(triples), batch_size), desc="ensemble", disable=not progress, leave=False):
        chunk = triples[s:s + batch_size]
        rows = [Encoded(evalset.inputs[i] + evalset.label_ids[j], [-100] * len(evalset.inputs[i]) + evalset.label_ids[j],
                        len(evalset.inputs[i])) for _, i, j in chunk]
        batch = collate(rows, base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], [tensors[k] for k, _, _ in chunk],
                                        batch["labels"])
        nll, _ = base.sequence_nll(prompted)
        for (k, i, j), v in zip(chunk, nll.tolist()):
            scores[k, i, j] = -v
    return scores


def combine(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """[prompts, rows, labels] scores -> [rows] predicted label index.

    mean: the highest mean log-probability over prompts. vote: each prompt votes for its best label; ties
    go to the tied label with the highest mean log-probability.
    """
    mean = scores.mean(0)  # [rows, labels]
    if how == "mean":
        return mean.argmax(1)
    if how != "vote":
        raise ValueError(f"unknown ensemble rule {how!r}; choose mean or vote")
    votes = torch.zeros_like(mean).scatter_add_(1, scores.argmax(2).T, torch.ones(scores.shape[1], scores.shape[0]))
    top = votes == votes.max(1, keepdim=True).values
    return mean.masked_fill(~top, float("-inf")).argmax(1)


def evaluate_ensemble(base: BaseModel, prompts: Sequence, names: Sequence[str], evalset: EvalSet,
                      batch_size: int = 32, progress: bool = False) -> dict[str, Any]:
    """Accuracy of each prompt alone and of the mean / vote ensembles, on the same rows."""
    scores = ensemble_label_scores(base, prompts, evalset, batch_size, progress)
    gold = torch.tensor(evalset.gold)

    def accuracy(pred: torch.Tensor) -> float:
        return float((pred == gold).float().mean())

    members = [{"system": name, "accuracy": accuracy(scores[k].argmax(1))} for k, name in enumerate(names)]
    return {"members": members, "ensemble_mean": accuracy(combine(scores, "mean")),
            "ensemble_vote": accuracy(combine(scores, "vote")), "n": len(evalset.gold), "labels": evalset.labels}
