"""Pretraining batches: random windows of the flat token stream, a pure function of the step."""

from __future__ import annotations

import numpy as np
import torch


def draw_indices(seed: int, step: int, micro: int, high: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> np.ndarray:
    """This rank's `batch_size` random indices in [0, high) for micro-batch (step, micro).

    The draw is for the global batch (batch_size x world_size rows) and each rank takes its own
    slice: ranks never overlap or leave gaps, and a single process with a world_size-times
    larger batch sees exactly the same rows.
    """
    rng = np.random.default_rng([seed, step, micro])
    picked = rng.integers(0, high, size=batch_size * world_size)
    return picked[rank * batch_size : (rank + 1) * batch_size]


class RandomWindows:
    """Micro-batch (step, micro) is `batch_size` windows at offsets drawn from a seeded RNG.

    With `doc_start` (the token that opens every document) it also returns document ids for
    document-aware attention: each window position's count of document starts so far.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, *,
                 rank: int = 0, world_size: int = 1, doc_start: int | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"only {len(tokens)} training tokens: a window needs seq_len + 1 = "
                             f"{seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size, self.doc_start = rank, world_size, doc_start

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        starts = draw_indices(self.seed, step, micro, len(self.tokens) - self.seq_len,
                              self.batch_size, self.rank, self.world_size)
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        x, y = batch[:, :-1], batch[:, 1:]
        if self.doc_start is None:
            return x, y
        return x, y, (x == self.doc_start).cumsum(dim=1)


def count_windows(n_tokens: int, seq_len: int, max_windows: int = 0) -> int:
    """How many whole windows `sequential_windows` yields (0 max_windows = no limit)."""
    n_windows = (n_tokens - 1) // seq_len
    return min(n_windows, max_windows) if max_windows else n_windows


def sequential_windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_windows: int = 0):
    """Non-overlapping windows covering the stream in order (for validation): yields (x, y)."""
    n_windows = count_windows(len(tokens), seq_len, max_windows)
    for first in range(0, n_windows, batch_size):
        idx = range(first, min(first + batch_size, n_windows))
        rows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx])
        batch = torch.from_numpy(rows.astype(np.int64))
        yield batch[:, :-1], batch[:, 1:]
