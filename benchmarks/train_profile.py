"""Where one eager training step of the throughput benchmark's model spends its time.

Profiles our Transformer and transformers' LlamaForCausalLM of the same ~23M shape
(benchmarks/train_throughput.py) side by side, and prints for each: step time, the share of
time in matmuls and their achieved TFLOP/s against the measured bf16 peak, the share in SDPA's
backward, and the heaviest other operators. It explains what MFU leaves on the table.

Run: `.venv/bin/python benchmarks/train_profile.py [--batch 8] [--seq 256] [--steps 2]`
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from train_throughput import CONFIG, hf_loss, hf_model, ours_loss, ours_model

from llmforge.model.transformer import Transformer
from llmforge.train.device import autocast, pick_device, use_bf16
from llmforge.train.flops import flops_per_token, measured_peak_flops

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm")
ATTENTION_BACKWARD = "_scaled_dot_product_flash_attention_for_cpu_backward"


def profile_steps(model, loss_fn, data, steps: int, device) -> tuple[float, list]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i: int) -> None:
        x, y = data[i, :, :-1], data[i, :, 1:]
        with autocast(device, "auto"):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up
        step(i)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    return (time.perf_counter() - start) / steps, prof.key_averages()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = pick_device("cpu")
    peak = measured_peak_flops(device.type, use_bf16(device, "auto"))
    tokens = args.batch * args.seq
    step_flops = tokens * flops_per_token(CONFIG, args.seq)
    matmul_flops = 6 * tokens * sum(  # weights only: attention scores are not aten::mm
        p.numel() for n, p in Transformer(CONFIG).named_parameters() if p.dim() == 2)
    data = torch.randint(0, CONFIG.vocab_size, (args.steps + 2, args.batch, args.seq + 1))
    print(f"measured bf16 matmul peak {peak / 1e12:.3f} TFLOP/s; batch {args.batch} x "
          f"{args.seq}; {step_flops / 1e9:.1f} model GFLOP per step")
    for name, build, loss_fn in (("llmforge", lambda: ours_model(CONFIG), ours_loss),
                                 ("transformers", lambda: hf_model(CONFIG), hf_loss)):
        torch.manual_seed(0)
        seconds, ops = profile_steps(build(), loss_fn, data, args.steps, device)
        total = sum(op.self_cpu_time_total for op in ops)
        mm = sum(op.self_cpu_time_total for op in ops if op.key in MATMULS)
        attn = sum(op.self_cpu_time_total for op in ops if op.key.endswith(ATTENTION_BACKWARD))
        mm_seconds = seconds * mm / total
        print(f"\n{name}: {seconds * 1e3:.0f} ms/step, MFU {step_flops / seconds / peak:.1%}; "
              f"matmuls {mm / total:.0%} of the time at {matmul_flops / mm_seconds / 1e12:.2f} "
              f"TFLOP/s ({matmul_flops / mm_seconds / peak:.0%} of peak); SDPA backward "
              f"{attn / total:.0%}")
        others = sorted((op for op in ops if op.key not in MATMULS),
                        key=lambda op: -op.self_cpu_time_total)[:6]
        for op in others:
            print(f"  {op.key[:60]:<60} {op.self_cpu_time_total / total:6.1%}")


if __name__ == "__main__":
    main()
