"""The stages of a model's life, each reading its upstream stages' files and writing its own.

Each function here is glue: it finds its inputs in the run directory, calls the module that does
the work, and returns a summary. The work itself lives in data/, tokenizer/, model/, train/,
align/, eval/ and report/.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from llmforge import distributed
from llmforge.align import sft
from llmforge.data import curate
from llmforge.data.datacard import write_datacard
from llmforge.data.sources import source_files
from llmforge.eval import evaluate
from llmforge.model.io import export_hf, load_model, save_model
from llmforge.model.transformer import Transformer
from llmforge.report import write_report
from llmforge.runs import Stage, StageContext, files_digest
from llmforge.tokenizer import (
    BOS,
    CHAT_TEMPLATE,
    load_tokenizer,
    open_shard,
    tokenize_documents,
    train_tokenizer,
)
from llmforge.train import loop
from llmforge.train.data import RandomWindows, count_windows, sequential_windows
from llmforge.train.device import pick_device
from llmforge.train.parallel import full_state_dict


def run_data(ctx: StageContext) -> dict:
    with ctx.progress("shard tasks", None) as update:
        summary = curate(ctx.recipe.data, ctx.dir,
                         progress=lambda done, total: update(done, info=f"of {total}"))
    ctx.log.info(f"kept {summary['kept']:,} of {summary['read']:,} documents; "
                 f"dropped {summary['dropped']}")
    _, html = write_datacard(summary, ctx.dir, title=f"Datacard: {ctx.recipe.data.source}")
    ctx.log.info(f"datacard: {html}")
    return summary


def run_tokenizer(ctx: StageContext) -> dict:
    return train_tokenizer(ctx.recipe.tokenizer, _documents(ctx), ctx.dir / "tokenizer.json")


def run_tokenize(ctx: StageContext) -> dict:
    cfg = ctx.recipe.tokenize
    with ctx.progress("documents", None) as update:
        stats = tokenize_documents(
            cfg, _documents(ctx), _tokenizer_path(ctx), ctx.dir,
            progress=lambda docs, tokens: update(docs, info=f"{tokens:,} tokens"),
        )
    if not stats["val_docs"]:  # documents are split whole, by a hash of their id
        raise ValueError(f"tokenize: no document fell in the validation split of "
                         f"{stats['train_docs']} documents; raise tokenize.val_fraction "
                         f"(now {cfg.val_fraction})")
    return stats


def run_pretrain(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.train
    torch.manual_seed(recipe.seed)
    tok = load_tokenizer(_tokenizer_path(ctx))
    model_cfg = dataclasses.replace(
        recipe.model, vocab_size=recipe.model.vocab_size or tok.get_vocab_size()
    )
    device = pick_device(recipe.device)
    model = Transformer(model_cfg).to(device)
    params = model.num_params()
    ctx.log.info(f"model: {params / 1e6:.2f}M parameters on {device}")
    shards = ctx.input("tokenize")
    train_tokens = open_shard(shards, "train").tokens
    val_tokens = open_shard(shards, "val").tokens
    dist = distributed.info()
    doc_start = tok.token_to_id(BOS) if cfg.doc_masking else None
    batches = RandomWindows(train_tokens, cfg.seq_len, cfg.batch_size, recipe.seed,
                            rank=dist.rank, world_size=dist.world_size, doc_start=doc_start)

    def val_loss() -> float:  # every rank evaluates the same windows (FSDP2 needs them all)
        windows = sequential_windows(
            val_tokens, cfg.seq_len, cfg.batch_size, max_windows=cfg.eval_batches * cfg.batch_size
        )
        total, count = evaluate.summed_loss(model, windows, cfg.dtype)
        return total / count

    summary = loop.train(model, cfg, batches, ctx, evaluate=val_loss,
                         benchmark=_core_benchmark(model, tok, cfg) if cfg.core_tasks else None)
    _save_model_dir(model, ctx, tok_path=_tokenizer_path(ctx))
    return {**summary, "params": params}


def _core_benchmark(model: Transformer, tok, cfg: loop.TrainConfig):
    """The CORE-like aggregate of cfg.core_tasks on the model as it trains."""
    from llmforge.eval.benchmarks import core_score, evaluate_task
    from llmforge.eval.lm import LanguageModel
    from llmforge.eval.tasks import load_task

    tasks = [load_task(name) for name in cfg.core_tasks]

    def benchmark() -> dict[str, float]:
        lm = LanguageModel(model, tok, prefix_id=tok.token_to_id(BOS))
        return {"core": core_score([evaluate_task(lm, t, limit=cfg.core_limit) for t in tasks])}

    return benchmark


def run_sft(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.sft
    torch.manual_seed(recipe.seed)
    tok = load_tokenizer(_tokenizer_path(ctx))
    model = load_model(ctx.input("pretrain") / "model", device=pick_device(recipe.device))
    examples, skipped = sft.load_examples(cfg, _documents(ctx))
    val = [e for e in examples if sft.is_validation(e.id, cfg.val_fraction)]
    train = [e for e in examples if not sft.is_validation(e.id, cfg.val_fraction)]
    pad = tok.token_to_id("<|pad|>")
    dist = distributed.info()
    if cfg.packing:  # whole conversations side by side in each row, attention kept apart
        train_rows, skipped_train = sft.pack_examples(tok, train, cfg.train.seq_len, pad)
        batches = sft.PackedBatches(train_rows, cfg.train.batch_size, recipe.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    else:
        train_rows, skipped_train = sft.encode_examples(tok, train, cfg.train.seq_len)
        batches = sft.ExampleBatches(train_rows, cfg.train.batch_size, pad, recipe.seed,
                                     rank=dist.rank, world_size=dist.world_size)
    val_rows, skipped_val = sft.encode_examples(tok, val, cfg.train.seq_len)
    skipped = dict(skipped + skipped_train + skipped_val)
    rows = "packed rows" if cfg.packing else "examples"
    ctx.log.info(f"{len(train_rows):,} train {rows} / {len(val_rows):,} val examples; set "
                 f"aside: {skipped or 'none'}")
    if not val_rows:
        raise ValueError("sft: no validation examples; raise sft.val_fraction")

    def val_loss() -> float:
        chunks = range(0, len(val_rows), cfg.train.batch_size)
        batches = (sft.pad_batch(val_rows[i : i + cfg.train.batch_size], pad) for i in chunks)
        total, count = evaluate.summed_loss(model, batches, cfg.train.dtype)
        return total / count

    before = val_loss()
    summary = loop.train(model, cfg.train, batches, ctx, evaluate=val_loss)
    _save_model_dir(model, ctx, tok_path=_tokenizer_path(ctx))
    return {**summary, "val_loss_before": before, "train_examples": len(train_rows),
            "val_examples": len(val_rows), "set_aside": skipped}


def run_eval(ctx: StageContext) -> dict:
    cfg = ctx.recipe.eval
    tok = load_tokenizer(_tokenizer_path(ctx))
    val_tokens = open_shard(ctx.input("tokenize"), "val").tokens
    n_windows = count_windows(len(val_tokens), cfg.seq_len, cfg.max_val_windows)
    covered = val_tokens[1 : n_windows * cfg.seq_len + 1]
    n_bytes = len(tok.decode(covered.tolist()).encode("utf-8"))
    unigram = json.loads((ctx.input("tokenize") / "shards.json").read_text())["unigram_nats"]
    models = {}
    for stage in ("pretrain", "sft"):
        model = load_model(ctx.input(stage) / "model", device=pick_device(ctx.recipe.device))
        windows = sequential_windows(val_tokens, cfg.seq_len, cfg.batch_size, n_windows)
        total, count = evaluate.summed_loss(model, windows, cfg.dtype)
        models[stage] = evaluate.loss_report(total, count, n_bytes)
        models[stage] |= evaluate.greedy_samples(model, tok, cfg)
        ctx.log.info(f"{stage}: val loss {models[stage]['val_loss']:.4f} "
                     f"(unigram {unigram:.4f}), {models[stage]['bpb']:.4f} bits/byte")
    result = {"unigram_nats": unigram, "models": models}
    (ctx.dir / "eval.json").write_text(json.dumps(result, indent=2))
    return {f"{m}_{k}": v[k] for m, v in models.items() for k in ("val_loss", "bpb")} | {
        "unigram_nats": unigram}


def run_export(ctx: StageContext) -> dict:
    """A Hugging Face model directory: transformers loads it as LlamaForCausalLM."""
    cfg = ctx.recipe.export
    model = load_model(ctx.input(cfg.source) / "model")
    tok_path = _tokenizer_path(ctx)
    tok = load_tokenizer(tok_path)
    out = ctx.dir / "model"
    bos, eos, end = (tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|end|>"))
    export_hf(model, out, dtype=getattr(torch, cfg.dtype), bos_token_id=bos,
              eos_token_id=[eos, end])
    shutil.copy(tok_path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|end|>", "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "model_max_length": model.cfg.max_seq_len,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos, "eos_token_id": [eos, end], "pad_token_id":
        tok.token_to_id("<|pad|>"), "do_sample": False, "max_new_tokens": 256,
    }, indent=2))
    ctx.log.info(f"exported {cfg.source} model to {out}; chat with: llmforge chat {out}")
    return {"path": str(out), "files": sorted(p.name for p in out.iterdir())}


def run_report(ctx: StageContext) -> dict:
    path = write_report(ctx.root)
    ctx.log.info(f"report: {path}")
    return {"path": str(path)}


def _documents(ctx: StageContext) -> Path:
    return ctx.input("data") / "documents"


def _tokenizer_path(ctx: StageContext) -> Path:
    return ctx.input("tokenizer") / "tokenizer.json"


def _save_model_dir(model: Transformer, ctx: StageContext, tok_path: Path) -> None:
    """The trained model as a model directory, written once (by rank 0 under torchrun)."""
    state = full_state_dict(model)  # collective: every rank takes part
    if ctx.is_main:
        save_model(model, ctx.dir / "model", state=state)
        shutil.copy(tok_path, ctx.dir / "model" / "tokenizer.json")


def _data_settings(r):
    files = [f for source in r.data.source.split(",") for f in source_files(source.strip())]
    return {"data": r.data, "inputs": files_digest(files)}


def _model_settings(r):
    return {"model": r.model, "train": r.train, "seed": r.seed, "device": r.device}


def _sft_settings(r):
    inputs = [] if r.sft.data == "docstrings" else [Path(r.sft.data)]
    return {"sft": r.sft, "seed": r.seed, "device": r.device,
            "inputs": files_digest([p for p in inputs if p.is_file()])}


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("data", "raw text (--data, or the built-in stdlib corpus): normalise, dedup, "
          "filter -> data/documents/*.parquet (+ rejects/ with reasons, datacard)", (),
          _data_settings, run_data),
    Stage("tokenizer", "data/documents -> tokenizer/tokenizer.json (byte-level BPE)",
          ("data",), lambda r: r.tokenizer, run_tokenizer),
    Stage("tokenize", "documents + tokenizer -> tokenize/{train,val}.bin token shards, "
          "document index, shards.json",
          ("data", "tokenizer"), lambda r: r.tokenize, run_tokenize),
    Stage("pretrain", "token shards -> pretrain/model/ (+ checkpoints/, metrics.jsonl); "
          "resumes if interrupted; every rank trains under torchrun", ("tokenizer", "tokenize"),
          _model_settings, run_pretrain, distributed=True),
    Stage("sft", "pretrain/model + docstring->code chats from the documents -> sft/model/ "
          "(loss on assistant tokens only)", ("data", "tokenizer", "pretrain"),
          _sft_settings, run_sft, distributed=True),
    Stage("eval", "pretrain/model, sft/model + val shard -> eval/eval.json (val loss, bits "
          "per byte, greedy samples)",
          ("tokenizer", "tokenize", "pretrain", "sft"), lambda r: r.eval, run_eval),
    Stage("export", "sft/model (or pretrain/model) -> export/model/ (Hugging Face Llama layout)",
          ("tokenizer", "pretrain", "sft"), lambda r: r.export, run_export),
    Stage("report", "every stage's summaries and metrics -> report.html",
          ("data", "tokenizer", "tokenize", "pretrain", "sft", "eval"), lambda r: {},
          run_report),
]}
