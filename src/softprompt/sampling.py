"""How the next token is chosen and when a completion ends: sampling parameters, token choice, the EOS set and
the stop-string rules. No model, no batch state: the engine calls these on logits and text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

# Below this a temperature is greedy: sampling tends to argmax as T -> 0, and logits / 1e-300 overflow float32 to
# inf (then NaN probabilities) instead.
GREEDY_BELOW = 1e-5

# Where a stop string may end a completion:
#   "literal" (OpenAI's rule, the server): wherever it appears, even as the first characters.
#   "answer" (generate, eval): once the answer has begun; in its leading whitespace a stop string does not count, so a
#            model that opens with "\nThe answer" is not answering "".
STOP_RULES = ("literal", "answer")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per sequence
    stop: tuple[str, ...] = ()
    stop_rule: str = "literal"

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids: argmax, or a draw at `temperature` from the smallest set of tokens whose
    probability mass reaches `top_p`."""
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


def greedy_and_finite(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """[B, V] logits -> (argmax per row, whether the row can be sampled at all) in ONE fp32 reduction.

    max() propagates NaN and +inf, and is -inf only when every token is -inf: one non-finite maximum flags every
    row that cannot be sampled (a NaN prompt). Checking isnan/isfinite element by element on [32, 49k] bf16 logits
    cost more than a fifth of a CPU decode step."""
    values, tokens = logits.float().max(-1)
    return tokens.tolist(), torch.isfinite(values).tolist()


def eos_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation config's (chat models often
    end turns with a token of their own, e.g. <|im_end|>)."""
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if config_eos is None else list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]
    return {t for t in [tokenizer.eos_token_id, *listed] if t is not None}


def find_stop(text: str, stops: Sequence[str], rule: str = "literal", start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (searching from `start`), or None."""
    if not stops:
        return None
    if rule == "answer":
        start = max(start, len(text) - len(text.lstrip()))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stop: Sequence[str], rule: str = "answer") -> str:
    """`text` up to its first stop string (see STOP_RULES)."""
    cut = find_stop(text, stop, rule)
    return text if cut is None else text[:cut]


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters a stream must hold back: an incomplete character, or a possible start of a stop
    string (sent once the next tokens show it is not one)."""
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), hold, -1):
            if text.endswith(x[:k]):
                hold = k
                break
    return hold
