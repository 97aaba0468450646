"""`llmforge chat`: streamed decoding and the terminal conversation loop."""

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmforge.model.config import ModelConfig
from llmforge.model.generate import generate
from llmforge.model.io import load_model, save_model
from llmforge.model.transformer import Transformer
from llmforge.serve.chat import HELP, chat_loop, stream_text
from llmforge.tokenizer import (
    TokenizerConfig,
    load_tokenizer,
    render_prompt,
    stop_ids,
    train_tokenizer,
)

CORPUS = [
    "def greet(name):\n    return f'hello {name}'  # 🐍 snake\n",
    "Größe über naïve façade — 日本語のテキスト, emoji 🎉🐍, Ελληνικά.\n",
    "You are terse. Say hello to the world, please.\n",
]
# Characters the tokenizer never saw come out as one token per byte, so they split mid-character.
STREAMED = [
    "hello 🎉 wörld",
    "日本語のテキスト and 中文字符 🦀🦀 👩‍🚀",
    "Ελληνικά ∮ E⋅da = Q, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "plain ascii only",
]
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat_tok")
    docs = tmp / "documents.parquet"
    texts = CORPUS * 4
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                             "source": ["test"] * len(texts)}), docs)
    train_tokenizer(TokenizerConfig(vocab_size=300), docs, tmp / "tokenizer.json")
    return tmp / "tokenizer.json"


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, tok_path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4,
                      n_kv_heads=2, max_seq_len=64)
    out = tmp_path_factory.mktemp("chat_model") / "model"
    save_model(Transformer(cfg), out)
    shutil.copy(tok_path, out / "tokenizer.json")
    return out


# ---- stream_text -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", STREAMED)
def test_stream_joins_to_the_full_decode(tok, text):
    ids = tok.encode(text).ids
    pieces = list(stream_text(tok, ids))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all(pieces)  # nothing empty is emitted
    for piece in pieces:
        assert "\ufffd" not in piece  # never half a character


def test_stream_waits_for_split_characters(tok):
    ids = tok.encode("a🦀b").ids
    # The crab is split across byte tokens: a prefix of the ids decodes to a replacement char.
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    pieces = list(stream_text(tok, ids))
    assert pieces[0] == "a"
    assert "🦀" in pieces
    assert len(pieces) < len(ids)


def test_stream_is_lazy(tok):
    ids = tok.encode("hello there").ids
    consumed = []

    def source():
        for t in ids:
            consumed.append(t)
            yield t

    stream = stream_text(tok, source())
    first = next(stream)
    assert consumed == ids[:1] and first == tok.decode(ids[:1])


def test_stream_truncated_mid_character_emits_no_half_character(tok):
    ids = tok.encode("ok🦀").ids
    pieces = list(stream_text(tok, ids[:-1]))  # generation stopped inside the crab
    assert "".join(pieces[:-1]) == "ok"  # the half character waits while tokens may complete it
    assert "".join(pieces) == tok.decode(ids[:-1])  # and shown as U+FFFD once they stop


def test_stream_of_nothing(tok):
    assert list(stream_text(tok, [])) == []


def test_stream_keeps_a_real_replacement_character(tok):
    ids = tok.encode("ok \ufffd").ids
    assert "".join(stream_text(tok, ids)) == tok.decode(ids) == "ok \ufffd"


# ---- chat_loop -------------------------------------------------------------------------------


def reply(model_dir: Path, tok, messages: list[dict]) -> str:
    """What greedy chat should print for this conversation, computed independently."""
    model = load_model(model_dir)
    tokens = generate(model, render_prompt(tok, messages), MAX_NEW, stop_ids=stop_ids(tok))
    return "".join(stream_text(tok, tokens))


def chat(model_dir: Path, lines: str) -> str:
    stdout = io.StringIO()
    chat_loop(model_dir, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
              seed=0, stdin=io.StringIO(lines), stdout=stdout)
    return stdout.getvalue()


def test_chat_session(model_dir, tok):
    out = chat(model_dir, "/system Be terse.\nhello there\n/reset\nagain\n/quit\nnever read\n")
    system = {"role": "system", "content": "Be terse."}
    first = reply(model_dir, tok, [system, {"role": "user", "content": "hello there"}])
    # /reset clears the history but keeps the system prompt.
    second = reply(model_dir, tok, [system, {"role": "user", "content": "again"}])
    assert out == (
        f"chatting with {model_dir} ({HELP})\n"
        "\n> (system prompt: 'Be terse.')\n"
        f"\n> {first}\n"
        "\n> (history cleared)\n"
        f"\n> {second}\n"
        "\n> "
    )


def test_chat_keeps_history(model_dir, tok):
    out = chat(model_dir, "hi\nmore\n")  # end of input also ends the chat
    first = reply(model_dir, tok, [{"role": "user", "content": "hi"}])
    second = reply(model_dir, tok, [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "more"},
    ])
    assert out == f"chatting with {model_dir} ({HELP})\n\n> {first}\n\n> {second}\n\n> "


def test_chat_system_prompt_can_be_cleared(model_dir, tok):
    out = chat(model_dir, "/system Be kind.\n/system\nhi\n /quit \n")
    expected = reply(model_dir, tok, [{"role": "user", "content": "hi"}])
    assert "(system prompt: 'Be kind.')" in out
    assert "(system prompt: None)" in out
    assert out.endswith(f"\n> {expected}\n\n> ")


def test_chat_on_empty_input_prints_banner_and_returns(model_dir):
    assert chat(model_dir, "") == f"chatting with {model_dir} ({HELP})\n\n> "


def test_chat_needs_a_tokenizer(tmp_path, model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        chat(bare, "hi\n")


def test_chat_survives_a_message_longer_than_the_context(model_dir):
    long_line = " ".join(["hello world"] * 40)  # more tokens than max_seq_len=64
    out = chat(model_dir, f"{long_line}\n/reset\n/quit\n")
    assert out.endswith("\n> (history cleared)\n\n> ")


def test_chat_survives_a_history_longer_than_the_context(model_dir, tok):
    lines = [f"message number {i}, say hello to the world" for i in range(8)]
    assert sum(len(tok.encode(line).ids) for line in lines) > 64
    out = chat(model_dir, "\n".join(lines) + "\n")
    assert out.count("\n> ") == len(lines) + 1  # every message got a turn, none an error
    assert "too long" not in out


def test_only_the_exact_system_command_sets_the_system_prompt(model_dir):
    out = chat(model_dir, "/systemd is confusing\n/quit\n")
    assert "(system prompt:" not in out
