"""Scoring a prompt on encoded rows (evalset.py): the answer loss, and rank classification (every candidate
label's log-likelihood after each input). evaluate.py and ensemble.py both score through here.

Label scoring picks the cheapest exact path:
- every label one token: ONE forward per row reads all of them from the last input position's distribution, and
  gives the answer loss from the same pass (`single_token_scores_and_loss`);
- labels of several tokens, plain KV caches: `label_log_likelihoods`. Scoring (row, label) pairs one by one runs
  the whole input once per label: with 4 labels of several tokens, 4 passes over inputs that are mostly longer
  than the labels. Here each input runs once (prompt, deep prefix and all); the first token of every label is
  read from its last position, and the labels' remaining tokens run together as a short continuation batch
  behind that row's cache, copied once per label;
- otherwise (text-to-text models, caches that cannot be copied): each (row, label) pair by `sequence_nll`
  (`pair_label_scores`, also the reference the fast paths are tested against).
"""

from __future__ import annotations

import torch

from .data import Encoded, collate
from .evalset import EvalSet
from .model import BaseModel, cache_of, repeat_cache
from .progress import progress_bar
from .prompt import SoftPrompt


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
    for s in progress_bar(range(0, len(order), batch_size), desc="labels", disable=not progress, leave=False):
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


def prompt_tensor(prompt: SoftPrompt | torch.Tensor | None) -> torch.Tensor | None:
    """A SoftPrompt's tensor; a tensor or None as it is."""
    return prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt


@torch.no_grad()
def token_loss(base: BaseModel, prompt, examples: list[Encoded], batch_size: int = 16, progress: bool = False) -> float:
    """Mean NLL per answer token over all examples (token-weighted, as in training)."""
    tensor, nll, count = prompt_tensor(prompt), 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in progress_bar(range(0, len(order), batch_size), desc="loss", disable=not progress, leave=False):
        batch = collate([examples[i] for i in order[s:s + batch_size]], base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        row_nll, row_count = base.sequence_nll(prompted)
        nll += row_nll.sum().item()
        count += row_count.sum().item()
    return nll / max(count, 1)


@torch.no_grad()
def label_scores(base: BaseModel, prompt, evalset: EvalSet, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """Total log-likelihood of each candidate label after each input: [rows, labels].

    When every label is one token, one forward per row reads all of them from the last position's
    distribution; labels of several tokens run behind each input's cached keys/values (one input pass,
    `label_log_likelihoods`); text-to-text models and caches that cannot be copied score each (row, label) pair by
    `sequence_nll`.
    """
    assert evalset.label_ids is not None
    tensor = prompt_tensor(prompt)
    if single_token_ok(evalset) and not base.is_encoder_decoder:
        return single_token_label_scores(base, tensor, evalset, batch_size, progress)
    if all(evalset.inputs) and base.has_plain_kv_cache:
        return label_log_likelihoods(base, evalset.inputs, evalset.label_ids, tensor, batch_size, progress)
    return pair_label_scores(base, tensor, evalset, batch_size, progress)


def pair_label_scores(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool) -> torch.Tensor:
    pairs = [(i, j) for i in range(len(evalset.inputs)) for j in range(len(evalset.label_ids))]
    pairs.sort(key=lambda p: len(evalset.inputs[p[0]]) + len(evalset.label_ids[p[1]]))
    scores = torch.empty(len(evalset.inputs), len(evalset.label_ids))
    for s in progress_bar(range(0, len(pairs), batch_size), desc="labels", disable=not progress, leave=False):
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


def single_token_ok(evalset: EvalSet) -> bool:
    return bool(evalset.label_ids) and all(len(ids) == 1 for ids in evalset.label_ids) and all(evalset.inputs)


@torch.no_grad()
def single_token_label_scores(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool) -> torch.Tensor:
    scores, _, _ = single_token_scores_and_loss(base, tensor, evalset, batch_size, progress, with_loss=False)
    return scores


@torch.no_grad()
def single_token_scores_and_loss(base: BaseModel, tensor, evalset: EvalSet, batch_size: int, progress: bool,
              with_loss: bool = True) -> tuple[torch.Tensor, float, int]:
    """Single-token labels: ONE forward per row over input + gold answer gives both every label's score (the
    distribution after the last input token) and the answer loss (the answer's own positions).

    Returns ([rows, labels] log-likelihoods, summed answer NLL, answer tokens) - the same numbers as
    `pair_label_scores` and `token_loss`, at a third (binary labels) of the cost.
    """
    candidates = torch.tensor([ids[0] for ids in evalset.label_ids])
    # Without the loss, a stand-in answer token marks the position whose distribution scores the labels.
    rows_all = evalset.examples if with_loss else [
        Encoded(ids + [int(candidates[0])], [-100] * (len(ids) + 1), len(ids)) for ids in evalset.inputs]
    order = sorted(range(len(rows_all)), key=lambda i: len(rows_all[i].input_ids))
    scores = torch.empty(len(rows_all), len(candidates))
    nll, count = 0.0, 0
    for s in progress_bar(range(0, len(order), batch_size), desc="labels+loss" if with_loss else "labels",
                  disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        examples = [rows_all[i] for i in rows]
        # Every answer token labelled: the logits come back at the last input token and at each answer token.
        marked = [Encoded(e.input_ids, [-100] * e.n_input + list(e.input_ids[e.n_input:]), e.n_input) for e in examples]
        batch = collate(marked, base.tokenizer.pad_token_id)
        prompted = base.prepend_prompts(batch["input_ids"], batch["attention_mask"], tensor, batch["labels"])
        logits, _ = base.logits_at_labels(prompted)  # [N, V], row by row
        logp = torch.log_softmax(logits, -1).cpu()
        for b, (e, answer) in enumerate(zip(examples, logp.split([len(e.input_ids) - e.n_input for e in examples]))):
            scores[rows[b]] = answer[0, candidates]
            for k, t in enumerate(range(e.n_input, len(e.input_ids))):
                if e.labels[t] != -100:  # answer token t, predicted at answer row k
                    nll -= float(answer[k, e.labels[t]])
                    count += 1
    return scores, nll, count
