"""The loss fast path: next-token NLL through a frozen LM head without keeping the [N, vocab] logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _HeadNLL(torch.autograd.Function):
    """Next-token NLL through a frozen LM head, a chunk of rows at a time.

    Forward computes each chunk's logits (model dtype, as `head(x)` would), its fp32 log-sum-exp and NLL, and,
    when a gradient is wanted, d nll / d x = (softmax - onehot) @ W right away; only that [N, d] tensor is
    kept for backward, never the [N, V] logits (the largest tensors of an LM step; with a 128k vocabulary
    gigabytes). Same maths and roundings as `F.cross_entropy(head(x).float(), t)`: the logits' gradient is
    formed in fp32 and cast to the model dtype before the matmul, as autograd does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        want_grad = ctx.needs_input_grad[0]
        nll = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        grad = torch.empty_like(hidden) if want_grad else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight).float()  # [n, V]
            t = targets[s:s + chunk]
            lse = torch.logsumexp(logits, dim=-1)
            nll[s:s + chunk] = lse - logits.gather(1, t[:, None])[:, 0]
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad[s:s + chunk] = probs.to(hidden.dtype) @ weight
            del logits
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 2**28) -> torch.Tensor:
    """NLL [N] (fp32) of `targets` [N] under logits `hidden @ weight.T` for a frozen `weight` [V, d]."""
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))  # fp32 logits of one chunk <= chunk_bytes
    return _HeadNLL.apply(hidden, weight, targets, chunk)
