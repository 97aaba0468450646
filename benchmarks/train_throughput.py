"""Training throughput and MFU of our Transformer against transformers' and litgpt's Llama.

First the machine's bf16 and fp32 matmul throughput is measured (square matmuls,
llmforge/train/flops.py). Then three models of the identical shape are trained in the same
process: llmforge's Transformer, Hugging Face transformers' LlamaForCausalLM and, if it is
installed, litgpt's GPT configured as a Llama (RMSNorm, SwiGLU, RoPE, no biases, tied
embeddings). The default shape is ~23M parameters (dim 512, 6 layers, 8 heads, SwiGLU 1408,
vocab 8192, tied embeddings); `--preset gpt2-124m` takes the model section of
recipes/gpt2-124m.yaml instead. All models get the same batch, sequence length, precision (bf16
autocast where the hardware has it, fp32 master weights), seed, random tokens and optimizer
(AdamW, fused where torch has a fused kernel for the device). Each model does two warm-up steps
(they also compile, with --compile) and then `--steps` timed steps; the timing runs twice,
interleaved (ours, hf, litgpt, ours, hf, litgpt), and the faster of the two counts, so a noisy
neighbour on a shared machine costs less.

MFU is the model FLOPs (PaLM counting, llmforge/train/flops.py, the same for all three models)
per second over the measured matmul peak of the precision used; the peak is measured before
and again after training and the higher figure counts, so a busy neighbour during one
measurement does not inflate the MFU. Targets: llmforge at least
1.3x transformers' tokens/s, and MFU at least 40% of the measured bf16 matmul peak.

Run:   .venv/bin/python benchmarks/train_throughput.py [--steps 10] [--batch 8] [--seq 256]
           [--compile] [--dtype auto|bf16|fp32] [--models ours,hf,litgpt] [--preset gpt2-124m]
litgpt is optional and not a dependency of llmforge; see benchmarks/README.md for installing it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.train.device import autocast, pick_device, use_bf16
from llmforge.train.flops import flops_per_token, measured_peak_flops

CONFIG = ModelConfig(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=8,
                     ffn_hidden=1408, max_seq_len=1024, tie_embeddings=True)
MODELS = ("ours", "hf", "litgpt")
ROUNDS = 2  # interleaved timing runs per model; the best one is reported
WARMUP = 2
PEAK_REPEATS = 20  # best of this many timed matmuls, before and after training
TARGET_RATIO = 1.3
TARGET_MFU = 0.40
REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"

Loss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def preset_config(name: str) -> ModelConfig:
    """The model section of recipes/<name>.yaml; vocab from its tokenizer section (or 32768)."""
    path = REPO_RECIPES / f"{name}.yaml"
    if not path.is_file():  # installed without the repo: the copy shipped inside the package
        import llmforge

        path = Path(llmforge.__file__).parent / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"--preset {name}: no recipe {name}.yaml in {REPO_RECIPES}")
    recipe = yaml.safe_load(path.read_text())
    section = dict(recipe.get("model") or {})
    vocab = section.pop("vocab_size", 0) or (recipe.get("tokenizer") or {}).get("vocab_size", 32768)
    return ModelConfig(**section, vocab_size=vocab)


def ours_model(cfg: ModelConfig) -> torch.nn.Module:
    return Transformer(cfg)


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                         intermediate_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                         max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def litgpt_model(cfg: ModelConfig) -> torch.nn.Module:
    import litgpt
    from litgpt.model import GPT

    config = litgpt.Config(
        name="llmforge-bench", block_size=cfg.max_seq_len, n_layer=cfg.n_layers,
        n_embd=cfg.dim, n_head=cfg.n_heads, n_query_groups=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, bias=False,
        norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP",
        intermediate_size=cfg.hidden, rotary_percentage=1.0, parallel_residual=False,
        rope_base=int(cfg.rope_theta))
    model = GPT(config)
    model.apply(model._init_weights)
    if cfg.tie_embeddings:  # litgpt's GPT has no tying option; share the matrix by hand
        model.lm_head.weight = model.transformer.wte.weight
    return model


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Full-logits cross-entropy in fp32, the same for transformers and litgpt."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(model(input_ids=x).logits, y)


def litgpt_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(model(x), y)


def ours_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)  # fused chunked lm-head + cross-entropy (llmforge/model/loss.py)


BUILDERS: dict[str, tuple[str, Callable[[ModelConfig], torch.nn.Module], Loss]] = {
    "ours": ("llmforge", ours_model, ours_loss),
    "hf": ("transformers Llama", hf_model, hf_loss),
    "litgpt": ("litgpt GPT", litgpt_model, litgpt_loss),
}


def litgpt_status() -> str | None:
    """None when litgpt imports; otherwise the line to print instead of its row."""
    try:
        import litgpt  # noqa: F401
        from litgpt.model import GPT  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "litgpt":
            return "litgpt: not installed (pip install litgpt)"
        return f"litgpt: not usable, {e} (see benchmarks/README.md for its dependencies)"
    except Exception as e:  # a broken install must not stop the benchmark
        return f"litgpt: not usable, {type(e).__name__}: {e}"
    return None


def measure_peak(device: torch.device, bf16: bool, size: int) -> float:
    """measured_peak_flops afresh (it caches per process), so it can be taken again later."""
    measured_peak_flops.cache_clear()
    return measured_peak_flops(device.type, bf16, size=size, repeats=PEAK_REPEATS)


def fused_adamw(device: torch.device) -> bool:
    """Whether torch.optim.AdamW(fused=True) runs on this device (CPU has it since torch 2.4)."""
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once


@dataclass
class Candidate:
    key: str  # "ours" / "hf" / "litgpt"
    name: str
    compiled: bool
    model: torch.nn.Module
    loss_fn: Loss
    optimizer: torch.optim.Optimizer
    params: int
    tps: list[float] = field(default_factory=list)


def time_steps(c: Candidate, data: torch.Tensor, steps: int, device: torch.device,
               dtype: str) -> float:
    """WARMUP untimed steps, then `steps` timed ones; returns tokens/s."""
    c.model.train()
    _, batch, seq_plus_one = data.shape
    start = 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = data[i, :, :-1], data[i, :, 1:]
        with autocast(device, dtype):
            loss = c.loss_fn(c.model, x, y)
        loss.backward()
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * (seq_plus_one - 1) / (time.perf_counter() - start)


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--compile", action="store_true",
                        help="also time every model under torch.compile (warm-up compiles)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of ours,hf,litgpt (default: all three)")
    parser.add_argument("--preset", default=None, metavar="RECIPE",
                        help="take the model shape from recipes/RECIPE.yaml, e.g. gpt2-124m")
    parser.add_argument("--mfu-target", type=float, default=TARGET_MFU,
                        help=f"MFU target as a fraction of the measured peak ({TARGET_MFU})")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        parser.error(f"--models takes a subset of {','.join(MODELS)}, got {args.models!r}")
    cfg = preset_config(args.preset) if args.preset else CONFIG
    if args.seq > cfg.max_seq_len:
        parser.error(f"--seq {args.seq} exceeds the model's max_seq_len {cfg.max_seq_len}")

    device = pick_device()
    bf16 = use_bf16(device, args.dtype)
    # A 2048^3 matmul takes tens of microseconds on a datacentre GPU, too short to time well.
    size = 8192 if device.type == "cuda" else 2048
    peaks = {True: [measure_peak(device, True, size)], False: [measure_peak(device, False, size)]}
    precision = "bf16" if bf16 else "fp32"
    per_token = flops_per_token(cfg, args.seq)
    fused = fused_adamw(device)

    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}"
          f", {torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"\nshape {args.preset or 'default'}: dim {cfg.dim}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads ({cfg.n_kv_heads} kv), SwiGLU {cfg.hidden}, vocab "
          f"{cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'}; batch {args.batch} x "
          f"{args.seq}, {'bf16 autocast' if bf16 else 'fp32'}, AdamW "
          f"{'fused' if fused else 'foreach'}, {WARMUP} warm-up + {args.steps} timed steps, "
          f"best of {ROUNDS} interleaved runs; {per_token / 1e6:.1f} MFLOP/token")

    notes = []
    if "litgpt" in keys and (status := litgpt_status()) is not None:
        notes.append(status)
        keys.remove("litgpt")

    torch.manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (WARMUP + args.steps, args.batch, args.seq + 1),
                         device=device)
    candidates: list[Candidate] = []
    for compiled in (False, True) if args.compile else (False,):
        for key in keys:
            name, build, loss_fn = BUILDERS[key]
            torch.manual_seed(0)
            model = build(cfg).to(device)
            params = unique_params(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
            if compiled:
                model = torch.compile(model)
                name += " + compile"
            candidates.append(Candidate(key, name, compiled, model, loss_fn, optimizer, params))

    for _ in range(ROUNDS):
        for c in candidates:
            c.tps.append(time_steps(c, data, args.steps, device, args.dtype))

    # Measured again after training: on a shared machine a neighbour may have been busy during
    # the first measurement, and a peak measured too low would inflate every MFU.
    for dt in (True, False):
        peaks[dt].append(measure_peak(device, dt, size))
    peak = max(peaks[bf16])
    print(f"\nmeasured matmul throughput, TFLOP/s ({size}^3, best of {PEAK_REPEATS} each time)")
    print(f"  {'dtype':<6} {'before':>8} {'after':>8} {'peak':>8}")
    for dt, label in ((True, "bf16"), (False, "fp32")):
        before, after = peaks[dt]
        print(f"  {label:<6} {before / 1e12:>8.3f} {after / 1e12:>8.3f} "
              f"{max(before, after) / 1e12:>8.3f}")

    counts = {c.key: c.params for c in candidates}
    if len(set(counts.values())) > 1:
        notes.append("note: parameter counts differ: "
                     + ", ".join(f"{k} {n:,}" for k, n in counts.items()))

    def best(c: Candidate) -> float:
        return max(c.tps)

    def reference(c: Candidate) -> Candidate | None:
        return next((r for r in candidates if r.key == "hf" and r.compiled == c.compiled), None)

    for line in notes:
        print(line)
    header = (f"{'model':<28} {'params':>11} {'tokens/s':>10} {'vs hf':>7} "
              f"{'MFU':>7} {'run spread':>10}")
    print(f"\n{header}\n{'-' * len(header)}")
    for c in candidates:
        ref = reference(c)
        ratio = f"{best(c) / best(ref):.2f}x" if ref is not None else "-"
        spread = (max(c.tps) - min(c.tps)) / max(c.tps)
        print(f"{c.name:<28} {c.params:>11,} {best(c):>10,.0f} {ratio:>7} "
              f"{best(c) * per_token / peak:>7.1%} {spread:>10.1%}")
    print(f"{'-' * len(header)}\nMFU = model FLOPs/s over the measured {precision} matmul peak "
          f"({peak / 1e12:.3f} TFLOP/s); vs hf = tokens/s over transformers' in the same mode; "
          f"run spread = gap between the {ROUNDS} runs")

    for c in candidates:
        if c.key != "ours":
            continue
        ref = reference(c)
        mode = "compiled" if c.compiled else "eager"
        if ref is None:
            ratio_text = f"target >= {TARGET_RATIO}x transformers: n/a (hf not run)"
        else:
            ratio = best(c) / best(ref)
            ratio_text = (f"target >= {TARGET_RATIO}x transformers: {ratio:.2f}x "
                          f"{verdict(ratio >= TARGET_RATIO)}")
        mfu = best(c) * per_token / peak
        print(f"llmforge {mode}: {ratio_text}; target MFU >= {args.mfu_target:.0%} of measured "
              f"{precision} peak: {mfu:.1%} {verdict(mfu >= args.mfu_target)}")


if __name__ == "__main__":
    main()
