"""Reparameterised prompts: during training the prompt is produced by a small network, which trains faster and
more stably than free vectors (P-tuning, Liu et al. 2021; Residual Prompt Tuning, Razdaibiedina et al. 2023).

Like every prompt source, a `ReparamPrompt` is an nn.Module whose forward() returns the prompt tensor and whose
parameters() are what the optimizer trains. After training only forward()'s output is kept: the artifact is
plain embeddings, so inference, export and serving need nothing new. For a deep prompt the encoder works on each
virtual token's flattened keys/values (with `mlp`, Prefix-Tuning's reparameterisation).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import SoftPromptError

KINDS = ("mlp", "lstm", "residual")


class ReparamPrompt(nn.Module):
    def __init__(self, init: torch.Tensor, kind: str, hidden: int = 0, meta: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise SoftPromptError(f"unknown reparam {kind!r}; choose {', '.join(KINDS)}")
        self.shape = tuple(init.shape)  # [n, d], or [n, 2l, kv] for a deep prompt
        init = init.reshape(init.shape[0], -1)
        n, d = init.shape
        hidden = hidden or d
        self.kind = kind
        self.meta = dict(meta or {})
        self.embeddings = nn.Parameter(init.detach().float().clone())  # [n, d], the encoder's input
        if kind == "lstm":  # P-tuning's encoder: a bidirectional LSTM over the virtual tokens, then an MLP
            self.lstm = nn.LSTM(d, hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
        else:
            self.head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        if kind == "residual":
            # Residual PT: x + MLP(x). The paper's LayerNorm on the MLP output is left out: with the last layer
            # zero-initialised (so training starts exactly at the init) it would divide by ~0 at step one.
            nn.init.zeros_(self.head[2].weight)
            nn.init.zeros_(self.head[2].bias)

    def forward(self) -> torch.Tensor:
        x = self.embeddings
        if self.kind == "lstm":
            out = self.head(self.lstm(x[None])[0][0])
        elif self.kind == "residual":
            out = x + self.head(x)
        else:
            out = self.head(x)
        return out.reshape(self.shape)
