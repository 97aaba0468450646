"""Knowledge distillation: the loss against a hand computation, the layer-subset student, and the
`llmforge compress distill` stage from a trained teacher to a model directory that serves."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_align_stages import greedy

from llmforge.cli import main
from llmforge.compress.distill import (
    DistillConfig,
    StudentConfig,
    distill_loss,
    make_student,
    open_models,
    spread_layers,
)
from llmforge.config import load_recipe
from llmforge.model.config import ModelConfig
from llmforge.model.io import save_model
from llmforge.model.transformer import Transformer
from llmforge.serve.chat_model import open_chat_model, save_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.sampling import SamplingParams
from llmforge.train import checkpoint
from llmforge.train.loop import TrainConfig, make_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Hello world, say hi again.",
             "def add(a, b):\n    return a + b", "Stop here, then start over.",
             "A lazy dog sleeps in the sun all day."]
TRAIN = ["train.max_steps=30", "train.batch_size=8", "train.seq_len=48", "train.lr=3e-3",
         "train.warmup_steps=3", "train.eval_every=10", "train.ckpt_every=10",
         "train.log_every=5", "train.dtype=fp32", "train.eval_batches=2"]


# --- the loss ---------------------------------------------------------------------------------


def by_hand(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float,
            reverse: bool = False) -> torch.Tensor:
    """The loss written out token by token, in float64: no chunks, no fused gradient."""
    total, count = 0.0, 0
    for row in range(s.size(0)):
        if y[row] == -100:
            continue
        q = torch.softmax(s[row].double() / temperature, -1)
        p = torch.softmax(t[row].double() / temperature, -1)
        kl = (q * (q / p).log()).sum() if reverse else (p * (p / q).log()).sum()
        ce = -torch.log_softmax(s[row].double(), -1)[y[row]]
        total = total + alpha * temperature**2 * kl + (1 - alpha) * ce
        count += 1
    return total / count


@pytest.mark.parametrize("temperature, alpha, kl", [(2.0, 0.5, "forward"), (1.0, 1.0, "forward"),
                                                   (3.0, 1.0, "forward"), (2.0, 0.0, "forward"),
                                                   (0.5, 0.3, "reverse")])
def test_loss_and_gradient_match_a_hand_computation(temperature, alpha, kl):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11) * 3, torch.randn(7, 11) * 3
    y = torch.tensor([3, -100, 0, 10, 5, -100, 2])
    s.requires_grad_(True)
    loss, metrics = distill_loss(s, t, y, temperature=temperature, alpha=alpha, kl=kl,
                                 chunk_rows=3)
    s64 = s.detach().double().requires_grad_(True)
    expected = by_hand(s64, t, y, temperature, alpha, reverse=kl == "reverse")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    expected.backward()
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6)
    assert s.grad[1].abs().sum() == 0 and s.grad[5].abs().sum() == 0  # padding: no gradient
    pure_kl = by_hand(s.detach(), t, y, temperature, 1.0, reverse=kl == "reverse")
    pure_ce = by_hand(s.detach(), t, y, temperature, 0.0)
    assert metrics["soft_kl"] * temperature**2 == pytest.approx(pure_kl.item(), rel=1e-5)
    assert metrics["ce"] == pytest.approx(pure_ce.item(), rel=1e-5)
    if alpha == 1.0:  # pure KL: T^2 * KL, whatever the labels say
        assert loss.item() == pytest.approx(temperature**2 * metrics["soft_kl"], rel=1e-6)
    if alpha == 0.0:  # pure CE: exactly the language-model loss
        assert loss.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_padding_positions_do_not_count():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    y = torch.randint(0, 13, (2, 5))
    y[1, 3:] = -100
    loss, _ = distill_loss(s, t, y)
    s2, t2 = s.clone(), t.clone()
    s2[1, 3:], t2[1, 3:] = 100.0, -100.0  # anything at the padding
    assert distill_loss(s2, t2, y)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert distill_loss(t, t, y, alpha=1.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        distill_loss(s, t[:, :4], y)


# --- the student ------------------------------------------------------------------------------


def test_spread_layers_keeps_the_first_and_last():
    assert spread_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(4, 2) == [0, 3] and spread_layers(5, 1) == [0]
    assert spread_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="the teacher has 4 blocks"):
        spread_layers(4, 5)


def test_layer_subset_student_copies_the_chosen_teacher_weights():
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=6, n_heads=4,
                                      n_kv_heads=2, max_seq_len=64, tie_embeddings=False))
    student, layers = make_student(teacher, StudentConfig(layers=[0, 2, 5]))
    assert layers == [0, 2, 5] and student.cfg.n_layers == 3 and student.cfg.dim == 32
    for j, i in enumerate(layers):
        for (name, a), (_, b) in zip(student.layers[j].state_dict().items(),
                                     teacher.layers[i].state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    for name in ("tok_emb.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    student.tok_emb.weight.data.zero_()  # a copy, not a view of the teacher's
    assert teacher.tok_emb.weight.abs().sum() > 0
    whole, _ = make_student(teacher, StudentConfig(n_layers=6))  # every block: the teacher
    x = torch.randint(0, 50, (2, 16))
    assert torch.equal(whole(x), teacher(x))
    default, picked = make_student(teacher, StudentConfig())  # half, evenly spaced
    assert picked == [0, 3, 5] and default.cfg.n_layers == 3
    narrow, none = make_student(teacher, StudentConfig(init="random", n_layers=2,
                                                       model={"dim": 16, "n_heads": 2,
                                                              "n_kv_heads": 1}))
    assert none is None and narrow.cfg.dim == 16 and narrow.cfg.n_layers == 2
    with pytest.raises(ValueError, match="out of range; the teacher has 6 blocks"):
        make_student(teacher, StudentConfig(layers=[0, 6]))
    with pytest.raises(ValueError, match="use student.init: random"):
        make_student(teacher, StudentConfig(model={"dim": 16, "n_heads": 2, "n_kv_heads": 1}))


@pytest.mark.parametrize("override, message", [
    ("distill.temperature=0", "temperature must be > 0"),
    ("distill.alpha=1.5", r"alpha must be in \[0, 1\]"),
    ("distill.alpha=-0.1", r"alpha must be in \[0, 1\]"),
    ("distill.kl=sideways", "kl must be one of forward, reverse"),
    ("distill.student.layers=[3, 1]", "increasing order"),
    ("distill.student.model={vocab_size: 10}", "shares the teacher's tokenizer"),
    ("distill.student.model={depth: 2}", "unknown ModelConfig field"),
    ("distill.student.n_layers=-1", "n_layers must be >= 0"),
    ("distill.student={layers: [0, 1], init: random}", "init: random copies none"),
])
def test_bad_settings_fail_with_a_clear_message(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(None, [override])


def test_a_student_base_with_another_tokenizer_is_refused(tiny_chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmforge.tokenizer import load_tokenizer
    from llmforge.tokenizer.bpe import TokenizerConfig, train_tokenizer

    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(SENTENCES))], "text": SENTENCES,
                             "source": ["t"] * len(SENTENCES)}), tmp_path / "docs.parquet")
    train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "docs.parquet",
                    tmp_path / "tok.json")
    tok = load_tokenizer(tmp_path / "tok.json")
    other = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1,
                                    n_heads=2, n_kv_heads=1, max_seq_len=64))
    save_model(other, tmp_path / "other")
    shutil.copy(tmp_path / "tok.json", tmp_path / "other" / "tokenizer.json")
    cfg = DistillConfig(student=StudentConfig(base=str(tmp_path / "other")))
    with pytest.raises(ValueError, match="is not the teacher's"):
        open_models(cfg, str(tiny_chat_model), torch.device("cpu"))
    with pytest.raises(ValueError, match="student.base is a whole model"):
        StudentConfig(base="x", n_layers=2)


def test_text_rows_come_from_the_run_corpus_by_default(tiny_chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmforge.compress.distill import load_rows
    from llmforge.config import load_recipe
    from llmforge.stages import STAGES

    assert STAGES["distill"].inputs(load_recipe(None)) == ("sft", "data")
    (tmp_path / "documents").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": SENTENCES[:2], "source": ["t", "t"]}),
                   tmp_path / "documents" / "part-0.parquet")
    chat = open_chat_model(str(tiny_chat_model))
    cfg = DistillConfig(val_fraction=0.5, train=TrainConfig(seq_len=8))
    train, val, skipped = load_rows(cfg, chat, tmp_path / "documents")
    stream = [chat.prefix_id, *chat.tokenizer.encode(SENTENCES[0]).ids,
              chat.prefix_id, *chat.tokenizer.encode(SENTENCES[1]).ids]
    windows = [(stream[i : i + 8], stream[i + 1 : i + 9]) for i in range(0, len(stream) - 8, 8)]
    assert sorted(train + val) == sorted(windows) and train and val and not skipped


# --- the stage --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text with structure: the fixture tokenizer's sentences, shuffled by a seeded RNG."""
    rng = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(SENTENCES), (600,), generator=rng).tolist()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(SENTENCES[i] for i in picks) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher(tiny_chat_model, corpus, tmp_path_factory) -> Path:
    """A 4-block model trained briefly on the corpus, so its predictions have structure for a
    student to learn (a random model's are nearly uniform)."""
    chat = open_chat_model(str(tiny_chat_model))
    ids = torch.tensor(chat.tokenizer.encode(corpus.read_text()).ids)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=chat.model.cfg.vocab_size, dim=64, n_layers=4,
                                    n_heads=4, n_kv_heads=2, max_seq_len=256))
    [optimizer] = make_optimizers(model, TrainConfig(lr=3e-3, weight_decay=0.0))
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 65] for s in starts.tolist()])
        model(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("teacher") / "model"
    save_model(model.eval(), out)
    shutil.copy(tiny_chat_model / "tokenizer.json", out / "tokenizer.json")
    return out


def distill(runs: Path, name: str, *overrides: str) -> int:
    return main(["compress", "distill", f"run_dir={runs}", f"name={name}", *overrides])


def summary_of(runs: Path, name: str) -> dict:
    return json.loads((runs / name / "distill" / "summary.json").read_text())


def test_distilled_student_approaches_the_teacher_then_serves_and_resumes(teacher, corpus,
                                                                          tmp_path, monkeypatch):
    settings = [f"distill.teacher={teacher}", f"distill.data={corpus}",
                "distill.student.n_layers=2", "distill.val_fraction=0.1",
                *[f"distill.{o}" for o in TRAIN]]
    assert distill(tmp_path, "whole", *settings) == 0
    summary = summary_of(tmp_path, "whole")
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert summary["copied_layers"] == [0, 3] and summary["student_layers"] == 2
    assert summary["student_params"] < summary["teacher_params"]
    assert after["kl"] < before["kl"] / 3  # the student's distributions close in on the teacher's
    assert after["top1_agreement"] > before["top1_agreement"]
    assert after["ce"] < before["ce"]  # on the data too (the teacher's own CE is for reference)
    assert math.isclose(summary["teacher_held_out_ce"], before["teacher_ce"], rel_tol=1e-6)
    metrics = [json.loads(line) for line in
               (tmp_path / "whole" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert {"soft_kl", "ce", "val_kl", "val_ce", "val_top1_agreement"} <= metrics[-1].keys()
    out = tmp_path / "whole" / "distill" / "model"
    student = open_chat_model(str(out))
    assert student.model.cfg.n_layers == 2 and student.format.template is None  # native layout
    assert len(greedy(out, "Say hi")) == 6
    # As a draft for the teacher: the teacher's own greedy text, most drafts accepted.
    target = open_chat_model(str(teacher))
    prompt = [target.prefix_id, *target.tokenizer.encode("The quick brown").ids]
    outputs = []
    for draft in (None, student.model):
        engine = Engine(target.model, target.tokenizer, draft=draft, num_speculative_tokens=4)
        try:
            [done] = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0,
                                                              ignore_eos=True))
        finally:
            engine.shutdown()
        outputs.append(done.choices[0].token_ids)
    assert outputs[0] == outputs[1]
    assert engine.spec_stats.mean_accepted_length > 2.5

    # Killed right after its step-10 checkpoint, then rerun: it resumes there and ends with
    # the weights of the uninterrupted run.
    save = checkpoint.save

    def save_then_die(root, step, *args, **kwargs):
        save(root, step, *args, **kwargs)
        if step == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    assert distill(tmp_path, "killed", *settings) == 130
    assert not (tmp_path / "killed" / "distill" / "summary.json").exists()
    monkeypatch.setattr(checkpoint, "save", save)
    assert distill(tmp_path, "killed", *settings) == 0
    assert "resumed from step 10" in (tmp_path / "killed" / "distill" / "log.txt").read_text()
    resumed = open_chat_model(str(tmp_path / "killed" / "distill" / "model")).model
    for (name, a), (_, b) in zip(student.model.state_dict().items(),
                                 resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert summary_of(tmp_path, "killed")["held_out_after"] == after


def test_conversations_from_an_hf_layout_teacher_give_an_hf_layout_student(teacher, tmp_path):
    """A teacher with its own chat template (kept in bf16): conversations render in it, the
    loss covers the assistant's tokens, and the student is written in the Hugging Face layout
    with the template."""
    save_chat_model(open_chat_model(str(teacher)), tmp_path / "hf", hf=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Say {s[:12]}"},
                                      {"role": "assistant", "content": s}]})
             for s in SENTENCES * 8] + ['{"broken']
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    assert distill(tmp_path, "hf", f"distill.teacher={tmp_path / 'hf'}",
                   f"distill.data={tmp_path / 'chats.jsonl'}", "distill.student.layers=[0, 2]",
                   "distill.kl=reverse", "distill.teacher_dtype=bf16", "distill.val_fraction=0.2",
                   *[f"distill.{o}" for o in TRAIN], "distill.train.max_steps=6") == 0
    summary = summary_of(tmp_path, "hf")
    assert summary["set_aside"] == {"malformed_record": 1}
    assert summary["held_out_after"]["loss"] < summary["held_out_before"]["loss"]
    out = tmp_path / "hf" / "distill" / "model"
    assert (out / "tokenizer_config.json").is_file()
    student = open_chat_model(str(out))
    assert student.format.template is not None and student.model.cfg.n_layers == 2
    assert len(greedy(out, "Say hi")) == 6


def test_a_run_without_a_teacher_or_rows_says_what_is_missing(teacher, tmp_path):
    (tmp_path / "short.txt").write_text("Hello.")
    assert distill(tmp_path, "empty", f"distill.teacher={teacher}",
                   f"distill.data={tmp_path / 'short.txt'}", "distill.train.seq_len=48") == 2
    assert distill(tmp_path, "layers", f"distill.teacher={teacher}",
                   f"distill.data={tmp_path / 'short.txt'}", "distill.student.layers=[0, 9]") == 2


@pytest.mark.slow
def test_two_ranks_match_one_process_at_the_same_global_batch(teacher, corpus, tmp_path):
    """Under torchrun (DDP, gloo) half of each global batch per rank gives the losses of one
    process taking the whole batch."""
    common = [f"distill.teacher={teacher}", f"distill.data={corpus}", "distill.train.max_steps=4",
              "distill.train.dtype=fp32", "distill.train.log_every=1", "distill.train.seq_len=48",
              "distill.train.eval_every=100", "distill.train.eval_batches=1"]
    logged = {}
    for nproc, batch in ((1, 8), (2, 4)):
        cli = ["-m", "llmforge.cli", "compress", "distill", f"run_dir={tmp_path / str(nproc)}",
               "name=d", *common, f"distill.train.batch_size={batch}"]
        if nproc > 1:
            cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *cli]
        done = subprocess.run([sys.executable, *cli], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        stage_dir = tmp_path / str(nproc) / "d" / "distill"
        assert json.loads((stage_dir / "summary.json").read_text())["world_size"] == nproc
        logged[nproc] = [json.loads(line)["loss"] for line in
                         (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[2] == pytest.approx(logged[1], rel=1e-4)
