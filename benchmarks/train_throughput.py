"""Training throughput and MFU of our Transformer against Hugging Face's LlamaForCausalLM.

Both models have the identical shape (~23M parameters: dim 512, 6 layers, 8 heads, SwiGLU 1408,
vocab 8192, tied embeddings), batch, sequence length, precision (bf16 autocast where the
hardware has it, fp32 master weights) and optimizer (AdamW), and train on the same random
tokens in the same process, one after the other. First the machine's matmul peak is measured;
MFU is the model FLOPs (PaLM counting, llmforge/train/flops.py) per second over that peak.

Run: `.venv/bin/python benchmarks/train_throughput.py [--steps 10] [--batch 8] [--seq 256]`
"""

from __future__ import annotations

import argparse
import time

import torch

from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.train.device import autocast, pick_device, use_bf16
from llmforge.train.flops import flops_per_token, measured_peak_flops

CONFIG = ModelConfig(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=8,
                     ffn_hidden=1408, max_seq_len=1024, tie_embeddings=True)


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                         intermediate_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def ours_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)


def tokens_per_second(model, loss_fn, steps: int, batch: int, seq: int, device, dtype) -> float:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, CONFIG.vocab_size, (steps + 2, batch, seq + 1), device=device)
    model.train()
    for i in range(steps + 2):  # two warm-up steps (they also compile, when asked)
        if i == 2:
            start = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        with autocast(device, dtype):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * seq / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile (warm-up compiles)")
    args = parser.parse_args()
    device = pick_device()
    bf16 = use_bf16(device, args.dtype)
    peak_bf16 = measured_peak_flops(device.type, True)
    peak_fp32 = measured_peak_flops(device.type, False)
    peak = peak_bf16 if bf16 else peak_fp32
    per_token = flops_per_token(CONFIG, args.seq)
    print(f"device {device}, {'bf16 autocast' if bf16 else 'fp32'}; measured matmul peak: "
          f"bf16 {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s")
    print(f"model: {sum(p.numel() for p in Transformer(CONFIG).parameters()) / 1e6:.1f}M "
          f"parameters, batch {args.batch} x {args.seq}, {args.steps} timed steps")
    rows = []
    candidates = [("llmforge", lambda: Transformer(CONFIG), ours_loss),
                  ("transformers LlamaForCausalLM", lambda: hf_model(CONFIG), hf_loss)]
    if args.compile:
        candidates += [("llmforge + torch.compile",
                        lambda: torch.compile(Transformer(CONFIG)), ours_loss),
                       ("transformers + torch.compile",
                        lambda: torch.compile(hf_model(CONFIG)), hf_loss)]
    for name, build, loss_fn in candidates:
        torch.manual_seed(0)
        model = build().to(device)
        tps = tokens_per_second(model, loss_fn, args.steps, args.batch, args.seq, device,
                                args.dtype)
        rows.append((name, tps, tps * per_token / peak))
        del model
    print(f"\n{'model':<32} {'tokens/s':>10} {'MFU':>7}")
    for name, tps, mfu in rows:
        print(f"{name:<32} {tps:>10.0f} {mfu:>7.1%}")
    print(f"\nllmforge / transformers: {rows[0][1] / rows[1][1]:.2f}x tokens/s "
          f"(target >= 1.3x); llmforge MFU {rows[0][2]:.1%} of the measured peak "
          f"(target >= 40%)")


if __name__ == "__main__":
    main()
