"""The forward of new tokens behind a KV buffer, written out for Llama-family decoders: HF's maths without the
generality of its forward. The decoding engine's decode steps (one token per row) and prefills (a row's input
behind its prompt's cached keys/values) both run here, together in one pass when newcomers join running rows.

Why: a forward of a small model on CPU is much fixed cost (module calls, mask building, cache bookkeeping), HF
runs q/k/v as three GEMMs and gate/up as two where one each does the same work, and a prefill of rows of unequal
length computes their padding too. For decoders whose layer is exactly

    h = h + o_proj(attention(rotary(q), rotary(k), v))     q, k, v = proj(input_layernorm(h))
    h = h + down_proj(act(gate_proj(x)) * up_proj(x))       x = post_attention_layernorm(h)

(Llama, Mistral, Qwen2 and their fine-tunes; checked by class below), this runs the same operations in the same
order on the same weights, reading and writing the engine's KV buffer [2, layers, rows, H, cols, D] in place;
padding tokens of a prefill are left out of every GEMM, and several blocks of rows (a decode step's, a prefill's)
share one pass of the weights. Measured in BENCHMARKS.md (Serving); logits and cache
equal HF's forward (tests). Any other model, HF attention other than SDPA, quantised or hooked (offloaded)
layers, or SOFTPROMPT_FAST_DECODE=0: `fast_forward` returns None and the engine uses HF's forward.

The fused q/k/v and gate/up weights are one tensor each; the HF modules' weights are re-pointed to row slices of
it (the same values, no extra memory), so HF's own forward (training, scoring) reads the same storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def fast_forward(model) -> FastForward | None:
    """A `FastForward` for `model` (a HF causal LM) when its architecture is one written out here, else None."""
    if os.environ.get("SOFTPROMPT_FAST_DECODE", "1") == "0":
        return None
    backbone = getattr(model, "model", None)
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.get_output_embeddings() is None:
        return None
    if not all(hasattr(backbone, name) for name in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return None
    config = model.config  # full attention everywhere (Mistral reads its window from the config, Qwen2 per layer)
    if getattr(config, "sliding_window", None) or set(getattr(config, "layer_types", None) or ()) - {"full_attention"}:
        return None
    for layer in backbone.layers:
        if type(layer).__name__ not in LAYERS:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(x) is not torch.nn.Linear for x in linears):  # quantised, LoRA-wrapped, ...
            return None
        if len({x.bias is None for x in linears[:3]}) > 1 or any(x.bias is not None for x in linears[4:6]):
            return None  # fused biases: q/k/v all or none, gate/up none
        if getattr(attn, "sliding_window", None) or abs(attn.scaling - attn.head_dim ** -0.5) > 1e-9:
            return None
    if any(hasattr(m, "_hf_hook") for m in model.modules()):  # accelerate's offloading moves weights in hooks
        return None
    return FastForward(model)


@dataclass
class NewTokens:
    """New tokens for a block of B rows of a KV buffer [2, layers, rows, H, cols, D], left-padded: ids [B, W],
    positions [B, W], mask [B, past + W] (0 over padding) over columns [first_col, first_col + past + W) of buffer
    rows `rows`. The rows' past fills the first `past` of those columns; the new keys/values go to the next W.
    A decode step is W = 1 with every row fed; a prefill is a row's input behind its prompt's keys/values."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    rows: slice
    first_col: int
    past: int


class FastForward:
    """`forward(kv, *blocks) -> [logits per block]`: see `__call__`."""

    def __init__(self, model):
        self.model = model
        self.backbone = model.model
        self.layers = list(self.backbone.layers)
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.q_heads = attn.q_proj.out_features // self.head_dim
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self._fuse()

    def _fuse(self) -> None:
        # Not inference tensors: the same storage serves training's forward (autograd refuses inference tensors).
        with torch.inference_mode(False), torch.no_grad():
            self.qkv = [fuse_linears(x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj) for x in self.layers]
            self.gate_up = [fuse_linears(x.mlp.gate_proj, x.mlp.up_proj) for x in self.layers]

    def __call__(self, kv: torch.Tensor, *blocks: NewTokens) -> list[torch.Tensor]:
        """Run every block's new tokens in ONE pass of the weights (a decode step and a prefill together) and write
        their keys/values into `kv` (a padding token's column is left as it was). Returns each block's rows'
        last-column logits [B, V].

        Padding tokens are never computed: the real tokens of all blocks are packed [T, d] for the projections
        and the MLP (most of the work), and spread to each block's [B, W] only for its attention."""
        if self.layers[0].self_attn.q_proj.weight.data_ptr() != self.qkv[0][0].data_ptr():
            self._fuse()  # the model was moved (or its weights replaced) since the weights were fused
        d = self.head_dim
        hq, hk = self.q_heads, self.kv_heads
        parts, offset = [], 0
        for block in blocks:
            parts.append(_Block(block, kv, hq // hk, offset))
            offset += parts[-1].n
        h = self.backbone.embed_tokens(torch.cat([p.ids for p in parts]))  # [T, d_model]
        cos, sin = self.backbone.rotary_emb(h, torch.cat([p.positions for p in parts])[None])  # [1, T, D]
        cos, sin = cos.view(-1, 1, d), sin.view(-1, 1, d)  # [T, 1, D]: every head
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(layer.input_layernorm(h), *self.qkv[i]).view(-1, hq + 2 * hk, d)
            qk = qkv[:, :hq + hk]  # q and k rotated together
            qk = qk * cos + rotate_half(qk) * sin
            out = [p.attend(i, qk[p.tokens], qkv[p.tokens, hq + hk:], attn.scaling) for p in parts]
            h = h + attn.o_proj(out[0] if len(out) == 1 else torch.cat(out))  # [T, Hq * D] -> [T, d_model]
            gate, up = F.linear(layer.post_attention_layernorm(h), *self.gate_up[i]).chunk(2, dim=-1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        last = h[torch.cat([p.last for p in parts])]  # each row's last column [sum of B, d_model]
        logits = self.model.get_output_embeddings()(self.backbone.norm(last))
        return list(logits.split([p.b for p in parts]))


class _Block:
    """One `NewTokens` block inside a pass: which packed tokens are its (`tokens`), where they go in the buffer,
    its attention mask, and its attention."""

    def __init__(self, block: NewTokens, kv: torch.Tensor, group: int, offset: int):
        (self.b, self.w), self.past, self.group = block.ids.shape, block.past, group
        b, w, past = self.b, self.w, self.past
        fed = block.mask[:, past:].bool()  # [B, W]
        self.dense = bool(fed.all())  # no padding among the new tokens: nothing to pack
        if self.dense:
            self.ids, self.positions = block.ids.flatten(), block.positions.flatten()
            self.n = b * w
            ends = torch.arange(1, b + 1, device=fed.device) * w - 1
        else:
            self.flat = fed.flatten().nonzero().squeeze(1)  # [N] the real tokens, row-major
            self.row_of, self.col_of = self.flat // w, past + self.flat % w
            self.ids, self.positions = block.ids.flatten()[self.flat], block.positions.flatten()[self.flat]
            self.n = len(self.flat)
            ends = (fed.sum(1).cumsum(0) - 1).clamp(min=0)  # left padding: a row's last real token ends it
        self.tokens = slice(offset, offset + self.n)
        self.last = offset + ends  # (a row with no token at all gets a neighbour's: unused by the caller)
        # As HF's SDPA path: no mask when nothing is padded in a decode step (kernels with grouped heads); else the
        # query heads of a key/value head side by side as that head's queries, and one mask for all of them.
        mask = block.mask.bool()
        if w == 1:
            self.attn_mask = None if bool(mask.all()) else mask[:, None, None, :]  # [B, 1, 1, past + 1]
        else:
            causal = torch.ones(w, past + w, dtype=torch.bool, device=mask.device).tril(past)  # col <= past + j
            self.attn_mask = (mask[:, None, :] & causal).repeat(1, group, 1)[:, None]  # [B, 1, g * W, past + W]
        cols = slice(block.first_col, block.first_col + past + w)
        self.keys, self.values = kv[0, :, block.rows, :, cols], kv[1, :, block.rows, :, cols]  # [L, B, Hk, past+W, D]

    def attend(self, layer: int, qk: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """This block's tokens' rotated q and k [N, Hq + Hk, D] and v [N, Hk, D] -> attention output [N, Hq * D];
        writes k and v to the buffer first."""
        b, w, past, g = self.b, self.w, self.past, self.group
        hk, d = v.shape[1], v.shape[2]
        hq = hk * g
        keys, values = self.keys[layer], self.values[layer]  # [B, Hk, past + W, D]
        if self.dense:
            keys[:, :, past:] = qk[:, hq:].view(b, w, hk, d).transpose(1, 2)
            values[:, :, past:] = v.view(b, w, hk, d).transpose(1, 2)
            q = qk[:, :hq].view(b, w, hq, d)
        else:
            keys[self.row_of, :, self.col_of] = qk[:, hq:]
            values[self.row_of, :, self.col_of] = v
            q = qk.new_zeros(b * w, hq, d).index_copy_(0, self.flat, qk[:, :hq]).view(b, w, hq, d)
        if self.attn_mask is None:  # [B, Hq, 1, D] against [B, Hk, past + 1, D]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, scale=scale,
                                                 enable_gqa=hq != hk).transpose(1, 2)
        else:  # [B, Hk, g * W, D]: query (k, j) at k * W + j
            q = q.view(b, w, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * w, d)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.attn_mask, scale=scale)
            out = out.view(b, hk, g, w, d).permute(0, 3, 1, 2, 4)  # [B, W, Hk, g, D]: HF's head order
        out = out.reshape(b * w, hq * d)
        return out if self.dense else out.index_select(0, self.flat)


def fuse_linears(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum of outputs, in] (and bias) for linears reading the same input; each linear's weight (and
    bias) becomes a row slice of it, so both paths share one copy."""
    weight = torch.cat([x.weight for x in linears])
    bias = torch.cat([x.bias for x in linears]) if linears[0].bias is not None else None
    start = 0
    for x in linears:
        n = x.out_features
        x.weight = torch.nn.Parameter(weight[start:start + n], requires_grad=x.weight.requires_grad)
        if bias is not None:
            x.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=x.bias.requires_grad)
        start += n
    return weight, bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
