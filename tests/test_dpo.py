"""DPO through the training loop: reference log-probs stored once, the held-out margin grows."""

import logging
import math

import pytest
import torch

from llmforge.align.dpo import PreferenceBatches, dpo_objective, encode_pairs, reference_logprobs
from llmforge.align.hh import PreferencePair
from llmforge.model.io import load_model
from llmforge.runs import StageContext
from llmforge.tokenizer import load_tokenizer
from llmforge.tokenizer.chat_format import native_format
from llmforge.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["Say hi", "Hello?", "What now?", "Tell me", "Any code?", "Quick one", "Again?",
             "Talk to me", "Go on", "Write"]


def pairs(questions):
    return [PreferencePair(f"p{i}", [{"role": "user", "content": q}],
                           chosen="Hello world, say hi again.", rejected="The lazy dog.")
            for i, q in enumerate(questions)]


def test_dpo_raises_the_held_out_margin_from_zero(tiny_chat_model, tmp_path):
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    pad = tok.token_to_id("<|pad|>")
    model = load_model(tiny_chat_model)
    train_rows, skipped = encode_pairs(native_format(tok), pairs(QUESTIONS[:7]), seq_len=64)
    held_rows, _ = encode_pairs(native_format(tok), pairs(QUESTIONS[7:]), seq_len=64)
    assert len(train_rows) == 7 and not skipped
    # Only the reply is scored: the targets start where the prompt's <|assistant|> ends.
    (x, y), _ = train_rows[0]
    assert all(t == -100 for t in y[: y.index(next(t for t in y if t != -100))])

    ref_train = reference_logprobs(model, train_rows, pad)
    ref_held = reference_logprobs(model, held_rows, pad)
    cfg = TrainConfig(seq_len=64, batch_size=4, max_steps=25, lr=3e-3, warmup_steps=2,
                      eval_every=1000, ckpt_every=1000, log_every=5, dtype="fp32")
    (tmp_path / "dpo").mkdir()
    ctx = StageContext(name="dpo", dir=tmp_path / "dpo", root=tmp_path, recipe=None,
                       log=logging.getLogger("tests.dpo"))
    batches = PreferenceBatches(train_rows, ref_train, cfg.batch_size, pad, seed=0)
    summary = train(model, cfg, batches, ctx, objective=dpo_objective(beta=0.1))

    # The policy starts as the reference: the first loss is exactly DPO's log 2.
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert summary["final_loss"] < 0.5 * math.log(2)
    after = reference_logprobs(model, held_rows, pad)
    margins = (after - ref_held) @ torch.tensor([1.0, -1.0])  # chosen minus rejected log-ratio
    assert (margins > 1.0).all(), margins
    logged = [line for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert '"rewards/accuracy"' in logged[-1] and '"rewards/margins"' in logged[-1]


def test_pairs_longer_than_the_context_are_counted(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    long = [PreferencePair("x", [{"role": "user", "content": "hi " * 200}], "a", "b")]
    rows, skipped = encode_pairs(native_format(tok), long + pairs(QUESTIONS[:1]), seq_len=64)
    assert len(rows) == 1 and skipped == {"longer_than_seq_len": 1}
