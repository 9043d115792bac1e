"""The running rows' keys/values, in ONE buffer allocated ahead so a decode step writes one column in place.

transformers' DynamicCache grows by `torch.cat` at every layer of every step: the whole cache copied per token
(a sixth of a CPU decode step at batch 32). Here one tensor holds every layer's keys and values,
[2, layers, rows_cap, H, cols_cap, D]; the batch uses rows [0, n) and columns [0, width), every row right-aligned
so its newest token is column width-1:

    [pad | its prompt's virtual tokens | pad | input | generated]     (mask 0 over the pads)

The model writes new states into it in place (`BaseModel.forward_in_place`). Newcomers are prefilled straight
into rows [n, n+m) of the same buffer (`open`, a forward over those rows, then `join`); a
leaving row's slot is refilled by one row from the end. Columns are added by doubling and rows in steps of 8 up to
the scheduler's bound, so reallocations are rare; the buffer is kept while idle.
"""

from __future__ import annotations

import torch

ROWS_MIN, COLS_MIN = 8, 64
TRIM_AT = 0.25  # drop leading all-padding columns once they are this share of the width (attention cost, no copy)


class DecodeBatch:
    """Rows (any objects: the engine's sequences), their mask [n, width], next positions [n] and the KV buffer."""

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.rows: list = []
        self.kv = torch.zeros(2, layers, 0, heads, 0, head_dim, dtype=dtype, device=device)  # [2, L, rows, H, cols, D]
        self.width = 0
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [n, width], 0 over padding
        self.next_pos = torch.zeros(0, dtype=torch.long, device=device)  # [n] position of the token fed next

    def __len__(self) -> int:
        return len(self.rows)

    def _reserve(self, rows: int, cols: int, shift: int = 0) -> None:
        """Make room for `rows` x `cols`, moving the current columns `shift` to the right (new left padding)."""
        n, w = len(self.rows), self.width
        cap_rows, cap_cols = self.kv.shape[2], self.kv.shape[4]
        if rows <= cap_rows and cols <= cap_cols and shift == 0:
            return
        new_rows = max(cap_rows, -(-rows // ROWS_MIN) * ROWS_MIN)  # rows stop at the scheduler's bound: no doubling
        new_cols = max(cols, cap_cols if cols <= cap_cols else 2 * cap_cols, COLS_MIN)
        two, layers, _, heads, _, head_dim = self.kv.shape
        fresh = self.kv.new_zeros(two, layers, new_rows, heads, new_cols, head_dim)
        fresh[:, :, :n, :, shift:shift + w] = self.kv[:, :, :n, :, :w]
        self.kv = fresh

    # ---- newcomers: open rows, prefill into them, join ----

    def open(self, m: int, span: int, ahead: int = 0) -> tuple[int, int]:
        """Room for `m` new rows whose states will fill `span` columns, right-aligned with the running rows (the batch
        widens, padding the running rows on the left, when `span` exceeds its width); `ahead` = 1 aligns them with
        the column the running rows write next (a prefill in the same pass as a decode step: `join` after that
        step's `commit`). Returns (first new row, first column of the span). The new rows' columns are zeroed:
        padding is masked, but must never be NaN."""
        n, w = len(self.rows), self.width
        width = max(w, span - ahead)
        self._reserve(n + m, width + 1, shift=width - w)
        self.kv[:, :, n:n + m, :, :width + ahead].zero_()
        self.mask, self.width = _left_pad_mask(self.mask, width), width
        return n, width + ahead - span

    def join(self, rows: list, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """The `open`ed rows, now prefilled (their span's mask [m, span]), become running rows."""
        n, (m, span) = len(self.rows), mask.shape
        c0 = self.width - span
        keep = mask.to(self.kv.dtype)[None, None, :, None, :, None]  # [1, 1, m, 1, span, 1]
        self.kv[:, :, n:n + m, :, c0:self.width] *= keep  # what the forward wrote at padded positions: zero
        self.mask = torch.cat([self.mask, _left_pad_mask(mask, self.width)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows = self.rows + list(rows)

    # ---- running rows ----

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows and trim leading columns that are padding in all. Rows that go leave holes, filled
        by kept rows from the end (one row copied per hole; the order of rows is not kept). Nothing here makes a
        temporary of the whole cache: one would be a fresh mmap of ~100 MB, page faults included, per retirement."""
        if not indices:  # the buffer stays for the next requests
            self.rows, self.width = [], 0
            self.mask, self.next_pos = self.mask[:0, :0], self.next_pos[:0]
            return
        n = len(indices)
        kept = set(indices)
        holes = [i for i in range(n) if i not in kept]  # front slots freed by leaving rows
        movers = [j for j in indices if j >= n]  # kept rows beyond the new end
        order = list(range(len(self.rows)))
        for h, j in zip(holes, movers):
            self.kv[:, :, h, :, :self.width] = self.kv[:, :, j, :, :self.width]
            order[h] = j
        order = order[:n]
        idx = torch.tensor(order, device=self.mask.device)
        self.mask, self.next_pos = self.mask.index_select(0, idx), self.next_pos.index_select(0, idx)
        self.rows = [self.rows[i] for i in order]
        first = int(self.mask.any(0).long().argmax())
        if first > TRIM_AT * self.width:
            w = self.width - first
            for layer in self.kv.unbind(1):  # per layer: small temporaries
                layer[:, :n, :, :w] = layer[:, :n, :, first:self.width].clone()
            self.mask, self.width = self.mask[:, first:], w

    def grow(self, new_tokens: int) -> None:
        """Room for the running rows' next `new_tokens` columns (a forward writes them); `commit` after it."""
        self._reserve(len(self.rows), self.width + new_tokens)

    def commit(self, new_tokens: int, mask: torch.Tensor) -> None:
        self.width += new_tokens
        self.mask = mask
        self.next_pos = self.next_pos + new_tokens


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - m.shape[1]
    return m if extra <= 0 else torch.cat([m.new_zeros(m.shape[0], extra), m], dim=1)
