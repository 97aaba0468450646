"""The tiny recipe through every stage, as a user runs it, and what each stage must have written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from llmforge.cli import main
from llmforge.model.io import load_model
from llmforge.tokenizer import load_tokenizer, open_shard, render_prompt

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
STAGES = ("data", "tokenizer", "tokenize", "pretrain", "sft", "eval", "export", "report")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    assert main(["run", str(TINY), f"run_dir={runs}"]) == 0
    return runs / "tiny"


def summary(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "summary.json").read_text())


def test_every_stage_wrote_its_outputs(run):
    for stage in STAGES:
        assert (run / stage / "summary.json").is_file(), stage
        assert (run / stage / "config.yaml").is_file(), stage
        assert (run / stage / "log.txt").is_file(), stage
    data = summary(run, "data")
    assert data["read"] == data["kept"] + sum(data["dropped"].values())
    assert pq.read_table(run / "data" / "documents").num_rows == data["kept"]
    assert len(open_shard(run / "tokenize", "train")) > 100_000
    assert (run / "pretrain" / "checkpoints").is_dir()
    assert (run / "report.html").stat().st_size > 10_000


def test_pretraining_beats_the_unigram_baseline(run):
    result = json.loads((run / "eval" / "eval.json").read_text())
    pretrain = result["models"]["pretrain"]
    assert pretrain["val_loss"] < result["unigram_nats"]
    assert 0 < pretrain["bpb"] < 8
    losses = [json.loads(line)["loss"] for line in open(run / "pretrain" / "metrics.jsonl")]
    assert losses[-1] < losses[0]
    assert all(s["completion"] is not None for s in pretrain["samples"])


def test_sft_lowers_the_loss_on_assistant_tokens(run):
    sft = summary(run, "sft")
    assert sft["train_examples"] > 100
    assert sft["val_loss"] < sft["val_loss_before"]


def test_export_loads_in_transformers_with_equal_logits(run):
    transformers = pytest.importorskip("transformers")
    out = run / "export" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(run / "sft" / "model").eval()
    tok = load_tokenizer(out / "tokenizer.json")
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "Add two numbers."}])])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Add two numbers."}]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()


def test_rerun_skips_and_a_changed_setting_reruns_downstream_only(run):
    before = {s: summary(run, s)["run_id"] for s in STAGES}
    runs = str(run.parent)
    assert main(["run", str(TINY), f"run_dir={runs}"]) == 0
    assert {s: summary(run, s)["run_id"] for s in STAGES} == before
    assert main(["eval", str(TINY), f"run_dir={runs}", "eval.max_new_tokens=8"]) == 0
    after = {s: summary(run, s)["run_id"] for s in STAGES}
    changed = {s for s in STAGES if after[s] != before[s]}
    assert changed == {"eval"}


def test_bad_config_keys_fail_with_one_clear_line(tmp_path, capsys):
    assert main(["pretrain", str(TINY), f"run_dir={tmp_path}", "train.lrr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'train.lrr'" in err and len(err.splitlines()) == 1
    assert main(["pretrain", str(TINY), "train.max_steps=many"]) == 2
    assert "train.max_steps: expected int, got 'many'" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_user_data_and_user_conversations(tmp_path):
    """--data with real books and sft.data with real GSM8K conversations instead of the corpus."""
    shared = Path(__file__).parents[2] / "shared" / "data"
    if not (shared / "gutenberg-nltk").is_dir():
        pytest.skip(f"shared data not found at {shared}")
    chats = tmp_path / "gsm8k.jsonl"
    with open(shared / "gsm8k" / "train.jsonl") as f, open(chats, "w") as out:
        for line, _ in zip(f, range(300), strict=False):
            record = json.loads(line)
            out.write(json.dumps({"prompt": record["question"], "completion": record["answer"]}))
            out.write("\n")
        out.write("{broken\n")
    books = str(shared / "gutenberg-nltk" / "*.txt")
    args = ["sft", str(TINY), f"run_dir={tmp_path}", f"sft.data={chats}",
            "data.steps=[clean, {length: {max_chars: 2000000}}]", "train.max_steps=20",
            "sft.train.max_steps=10", "sft.val_fraction=0.1", "--data", books]
    assert main(args) == 2  # 13 whole books: none falls in a 2% validation split
    assert main([*args, "tokenize.val_fraction=0.3"]) == 0
    run = tmp_path / "tiny"
    data = summary(run, "data")
    assert data["read"] == len(list((shared / "gutenberg-nltk").glob("*.txt")))
    assert data["dropped"] == {"invalid_utf8": 2}  # two of the books are Latin-1: set aside
    sft = summary(run, "sft")
    assert sft["set_aside"] == {"malformed_record": 1}
    assert sft["train_examples"] + sft["val_examples"] == 300
    assert not (run / "eval").exists()  # only what sft needs ran
