"""The running rows' keys/values, in buffers allocated ahead so a decode step writes one column in place.

transformers' DynamicCache grows by `torch.cat` at every layer of every step: the whole cache copied per token
(a sixth of a CPU decode step at batch 32). Here each layer owns a buffer [rows_cap, H, cols_cap, D]; the batch
uses rows [0, n) and columns [0, width), every row right-aligned so its newest token is column width-1:

    [pad | its prompt's virtual tokens | pad | input | generated]     (mask 0 over the pads)

A forward sees the buffers through a cache whose layers write the new states at column `width` and hand back
views [:n, :, :width+q]; `commit(q)` then moves `width`. Room is added by doubling, so copies are rare.
"""

from __future__ import annotations

import torch

ROWS_MIN, COLS_MIN = 8, 64
TRIM_AT = 0.25  # drop leading all-padding columns once they are this share of the width (attention cost, no copy)


class DecodeBatch:
    """Rows (any objects: the engine's sequences), their mask [n, width], next positions [n] and KV buffers."""

    def __init__(self):
        self.rows: list = []
        self.keys: list[torch.Tensor] = []  # per layer [rows_cap, H, cols_cap, D]
        self.values: list[torch.Tensor] = []
        self.width = 0
        self.mask: torch.Tensor | None = None  # [n, width] long, 0 over padding
        self.next_pos: torch.Tensor | None = None  # [n] position of the token fed next

    def __len__(self) -> int:
        return len(self.rows)

    # ---- shape management ----

    def _grow(self, rows: int, cols: int, shift: int = 0) -> None:
        """Make room for `rows` x `cols`, moving the current columns `shift` to the right (new left padding)."""
        n, w = len(self.rows), self.width
        cap_rows, cap_cols = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= cap_rows and cols <= cap_cols and shift == 0:
            return
        new_rows = max(rows, cap_rows if rows <= cap_rows else 2 * cap_rows, ROWS_MIN)
        new_cols = max(cols, cap_cols if cols <= cap_cols else 2 * cap_cols, COLS_MIN)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                fresh = buf.new_zeros(new_rows, buf.shape[1], new_cols, buf.shape[3])
                fresh[:n, :, shift:shift + w] = buf[:n, :, :w]
                store[i] = fresh

    def merge(self, rows: list, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
              next_pos: torch.Tensor) -> None:
        """Append prefilled rows: per layer (keys, values) [m, H, w, D] right-aligned as described, mask [m, w]."""
        m, w_new = mask.shape
        if not self.rows:
            self.keys = [k.new_zeros(max(m, ROWS_MIN), k.shape[1], max(2 * w_new, COLS_MIN), k.shape[3]) for k, _ in layers]
            self.values = [v.new_zeros(max(m, ROWS_MIN), v.shape[1], max(2 * w_new, COLS_MIN), v.shape[3]) for _, v in layers]
            self.width, self.mask, self.next_pos = 0, mask.new_zeros(0, 0), next_pos.new_zeros(0)
        n, w = len(self.rows), self.width
        width = max(w, w_new)
        self._grow(n + m, width + 1, shift=width - w)
        for (k, v), kb, vb in zip(layers, self.keys, self.values):
            kb[n:n + m, :, :width - w_new].zero_()  # stale states of retired rows: masked, but never NaN
            vb[n:n + m, :, :width - w_new].zero_()
            kb[n:n + m, :, width - w_new:width] = k
            vb[n:n + m, :, width - w_new:width] = v
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows = self.rows + list(rows)
        self.width = width

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (compacted to the front), and trim leading columns that are padding in all."""
        if not indices:
            self.__init__()
            return
        n = len(indices)
        if indices != list(range(n)):  # move the kept rows to the front (when only the last rows go, nothing moves)
            idx = torch.tensor(indices, device=self.mask.device)
            for store in (self.keys, self.values):
                for buf in store:
                    buf[:n, :, :self.width] = buf[:, :, :self.width].index_select(0, idx)
            self.mask, self.next_pos = self.mask.index_select(0, idx), self.next_pos.index_select(0, idx)
        else:
            self.mask, self.next_pos = self.mask[:n], self.next_pos[:n]
        self.rows = [self.rows[i] for i in indices]
        first = int(self.mask.any(0).long().argmax())
        if first > TRIM_AT * self.width:
            w = self.width - first
            for store in (self.keys, self.values):
                for buf in store:
                    buf[:n, :, :w] = buf[:n, :, first:self.width].clone()
            self.mask, self.width = self.mask[:, first:], w

    # ---- one forward ----

    def cache(self, new_tokens: int):
        """A transformers cache over the buffers for a forward adding `new_tokens` columns; `commit` after it."""
        self._grow(len(self.rows), self.width + new_tokens)
        return slot_cache(self, len(self.rows))

    def commit(self, new_tokens: int, mask: torch.Tensor) -> None:
        self.width += new_tokens
        self.mask = mask
        self.next_pos = self.next_pos + new_tokens


def slot_cache(batch: DecodeBatch, n: int):
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer's view of the batch buffers: `update` writes the new states in place, returns [:n, :, :w+q]."""

        def __init__(self, i: int):
            super().__init__()
            self.i = i
            self.keys = batch.keys[i][:n, :, :batch.width]
            self.values = batch.values[i][:n, :, :batch.width]
            self.dtype, self.device, self.is_initialized = self.keys.dtype, self.keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            w, q = batch.width, key_states.shape[2]
            kb, vb = batch.keys[self.i], batch.values[self.i]
            kb[:n, :, w:w + q] = key_states
            vb[:n, :, w:w + q] = value_states
            self.keys, self.values = kb[:n, :, :w + q], vb[:n, :, :w + q]
            return self.keys, self.values

    cache = DynamicCache()
    cache.layers = [SlotLayer(i) for i in range(len(batch.keys))]
    cache.layer_class_to_replicate = None
    return cache


# ---- transformers cache plumbing (4.56+ / 5.x Cache objects) -------------------------------------------------


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each [B, H, L, D]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v, *_ in cache]  # legacy tuple of tuples


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers cache holding these per-layer (keys, values) as they are (no copy)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates the layer; its states are then set, not copied by cat
        cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, width, D] with zeros in front."""
    extra = width - x.shape[2]
    if extra <= 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], extra, x.shape[3]), x], dim=2)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - m.shape[1]
    return m if extra <= 0 else torch.cat([m.new_zeros(m.shape[0], extra), m], dim=1)
