"""Rank classification in one input pass: every candidate label scored from the input's cached keys/values.

Scoring (row, label) pairs one by one runs the whole input once per label: with 4 labels of several tokens,
4 passes over inputs that are mostly longer than the labels. Here each input runs once (prompt, deep prefix
and all); the first token of every label is read from its last position, and the labels' remaining tokens run
together as a short continuation batch behind that row's cache, copied once per label.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import Encoded, collate
from .model import BaseModel, cache_of, repeat_cache


@torch.no_grad()
def label_log_likelihoods(base: BaseModel, inputs: list[list[int]], label_ids: list[list[int]], prompts=None,
                          batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Total log-likelihood of every label's tokens after every input: [rows, labels] (fp32, on the CPU).

    `prompts`: one prompt (tensor / SoftPrompt) for every row, None, or a list with one per row (ensembles mix
    prompts in a batch). Inputs must be non-empty (the first label token is predicted by the last input token).
    """
    assert all(inputs), "label_log_likelihoods needs a non-empty input per row"
    per_row = isinstance(prompts, (list, tuple))
    n_labels = len(label_ids)
    first = torch.tensor([ids[0] for ids in label_ids])  # [labels]
    longer = [j for j, ids in enumerate(label_ids) if len(ids) > 1]  # labels of several tokens
    width = max((len(label_ids[j]) - 1 for j in longer), default=0)
    pad = base.tokenizer.pad_token_id
    scores = torch.empty(len(inputs), n_labels)
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    for s in tqdm(range(0, len(order), batch_size), desc="labels", disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        batch = collate([Encoded(inputs[i], [-100] * len(inputs[i]), len(inputs[i])) for i in rows], pad)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"],
                                        [prompts[i] for i in rows] if per_row else prompts)
        out = base.forward(prompted, use_cache=True, **base.last_logits_kw())  # rows are left-padded: position -1 is each row's last token
        chunk = torch.log_softmax(out.logits[:, -1].float(), -1)[:, first].cpu()  # [B, labels]: first tokens
        if longer:
            b, m = len(rows), len(longer)
            # Continuation rows, row-major (row, label): label tokens 0..n-2, right-padded; position t predicts t+1.
            tokens = torch.full((b * m, width), pad, dtype=torch.long)
            keep = torch.zeros(b * m, width, dtype=torch.long)
            for k, j in enumerate(longer):
                n = len(label_ids[j]) - 1
                tokens[k::m, :n] = torch.tensor(label_ids[j][:-1])
                keep[k::m, :n] = 1
            tokens, keep = tokens.to(base.device), keep.to(base.device)
            mask = torch.cat([prompted.attention_mask.repeat_interleave(m, 0), keep], dim=1)
            positions = prompted.position_ids[:, -1:].repeat_interleave(m, 0) + 1 + torch.arange(width, device=base.device)
            logp = torch.log_softmax(base.extend(repeat_cache(cache_of(out), m), tokens, mask, positions).logits.float(), -1)
            for k, j in enumerate(longer):
                targets = torch.tensor(label_ids[j][1:], device=base.device)  # [n]
                picked = logp[k::m, :len(targets)].gather(2, targets.expand(b, -1)[..., None])[..., 0]  # [B, n]
                chunk[:, j] += picked.sum(1).cpu()
        scores[rows] = chunk
    return scores
