"""Prompt ensembles (Lester et al. 2021, Table 3): several prompts for one task, scored in the same batches
(one frozen model, a different prompt per row) and combined by majority vote or mean log-probability.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .evalset import EvalSet
from .metrics import accuracy, macro_f1
from .model import BaseModel
from .scoring import label_log_likelihoods, label_scores, prompt_tensor


@torch.no_grad()
def ensemble_label_scores(base: BaseModel, prompts: Sequence, evalset: EvalSet, batch_size: int = 32,
                          progress: bool = False) -> torch.Tensor:
    """Log-likelihood of every label after every input under every prompt: [prompts, rows, labels].

    All (prompt, row) pairs go through the same batches, each row with its own prompt (the mixed-prompt batching
    the server uses), every label scored behind the row's cached input: K prompts cost one pass over K x rows.
    """
    assert evalset.label_ids is not None, "ensembles need a classification task (a small label set)"
    tensors = [prompt_tensor(p) for p in prompts]
    if not (all(evalset.inputs) and base.has_plain_kv_cache):  # text-to-text models: prompt by prompt
        return torch.stack([label_scores(base, t, evalset, batch_size, progress) for t in tensors])
    n = len(evalset.inputs)
    per_row = [t for t in tensors for _ in range(n)]  # prompt k's rows, then prompt k+1's
    flat = label_log_likelihoods(base, evalset.inputs * len(tensors), evalset.label_ids, per_row, batch_size, progress)
    return flat.view(len(tensors), n, len(evalset.label_ids))


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
    """Each prompt alone and the mean / vote ensembles, on the same rows, from one mixed-batch scoring pass.

    Returns {'members': a row per prompt, 'ensembles': the rows 'ensemble (mean)' and 'ensemble (vote)',
    'ensemble_mean', 'ensemble_vote' (their accuracies), 'n', 'labels'}; a row is what `evaluate` reports per
    system (system, prompt, n, accuracy, macro_f1, labels, predictions).
    """
    scores = ensemble_label_scores(base, prompts, evalset, batch_size, progress)

    def row(system: str, predicted: torch.Tensor) -> dict[str, Any]:
        predictions = predicted.tolist()
        return {"system": system, "prompt": None, "n": len(evalset.gold),
                "accuracy": accuracy(predictions, evalset.gold),
                "macro_f1": macro_f1(predictions, evalset.gold, len(evalset.labels)),
                "labels": evalset.labels, "predictions": [evalset.labels[p] for p in predictions]}

    members = [row(name, scores[k].argmax(1)) for k, name in enumerate(names)]
    ensembles = [row(f"ensemble ({how})", combine(scores, how)) for how in ("mean", "vote")]
    return {"members": members, "ensembles": ensembles, "ensemble_mean": ensembles[0]["accuracy"],
            "ensemble_vote": ensembles[1]["accuracy"], "n": len(evalset.gold), "labels": evalset.labels}
