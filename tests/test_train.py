"""The training loop: schedule, optimizer groups, batches, checkpoints and exact resume."""

import contextlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.runs import StageContext
from llmforge.train import checkpoint, flops, loop
from llmforge.train.data import RandomWindows, sequential_windows
from llmforge.train.device import autocast, cpu_has_bf16, pick_device, use_bf16
from llmforge.train.loop import TrainConfig, lr_at, make_optimizers, train
from llmforge.train.muon import Muon

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
# A periodic stream: easy to learn, so a few steps must bring the loss down.
TOKENS = np.tile(np.arange(3, 19, dtype=np.uint16), 200)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def new_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG)


def make_ctx(tmp_path: Path, name: str = "train") -> StageContext:
    stage_dir = tmp_path / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, dir=stage_dir, root=tmp_path, recipe=None,
                        log=logging.getLogger(f"tests.train.{name}"))


def small_cfg(**changes) -> TrainConfig:
    base = dict(seq_len=16, batch_size=4, max_steps=8, lr=1e-2, warmup_steps=2, ckpt_every=3,
                keep_last=2, log_every=2, eval_every=4, dtype="fp32")
    return TrainConfig(**{**base, **changes})


def read_metrics(ctx: StageContext) -> list[dict]:
    return [json.loads(line) for line in (ctx.dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(ctx: StageContext) -> list[str]:
    return [p.name for p in checkpoint.list_checkpoints(ctx.dir / "checkpoints")]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class Interrupt(Exception):
    pass


# ---- learning-rate schedule and optimizer ----------------------------------------------------


def test_lr_warmup_peak_and_cosine_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    warm = [lr_at(s, cfg) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(9, cfg) == pytest.approx(1.0)  # warmup ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1.0)  # and decay starts from it
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)  # floor = lr * min_lr_ratio
    assert lr_at(10_000, cfg) == pytest.approx(0.1)  # and it stays there
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(decay, decay[1:], strict=False))
    assert all(0.1 - 1e-12 <= x <= 1.0 for x in decay)


def test_lr_without_warmup_starts_at_peak():
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, max_steps=100, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(3e-3)
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25, cfg) == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_only_on_matrices():
    model = new_model()
    model.norm.weight.requires_grad_(False)  # frozen parameters are not optimised at all
    cfg = TrainConfig(weight_decay=0.1, lr=0.5, beta1=0.8, beta2=0.9)
    (opt,) = make_optimizers(model, cfg)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert plain == {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")}
    assert "tok_emb.weight" in decayed and "layers.1.mlp.w_down.weight" in decayed
    assert "norm.weight" not in decayed | plain
    assert len(decayed) + len(plain) == len(list(model.parameters())) - 1
    for group in opt.param_groups:
        assert group["lr"] == 0.5 and group["betas"] == (0.8, 0.9)


# ---- batches ---------------------------------------------------------------------------------


def test_random_windows_are_a_pure_function_of_step_and_micro():
    stream = np.arange(1000, dtype=np.uint16)
    windows = RandomWindows(stream, seq_len=16, batch_size=4, seed=7)
    x, y = windows(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    x2, y2 = RandomWindows(stream, 16, 4, seed=7)(3, 1)  # a fresh object: no hidden state
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, windows(3, 0)[0])
    assert not torch.equal(x, windows(4, 1)[0])
    assert not torch.equal(x, RandomWindows(stream, 16, 4, seed=8)(3, 1)[0])
    # Each row is a contiguous slice of the stream and the targets are it shifted by one.
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:
        start = int(row[0])
        assert torch.equal(row, torch.from_numpy(stream[start : start + 16].astype(np.int64)))


def test_ranks_split_the_global_batch_without_overlap_or_gap():
    whole = RandomWindows(TOKENS, 16, 6, seed=2)(4, 1)[0]
    halves = [RandomWindows(TOKENS, 16, 3, seed=2, rank=r, world_size=2)(4, 1)[0]
              for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_document_ids_count_document_starts():
    tokens = np.array([0, 5, 6, 0, 7, 8, 9, 0, 4, 4], dtype=np.uint16)
    x, y, doc_ids = RandomWindows(tokens, 9, 1, seed=0, doc_start=0)(0, 0)
    assert torch.equal(doc_ids, (x == 0).cumsum(1))
    assert doc_ids.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3]]


def test_random_windows_stay_inside_the_stream():
    stream = np.arange(40, dtype=np.uint16)
    windows = RandomWindows(stream, seq_len=16, batch_size=8, seed=0)
    for step in range(50):
        x, y = windows(step, 0)
        assert int(x.min()) >= 0 and int(y.max()) <= 39


def test_random_windows_need_enough_tokens():
    with pytest.raises(ValueError, match="only 10 training tokens"):
        RandomWindows(np.arange(10), seq_len=16, batch_size=2, seed=0)


def test_random_windows_can_reach_the_last_token():
    stream = np.arange(18, dtype=np.uint16)  # seq_len + 2: windows may start at 0 or 1
    windows = RandomWindows(stream, seq_len=16, batch_size=1, seed=0)
    starts = {int(windows(step, 0)[0][0, 0]) for step in range(100)}
    assert starts == {0, 1}


def test_sequential_windows_cover_the_stream_without_overlap():
    stream = np.arange(103, dtype=np.uint16)
    batches = list(sequential_windows(stream, seq_len=10, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.arange(100))  # every input once, in order
    assert torch.equal(y.flatten(), torch.arange(1, 101))  # targets shifted by one


def test_sequential_windows_limits():
    stream = np.arange(103, dtype=np.uint16)
    batches = list(sequential_windows(stream, seq_len=10, batch_size=4, max_windows=3))
    assert len(batches) == 1 and torch.equal(batches[0][0].flatten(), torch.arange(30))
    exact = list(sequential_windows(np.arange(21), seq_len=10, batch_size=8))
    assert exact[0][0].shape == (2, 10)  # 21 tokens hold exactly two windows with targets
    assert list(sequential_windows(np.arange(10), seq_len=10, batch_size=8)) == []


# ---- device and precision --------------------------------------------------------------------


def test_use_bf16_rejects_unknown_dtype():
    for bad in ("fp16", "bfloat16", "", "BF16"):
        with pytest.raises(ValueError, match=repr(bad)):
            use_bf16(CPU, bad)
    assert use_bf16(CPU, "bf16") is True
    assert use_bf16(CPU, "fp32") is False
    assert use_bf16(CPU, "auto") is cpu_has_bf16()
    assert use_bf16(torch.device("meta"), "auto") is False


def test_autocast_follows_the_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32
    assert isinstance(autocast(CPU, "fp32"), contextlib.nullcontext)


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == CPU
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


# ---- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = new_model(0)
    cfg = small_cfg()
    (opt,) = make_optimizers(model, cfg)
    x, y = RandomWindows(TOKENS, 16, 4, seed=0)(0, 0)
    model(x, y).backward()
    opt.step()
    path = checkpoint.save(tmp_path, 5, model, [opt], extra={"note": "kept"})
    assert path == tmp_path / "step_0000005"
    state = {"step": 5, "world_size": 1, "note": "kept"}
    assert json.loads((path / "state.json").read_text()) == state

    other = new_model(1)
    (other_opt,) = make_optimizers(other, cfg)
    assert checkpoint.resume(tmp_path, other, [other_opt]) == (5, state)
    assert_same_weights(model, other)
    saved, loaded = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for key in saved:
        for name, value in saved[key].items():
            assert torch.equal(value, loaded[key][name])


def test_resume_without_checkpoints_is_step_zero(tmp_path):
    model = new_model()
    optimizers = make_optimizers(model, small_cfg())
    assert checkpoint.resume(tmp_path / "none", model, optimizers) == (0, {})
    assert checkpoint.list_checkpoints(tmp_path / "none") == []


def test_keep_last(tmp_path):
    model = new_model()
    opt = make_optimizers(model, small_cfg())
    for step in (1, 2, 3, 10):
        checkpoint.save(tmp_path / "k2", step, model, opt, keep_last=2)
        checkpoint.save(tmp_path / "all", step, model, opt, keep_last=0)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "k2")]
    assert names == ["step_0000003", "step_0000010"]  # numeric order, newest kept
    assert len(checkpoint.list_checkpoints(tmp_path / "all")) == 4  # 0 keeps everything


def test_leftover_tmp_checkpoint_is_ignored(tmp_path):
    model = new_model()
    opt = make_optimizers(model, small_cfg())
    checkpoint.save(tmp_path, 2, model, opt)
    junk = tmp_path / ".tmp_step_0000004"  # a save killed halfway
    junk.mkdir()
    (junk / ".metadata").write_bytes(b"not a DCP metadata file")
    (tmp_path / "step_0000009.txt").write_text("a file, not a checkpoint")
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "step_0000002"]
    other = new_model(1)
    assert checkpoint.resume(tmp_path, other, make_optimizers(other, small_cfg()))[0] == 2


def test_train_ignores_leftover_tmp_checkpoint(tmp_path):
    ctx = make_ctx(tmp_path)
    model = new_model()
    checkpoint.save(ctx.dir / "checkpoints", 4, model, make_optimizers(model, small_cfg()))
    junk = ctx.dir / "checkpoints" / ".tmp_step_0000006"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"garbage")
    steps = []
    source = RandomWindows(TOKENS, 16, 4, seed=0)

    def batches(step, micro):
        steps.append(step)
        return source(step, micro)

    train(model, small_cfg(ckpt_every=2), batches, ctx)
    assert steps == [4, 5, 6, 7]
    assert checkpoint_names(ctx) == ["step_0000006", "step_0000008"]
    assert not junk.exists()  # overwritten by the real step-6 save


# ---- training --------------------------------------------------------------------------------


def test_loss_goes_down(tmp_path):
    ctx = make_ctx(tmp_path)
    model = new_model()
    cfg = small_cfg(seq_len=32, batch_size=4, max_steps=20, lr=2e-2, warmup_steps=2,
                    log_every=5, eval_every=10, ckpt_every=10)
    evaluated = []

    def evaluate() -> float:
        evaluated.append(model.training)
        return 1.25

    summary = train(model, cfg, RandomWindows(TOKENS, 32, 4, seed=0), ctx, evaluate=evaluate)
    assert summary["steps"] == 20
    assert summary["tokens_seen"] == 20 * 4 * 32
    assert summary["first_loss"] == pytest.approx(math.log(64), rel=0.1)  # starts near uniform
    assert summary["final_loss"] < 0.25 * summary["first_loss"]
    assert summary["val_loss"] == 1.25
    assert len(evaluated) == 2 and model.training  # back in train mode after evaluating

    records = read_metrics(ctx)
    assert [r["step"] for r in records] == list(range(1, 21))
    assert [r["lr"] for r in records] == [lr_at(s, cfg) for s in range(20)]
    assert [r["step"] for r in records if "grad_norm" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    assert records[0]["loss"] == round(summary["first_loss"], 5)
    assert records[-1]["loss"] == round(summary["final_loss"], 5)
    assert checkpoint_names(ctx) == ["step_0000010", "step_0000020"]


def test_muon_with_checkpointing_and_trackers(tmp_path):
    ctx = make_ctx(tmp_path)
    model = new_model()
    cfg = small_cfg(seq_len=32, max_steps=20, lr=2e-2, optimizer="muon", log_every=5,
                    activation_checkpointing=True,
                    tracking=loop.TrackingConfig(tensorboard=True))
    summary = train(model, cfg, RandomWindows(TOKENS, 32, 4, seed=0), ctx)
    assert summary["final_loss"] < 0.25 * summary["first_loss"]
    muon, adamw = make_optimizers(model, cfg)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert model.layers[0].attn.wq.weight in muon.param_groups[0]["params"]
    logged = [r for r in read_metrics(ctx) if "tokens_per_s" in r]
    assert logged and all(r["mem_gib"] > 0 for r in logged)  # peak memory on logging steps
    assert list((ctx.dir / "tensorboard").glob("events.out.tfevents.*"))


def test_benchmark_scores_are_logged_at_each_evaluation(tmp_path):
    ctx = make_ctx(tmp_path)
    model = new_model()
    calls = []

    def benchmark() -> dict[str, float]:
        calls.append(model.training)
        return {"core": 0.125}

    train(model, small_cfg(max_steps=8, eval_every=4), RandomWindows(TOKENS, 16, 4, seed=0),
          ctx, benchmark=benchmark)
    assert [r["step"] for r in read_metrics(ctx) if "core" in r] == [4, 8]
    assert len(calls) == 2 and model.training


def test_grad_accum_draws_every_micro_batch(tmp_path):
    calls = []
    source = RandomWindows(TOKENS, 16, 2, seed=0)

    def batches(step, micro):
        calls.append((step, micro))
        return source(step, micro)

    summary = train(new_model(), small_cfg(max_steps=3, grad_accum=2, batch_size=2), batches,
                    make_ctx(tmp_path))
    assert calls == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert summary["tokens_seen"] == 3 * 2 * 16 * 2


def test_keep_last_during_training(tmp_path):
    ctx = make_ctx(tmp_path)
    train(new_model(), small_cfg(max_steps=7, ckpt_every=2, keep_last=2),
          RandomWindows(TOKENS, 16, 4, seed=0), ctx)
    assert checkpoint_names(ctx) == ["step_0000006", "step_0000007"]  # the final step too


def run_interrupted(tmp_path: Path, cfg: TrainConfig, crash_at: int):
    """An uninterrupted run and one killed at `crash_at` then rerun: (full, resumed, ...)."""
    source = RandomWindows(TOKENS, cfg.seq_len, cfg.batch_size, seed=3)
    full = new_model()
    full_ctx = make_ctx(tmp_path, "full")
    full_summary = train(full, cfg, source, full_ctx)

    def crashing(step, micro):
        if step == crash_at:
            raise Interrupt
        return source(step, micro)

    ctx = make_ctx(tmp_path, "resumed")
    with pytest.raises(Interrupt):
        train(new_model(), cfg, crashing, ctx)
    steps = []

    def recording(step, micro):
        steps.append(step)
        return source(step, micro)

    resumed = new_model(seed=123)  # a different init: everything must come from the checkpoint
    summary = train(resumed, cfg, recording, ctx)
    return full, full_ctx, full_summary, resumed, ctx, summary, steps


def test_resume_is_exact(tmp_path):
    cfg = small_cfg(max_steps=8, ckpt_every=3, grad_accum=2)
    full, full_ctx, full_summary, resumed, ctx, summary, steps = run_interrupted(tmp_path, cfg, 5)
    assert steps[0] == 3  # resumed from the step-3 checkpoint, not from scratch
    assert sorted(set(steps)) == list(range(3, 8))
    assert_same_weights(full, resumed)
    assert summary["final_loss"] == full_summary["final_loss"]
    # The optimizer state is restored too: the final checkpoints are identical.
    a, b = (checkpointed_optimizer(c.dir / "checkpoints", cfg) for c in (full_ctx, ctx))
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name])


def checkpointed_optimizer(root: Path, cfg: TrainConfig) -> dict:
    """The optimizer state of the newest checkpoint under root."""
    model = new_model(seed=9)
    (optimizer,) = make_optimizers(model, cfg)
    checkpoint.resume(root, model, [optimizer])
    return optimizer.state_dict()["state"]


def test_resume_right_after_a_checkpoint_is_exact(tmp_path):
    cfg = small_cfg(max_steps=7, ckpt_every=3)
    full, _, _, resumed, _, _, steps = run_interrupted(tmp_path, cfg, 6)
    assert steps[0] == 6
    assert_same_weights(full, resumed)


def test_rerun_after_finishing_trains_nothing(tmp_path):
    ctx = make_ctx(tmp_path)
    model = new_model()
    cfg = small_cfg(max_steps=4)
    train(model, cfg, RandomWindows(TOKENS, 16, 4, seed=0), ctx)
    again = new_model(seed=5)

    def never(step, micro):
        raise AssertionError("no step is left to train")

    train(again, cfg, never, ctx)
    assert_same_weights(model, again)


def test_resume_does_not_duplicate_metrics(tmp_path):
    cfg = small_cfg(max_steps=8, ckpt_every=3)
    *_, ctx, _, _ = run_interrupted(tmp_path, cfg, 5)
    assert [r["step"] for r in read_metrics(ctx)] == list(range(1, 9))


def test_resumed_summary_matches_uninterrupted(tmp_path):
    cfg = small_cfg(max_steps=8, ckpt_every=3)
    _, _, full_summary, _, _, summary, _ = run_interrupted(tmp_path, cfg, 5)
    assert summary["first_loss"] == full_summary["first_loss"]


class FakeClock:
    """Stands in for loop.time: one second passes per batch drawn."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def clocked_source(monkeypatch, cfg: TrainConfig):
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    source = RandomWindows(TOKENS, cfg.seq_len, cfg.batch_size, seed=0)

    def batches(step, micro):
        clock.now += 1.0
        return source(step, micro)

    return batches


def test_throughput_is_tokens_over_time(tmp_path, monkeypatch):
    cfg = small_cfg(max_steps=10, log_every=4)
    ctx = make_ctx(tmp_path)
    train(new_model(), cfg, clocked_source(monkeypatch, cfg), ctx)
    rates = {r["step"]: r["tokens_per_s"] for r in read_metrics(ctx) if "tokens_per_s" in r}
    per_step = cfg.batch_size * cfg.seq_len  # one step per second
    assert rates == {4: per_step, 8: per_step, 10: per_step}


def test_throughput_after_resume(tmp_path, monkeypatch):
    cfg = small_cfg(max_steps=8, log_every=4, ckpt_every=3)
    batches = clocked_source(monkeypatch, cfg)
    ctx = make_ctx(tmp_path)

    def crashing(step, micro):
        if step == 3:
            raise Interrupt
        return batches(step, micro)

    with pytest.raises(Interrupt):
        train(new_model(), cfg, crashing, ctx)
    (ctx.dir / "metrics.jsonl").unlink()
    train(new_model(), cfg, batches, ctx)  # resumes at step 3: one step until the step-4 log
    rates = [r["tokens_per_s"] for r in read_metrics(ctx) if "tokens_per_s" in r]
    assert rates == [cfg.batch_size * cfg.seq_len] * 2


# ---- schedules, update guard, MFU ----------------------------------------------------------


def test_wsd_holds_the_peak_then_decays_linearly_to_the_floor():
    cfg = small_cfg(max_steps=100, warmup_steps=10, schedule="wsd", decay_frac=0.2,
                    min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert all(lr_at(s, cfg) == pytest.approx(1e-2) for s in range(10, 81))
    assert lr_at(90, cfg) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    decay = [lr_at(s, cfg) for s in range(80, 100)]
    assert decay == sorted(decay, reverse=True) and decay[-1] > 1e-3 * 0.99


def test_bad_schedule_settings_are_rejected():
    with pytest.raises(ValueError, match="schedule"):
        small_cfg(schedule="linear")
    with pytest.raises(ValueError, match="spike_factor"):
        small_cfg(spike_factor=0.5)


class PoisonedModel(torch.nn.Module):
    """A model whose loss is NaN on the micro-batches a test chooses."""

    def __init__(self, poison_steps: set[int]):
        super().__init__()
        self.inner = new_model()
        self.cfg = self.inner.cfg
        self.poison_steps, self.calls = poison_steps, 0

    def forward(self, x, y, doc_ids=None):
        self.calls += 1
        loss = self.inner(x, y, doc_ids=doc_ids)
        return loss * float("nan") if self.calls in self.poison_steps else loss


def test_a_nan_update_is_skipped_and_logged(tmp_path):
    model = PoisonedModel({3})
    ctx = make_ctx(tmp_path)
    summary = train(model, small_cfg(max_steps=6, peak_tflops=1.0),
                    RandomWindows(TOKENS, 16, 4, seed=0), ctx)
    assert summary["skipped_updates"] == 1
    records = read_metrics(ctx)
    assert [r.get("skipped") for r in records].count("non-finite loss or gradient") == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert summary["final_loss"] < records[0]["loss"]


def test_a_loss_spike_is_skipped():
    guard = loop.UpdateGuard(skip_nonfinite=True, spike_factor=2.0)
    assert [guard.check(x, 1.0) for x in (3.0, 2.9, 2.8)] == [None, None, None]
    assert "spike" in guard.check(9.0, 1.0)
    assert guard.check(2.7, 1.0) is None and guard.skipped == 1


def test_mfu_is_logged_against_the_given_peak(tmp_path):
    ctx = make_ctx(tmp_path)
    train(new_model(), small_cfg(max_steps=4, peak_tflops=0.001),
          RandomWindows(TOKENS, 16, 4, seed=0), ctx)
    logged = [r for r in read_metrics(ctx) if "tokens_per_s" in r]
    per_token = flops.flops_per_token(CFG, 16)
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, rel=0.01)


def test_flops_per_token_counts_matmul_weights_and_attention():
    cfg = ModelConfig(vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1,
                      ffn_hidden=16)
    per_layer = 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16  # q, o; k, v (kv_dim 4); gate, up, down
    expected = 6 * (2 * per_layer + 100 * 8) + 12 * 2 * 8 * 32
    assert flops.flops_per_token(cfg, seq_len=32) == expected
    assert flops.measured_peak_flops("cpu", False, size=256, repeats=1) > 1e8


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = new_model(), new_model()
    batches = RandomWindows(TOKENS, 16, 4, seed=0)
    train(eager, small_cfg(max_steps=3, peak_tflops=1.0), batches, make_ctx(tmp_path, "eager"))
    train(compiled, small_cfg(max_steps=3, peak_tflops=1.0, compile=True), batches,
          make_ctx(tmp_path, "compiled"))
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not any(k.startswith("_orig_mod") for k in compiled.state_dict())
