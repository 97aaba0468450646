"""Reward model: a scalar head on the Transformer, Bradley-Terry through the training loop."""

import itertools
import json
import logging
import math
import random

import pytest
import torch

from llmforge.align.dpo import PreferenceBatches, encode_pairs
from llmforge.align.hh import PreferencePair
from llmforge.align.reward import (
    RewardModel,
    load_reward_model,
    preference_accuracy,
    reward_objective,
    save_reward_model,
)
from llmforge.align.sft import pad_batch
from llmforge.model.config import ModelConfig
from llmforge.model.io import load_model, save_model
from llmforge.model.transformer import Transformer
from llmforge.runs import StageContext
from llmforge.tokenizer import load_tokenizer
from llmforge.tokenizer.chat_format import native_format
from llmforge.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
# Chosen replies mix in one friendly word; rejected ones have none. Both vary in wording.
FRIENDLY = ["Hello", "world", "say", "hi", "again"]
NEUTRAL = ["quick", "brown", "fox", "jumps", "lazy", "dog"]
TOPICS = ["fox", "dog", "code", "world", "add", "numbers", "jumps", "here"]
ASKS = ["Tell me about", "Any news on", "Write on", "Talk about", "Explain", "What about"]


def preference_pairs(seed: int, prompts: list[str]) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for i, prompt in enumerate(prompts):
        rejected = rng.sample(NEUTRAL, 3)
        chosen = rng.sample(NEUTRAL, 2)
        chosen.insert(rng.randrange(3), rng.choice(FRIENDLY))
        pairs.append(PreferencePair(f"p{i}", [{"role": "user", "content": prompt}],
                                    chosen=" ".join(chosen) + ".",
                                    rejected=" ".join(rejected) + "."))
    return pairs


def random_head(model: RewardModel) -> RewardModel:
    torch.manual_seed(1)
    torch.nn.init.normal_(model.score.weight, std=model.cfg.dim**-0.5)
    return model


def test_reward_model_learns_held_out_preferences(tiny_chat_model, tmp_path):
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    pad = tok.token_to_id("<|pad|>")
    chat = native_format(tok)
    prompts = [f"{ask} {topic}?" for ask, topic in itertools.product(ASKS, TOPICS)]
    held_out = prompts[2::3]  # split by prompt; the replies are drawn afresh too
    train_prompts = [p for p in prompts if p not in held_out]
    train_rows, skipped = encode_pairs(chat, preference_pairs(0, train_prompts), seq_len=64)
    held_rows, _ = encode_pairs(chat, preference_pairs(1, held_out), seq_len=64)
    assert len(train_rows) == 32 and len(held_rows) == 16 and not skipped
    train_replies = {tuple(row[0]) for pair in train_rows for row in pair}
    assert not train_replies & {tuple(row[0]) for pair in held_rows for row in pair}

    model = RewardModel(load_model(tiny_chat_model))
    before = preference_accuracy(model, held_rows, pad)
    assert before == {"accuracy": 0.0, "margin": 0.0, "pairs": 16}  # zero head: all ties
    cfg = TrainConfig(seq_len=64, batch_size=8, max_steps=80, lr=3e-3, warmup_steps=2,
                      eval_every=1000, ckpt_every=1000, log_every=10, dtype="fp32")
    (tmp_path / "reward").mkdir()
    ctx = StageContext(name="reward", dir=tmp_path / "reward", root=tmp_path, recipe=None,
                       log=logging.getLogger("tests.reward"))
    batches = PreferenceBatches(train_rows, None, cfg.batch_size, pad, seed=0)
    summary = train(model, cfg, batches, ctx, objective=reward_objective())

    assert summary["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["final_loss"] < 0.3
    after = preference_accuracy(model, held_rows, pad)
    assert after["accuracy"] >= 0.8 and after["margin"] > 1.0, after
    assert model.training  # preference_accuracy restores the mode it found
    last = json.loads((ctx.dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward"} <= last.keys()
    assert last["chosen_reward"] > last["rejected_reward"]

    # The loop's checkpoint holds the head too: a fresh model resumes to the same scores.
    resumed = RewardModel(load_model(tiny_chat_model))
    train(resumed, cfg, batches, ctx, objective=reward_objective())
    assert preference_accuracy(resumed, held_rows, pad) == after


def test_objective_splits_chosen_and_rejected_and_applies_the_margin():
    def forward(x, y):
        return torch.tensor([2.0, 0.0, 1.0, 1.0])  # chosen [2, 0], rejected [1, 1]

    batch = (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    loss, metrics = reward_objective()(forward, batch)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    assert metrics == {"accuracy": 0.5, "margin": 0.0, "chosen_reward": 1.0,
                       "rejected_reward": 1.0}
    with_margin, _ = reward_objective(margin=1.0)(forward, batch)
    assert with_margin.item() == pytest.approx((math.log(2) + math.log1p(math.exp(2))) / 2)


def test_scores_ignore_padding_and_need_a_reply(tiny_chat_model):
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    pad = tok.token_to_id("<|pad|>")
    pairs = preference_pairs(2, ["Hi?", "Tell me about the quick brown fox and the lazy dog?"])
    (short, _), (long, _) = encode_pairs(native_format(tok), pairs, seq_len=64)[0]
    assert len(short[0]) < len(long[0])
    model = random_head(RewardModel(load_model(tiny_chat_model))).eval()

    def scores(rows):
        with torch.no_grad():
            return model(*pad_batch(rows, pad))

    alone, padded = scores([short]), scores([short, long])
    assert alone.shape == (1,) and padded.shape == (2,) and alone.abs().item() > 1e-3
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no reply tokens"):
        scores([(short[0], [-100] * len(short[1]))])


def test_save_and_load_round_trip(tiny_chat_model, tmp_path):
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    pad = tok.token_to_id("<|pad|>")
    rows, _ = encode_pairs(native_format(tok), preference_pairs(3, ["Hi?", "Write on code?"]),
                           seq_len=64)
    model = random_head(RewardModel(load_model(tiny_chat_model)))
    out = tmp_path / "rm"
    save_model(model.backbone, out)
    with pytest.raises(FileNotFoundError, match="no reward head"):
        load_reward_model(out)
    save_reward_model(model, out)
    assert json.loads((out / "reward_config.json").read_text()) == {
        "format": "llmforge-reward-head", "dim": model.cfg.dim}
    loaded = load_reward_model(out)
    x, y = pad_batch([row for pair in rows for row in pair], pad)
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))
    assert loaded.num_params() == model.num_params() == model.backbone.num_params() + 65

    (out / "reward_config.json").write_text(json.dumps({"format": "llmforge-reward-head",
                                                        "dim": 32}))
    with pytest.raises(ValueError, match="head dim 32 does not match"):
        load_reward_model(out)


def test_the_loop_reaches_the_backbone(tiny_chat_model):
    model = RewardModel(load_model(tiny_chat_model))
    model.activation_checkpointing = True  # the loop sets it; the backbone must recompute
    assert model.backbone.activation_checkpointing and "activation_checkpointing" not in vars(model)
    assert model.cfg is model.backbone.cfg and model.layers is model.backbone.layers
    assert set(model.state_dict()) == {f"backbone.{k}" for k in model.backbone.state_dict()} | {
        "score.weight", "score.bias"}
    # An untied lm_head scores nothing: frozen, or DDP would wait for its gradient forever.
    untied = RewardModel(Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4,
                                                 max_seq_len=16, tie_embeddings=False)))
    assert [n for n, p in untied.named_parameters() if not p.requires_grad] == [
        "backbone.lm_head.weight"]
