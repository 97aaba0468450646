"""Keys and values of many sequences at once, one slot per sequence, each at its own length.

The engine decodes the sequences in slots [0, D) together, so a decode step attends to a view
of the cache, never a copy. Prefill rows can sit in any slots (their gather is small next to
their compute). One extra column per slot takes the writes of padding tokens, so padding never
lands on a real position.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, device: torch.device, dtype: torch.dtype) -> None:
        # Zeros, not empty: masked positions still meet V in attention (0 * NaN would be NaN).
        shape = (n_layers, n_slots, n_kv_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.scratch = max_len  # the padding column
        self._rows: slice | Tensor = slice(0, 0)
        self._write: Tensor | None = None
        self._kv_len = 0

    def select(self, rows: slice | Tensor, write_positions: Tensor, kv_len: int) -> None:
        """The rows of the next forward pass, where each token's k/v goes ([B, T]), and how many
        leading positions attention reads."""
        self._rows, self._write, self._kv_len = rows, write_positions, kv_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this pass's k/v ([B, H, T, D]) and return each row's first kv_len positions."""
        rows = self._rows
        if isinstance(rows, slice):
            keys, values = self.k[layer, rows], self.v[layer, rows]
            batch = torch.arange(keys.size(0), device=k.device)[:, None]
            keys[batch, :, self._write] = k.transpose(1, 2)
            values[batch, :, self._write] = v.transpose(1, 2)
            return keys[:, :, : self._kv_len], values[:, :, : self._kv_len]
        self.k[layer, rows[:, None], :, self._write] = k.transpose(1, 2)
        self.v[layer, rows[:, None], :, self._write] = v.transpose(1, 2)
        return self.k[layer, rows, :, : self._kv_len], self.v[layer, rows, :, : self._kv_len]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Give slot dst the first `length` positions of slot src (forks, moves, prefix reuse)."""
        if src != dst and length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]
