"""Task metrics. Generation metrics come from well-kept libraries (sacrebleu, rouge-score: `pip install
'softprompt[eval]'`); the classification ones are two lines of counting each.

Every generation metric accepts several references per prediction (E2E NLG has ~8 per input).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from .errors import SoftPromptError


# ---- classification ------------------------------------------------------------------------------


def accuracy(predictions: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(predictions, gold)) / max(len(predictions), 1)


def macro_f1(predictions: Sequence[int], gold: Sequence[int], n_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in gold or predictions (as sklearn's
    `f1_score(average='macro')` over the present labels); a class never predicted and never gold is skipped."""
    scores = []
    for c in range(n_labels):
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


# ---- generation -----------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 on normalised words, best over the references."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def _libraries():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise SoftPromptError("generation metrics need sacrebleu and rouge-score: pip install 'softprompt[eval]'") from None
    return sacrebleu, rouge_scorer


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match, token_f1 (mean, %-free 0..1), rougeL (F-measure, best reference, mean over rows, 0..1)
    and bleu (sacrebleu corpus BLEU, 0..100, multi-reference)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        return {"exact_match": 0.0, "token_f1": 0.0, "rougeL": 0.0, "bleu": 0.0}
    sacrebleu, rouge_scorer = _libraries()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = sacrebleu.metrics.BLEU().corpus_score(list(predictions), streams).score
    n = len(predictions)
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rougeL": sum(rouge) / n,
        "bleu": bleu,
    }
