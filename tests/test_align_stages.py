"""The alignment stages as a user runs them: `llmforge sft|dpo|reward|grpo` from any base model,
full or LoRA, writing model directories that reopen, chat and serve as they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.align.lora import load_adapter
from llmforge.align.reward import load_reward_model
from llmforge.cli import main
from llmforge.serve.chat_model import open_chat_model, save_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.sampling import SamplingParams
from llmforge.tokenizer import render_chat

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["train.max_steps=12", "train.batch_size=4", "train.seq_len=64", "train.lr=3e-3",
         "train.warmup_steps=2", "train.eval_every=6", "train.ckpt_every=6",
         "train.log_every=3", "train.dtype=fp32"]
ASKS = ["Say hi", "Hello?", "What now?", "Tell me", "Any code?", "Quick one", "Again?",
        "Talk to me", "Go on", "Write", "Greet me", "Speak"]


def preference_file(path: Path) -> Path:
    """Explicit-prompt pairs (strings and message lists), with bad records among them."""
    lines = [json.dumps({"prompt": ask, "chosen": "Hello world, say hi again.",
                         "rejected": "The lazy dog."}) for ask in ASKS[:10]]
    lines += [json.dumps({"prompt": [{"role": "user", "content": ask}],
                          "chosen": [{"role": "assistant", "content": "Hello world, say hi."}],
                          "rejected": "The quick brown fox."}) for ask in ASKS[10:]]
    lines += [json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),
              json.dumps({"prompt": "x", "chosen": "  ", "rejected": "y"}),
              json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a",
                          "rejected": "b"}),
              json.dumps({"chosen": "a"}), "{broken"]
    path.write_text("\n".join(lines) + "\n")
    return path


def stage(verb: str, runs: Path, *overrides: str) -> dict:
    assert main([verb, f"run_dir={runs}", "name=align", *overrides]) == 0
    return json.loads((runs / "align" / verb / "summary.json").read_text())


def greedy(model_dir: Path, text: str) -> list[int]:
    """What serving the directory gives: greedy token ids through the engine."""
    chat = open_chat_model(str(model_dir))
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids)
    try:
        [out] = engine.generate([chat.format.prompt([{"role": "user", "content": text}])],
                                SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    return out.choices[0].token_ids


def logits(model_dir: Path, text: str) -> torch.Tensor:
    chat = open_chat_model(str(model_dir))
    return chat.model(torch.tensor([chat.format.prompt([{"role": "user", "content": text}])]))


def test_template_format_finds_the_same_tokens_to_learn_as_ours(tiny_chat_model, tmp_path):
    """Our model saved in the HF layout reopens with its Jinja template; the template's
    prefix-rendering mask then equals our own format's mask, token for token."""
    ours = open_chat_model(str(tiny_chat_model))
    save_chat_model(ours, tmp_path / "hf", hf=True)
    theirs = open_chat_model(str(tmp_path / "hf"))
    assert theirs.format.template is not None and ours.format.template is None
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hi"},
                    {"role": "assistant", "content": "Hello world"},
                    {"role": "user", "content": "Again?"},
                    {"role": "assistant", "content": "say hi again."}]
    assert theirs.format.conversation(conversation) == render_chat(ours.tokenizer, conversation)
    assert theirs.format.prompt(conversation[:2]) == ours.format.prompt(conversation[:2])
    assert sorted(theirs.stop_ids) == sorted(ours.stop_ids)
    x = torch.tensor([ours.format.prompt(conversation[:2])])
    assert torch.equal(theirs.model(x), ours.model(x))


def test_dpo_stage_with_lora_from_a_base_model(tiny_chat_model, tmp_path):
    data = preference_file(tmp_path / "pairs.jsonl")
    summary = stage("dpo", tmp_path, f"dpo.base={tiny_chat_model}", f"dpo.data={data}",
                    "dpo.val_fraction=0.3", "dpo.lora={r: 4, alpha: 8}", "dpo.base_dtype=int8",
                    *[f"dpo.{o}" for o in TRAIN])
    assert summary["set_aside"] == {"chosen_equals_rejected": 1, "empty_reply": 1,
                                    "bad_prompt": 1, "missing_fields": 1, "unparsable_json": 1}
    assert summary["train_pairs"] + summary["held_out_pairs"] == len(ASKS)
    assert summary["method"] == "lora" and summary["trainable_params"] < summary["params"] / 4
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert before["rewards/margins"] == 0.0
    assert summary["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["rewards/margins"] > 0.2 and after["rewards/accuracy"] == 1.0
    assert after["logp_accuracy"] >= before["logp_accuracy"]
    out = tmp_path / "align" / "dpo"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Trained over an int8 base, the adapter is merged into the fp32 base, and that serves.
    base = open_chat_model(str(tiny_chat_model))
    load_adapter(base.model, out / "adapter")
    x = torch.tensor([base.format.prompt([{"role": "user", "content": "Say hi"}])])
    merged = logits(out / "model", "Say hi")
    assert torch.allclose(base.model(x), merged, atol=1e-4)
    assert not torch.allclose(logits(tiny_chat_model, "Say hi"), merged, atol=1e-3)
    assert len(greedy(out / "model", "Say hi")) == 6


def test_reward_stage_writes_a_reward_model_with_held_out_accuracy(tiny_chat_model, tmp_path):
    data = preference_file(tmp_path / "pairs.jsonl")
    summary = stage("reward", tmp_path, f"reward.base={tiny_chat_model}", f"reward.data={data}",
                    "reward.val_fraction=0.3", "reward.margin=0.5",
                    *[f"reward.{o}" for o in TRAIN])
    assert summary["held_out"]["accuracy"] == 1.0 and summary["held_out"]["pairs"] >= 1
    metrics = [json.loads(line) for line in
               (tmp_path / "align" / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert "held_out_accuracy" in metrics[-1] and "chosen_reward" in metrics[-1]
    scorer = load_reward_model(tmp_path / "align" / "reward" / "model")
    assert scorer.score.weight.abs().sum() > 0


def test_sft_teaches_the_reply_and_its_end_of_turn_token(tiny_chat_model, tmp_path):
    """Before: the random base never stops. After a short SFT on one answer, greedy decoding
    gives that answer and stops at the end-of-turn token by itself. (Full fine-tuning: the
    random base's tiny tied embedding caps its logits, which adapters alone cannot lift.)"""
    answer = "Hello world, say hi again."
    lines = [json.dumps({"messages": [{"role": "user", "content": ask},
                                      {"role": "assistant", "content": answer}]})
             for ask in ASKS * 3]
    lines += [json.dumps({"messages": [{"role": "user", "content": "x"},
                                       {"role": "assistant", "content": " "}]}),
              json.dumps({"messages": [{"role": "user", "content": "x"}]})]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    summary = stage("sft", tmp_path, f"sft.base={tiny_chat_model}",
                    f"sft.data={tmp_path / 'chats.jsonl'}", "sft.val_fraction=0.2",
                    *[f"sft.{o}" for o in TRAIN], "sft.train.max_steps=40")
    assert summary["set_aside"] == {"empty_answer": 1, "no_assistant_turn": 1}
    assert summary["val_loss"] < summary["val_loss_before"] / 4
    before, after = (reply(d, "Talk to me") for d in (tiny_chat_model,
                                                        tmp_path / "align" / "sft" / "model"))
    assert before[1] == "length"
    assert after == (answer, "stop")


def reply(model_dir: Path, text: str) -> tuple[str, str]:
    chat = open_chat_model(str(model_dir))
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids)
    try:
        [out] = engine.generate([chat.format.prompt([{"role": "user", "content": text}])],
                                SamplingParams(max_tokens=24, temperature=0.0))
    finally:
        engine.shutdown()
    return out.choices[0].text, out.choices[0].finish_reason


def test_sft_then_grpo_chain_through_the_stages_under_one_run(tiny_chat_model, tmp_path):
    """sft from a base with GSM8K-style records and packing; grpo then starts from sft/model
    (its default upstream), and samples, scores and logs."""
    records = [json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a + b}"})
               for a in range(5) for b in range(5)]
    (tmp_path / "sums.jsonl").write_text("\n".join([*records, '{"question": 1}']) + "\n")
    sft_settings = [f"sft.base={tiny_chat_model}", f"sft.data={tmp_path / 'sums.jsonl'}",
                    "sft.packing=true", "sft.val_fraction=0.2", *[f"sft.{o}" for o in TRAIN]]
    sft = stage("sft", tmp_path, *sft_settings)
    assert sft["set_aside"] == {"malformed_record": 1} and sft["method"] == "full"
    assert sft["val_loss"] < sft["val_loss_before"]
    grpo = stage("grpo", tmp_path, *sft_settings, "grpo.group_size=4", "grpo.prompts_per_step=2",
                 "grpo.max_new_tokens=4", "grpo.val_prompts=4", "grpo.max_operand=4",
                 "grpo.kl_coef=0.05", "grpo.train.max_steps=2", "grpo.train.seq_len=64",
                 "grpo.train.log_every=1", "grpo.train.dtype=fp32")
    assert grpo["base"].endswith("sft/model") and grpo["steps"] == 2
    assert set(grpo["held_out_before"]) >= {"reward", "accuracy"}
    metrics = [json.loads(line) for line in
               (tmp_path / "align" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "zero_variance", "kl", "completion_length"} <= metrics[-1].keys()
    assert len(greedy(tmp_path / "align" / "grpo" / "model", "What is 1 + 1?")) == 6


def launch(run_dir: Path, nproc: int, verb: str, *overrides: str) -> dict:
    """`llmforge VERB` in its own process, or under `torchrun --nproc_per_node 2`."""
    cli = ["-m", "llmforge.cli", verb, f"run_dir={run_dir}", "name=align", *overrides]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    done = subprocess.run([sys.executable, *cli], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((run_dir / "align" / verb / "summary.json").read_text())


def logged(run_dir: Path, verb: str, key: str) -> list[float]:
    lines = (run_dir / "align" / verb / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("verb, extra", [
    ("dpo", []),
    ("reward", ["reward.lora={r: 4}"]),
    ("grpo", ["grpo.lora={r: 4}", "grpo.group_size=4", "grpo.max_new_tokens=4",
              "grpo.val_prompts=0", "grpo.max_operand=4"]),
])
def test_two_ranks_match_one_process_at_the_same_global_batch(tiny_chat_model, tmp_path,
                                                               verb, extra):
    """Each method under torchrun (DDP, gloo): half of every global batch per rank gives the
    losses of one process taking the whole batch; GRPO's ranks sample what one process would."""
    data = preference_file(tmp_path / "pairs.jsonl")
    common = [f"{verb}.base={tiny_chat_model}", *extra, f"{verb}.train.max_steps=4",
              f"{verb}.train.dtype=fp32", f"{verb}.train.log_every=1", f"{verb}.train.seq_len=64",
              f"{verb}.train.eval_every=100"]
    if verb != "grpo":
        common.append(f"{verb}.data={data}")
    per_rank = "prompts_per_step" if verb == "grpo" else "train.batch_size"
    single = launch(tmp_path / "one", 1, verb, *common, f"{verb}.{per_rank}=4")
    ranks = launch(tmp_path / "two", 2, verb, *common, f"{verb}.{per_rank}=2")
    assert single["world_size"] == 1 and ranks["world_size"] == 2
    if verb == "grpo":  # the same samples and rewards; losses differ by per-rank normalisation
        assert logged(tmp_path / "two", verb, "reward")[0] == pytest.approx(
            logged(tmp_path / "one", verb, "reward")[0], abs=1e-6)
    else:
        assert logged(tmp_path / "two", verb, "loss") == pytest.approx(
            logged(tmp_path / "one", verb, "loss"), rel=1e-4)
    assert (tmp_path / "two" / "align" / verb / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sft_from_a_base_model_under_torchrun_with_fsdp(tiny_chat_model, tmp_path):
    """Full fine-tuning sharded over two ranks writes one whole model directory."""
    records = [json.dumps({"prompt": ask, "completion": "Hello world, say hi again."})
               for ask in ASKS * 2]
    (tmp_path / "chats.jsonl").write_text("\n".join(records) + "\n")
    summary = launch(tmp_path, 2, "sft", f"sft.base={tiny_chat_model}",
                     f"sft.data={tmp_path / 'chats.jsonl'}", "sft.val_fraction=0.2",
                     "sft.train.parallel=fsdp", *[f"sft.{o}" for o in TRAIN])
    assert summary["world_size"] == 2 and summary["val_loss"] < summary["val_loss_before"]
    assert reply(tmp_path / "align" / "sft" / "model", "Say hi")[1] in ("stop", "length")


def test_lora_under_fsdp_and_a_reduced_base_without_lora_are_refused(tiny_chat_model):
    from llmforge.align.finetune import open_for_training
    from llmforge.align.lora import LoRAConfig
    from llmforge.align.reward import RewardConfig
    from llmforge.align.sft import SFTConfig
    from llmforge.train.loop import TrainConfig

    cfg = SFTConfig(base=str(tiny_chat_model), lora=LoRAConfig(r=4))
    cfg.train.parallel = "fsdp"
    with pytest.raises(ValueError, match="parallel=ddp"):
        open_for_training(cfg, cfg.base, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs lora"):
        SFTConfig(base_dtype="int8")
    with pytest.raises(ValueError, match="parallel must be ddp"):
        RewardConfig(train=TrainConfig(parallel="fsdp"))
