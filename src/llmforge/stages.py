"""The stages of a model's life, each reading its upstream stages' files and writing its own.

Each function here is glue: it finds its inputs in the run directory, calls the module that does
the work, and returns a summary. The work itself lives in data/, tokenizer/, model/, train/,
align/, eval/ and report/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from llmforge import distributed
from llmforge.align import dpo, finetune, grpo, sft
from llmforge.align.pairs import load_pairs
from llmforge.align.reward import (
    RewardModel,
    preference_accuracy,
    reward_objective,
    save_reward_model,
)
from llmforge.compress import distill, prune
from llmforge.data import curate
from llmforge.data.datacard import write_datacard
from llmforge.data.sources import source_files
from llmforge.eval import evaluate
from llmforge.model.io import load_model, save_model
from llmforge.model.transformer import Transformer
from llmforge.report import write_report
from llmforge.runs import Stage, StageContext, files_digest
from llmforge.serve.chat_model import GGUF_PREFIX, ChatModel, open_chat_model, save_chat_model
from llmforge.tokenizer import (
    BOS,
    load_tokenizer,
    open_shard,
    tokenize_documents,
    train_tokenizer,
)
from llmforge.train import loop
from llmforge.train.data import RandomWindows, count_windows, sequential_windows
from llmforge.train.device import autocast, pick_device
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
    spec, chat, trainable = _open_base(ctx, cfg, "pretrain")
    model = chat.model
    examples, skipped = sft.load_examples(cfg, _documents(ctx) if "data" in ctx.upstream else None)
    val = [e for e in examples if sft.is_validation(e.id, cfg.val_fraction)]
    train = [e for e in examples if not sft.is_validation(e.id, cfg.val_fraction)]
    pad, seq_len = _pad_id(chat), cfg.train.seq_len
    dist = distributed.info()
    if cfg.packing:  # whole conversations side by side in each row, attention kept apart
        train_rows, skipped_train = sft.pack_examples(chat.format, train, seq_len, pad)
        batches = sft.PackedBatches(train_rows, cfg.train.batch_size, recipe.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    else:
        train_rows, skipped_train = sft.encode_examples(chat.format, train, seq_len)
        batches = sft.ExampleBatches(train_rows, cfg.train.batch_size, pad, recipe.seed,
                                     rank=dist.rank, world_size=dist.world_size)
    val_rows, skipped_val = sft.encode_examples(chat.format, val, seq_len)
    skipped = dict(skipped + skipped_train + skipped_val)
    rows = "packed rows" if cfg.packing else "examples"
    ctx.log.info(f"{trainable['method']} fine-tuning of {spec}: {trainable['trainable_params']:,}"
                 f" of {trainable['params']:,} parameters train; {len(train_rows):,} train "
                 f"{rows} / {len(val_rows):,} val examples; set aside: {skipped or 'none'}")
    if not val_rows:
        raise ValueError("sft: no validation examples; raise sft.val_fraction")

    def val_loss() -> float:
        chunks = range(0, len(val_rows), cfg.train.batch_size)
        batches = (sft.pad_batch(val_rows[i : i + cfg.train.batch_size], pad) for i in chunks)
        total, count = evaluate.summed_loss(model, batches, cfg.train.dtype)
        return total / count

    before = val_loss()
    summary = loop.train(model, cfg.train, batches, ctx, evaluate=val_loss)
    finetune.save_trained(chat, cfg, spec, ctx.dir, ctx.is_main)
    return {**summary, **trainable, "val_loss_before": before,
            "train_examples": len(train_rows), "val_examples": len(val_rows),
            "set_aside": skipped}


def run_dpo(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.dpo
    torch.manual_seed(recipe.seed)
    spec, chat, trainable = _open_base(ctx, cfg, "sft")
    train_rows, val_rows, skipped = _preference_rows(ctx, cfg, chat, spec, trainable)
    pad, model = _pad_id(chat), chat.model
    device = next(model.parameters()).device

    def held_out() -> dict:
        with autocast(device, cfg.train.dtype):
            return dpo.held_out(model, val_rows, val_reference, pad, cfg)

    # The policy starts as the reference: its log-probs now are the reference's, kept for good,
    # computed in the precision training runs in, so that training starts at exactly log 2.
    with autocast(device, cfg.train.dtype):
        reference = dpo.reference_logprobs(model, train_rows, pad)
        val_reference = dpo.reference_logprobs(model, val_rows, pad)
    before = held_out()
    dist = distributed.info()
    batches = dpo.PreferenceBatches(train_rows, reference, cfg.train.batch_size, pad,
                                    recipe.seed, rank=dist.rank, world_size=dist.world_size)
    measured = _Measured(held_out)
    summary = loop.train(model, cfg.train, batches, ctx, objective=cfg.objective(),
                         evaluate=lambda: measured()["loss"])
    after = measured.final()
    ctx.log.info(f"held-out: chosen more likely than rejected {before['logp_accuracy']:.3f} -> "
                 f"{after['logp_accuracy']:.3f}; reward accuracy {after['rewards/accuracy']:.3f}, "
                 f"margin {after['rewards/margins']:.4f}")
    finetune.save_trained(chat, cfg, spec, ctx.dir, ctx.is_main)
    return {**summary, **trainable, "held_out_before": before, "held_out_after": after,
            "train_pairs": len(train_rows), "held_out_pairs": len(val_rows),
            "set_aside": skipped}


def run_reward(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.reward
    torch.manual_seed(recipe.seed)
    spec, chat, trainable = _open_base(ctx, cfg, "sft")
    train_rows, val_rows, skipped = _preference_rows(ctx, cfg, chat, spec, trainable)
    pad, scorer = _pad_id(chat), RewardModel(chat.model)
    dist = distributed.info()
    batches = dpo.PreferenceBatches(train_rows, None, cfg.train.batch_size, pad, recipe.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    measured = _Measured(lambda: preference_accuracy(scorer, val_rows, pad))
    summary = loop.train(scorer, cfg.train, batches, ctx, objective=reward_objective(cfg.margin),
                         benchmark=lambda: {"held_out_accuracy": measured()["accuracy"]})
    held_out = measured.final()
    ctx.log.info(f"held-out accuracy {held_out['accuracy']:.3f} (chance 0.5), mean margin "
                 f"{held_out['margin']:.3f} over {held_out['pairs']} pairs")
    finetune.save_trained(chat, cfg, spec, ctx.dir, ctx.is_main)
    if ctx.is_main:
        save_reward_model(scorer, ctx.dir / "model")
    return {**summary, **trainable, "held_out": held_out, "train_pairs": len(train_rows),
            "set_aside": skipped}


def run_grpo(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.grpo
    torch.manual_seed(recipe.seed)
    spec, chat, trainable = _open_base(ctx, cfg, "sft")
    model = chat.model
    tasks, skipped = grpo.load_tasks(cfg, seed=recipe.seed)
    train_tasks, val_tasks = grpo.split_tasks(tasks, cfg.val_prompts)
    reward = grpo.task_reward(cfg)
    # With LoRA the reference is the base (adapters off); a full fine-tune keeps a frozen copy.
    reference = copy.deepcopy(model).requires_grad_(False).eval() \
        if cfg.kl_coef and cfg.lora is None else None
    dist = distributed.info()
    batches = grpo.GRPOBatches(model, chat.format, chat.tokenizer, chat.stop_ids, train_tasks,
                               reward, cfg, recipe.seed, rank=dist.rank,
                               world_size=dist.world_size, reference=reference)
    skipped = dict(skipped + batches.skipped)
    ctx.log.info(f"{trainable['method']} GRPO of {spec}: {len(batches.tasks):,} train / "
                 f"{len(val_tasks):,} held-out tasks; set aside: {skipped or 'none'}")

    def held_out() -> dict:
        return grpo.evaluate_tasks(model, chat.format, chat.tokenizer, chat.stop_ids, val_tasks,
                                   reward, cfg.max_new_tokens) if val_tasks else {}

    before = held_out()
    summary = loop.train(model, cfg.train, batches, ctx, objective=grpo.grpo_objective(cfg))
    after = held_out()
    if after:
        ctx.log.info(f"held-out greedy reward {before['reward']:.3f} -> {after['reward']:.3f}")
    finetune.save_trained(chat, cfg, spec, ctx.dir, ctx.is_main)
    return {**summary, **trainable, "held_out_before": before, "held_out_after": after,
            "train_tasks": len(batches.tasks), "set_aside": skipped}


def run_distill(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.distill
    torch.manual_seed(recipe.seed)
    spec = finetune.base_spec(cfg, ctx.upstream.get("sft"), "teacher")
    teacher, student, built = distill.open_models(cfg, spec, pick_device(recipe.device),
                                                  seed=recipe.seed)
    train_rows, val_rows, skipped = distill.load_rows(
        cfg, teacher, _documents(ctx) if "data" in ctx.upstream else None)
    val_rows = val_rows[: cfg.train.eval_batches * cfg.train.batch_size]
    copied = built["copied_layers"]
    ctx.log.info(f"distilling {spec} ({built['teacher_params']:,} parameters, "
                 f"{built['teacher_layers']} blocks) into a {built['student_params']:,}-parameter "
                 f"student ({built['student_layers']} blocks, "
                 f"{f'teacher blocks {copied}' if copied else built['student_init'] + ' init'}); "
                 f"{len(train_rows):,} train / {len(val_rows):,} held-out rows; set aside: "
                 f"{dict(skipped) or 'none'}")
    if not train_rows or not val_rows:
        raise ValueError(f"distill: {len(train_rows)} train and {len(val_rows)} held-out rows; "
                         f"need both (check distill.data, max_rows and val_fraction)")
    pad, model = _pad_id(teacher), student.model
    dist = distributed.info()
    batches = sft.ExampleBatches(train_rows, cfg.train.batch_size, pad, recipe.seed,
                                 rank=dist.rank, world_size=dist.world_size)

    def held_out() -> dict:
        return distill.held_out(model, teacher.model, val_rows, pad, cfg)

    before = held_out()
    measured = _Measured(held_out)
    summary = loop.train(model, cfg.train, batches, ctx,
                         objective=distill.distill_objective(teacher.model, cfg),
                         evaluate=lambda: measured()["loss"],
                         benchmark=lambda: {f"val_{k}": measured.last[k]
                                            for k in ("kl", "ce", "top1_agreement")})
    after = measured.final()
    ctx.log.info(f"held-out student: KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f}, "
                 f"CE {before['ce']:.4f} -> {after['ce']:.4f} (teacher {after['teacher_ce']:.4f}),"
                 f" top-1 agreement {before['top1_agreement']:.3f} -> "
                 f"{after['top1_agreement']:.3f}")
    state = full_state_dict(model)  # collective: every rank takes part
    if ctx.is_main:
        save_chat_model(student, ctx.dir / "model", state=state)
    return {**summary, **built, "held_out_before": before, "held_out_after": after,
            "teacher_held_out_ce": after["teacher_ce"], "train_rows": len(train_rows),
            "held_out_rows": len(val_rows), "set_aside": dict(skipped)}


def _distill_needs(r) -> tuple[str, ...]:
    return (() if r.distill.teacher else ("sft",)) + (() if r.distill.data else ("data",))


def _distill_settings(r):
    cfg = r.distill
    models = [f for spec in (cfg.teacher, cfg.student.base)
              for f in _base_files(finetune.FinetuneConfig(base=spec))]
    inputs = source_files(cfg.data) if cfg.data else []
    return {"distill": cfg, "seed": r.seed, "device": r.device,
            "inputs": files_digest(inputs + models)}


def run_prune(ctx: StageContext) -> dict:
    recipe, cfg = ctx.recipe, ctx.recipe.prune
    rc = cfg.recovery
    torch.manual_seed(recipe.seed)
    if not cfg.data:
        raise ValueError("prune: set prune.data to a text file (recovery trains on its head, "
                         "held-out loss is measured on its tail)")
    dist = distributed.info()
    if cfg.method == "magnitude" and rc.parallel == "fsdp" and dist.world_size > 1:
        raise ValueError("prune: magnitude masks hold under prune.recovery.parallel=ddp only "
                         "(FSDP2 replaces the parameters they are attached to)")
    spec = finetune.base_spec(cfg, ctx.upstream.get("sft"))
    chat = open_chat_model(spec, device=pick_device(recipe.device))
    if rc.seq_len > chat.model.cfg.max_seq_len:
        raise ValueError(f"prune.recovery.seq_len={rc.seq_len} exceeds the model's "
                         f"max_seq_len={chat.model.cfg.max_seq_len}")
    train_tokens, val_tokens = prune.split_tokens(prune.read_tokens(cfg.data, chat.tokenizer),
                                                  cfg.val_fraction, rc.seq_len)
    calibration_tokens = prune.read_tokens(cfg.calibration, chat.tokenizer) \
        if cfg.calibration else train_tokens
    calibration = prune.calibration_batches(calibration_tokens, rc.seq_len,
                                            cfg.calibration_rows, rc.batch_size, recipe.seed)
    val_windows = count_windows(len(val_tokens), rc.seq_len, rc.eval_batches * rc.batch_size)

    def held_out() -> float:
        windows = sequential_windows(val_tokens, rc.seq_len, rc.batch_size, val_windows)
        total, count = evaluate.summed_loss(chat.model, windows, rc.dtype)
        return total / count

    before, shape_before, params_before = held_out(), _shape(chat.model), chat.model.num_params()
    pruned = prune.prune(chat.model, cfg, calibration, rc.dtype)
    chat.model, masks = pruned.model, pruned.masks
    after_pruning, params_after = held_out(), chat.model.num_params()
    ctx.log.info(f"{cfg.method} pruning of {spec}: {params_before:,} -> {params_after:,} "
                 f"parameters; held-out loss {before:.4f} -> {after_pruning:.4f}")

    def val_loss() -> float:
        if masks is not None:
            masks.apply()
        return held_out()

    recovery, recovered = {}, after_pruning
    if rc.max_steps:
        batches = RandomWindows(train_tokens, rc.seq_len, rc.batch_size, recipe.seed,
                                rank=dist.rank, world_size=dist.world_size)
        measured = _Measured(val_loss)
        with masks.held() if masks is not None else contextlib.nullcontext():
            recovery = loop.train(chat.model, rc, batches, ctx, evaluate=measured,
                                  objective=masks.objective() if masks else loop.lm_objective)
        recovered = measured.final()
        ctx.log.info(f"recovery: held-out loss {after_pruning:.4f} -> {recovered:.4f} "
                     f"(before pruning {before:.4f})")
    state = full_state_dict(chat.model)  # collective: every rank takes part
    if ctx.is_main:
        save_chat_model(chat, ctx.dir / "model", state=state)
    report = dict(pruned.report)
    if masks is not None:  # counted again after recovery: the zeros held
        report["zero_weights"], _ = masks.zeros()
        report["on_disk"] = ("dense layout: the zeros are stored, so the model directory is as "
                             "large as an unpruned one")
    return {"base": spec, "method": cfg.method, "params_before": params_before,
            "params_after": params_after, "shape_before": shape_before,
            "shape_after": _shape(chat.model), **report,
            "held_out": {name: {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 3)}
                         for name, loss in (("before", before), ("pruned", after_pruning),
                                            ("recovered", recovered))},
            "held_out_tokens": val_windows * rc.seq_len, "train_tokens": len(train_tokens),
            "calibration_rows": cfg.calibration_rows, "recovery": recovery}


def _shape(model: Transformer) -> dict:
    c = model.cfg
    return {"n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "hidden": c.hidden}


def _prune_settings(r):
    inputs = [Path(p) for p in (r.prune.data, r.prune.calibration) if p]
    return {"prune": r.prune, "seed": r.seed, "device": r.device,
            "inputs": files_digest([p for p in inputs if p.is_file()] + _base_files(r.prune))}


class _Measured:
    """A held-out measurement the loop takes at each evaluation, remembered: the loop always
    evaluates after its last step, so the stage's final numbers are that one, not a second
    pass over the held-out set (measured afresh only when no step ran, as on a finished run)."""

    def __init__(self, measure: Callable[[], dict]):
        self.measure, self.last = measure, None

    def __call__(self) -> dict:
        self.last = self.measure()
        return self.last

    def final(self) -> dict:
        return self.last if self.last is not None else self()


def _open_base(ctx: StageContext, cfg: finetune.FinetuneConfig,
               upstream: str) -> tuple[str, ChatModel, dict]:
    """(spec, opened model ready to train, what trains) for an alignment stage."""
    spec = finetune.base_spec(cfg, ctx.upstream.get(upstream))
    chat, trainable = finetune.open_for_training(cfg, spec, pick_device(ctx.recipe.device))
    return spec, chat, trainable


def _preference_rows(ctx: StageContext, cfg, chat: ChatModel, spec: str, trainable: dict):
    """Train and held-out (chosen, rejected) rows of cfg.data, and what was set aside."""
    pairs, skipped = load_pairs(Path(cfg.data), cfg.max_pairs)
    val = [p for p in pairs if sft.is_validation(p.id, cfg.val_fraction)]
    train = [p for p in pairs if not sft.is_validation(p.id, cfg.val_fraction)]
    train_rows, skipped_train = dpo.encode_pairs(chat.format, train, cfg.train.seq_len)
    val_rows, skipped_val = dpo.encode_pairs(chat.format, val, cfg.train.seq_len)
    skipped = dict(skipped + skipped_train + skipped_val)
    ctx.log.info(f"{trainable['method']} {ctx.name} of {spec}: {trainable['trainable_params']:,}"
                 f" of {trainable['params']:,} parameters train; {len(train_rows):,} train / "
                 f"{len(val_rows):,} held-out pairs; set aside: {skipped or 'none'}")
    if not val_rows or not train_rows:
        raise ValueError(f"{ctx.name}: {len(train_rows)} train and {len(val_rows)} held-out "
                         f"pairs; need both (check {ctx.name}.data and val_fraction)")
    return train_rows, val_rows, skipped


def _pad_id(chat: ChatModel) -> int:
    """A token to fill rows with (never a target): the tokenizer's pad, else the first stop."""
    pad = chat.tokenizer.token_to_id("<|pad|>")
    return chat.stop_ids[0] if pad is None else pad


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
    out = ctx.dir / "model"
    save_chat_model(open_chat_model(str(ctx.input(cfg.source) / "model")), out, hf=True,
                    dtype=getattr(torch, cfg.dtype))
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
            "inputs": files_digest([p for p in inputs if p.is_file()] + _base_files(r.sft))}


def _sft_needs(r) -> tuple[str, ...]:
    return (("data",) if r.sft.data == "docstrings" else ()) + (() if r.sft.base else
                                                                ("pretrain",))


def _preference_settings(section: str):
    def settings(r):
        cfg = getattr(r, section)
        return {section: cfg, "seed": r.seed, "device": r.device,
                "inputs": files_digest([Path(cfg.data), *_base_files(cfg)])}

    return settings


def _grpo_settings(r):
    inputs = [Path(r.grpo.data)] if r.grpo.data != grpo.ARITHMETIC else []
    if r.grpo.reward:
        inputs.append(Path(r.grpo.reward.rpartition(":")[0]))
    return {"grpo": r.grpo, "seed": r.seed, "device": r.device,
            "inputs": files_digest([p for p in inputs if p.is_file()] + _base_files(r.grpo))}


def _base_files(cfg: finetune.FinetuneConfig) -> list[Path]:
    """The files of a base model named by path, so that replacing them reruns the stage."""
    from llmforge.interop.gguf import resolve_gguf_path

    gguf = cfg.base.startswith(GGUF_PREFIX)
    path = resolve_gguf_path(cfg.base.removeprefix(GGUF_PREFIX)) if gguf else Path(cfg.base)
    if not cfg.base or not path.exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


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
    Stage("sft", "pretrain/model (or sft.base) + chats (sft.data, by default docstring->code "
          "from the documents) -> sft/model/ (loss on assistant tokens only; full or LoRA)",
          _sft_needs, _sft_settings, run_sft, distributed=True),
    Stage("dpo", "sft/model (or dpo.base) + preference pairs (dpo.data) -> dpo/model/ (DPO with "
          "stored reference log-probs; full or LoRA)", lambda r: () if r.dpo.base else ("sft",),
          _preference_settings("dpo"), run_dpo, distributed=True),
    Stage("reward", "sft/model (or reward.base) + preference pairs (reward.data) -> reward/model/ "
          "(a scalar head, Bradley-Terry loss, held-out accuracy)",
          lambda r: () if r.reward.base else ("sft",), _preference_settings("reward"),
          run_reward, distributed=True),
    Stage("grpo", "sft/model (or grpo.base) + verifiable tasks (grpo.data) -> grpo/model/ (GRPO "
          "with G samples per prompt from the engine)",
          lambda r: () if r.grpo.base else ("sft",), _grpo_settings, run_grpo,
          distributed=True),
    Stage("distill", "distill.teacher (or sft/model) + text (distill.data, by default the "
          "documents) -> distill/model/ (a smaller student, by default half the teacher's "
          "blocks, trained on the teacher's softened logits and the data; held-out KL and CE "
          "before and after)",
          _distill_needs, _distill_settings, run_distill, distributed=True),
    Stage("prune", "prune.base (or sft/model) -> prune/model/ (magnitude sparsity, or whole "
          "heads, MLP channels or blocks removed by calibration importance; a short recovery "
          "fine-tune; held-out perplexity before, after pruning, after recovery)",
          lambda r: () if r.prune.base else ("sft",), _prune_settings, run_prune,
          distributed=True),
    Stage("eval", "pretrain/model, sft/model + val shard -> eval/eval.json (val loss, bits "
          "per byte, greedy samples)",
          ("tokenizer", "tokenize", "pretrain", "sft"), lambda r: r.eval, run_eval),
    Stage("export", "sft/model (or pretrain/model) -> export/model/ (Hugging Face Llama layout)",
          ("tokenizer", "pretrain", "sft"), lambda r: r.export, run_export),
    Stage("report", "every stage's summaries and metrics -> report.html",
          ("data", "tokenizer", "tokenize", "pretrain", "sft", "eval"), lambda r: {},
          run_report),
]}
