"""Anthropic HH-RLHF transcripts as messages: SFT conversations and preference pairs."""

import gzip
import itertools
import json
from pathlib import Path

import pytest

from llmforge.align.hh import BadRecord, hh_conversations, hh_pairs, parse_transcript
from llmforge.align.sft import SFTConfig, is_hh_file, load_examples

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"
REAL = HH / "helpful-base" / "test.jsonl.gz"


@pytest.fixture
def real_sample(tmp_path) -> Path:
    """The first 200 records of a released split, gzipped as released."""
    if not REAL.is_file():
        pytest.skip(f"HH-RLHF data not found at {REAL}")
    with gzip.open(REAL, "rb") as f:
        head = b"".join(itertools.islice(f, 200))
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress(head))
    return path


def test_parse_transcript():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:  4 \n"
    assert parse_transcript(text) == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
    ]
    # "Human:" inside a turn, not after a blank line, is just text.
    assert parse_transcript("\n\nHuman: Say Human: x\n\nAssistant: ok")[0]["content"] == (
        "Say Human: x")


@pytest.mark.parametrize("text, reason", [
    ("Just some text", "missing_roles"),
    ("preamble\n\nHuman: a\n\nAssistant: b", "missing_roles"),
    ("\n\nAssistant: a\n\nHuman: b", "turns_out_of_order"),
    ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "turns_out_of_order"),
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "turns_out_of_order"),
    ("\n\nHuman: a\n\nAssistant:", "empty_answer"),
    ("\n\nHuman: \n\nAssistant: b", "empty_turn"),
])
def test_parse_transcript_rejects(text, reason):
    with pytest.raises(BadRecord, match=reason):
        parse_transcript(text)


def test_real_records(real_sample):
    conversations, skipped = hh_conversations(real_sample)
    pairs, pair_skipped = hh_pairs(real_sample)
    assert len(conversations) + sum(skipped.values()) == 200
    assert len(pairs) + sum(pair_skipped.values()) == 200
    assert len(conversations) > 180 and len(pairs) > 180
    assert conversations[0].id == "hh.jsonl.gz:1"
    assert conversations[0].messages[0]["content"].startswith(
        "Do you know why turkeys became the official food of thanksgiving?")
    for ex in conversations:
        roles = [m["role"] for m in ex.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"] and m["content"] == m["content"].strip() for m in ex.messages)


def test_pair_prompt_is_shared(real_sample):
    pairs, _ = hh_pairs(real_sample)
    by_id = {e.id: e.messages for e in hh_conversations(real_sample)[0]}
    with gzip.open(real_sample, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for pair in pairs:
        record = records[int(pair.id.rsplit(":", 1)[1]) - 1]
        assert parse_transcript(record["chosen"]) == [
            *pair.prompt, {"role": "assistant", "content": pair.chosen}]
        assert parse_transcript(record["rejected"]) == [
            *pair.prompt, {"role": "assistant", "content": pair.rejected}]
        assert pair.prompt[-1]["role"] == "user" and pair.chosen != pair.rejected
        assert by_id[pair.id] == [*pair.prompt, {"role": "assistant", "content": pair.chosen}]
    assert any(len(p.prompt) > 1 for p in pairs)  # multi-turn prompts are kept whole


def test_bad_records_are_counted_by_reason(tmp_path):
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({"chosen": good["chosen"]}).encode(),  # no rejected
        json.dumps({"chosen": "Hi", "rejected": "Hello"}).encode(),
        json.dumps({"chosen": "\n\nAssistant: x\n\nHuman: y",
                    "rejected": "\n\nAssistant: x\n\nHuman: z"}).encode(),
        json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: ",
                    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."}).encode(),
        json.dumps({"chosen": good["chosen"], "rejected": good["chosen"]}).encode(),
        json.dumps({"chosen": good["chosen"],
                    "rejected": "\n\nHuman: Bye\n\nAssistant: Go away."}).encode(),
        b'{"chosen": "\xff\xfe", "rejected": "x"}',
        b"",
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    pairs, skipped = hh_pairs(path)
    assert [(p.id, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("bad.jsonl:1", [{"role": "user", "content": "Hi"}], "Hello.", "Go away.")]
    assert skipped == {"unparsable_json": 1, "missing_fields": 1, "missing_roles": 1,
                       "turns_out_of_order": 1, "empty_answer": 1, "chosen_equals_rejected": 1,
                       "prompts_differ": 1, "invalid_utf8": 1}
    conversations, skipped = hh_conversations(path)
    assert [e.id for e in conversations] == ["bad.jsonl:1", "bad.jsonl:7", "bad.jsonl:8"]
    assert skipped == {"unparsable_json": 1, "missing_fields": 1, "missing_roles": 1,
                       "turns_out_of_order": 1, "empty_answer": 1, "invalid_utf8": 1}


def test_sft_data_accepts_an_hh_file(real_sample, tmp_path):
    assert is_hh_file(real_sample)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    assert not is_hh_file(chats)
    examples, skipped = load_examples(SFTConfig(data=str(real_sample), max_examples=50),
                                      tmp_path / "unused.parquet")
    assert len(examples) == 50 and examples[0].messages[-1]["role"] == "assistant"
    expected, expected_skipped = hh_conversations(real_sample, max_examples=50)
    assert [e.messages for e in examples] == [e.messages for e in expected]
    assert skipped == expected_skipped  # set aside counts reach the stage summary
