"""GRPO on the training loop: sampled groups, verified rewards, and a reward that goes up."""

import copy
import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmforge.align.grpo import (
    GRPOBatches,
    GRPOConfig,
    Task,
    arithmetic_tasks,
    evaluate_tasks,
    grpo_objective,
    jsonl_tasks,
    load_tasks,
    per_token_logprobs,
    split_tasks,
    task_reward,
    user_reward,
)
from llmforge.align.lora import LoRAConfig, apply_lora, lora_layers
from llmforge.align.rewards import load_reward_function
from llmforge.align.sft import Example, ExampleBatches, encode_examples
from llmforge.model.io import load_model
from llmforge.runs import StageContext
from llmforge.tokenizer import load_tokenizer, stop_ids
from llmforge.tokenizer.chat_format import native_format
from llmforge.train.data import draw_indices
from llmforge.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
SFT_TASKS = 12  # of the 25 sums, the ones the warm-up shows answered


def context(root: Path, name: str) -> StageContext:
    (root / name).mkdir()
    return StageContext(name=name, dir=root / name, root=root, recipe=None,
                        log=logging.getLogger(f"tests.{name}"))


def grpo_config(**overrides) -> GRPOConfig:
    train_cfg = TrainConfig(seq_len=64, max_steps=overrides.pop("max_steps", 2),
                            lr=overrides.pop("lr", 1e-3), warmup_steps=2, min_lr_ratio=1.0,
                            weight_decay=0.0, eval_every=1000, ckpt_every=1000, log_every=10,
                            dtype="fp32")
    settings = dict(data="arithmetic", max_operand=4, operators="+", val_prompts=0,
                    group_size=8, prompts_per_step=4, max_new_tokens=4, train=train_cfg)
    return GRPOConfig(**settings | overrides)


@pytest.fixture(scope="module")
def warm(tiny_chat_model, tmp_path_factory, one_thread):
    """The tiny random model after a short SFT warm-up on 12 of the 25 sums a + b (a, b <= 4):
    it answers in the format (one number, then <|end|>) and is right about a third of the
    time, so sampled groups disagree and GRPO has something to learn from."""
    tok = load_tokenizer(tiny_chat_model / "tokenizer.json")
    chat, stops = native_format(tok), stop_ids(tok)
    cfg = grpo_config()
    tasks, _ = load_tasks(cfg, seed=0)
    examples = [Example(t.id, [*t.messages, {"role": "assistant", "content": t.answer}])
                for t in tasks[:SFT_TASKS]]
    encoded, skipped = encode_examples(chat, examples, seq_len=64)
    assert len(encoded) == SFT_TASKS and not skipped
    model = load_model(tiny_chat_model)
    sft = TrainConfig(seq_len=64, batch_size=8, max_steps=100, lr=3e-3, warmup_steps=2,
                      eval_every=1000, ckpt_every=1000, log_every=50, dtype="fp32")
    train(model, sft, ExampleBatches(encoded, 8, stops[0], seed=0),
          context(tmp_path_factory.mktemp("warmup"), "sft"))
    return SimpleNamespace(model=model, tok=tok, chat=chat, stops=stops, tasks=tasks,
                           reward=task_reward(cfg))


def batches_for(warm, cfg, model=None, **kwargs) -> GRPOBatches:
    return GRPOBatches(model or copy.deepcopy(warm.model), warm.chat, warm.tok, warm.stops,
                       warm.tasks, warm.reward, cfg, seed=0, **kwargs)


def _drawn(batches: GRPOBatches, step: int, micro: int) -> list[int]:
    """Which tasks micro-batch (step, micro) drew, one per group."""
    return draw_indices(batches.seed, step, micro, len(batches.tasks),
                        batches.cfg.prompts_per_step).tolist()


def test_grpo_raises_the_verified_reward(warm, tmp_path):
    model = copy.deepcopy(warm.model)
    cfg = grpo_config(prompts_per_step=16, max_steps=80, lr=1e-3)

    def score():
        return evaluate_tasks(model, warm.chat, warm.tok, warm.stops, warm.tasks, warm.reward,
                              cfg.max_new_tokens)

    before = score()
    assert before["tasks"] == 25 and before["completion_length"] == pytest.approx(2.0, abs=0.1)
    assert 0.1 <= before["reward"] <= 0.6  # right sometimes: groups are not all equal
    ctx = context(tmp_path, "grpo")
    summary = train(model, cfg.train, batches_for(warm, cfg, model=model), ctx,
                    objective=grpo_objective(cfg))
    after = score()
    print(f"greedy reward on the 25 sums: before {before['reward']:.2f}, "
          f"after {after['reward']:.2f}")
    assert model.training  # sampling and scoring restored the training mode
    assert after["reward"] >= before["reward"] + 0.15, (before, after)
    assert after["accuracy"] == after["reward"]  # a 0/1 verifier

    records = [json.loads(line) for line in (ctx.dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["steps"] == 80
    for key in ("reward", "zero_variance", "kl", "completion_length", "clip_fraction", "ratio"):
        assert all(key in r for r in records), key
    first, last = (sum(r["reward"] for r in part) / 10 for part in (records[:10], records[-10:]))
    print(f"sampled reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last >= first + 0.1
    # One update per sampled batch: the policy that sampled is the one being updated.
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-3) and r["kl"] == 0 for r in records)
    assert all(0 <= r["zero_variance"] <= 1 for r in records)


def test_same_step_and_weights_give_the_same_batch(warm):
    cfg = grpo_config()
    batches = batches_for(warm, cfg)
    first = batches(3, 1)
    again = batches(3, 1)
    fresh = batches_for(warm, cfg)(3, 1)  # a new engine: nothing carried between calls
    assert len(first) == 5
    for a, b, c in zip(first, again, fresh, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    other = batches(4, 1)
    assert not (first[0].shape == other[0].shape and torch.equal(first[0], other[0]))


def test_only_completion_tokens_are_targets(warm):
    cfg = grpo_config()
    batches = batches_for(warm, cfg)
    x, y, logp_old, advantages, rewards = batches(0, 0)
    n = cfg.prompts_per_step * cfg.group_size
    assert x.shape == y.shape == logp_old.shape and x.size(0) == n
    assert advantages.shape == rewards.shape == (n,)
    groups = rewards.view(-1, cfg.group_size)
    torch.testing.assert_close(advantages.view(-1, cfg.group_size).sum(1),
                               torch.zeros(groups.size(0)), atol=1e-4, rtol=0)
    drawn = _drawn(batches, 0, 0)
    stopped = 0
    for row in range(n):
        prompt = batches.prompts[drawn[row // cfg.group_size]]
        assert x[row, : len(prompt)].tolist() == prompt
        targets = y[row].tolist()
        completion = [t for t in targets if t != -100]
        start = len(prompt) - 1  # the last prompt token predicts the first completion token
        assert targets[:start] == [-100] * start
        assert targets[start : start + len(completion)] == completion
        assert 1 <= len(completion) <= cfg.max_new_tokens
        # Inputs continue with the completion, all but its last token.
        assert x[row, len(prompt) : len(prompt) + len(completion) - 1].tolist() == completion[:-1]
        if completion[-1] in warm.stops:
            stopped += 1
        else:
            assert len(completion) == cfg.max_new_tokens  # only the length limit ends it early
        assert not any(t in warm.stops for t in completion[:-1])
        assert (logp_old[row][y[row] == -100] == 0).all()
        assert (logp_old[row][y[row] != -100] < 0).all()
    assert stopped > n // 2  # the warmed-up model ends its answers with <|end|>: trained on


def test_bad_records_are_counted_not_fatal(tmp_path):
    lines = [
        json.dumps({"prompt": "What is 2 + 2?", "answer": "4"}),
        json.dumps({"messages": [{"role": "user", "content": "Half of 10?"}], "answer": 5}),
        json.dumps({"question": "Three times 3?", "answer": "So 9.\n#### 9"}),  # GSM8K's keys
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"answer": "4"}),
        json.dumps({"prompt": "   ", "answer": "4"}),
        json.dumps({"prompt": "What is 1 + 1?"}),
        json.dumps({"prompt": "What is 1 + 1?", "answer": "  "}),
        json.dumps({"prompt": "What is 1 + 1?", "answer": ["2"]}),
        json.dumps({"prompt": "What is 1 + 1?", "answer": "two"}),
        json.dumps({"messages": "hi", "answer": "4"}),
        "",
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tasks, skipped = load_tasks(GRPOConfig(data=str(path)))
    assert [t.id for t in tasks] == ["tasks.jsonl:1", "tasks.jsonl:2", "tasks.jsonl:3"]
    assert tasks[1].answer == "5" and tasks[2].messages[0]["content"] == "Three times 3?"
    assert skipped == Counter(unparsable_json=1, not_an_object=1, missing_prompt=2,
                              missing_answer=1, empty_answer=1, bad_answer=1,
                              no_number_in_answer=1, bad_messages=1)
    reward = task_reward(GRPOConfig(data=str(path)))
    assert [reward(t, "The answer is 4") for t in tasks] == [1.0, 0.0, 0.0]
    # A user reward checks what it likes: "two" is a fine answer for it.
    assert len(jsonl_tasks(path, need_number=False)[0]) == 4
    assert len(jsonl_tasks(path, max_tasks=2)[0]) == 2
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable tasks"):
        load_tasks(GRPOConfig(data=str(tmp_path / "empty.jsonl")))


def test_gsm8k_records_load_and_verify():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"shared data not found at {GSM8K_TEST}")
    cfg = GRPOConfig(data=str(GSM8K_TEST), max_prompts=20, val_prompts=5)
    tasks, skipped = load_tasks(cfg)
    assert len(tasks) == 20 and not skipped
    train_tasks, held_out = split_tasks(tasks, cfg.val_prompts)
    assert held_out == tasks[:5] and train_tasks == tasks[5:]
    reward = task_reward(cfg)
    final = tasks[0].answer.rsplit("####", 1)[1].strip()
    assert reward(tasks[0], f"So she makes {final} dollars.") == 1.0
    assert reward(tasks[0], "I do not know") == 0.0
    with pytest.raises(ValueError, match="val_prompts"):
        split_tasks(tasks, 20)


def test_a_user_reward_function_scores_the_samples(warm, tmp_path):
    module = tmp_path / "my_reward.py"
    module.write_text(
        "def says_the_answer(prompt, completion, **record):\n"
        "    assert prompt.startswith('What is') and record['id']\n"
        "    return 1.0 if completion.strip() == record['answer'] else -0.5\n"
        "def crashes(prompt, completion, **record):\n"
        "    raise RuntimeError('bug')\n"
    )
    cfg = grpo_config(reward=f"{module}:says_the_answer")
    reward = task_reward(cfg)
    batches = GRPOBatches(copy.deepcopy(warm.model), warm.chat, warm.tok, warm.stops,
                          warm.tasks, reward, cfg, seed=0)
    _, y, _, _, rewards = batches(0, 0)
    texts = [warm.tok.decode([t for t in row.tolist() if t != -100 and t not in warm.stops])
             for row in y]
    answers = [batches.tasks[i].answer for i in _drawn(batches, 0, 0)
               for _ in range(cfg.group_size)]
    expected = [1.0 if t.strip() == a else -0.5 for t, a in zip(texts, answers, strict=True)]
    assert rewards.tolist() == expected and 1.0 in expected and -0.5 in expected
    scores = evaluate_tasks(warm.model, warm.chat, warm.tok, warm.stops, warm.tasks[:5],
                            reward, cfg.max_new_tokens)
    assert scores["tasks"] == 5 and -0.5 <= scores["reward"] <= 1.0

    crashing = load_reward_function(f"{module}:crashes")
    assert user_reward(crashing)(warm.tasks[0], "4") == 0.0 and crashing.errors == 1


def test_kl_to_a_frozen_reference_is_logged(warm, tmp_path):
    model = copy.deepcopy(warm.model)
    reference = copy.deepcopy(warm.model).requires_grad_(False)
    cfg = grpo_config(kl_coef=0.1, max_steps=4, lr=3e-3)
    with pytest.raises(ValueError, match="reference"):
        batches_for(warm, cfg, model=model)
    batches = batches_for(warm, cfg, model=model, reference=reference)
    *_, logp_old, _, _, logp_ref = batches(0, 0)
    torch.testing.assert_close(logp_ref, logp_old)  # the policy starts as the reference
    ctx = context(tmp_path, "grpo_kl")
    train(model, cfg.train, batches, ctx, objective=grpo_objective(cfg))
    records = [json.loads(line) for line in (ctx.dir / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in records]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)
    assert all(kl >= 0 for kl in kls) and kls[-1] > 0  # the policy has moved away


def test_lora_policy_gives_its_own_reference(warm):
    model = copy.deepcopy(warm.model)
    apply_lora(model, LoRAConfig(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.5)  # an adapter that changes the outputs
    cfg = grpo_config(kl_coef=0.1)
    x, y, logp_old, _, _, logp_ref = batches_for(warm, cfg, model=model)(0, 0)
    with torch.no_grad():
        base = per_token_logprobs(copy.deepcopy(warm.model).eval()(x), y)
    torch.testing.assert_close(logp_ref, base)  # adapters off: the base model
    assert not torch.allclose(logp_old, logp_ref)
    assert all(layer.scaling == 16 / 4 for layer in lora_layers(model).values())  # on again


def test_arithmetic_tasks_are_distinct_and_seeded():
    tasks = arithmetic_tasks(0, 3, "+-*", seed=1)
    assert len(tasks) == 3 * 16 == len({t.id for t in tasks})
    assert [t.id for t in arithmetic_tasks(5, 3, "+-*", seed=1)] == [t.id for t in tasks[:5]]
    assert [t.id for t in arithmetic_tasks(5, 3, "+-*", seed=2)] != [t.id for t in tasks[:5]]
    by_id = {t.id: t for t in tasks}
    assert by_id["3-1"] == Task("3-1", [{"role": "user", "content": "What is 3 - 1?"}], "2")
    assert by_id["1-3"].answer == "-2" and by_id["2*3"].answer == "6"
    assert len(load_tasks(GRPOConfig(max_prompts=10))[0]) == 10


@pytest.mark.parametrize(("overrides", "field"), [
    ({"group_size": 1}, "group_size"),
    ({"group_size": 17}, "group_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"advantage_scale": "mad"}, "advantage_scale"),
    ({"operators": "+/"}, "operators"),
    ({"kl_coef": -1.0}, "kl_coef"),
    ({"reward": "rewards.py"}, "reward"),
    ({"train": TrainConfig(spike_factor=3.0)}, "spike_factor"),
    ({"train": TrainConfig(parallel="fsdp")}, "parallel"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**overrides)
