"""`llmforge`: one command, a verb per stage of a model's life.

    llmforge pretrain recipes/demo.yaml train.lr=3e-4   # one stage (and what it needs)
    llmforge run recipes/demo.yaml                      # the stages a recipe lists
    llmforge demo                                       # the built-in recipe, end to end
    llmforge chat runs/demo/export/model                # talk to a model (or gguf:FILE)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

DEMO_RECIPE = "demo.yaml"
STAGE_VERBS = ("data", "tokenizer", "tokenize", "pretrain", "sft", "dpo", "reward", "grpo", "eval",
               "export")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may also follow options (`run recipe.yaml --data x train.lr=1`), where argparse
    # no longer takes positionals: collect those KEY=VALUE leftovers here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("LLMFORGE_DEBUG"):
            raise
        print(f"llmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmforge {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from llmforge.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="llmforge",
        description="Train, align, evaluate, export and chat with a language model. Each stage "
        "reads the files its upstream stages wrote under runs/<name>/ and writes its own there.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb in STAGE_VERBS:
        p = sub.add_parser(verb, help=STAGES[verb].help, description=(
            f"Run the {verb} stage: {STAGES[verb].help}. Upstream stages run first unless "
            "their outputs are current."))
        _add_recipe_args(p)
        p.set_defaults(handler=lambda a, v=verb: _run_stages(a, [v]))
        if verb == "eval":
            _add_benchmark_args(p)
    p = sub.add_parser("run", help="run every stage a recipe lists, skipping finished ones",
                       description="Run the stages listed in the recipe's `stages:` in order.")
    _add_recipe_args(p)
    p.set_defaults(handler=lambda a: _run_stages(a, None))
    p = sub.add_parser("demo", help="run the built-in demo recipe on the Python standard library",
                       description="Every stage on the Python standard library's own source "
                       "(no download): writes runs/demo/ and runs/demo/report.html.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--force", nargs="*", metavar="STAGE", default=(), help="rerun these stages")
    p.set_defaults(handler=lambda a: _run_stages(a, None), recipe=None, data=None)
    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming)",
                       description="Reads a model directory (ours, or a Hugging Face Llama, "
                       "Mistral or Qwen2 one with its chat template), hf://owner/name or "
                       "gguf:PATH, and streams replies. /reset clears the history, "
                       "/system TEXT sets a system prompt, /quit leaves.")
    p.add_argument("model", help="model directory (e.g. runs/demo/export/model), "
                   "hf://owner/name[@revision] or gguf:PATH")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(handler=_chat)
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serves a model (the same sources as `chat`) at "
                       "/v1/completions and /v1/chat/completions (streaming too), with "
                       "/v1/models, /tokenize, /detokenize, /health, Prometheus /metrics and a "
                       "chat page at /. Requests are batched together on the engine; a full "
                       "queue answers 429. SIGTERM lets requests in flight finish.")
    p.add_argument("model", help="model directory (e.g. runs/demo/export/model), "
                   "hf://owner/name[@revision] or gguf:PATH")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API endpoints "
                   "(default: $LLMFORGE_API_KEY; none: open)")
    p.add_argument("--served-model-name", help="the model name clients use (default: MODEL)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int,
                   help="prompt + output tokens per sequence (default: the model's context, "
                   "at most 2048)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued for a decode slot before new ones get 429")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body (413 beyond)")
    p.add_argument("--store", metavar="URL",
                   help="record every request, its answer, latencies and user feedback "
                   "(POST /v1/feedback) in this database: sqlite:///PATH or "
                   "postgresql+psycopg://USER@HOST/DB")
    p.add_argument("--redact-pii", action="store_true",
                   help="with --store: redact emails, phone numbers and such before writing")
    p.add_argument("--retention-days", type=float,
                   help="with --store: delete requests older than this")
    p.add_argument("--model-version", help="recorded with each request (default: the model name)")
    p.add_argument("--quantization", choices=("none", "int4"), default="none",
                   help="int4: the blocks' weights as 4-bit groups of 32 (a Q4_1 GGUF "
                   "keeps its own codes; the CPU kernel, plain ops elsewhere), about 1.2-1.4x "
                   "faster single-stream decoding on a CPU")
    p.add_argument("--draft-model", metavar="SPEC",
                   help="speculative decoding: a model with the same tokenizer (the same "
                   "sources as MODEL; smaller or quantized) proposes tokens that MODEL checks "
                   "several at a time; the output is MODEL's alone")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="with --draft-model: tokens the draft proposes per step")
    p.add_argument("--draft-quantization", choices=("none", "int4"), default="none",
                   help="with --draft-model: int4 as for --quantization (the same model as "
                   "MODEL in int4 makes a draft that agrees often)")
    p.set_defaults(handler=_serve)
    p = sub.add_parser("compress", help="a smaller or faster model: quantize, distill, prune",
                       description="Each method writes a model directory that eval, chat and "
                       "serve take as they are.")
    compress = p.add_subparsers(dest="compress_command", metavar="METHOD", required=True)
    p = compress.add_parser("quantize", help="weight-only int8 / int4, or a GGUF Q8_0 / Q4_0 file",
                            description="int8: one scale per output channel; int4: groups of "
                            "--group-size weights with a scale and offset each; both a model "
                            "directory serve and eval load. q8_0 / q4_0: a GGUF file for "
                            "llama.cpp (and `gguf:FILE` here).")
    p.add_argument("model", help="a model directory, hf://owner/name or gguf:PATH")
    p.add_argument("--method", required=True, choices=("int8", "int4", "q8_0", "q4_0"))
    p.add_argument("--group-size", type=int, default=32, help="int4: weights per group")
    p.add_argument("--out", type=Path, required=True,
                   help="output model directory (a .gguf file for q8_0 / q4_0)")
    p.set_defaults(handler=_compress_quantize)
    for method in ("distill", "prune"):
        p = compress.add_parser(method, help=STAGES[method].help, description=(
            f"Run the {method} stage of a recipe: {STAGES[method].help}."))
        _add_recipe_args(p)
        p.set_defaults(handler=lambda a, m=method: _run_stages(a, [m]))
    p = sub.add_parser("monitor", help="what a served model's request store holds",
                       description="Work on the request store `llmforge serve --store` writes.")
    monitor = p.add_subparsers(dest="monitor_command", metavar="SUBCOMMAND", required=True)
    p = monitor.add_parser("export", help="users' feedback as DPO preference pairs and SFT "
                           "examples", description="Writes OUT/preferences.jsonl (a preferred "
                           "answer vs the model's) and OUT/sft.jsonl (liked or preferred "
                           "answers), in the formats `llmforge dpo` and `llmforge sft` read.")
    p.add_argument("--store", required=True, metavar="URL", help="the store's database URL")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--min-rating", type=int, default=4,
                   help="a rating from which an answer counts as liked (1-5)")
    p.set_defaults(handler=_monitor_export)
    p = monitor.add_parser("drift", help="has traffic moved away from a reference window?",
                           description="Tests the last --current-days of answered requests "
                           "against the --reference-days before them: prompt and output "
                           "lengths, prompt language, prompt tokens, refusals, stop reasons and, "
                           "with --model, the model's perplexity on the prompts. Exits 1 when "
                           "a column drifted.")
    _add_store_drift_args(p)
    p.add_argument("--json", type=Path, help="also write the report here as JSON")
    p.set_defaults(handler=_monitor_drift)
    p = monitor.add_parser("dashboard", help="serve a dashboard page of the request store",
                           description="Latency percentiles, throughput, errors, drift, safety "
                           "flags and feedback over time, as plots, at http://HOST:PORT/; "
                           "drift gauges for Prometheus at /metrics.")
    _add_store_drift_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.set_defaults(handler=_monitor_dashboard)
    p = monitor.add_parser("gate", help="is a candidate model worse than the serving one?",
                           description="Evaluates NEW and OLD on the same fixed items and fails "
                           "(exit 1) when NEW is worse on a task beyond the noise: a one-sided "
                           "paired test over the items at --alpha.")
    p.add_argument("new", help="the candidate model (any source `chat` takes)")
    p.add_argument("old", help="the serving model")
    p.add_argument("--tasks", default="arc_easy,hellaswag",
                   help="built-in task names or task YAML paths, comma-separated")
    p.add_argument("--limit", type=int, default=500, help="first N items of each task (0 = all)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="false-alarm rate per task of the one-sided test")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="a drop in the per-item score (e.g. 0.01 = one point of accuracy) "
                   "accepted without failing")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/gate"),
                   help="writes new/ and old/ evaluations and gate.json here")
    p.set_defaults(handler=_monitor_gate)
    return parser


def _add_store_drift_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="URL", help="the store's database URL")
    p.add_argument("--reference-days", type=float, default=7.0)
    p.add_argument("--current-days", type=float, default=1.0)
    p.add_argument("--model-version", help="only requests served by this model version")
    p.add_argument("--model", help="score the prompts' perplexity with this model (a model "
                   "directory, hf://owner/name or gguf:PATH)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the built-in demo recipe)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.lr=3e-4 model.n_layers=6")
    p.add_argument("--data", help="a folder, glob or hf://owner/name of text (.txt, .jsonl[.gz|"
                   ".zst], .parquet, .csv, WARC/WET), or several joined by commas, instead of "
                   "the built-in corpus (sets data.source)")
    p.add_argument("--force", nargs="*", metavar="STAGE", default=None,
                   help="rerun these stages (default with no names: the stage asked for) and, "
                   "through their new outputs, everything downstream")


def _add_benchmark_args(p: argparse.ArgumentParser) -> None:
    p.description += (" With --model, benchmark any model on tasks instead; with --compare, "
                      "put two benchmark runs side by side.")
    p.add_argument("--model", help="benchmark this model (a model directory, hf://owner/name or "
                   "gguf:PATH) on --tasks, writing eval.json, items/ and report.html to --out")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag",
                   help="built-in task names or task YAML paths, comma-separated")
    p.add_argument("--limit", type=int, default=0, help="first N items of each task (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat-template", action="store_true",
                   help="put each prompt in a user turn of the model's chat template and score "
                   "or generate the assistant's reply (lm-eval's --apply_chat_template)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), type=Path,
                   help="two eval.json files (or their directories): differences and their "
                   "standard errors")
    p.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    """The eval stage of a recipe, or a benchmark run (--model), or a comparison (--compare)."""
    if args.compare:
        from llmforge.eval.suite import compare, format_comparison

        a, b = (p / "eval.json" if p.is_dir() else p for p in args.compare)
        print(format_comparison(compare(a, b), str(a), str(b)))
        return 0
    if args.model:
        from llmforge.eval.suite import run_suite
        from llmforge.train.device import pick_device

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        run_suite(args.model, tasks, args.out, limit=args.limit, device=pick_device(),
                  batch_size=args.batch_size, chat_template=args.chat_template)
        print(f"wrote {args.out / 'eval.json'} and {args.out / 'report.html'}")
        return 0
    return _run_stages(args, ["eval"])


def _run_stages(args: argparse.Namespace, targets: list[str] | None) -> int:
    from llmforge import distributed
    from llmforge.config import load_recipe, to_dict
    from llmforge.runs import Runner, console
    from llmforge.stages import STAGES

    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path and "=" in recipe_path and not Path(recipe_path).exists():
        recipe_path, overrides = None, [recipe_path, *overrides]  # only overrides were given
    if args.data:
        overrides.append(f"data.source={args.data}")
    recipe = load_recipe(recipe_path or _demo_recipe(), overrides)
    targets = targets or recipe.stages
    force = tuple(targets if args.force == [] else args.force or ())
    dist = distributed.init_from_env()  # under torchrun: join the process group
    try:
        Runner(recipe, STAGES, to_dict).run(targets, force=force)
    finally:
        distributed.shutdown()
    if not dist.is_main:
        return 0
    console.print(f"[bold]outputs:[/] {recipe.root}")
    if "export" in targets:
        console.print(f"chat with the model: [bold]llmforge chat {recipe.root / 'export/model'}")
    return 0


def _demo_recipe() -> Path:
    return Path(str(resources.files("llmforge") / "recipes" / DEMO_RECIPE))


def _chat(args: argparse.Namespace) -> int:
    from llmforge.serve.chat import chat_loop

    chat_loop(args.model, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              max_new_tokens=args.max_new_tokens, seed=args.seed)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from llmforge.serve.api import ServerSettings
    from llmforge.serve.server import serve

    store = None
    if args.store:
        from llmforge.monitor.store import RequestStore

        store = RequestStore(args.store, redact_pii=args.redact_pii,
                             retention_days=args.retention_days)
    settings = ServerSettings(api_key=args.api_key or os.environ.get("LLMFORGE_API_KEY"),
                              served_model_name=args.served_model_name,
                              max_tokens_limit=args.max_tokens_limit,
                              max_body_bytes=args.max_body_bytes, store=store,
                              model_version=args.model_version)
    try:
        serve(args.model, host=args.host, port=args.port, settings=settings,
              max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              max_waiting=args.max_waiting, quantization=args.quantization,
              draft_model=args.draft_model, num_speculative_tokens=args.num_speculative_tokens,
              draft_quantization=args.draft_quantization)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 130
    return 0


def _compress_quantize(args: argparse.Namespace) -> int:
    from llmforge.compress.quantize import quantize_model

    out = quantize_model(args.model, args.out, method=args.method, group_size=args.group_size)
    print(f"wrote {out}")
    return 0


def _monitor_export(args: argparse.Namespace) -> int:
    from llmforge.monitor.export import export_feedback
    from llmforge.monitor.store import RequestStore

    store = RequestStore(args.store)
    try:
        summary = export_feedback(store, args.out, args.min_rating)
    finally:
        store.close()
    print(json.dumps(summary))
    return 0


def _monitor_drift(args: argparse.Namespace) -> int:
    from llmforge.monitor.store import RequestStore
    from llmforge.monitor.store_drift import PromptPerplexity, store_drift

    perplexity = PromptPerplexity(args.model) if args.model else None
    store = RequestStore(args.store)
    try:
        report = store_drift(store, reference_days=args.reference_days,
                             current_days=args.current_days, model_version=args.model_version,
                             perplexity=perplexity)
    finally:
        store.close()
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if report.drifted else 0


def _monitor_dashboard(args: argparse.Namespace) -> int:
    from llmforge.monitor.dashboard import serve_dashboard

    serve_dashboard(args.store, host=args.host, port=args.port,
                    reference_days=args.reference_days, current_days=args.current_days,
                    model_version=args.model_version, model=args.model)
    return 0


def _monitor_gate(args: argparse.Namespace) -> int:
    from llmforge.monitor.gate import format_gate, run_gate
    from llmforge.train.device import pick_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_gate(args.new, args.old, tasks, args.out, limit=args.limit, alpha=args.alpha,
                      tolerance=args.tolerance, batch_size=args.batch_size, device=pick_device())
    print(format_gate(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
