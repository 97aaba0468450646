"""Keys and values of many sequences at once, one slot per sequence, each at its own length.

The engine decodes the sequences in slots [0, D) together, so a decode step attends to a view
of the cache, never a copy. Prefill rows can sit in any slots (their gather is small next to
their compute). One extra column per slot takes the writes of padding tokens, so padding never
lands on a real position. Slots start short and grow (doubling, up to max_len) when a sequence
needs more room, so memory follows the longest live sequence, not the configured context.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotCache:
    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_len: int,
                 head_dim: int, *, device: torch.device, dtype: torch.dtype,
                 initial_len: int = 256) -> None:
        self.max_len = max_len
        self.k = self.v = torch.empty(0)
        self._shape = (n_layers, n_slots, n_kv_heads, head_dim)
        self._device, self._dtype = device, dtype
        self.capacity = 0
        self.reserve(min(initial_len, max_len))
        self._rows: slice | Tensor = slice(0, 0)
        self._write: Tensor | None = None
        self._kv_len = 0

    @property
    def scratch(self) -> int:
        """The padding column, past every real position."""
        return self.capacity

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (at least doubling, at most max_len)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's max_len={self.max_len}")
        capacity = min(self.max_len, max(length, 2 * self.capacity))
        n_layers, n_slots, n_heads, head_dim = self._shape
        shape = (n_layers, n_slots, n_heads, capacity + 1, head_dim)
        # Zeros, not empty: masked positions still meet V in attention (0 * NaN would be NaN).
        k = torch.zeros(shape, device=self._device, dtype=self._dtype)
        v = torch.zeros(shape, device=self._device, dtype=self._dtype)
        if self.capacity:
            k[:, :, :, : self.capacity] = self.k[:, :, :, : self.capacity]
            v[:, :, :, : self.capacity] = self.v[:, :, :, : self.capacity]
        self.k, self.v, self.capacity = k, v, capacity

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
