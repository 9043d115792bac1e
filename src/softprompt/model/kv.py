"""KV-cache pieces on top of transformers' caches: a prefix layer (a prompt's or a shared prefix's keys/values,
broadcast to the batch and never stored), a slot cache (layers reading and writing a preallocated buffer in
place: the decoding engine's), a cache's rows repeated, the cache a forward returned under either of its
names, and its (keys, values) per layer. transformers is imported only when a cache is made.
"""

from __future__ import annotations

import torch


def _prefix_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """A cache layer holding the shared prefix's keys/values [1, H, P, D], broadcast to the batch.
        `update` returns prefix + new states WITHOUT storing them, so a recomputed forward sees the same."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch: int):
            super().__init__()
            self.keys = keys.expand(batch, -1, -1, -1)
            self.values = values.expand(batch, -1, -1, -1)
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixLayer


def prefix_layer(keys: torch.Tensor, values: torch.Tensor, batch: int):
    """A `PrefixLayer` (its class is made on first use: transformers is imported only then)."""
    global _PREFIX_LAYER
    if _PREFIX_LAYER is None:
        _PREFIX_LAYER = _prefix_layer_class()
    return _PREFIX_LAYER(keys, values, batch)


_PREFIX_LAYER = None


def _slot_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """Layer i's view of a buffer [2, layers, rows, H, cols, D]: kv[0|1, i, rows, :, first_col:...]. `update`
        writes the new states after the past, in place, and returns past + new. (One class for all calls: a class
        made per call, closing over the buffer, would be a reference cycle keeping dead buffers alive until the
        garbage collector runs.)"""

        def __init__(self, kv: torch.Tensor, i: int, rows: slice, first_col: int, past: int):
            super().__init__()
            self.buffer, self.i, self.rows, self.first_col, self.end = kv, i, rows, first_col, first_col + past
            self.keys = kv[0, i, rows, :, first_col:self.end]
            self.values = kv[1, i, rows, :, first_col:self.end]
            self.dtype, self.device, self.is_initialized = kv.dtype, kv.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.end + key_states.shape[2]
            kb, vb = self.buffer[0, self.i, self.rows], self.buffer[1, self.i, self.rows]
            kb[:, :, self.end:end] = key_states
            vb[:, :, self.end:end] = value_states
            self.keys, self.values, self.end = kb[:, :, self.first_col:end], vb[:, :, self.first_col:end], end
            return self.keys, self.values

    return SlotLayer


def slot_cache(kv: torch.Tensor, rows: slice, first_col: int, past: int):
    """A DynamicCache whose layer i reads and writes kv[0|1, i, rows, :, first_col:...] in place: the past is the
    `past` columns from `first_col`, and a forward appends its new states after them."""
    from transformers.cache_utils import DynamicCache

    global _SLOT_LAYER
    if _SLOT_LAYER is None:
        _SLOT_LAYER = _slot_layer_class()
    cache = DynamicCache()
    cache.layers = [_SLOT_LAYER(kv, i, rows, first_col, past) for i in range(kv.shape[1])]
    cache.layer_class_to_replicate = None
    return cache


_SLOT_LAYER = None


def repeat_cache(cache, times: int):
    """A new cache with every row repeated `times` times in a row (row-major): [B, H, S, D] -> [B*times, H, S, D]."""
    from transformers.cache_utils import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.repeat_interleave(times, 0), layer.values.repeat_interleave(times, 0), i)
    return out


def cache_of(out):
    """The cache a forward returned (`cache` since transformers 5.2x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [B, H, L, D], from a transformers cache (4.56+ / 5.x Cache objects)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuple of tuples
