"""Speed of the lm-head + cross-entropy, fused and chunked vs plain PyTorch.

Reference: `F.cross_entropy(F.linear(h, W).float(), y)` with autograd, which materialises the
full [rows, vocab] logits and their gradient. Run: `python benchmarks/lm_head_loss.py`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmforge.model.loss import linear_cross_entropy
from llmforge.train.device import autocast


def plain(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def fused(h, w, y):
    return linear_cross_entropy(h, w, y)


def measure(fn, rows: int, dim: int, vocab: int, dtype: str, repeats: int) -> float:
    torch.manual_seed(0)
    h = torch.randn(rows, dim, requires_grad=True)
    w = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (rows,))
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = fn(h, w, y)
        loss.backward()
        times.append(time.perf_counter() - t0)
        h.grad = w.grad = None
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"rows={args.rows} dim={args.dim} vocab={args.vocab}, forward+backward, best of "
          f"{args.repeats}")
    print(f"{'dtype':<6} {'plain ms':>10} {'fused ms':>10} {'speed-up':>9}")
    for dtype in ("fp32", "bf16", "auto"):
        t_plain = measure(plain, args.rows, args.dim, args.vocab, dtype, args.repeats)
        t_fused = measure(fused, args.rows, args.dim, args.vocab, dtype, args.repeats)
        print(f"{dtype:<6} {t_plain * 1e3:>10.1f} {t_fused * 1e3:>10.1f} "
              f"{t_plain / t_fused:>8.2f}x")


if __name__ == "__main__":
    main()
