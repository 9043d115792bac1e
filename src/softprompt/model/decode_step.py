"""One decode step of a Llama-family decoder written out: HF's maths for one new token per row, without the
generality of its forward.

Why: a decode step of a small model on CPU is mostly fixed cost (module calls, mask building, cache bookkeeping),
and HF runs q/k/v as three GEMMs and gate/up as two where one each does the same work. For decoders whose layer
is exactly

    h = h + o_proj(attention(rotary(q), rotary(k), v))     q, k, v = proj(input_layernorm(h))
    h = h + down_proj(act(gate_proj(x)) * up_proj(x))       x = post_attention_layernorm(h)

(Llama, Mistral, Qwen2 and their fine-tunes; checked by class below), this step runs the same operations in the
same order on the same weights, reading and writing the engine's KV buffer [2, layers, rows, H, cols, D] in place:
1.12x a batch-32 decode step of SmolLM2-135M here (BENCHMARKS.md, Serving), logits and cache equal to HF's
forward (tests). Any other model, HF attention other than SDPA, quantised or hooked (offloaded) layers, or
SOFTPROMPT_FAST_DECODE=0: `fast_decode_step` returns None and the engine uses HF's forward.

The fused q/k/v and gate/up weights are one tensor each; the HF modules' weights are re-pointed to row slices of
it (the same values, no extra memory), so HF's own forward (prefill, training) reads the same storage.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def fast_decode_step(model) -> DecodeStep | None:
    """A `DecodeStep` for `model` (a HF causal LM) when its architecture is one this step writes out, else None."""
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
    return DecodeStep(model)


class DecodeStep:
    """`step(ids, mask, positions, kv, width) -> logits`: see `__call__`."""

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

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                 width: int) -> torch.Tensor:
        """Feed each of B rows one token: ids [B, 1], mask [B, width + 1] (0 over padding), positions [B, 1].
        kv [2, layers, >= B, H, > width, D] holds the rows' past in columns [0, width); the new keys/values are
        written to column `width`. Returns the logits [B, V]."""
        if self.layers[0].self_attn.q_proj.weight.data_ptr() != self.qkv[0][0].data_ptr():
            self._fuse()  # the model was moved (or its weights replaced) since the weights were fused
        b, hq, hk, d = ids.shape[0], self.q_heads, self.kv_heads, self.head_dim
        h = self.backbone.embed_tokens(ids)  # [B, 1, d_model]
        cos, sin = self.backbone.rotary_emb(h, positions)  # [B, 1, D] each
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, D]: every head
        # As HF's SDPA path: no mask when nothing is padded (kernels with grouped heads), else the query heads of a
        # key/value head side by side as that head's queries, with one mask [B, 1, 1, width + 1] for all.
        attn_mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        all_keys, all_values = kv[0, :, :b, :, :width + 1], kv[1, :, :b, :, :width + 1]  # [layers, B, Hk, width+1, D]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(layer.input_layernorm(h), *self.qkv[i]).view(b, 1, hq + 2 * hk, d).transpose(1, 2)
            qk = qkv[:, :hq + hk]  # [B, Hq + Hk, 1, D]: q and k rotated together
            qk = qk * cos + rotate_half(qk) * sin
            keys, values = all_keys[i], all_values[i]  # [B, Hk, width + 1, D]
            keys[:, :, width:] = qk[:, hq:]
            values[:, :, width:] = qkv[:, hq + hk:]
            if attn_mask is None:
                out = F.scaled_dot_product_attention(qk[:, :hq], keys, values, scale=attn.scaling,
                                                     enable_gqa=hq != hk)
            else:
                out = F.scaled_dot_product_attention(qk[:, :hq].reshape(b, hk, hq // hk, d), keys, values,
                                                     attn_mask=attn_mask, scale=attn.scaling)
            h = h + attn.o_proj(out.reshape(b, 1, hq * d))
            gate, up = F.linear(layer.post_attention_layernorm(h), *self.gate_up[i]).chunk(2, dim=-1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.model.get_output_embeddings()(self.backbone.norm(h))[:, -1]


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
