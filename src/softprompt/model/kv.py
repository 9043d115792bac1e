"""KV-cache pieces on top of transformers' caches: a prefix layer (a prompt's or a shared prefix's keys/values,
broadcast to the batch and never stored), a cache's rows repeated, and the cache a forward returned under either
of its names. transformers is imported only when a cache is made.
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
