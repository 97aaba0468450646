"""SFT data: documented functions become (docstring -> code) chats, loss on the answer only."""

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmforge.align.sft import (
    Example,
    ExampleBatches,
    PackedBatches,
    SFTConfig,
    docstring_examples,
    encode_examples,
    is_validation,
    jsonl_examples,
    load_examples,
    pack_examples,
    pad_batch,
)
from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.runs import StageContext
from llmforge.tokenizer import (
    TokenizerConfig,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)
from llmforge.tokenizer.chat_format import native_format
from llmforge.train.loop import TrainConfig, train


def request(example: Example) -> str:
    return example.messages[0]["content"]


def answer(example: Example) -> str:
    return example.messages[-1]["content"]


MODULE = '''import functools



def documented(x, y):
    """Add two numbers together and return the sum.

    More detail that is not part of the request.
    """
    total = x + y
    return total


def undocumented(x):
    return x * 2


def short_doc(x):
    """Too short."""
    return x


@functools.lru_cache(maxsize=None)
def decorated(n):
    """Return the n-th triangular number, cached."""
    return n * (n + 1) // 2


class Box:
    def method(self, item):
        """Put the item into the box and return the box."""
        self.items.append(item)
        return self


async def fetch(url):
    """Fetch the url and return the body as text."""
    return await get(url)


def only_doc():
    """This function has a docstring and no body at all."""


def one_liner(x): return x + 1
'''

SECOND = '''def outer(values):
    """Return the values sorted by their absolute size."""

    def key(v):
        """Absolute value of v, used as the sort key."""
        return abs(v)

    return sorted(values, key=key)
'''

BROKEN = "def broken(:\n    pass\n"
PY2 = 'print "hello"\n'

ANSWERS = {
    "Add two numbers together and return the sum.":
        "def documented(x, y):\n    total = x + y\n    return total",
    "Return the n-th triangular number, cached.":
        "@functools.lru_cache(maxsize=None)\ndef decorated(n):\n    return n * (n + 1) // 2",
    "Put the item into the box and return the box.":
        "def method(self, item):\n    self.items.append(item)\n    return self",
    "Fetch the url and return the body as text.":
        "async def fetch(url):\n    return await get(url)",
    "Return the values sorted by their absolute size.":
        "def outer(values):\n\n    def key(v):\n"
        '        """Absolute value of v, used as the sort key."""\n'
        "        return abs(v)\n\n    return sorted(values, key=key)",
    "Absolute value of v, used as the sort key.": "def key(v):\n    return abs(v)",
}


def write_documents(path: Path, docs: dict[str, str]) -> Path:
    table = pa.table({"id": list(docs), "text": list(docs.values()),
                      "source": ["test"] * len(docs)})
    pq.write_table(table, path)
    return path


def line_of(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


@pytest.fixture
def documents(tmp_path) -> Path:
    return write_documents(tmp_path / "documents.parquet", {
        "pkg/mod.py": MODULE, "broken.py": BROKEN, "pkg/nested.py": SECOND, "old.py": PY2,
    })


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_tok")
    docs = write_documents(tmp / "documents.parquet",
                           {f"d{i}": MODULE + SECOND for i in range(3)})
    train_tokenizer(TokenizerConfig(vocab_size=320), docs, tmp / "tokenizer.json")
    return load_tokenizer(tmp / "tokenizer.json")


# ---- docstring_examples ----------------------------------------------------------------------


def test_docstring_examples(documents):
    examples, unparsable = docstring_examples(documents, SFTConfig())
    assert unparsable == 2  # the syntax error and the Python 2 file
    assert {request(e): answer(e) for e in examples} == ANSWERS
    assert len(examples) == len(ANSWERS)


def test_answers_have_no_docstring_and_are_dedented(documents):
    examples, _ = docstring_examples(documents, SFTConfig())
    by_request = {request(e): e for e in examples}
    method = by_request["Put the item into the box and return the box."]
    assert answer(method).startswith("def method(")  # dedented out of the class
    for e in examples:
        assert request(e) not in answer(e)
        assert not answer(e).startswith((" ", "\n")) and not answer(e).endswith("\n")
    # Only the first paragraph of a docstring is the request.
    assert "More detail" not in "".join(request(e) + answer(e) for e in examples)


def test_example_ids_name_file_and_line(documents):
    examples, _ = docstring_examples(documents, SFTConfig())
    ids = {request(e): e.id for e in examples}
    assert ids["Add two numbers together and return the sum."] == (
        f"pkg/mod.py:{line_of(MODULE, 'def documented(x, y):')}")
    # A decorated function is located by its def line, but its answer includes the decorator.
    assert ids["Return the n-th triangular number, cached."] == (
        f"pkg/mod.py:{line_of(MODULE, 'def decorated(n):')}")
    assert ids["Absolute value of v, used as the sort key."] == (
        f"pkg/nested.py:{line_of(SECOND, '    def key(v):')}")
    assert len(set(ids.values())) == len(ids)


def test_config_limits(documents):
    everything, _ = docstring_examples(documents, SFTConfig(min_request_chars=5))
    assert "Too short." in {request(e) for e in everything}
    assert len(everything) == len(ANSWERS) + 1

    two, unparsable = docstring_examples(documents, SFTConfig(max_examples=2))
    assert len(two) == 2
    assert unparsable == 0  # stopped after the first file

    expected = ANSWERS["Add two numbers together and return the sum."]
    fits, _ = docstring_examples(documents, SFTConfig(max_answer_chars=len(expected)))
    assert expected in {answer(e) for e in fits}
    assert all(len(answer(e)) <= len(expected) for e in fits)
    too_long, _ = docstring_examples(documents, SFTConfig(max_answer_chars=len(expected) - 1))
    assert expected not in {answer(e) for e in too_long}


def test_one_line_function_with_docstring_is_skipped(tmp_path):
    text = 'def one(x): """Return x plus one, as documented here."""; return x + 1\n\n\n' + SECOND
    documents = write_documents(tmp_path / "documents.parquet", {"one.py": text})
    examples, unparsable = docstring_examples(documents, SFTConfig())
    assert unparsable == 0
    assert "Return the values sorted by their absolute size." in {request(e) for e in examples}


# ---- validation split ------------------------------------------------------------------------


def test_is_validation_is_a_deterministic_fraction():
    ids = [f"pkg/mod{i}.py:{i % 97}" for i in range(2000)]
    first = [is_validation(i, 0.1) for i in ids]
    assert first == [is_validation(i, 0.1) for i in ids]
    assert 0.07 < sum(first) / len(ids) < 0.13
    assert not any(is_validation(i, 0.0) for i in ids)
    assert all(is_validation(i, 1.0) for i in ids)
    # Growing the fraction only adds examples to validation.
    wider = [is_validation(i, 0.3) for i in ids]
    assert all(w for f, w in zip(first, wider, strict=True) if f)


# ---- encoding and batches --------------------------------------------------------------------


def chat(id_: str, req: str, ans: str) -> Example:
    return Example(id_, [{"role": "user", "content": req}, {"role": "assistant", "content": ans}])


EXAMPLES = [
    chat("a:1", "Add two numbers together and return the sum.", ANSWERS[
        "Add two numbers together and return the sum."]),
    chat("a:2", "Fetch the url.", "async def fetch(url):\n    return await get(url)"),
    chat("a:3", "Return x.", "def f(x):\n    return x"),
    chat("a:4", "Put the item into the box.", ANSWERS[
        "Put the item into the box and return the box."]),
]


def test_targets_only_on_assistant_content_and_end(tok):
    end = tok.token_to_id("<|end|>")
    assistant = tok.token_to_id("<|assistant|>")
    encoded, _ = encode_examples(native_format(tok), EXAMPLES, seq_len=64)
    assert len(encoded) == len(EXAMPLES)
    for ex, (ids, targets) in zip(EXAMPLES, encoded, strict=True):
        full, mask = render_chat(tok, ex.messages)
        assert len(full) <= 65  # short enough not to be cut
        assert ids == full[:-1] and len(targets) == len(ids)
        assert targets == [t if m else -100 for t, m in zip(full[1:], mask[1:], strict=True)]
        learned = [t for t in targets if t != -100]
        assert learned[-1] == end
        assert tok.decode(learned[:-1]) == answer(ex)
        first = next(i for i, t in enumerate(targets) if t != -100)
        assert ids[first] == assistant  # learning starts at the token after <|assistant|>
        assert all(t != -100 for t in targets[first:])  # through to the final <|end|>
        answer_ids = tok.encode(answer(ex), add_special_tokens=False).ids
        assert learned == [*answer_ids, end]


def test_encoding_truncates_and_drops_examples_without_targets(tok):
    encoded, _ = encode_examples(native_format(tok), EXAMPLES, seq_len=24)
    for ids, targets in encoded:
        assert len(ids) == len(targets) <= 24
    prompt_len = len(render_chat(tok, [{"role": "user", "content": request(EXAMPLES[0])}])[0])
    # A window that ends before the answer starts has nothing to learn: it is dropped.
    none, skipped = encode_examples(native_format(tok), EXAMPLES[:1], seq_len=prompt_len)
    assert none == [] and skipped == {"no_assistant_tokens_within_seq_len": 1}
    one, _ = encode_examples(native_format(tok), EXAMPLES[:1], seq_len=prompt_len + 1)
    assert len(one) == 1 and sum(t != -100 for t in one[0][1]) == 1


def test_pad_batch():
    x, y = pad_batch([([5, 6, 7], [6, 7, -100]), ([9], [10])], pad_id=2)
    assert torch.equal(x, torch.tensor([[5, 6, 7], [9, 2, 2]]))
    assert torch.equal(y, torch.tensor([[6, 7, -100], [10, -100, -100]]))
    assert x.dtype == y.dtype == torch.long


def test_example_batches_are_deterministic_and_padded(tok):
    pad = tok.token_to_id("<|pad|>")
    encoded, _ = encode_examples(native_format(tok), EXAMPLES, seq_len=64)
    batches = ExampleBatches(encoded, batch_size=3, pad_id=pad, seed=11)
    x, y = batches(4, 1)
    x2, y2 = ExampleBatches(encoded, batch_size=3, pad_id=pad, seed=11)(4, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    draws = {tuple(map(tuple, batches(step, micro)[0].tolist()))
             for step in range(6) for micro in range(2)}
    assert len(draws) > 1  # different (step, micro) give different batches
    rows = {tuple(ids): targets for ids, targets in encoded}
    for step in range(6):
        x, y = batches(step, 0)
        assert x.shape[0] == 3 and x.shape == y.shape
        lengths = []
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            n = sum(t != pad for t in xi)  # content never encodes to the pad id
            lengths.append(n)
            assert tuple(xi[:n]) in rows and xi[n:] == [pad] * (len(xi) - n)
            assert yi[:n] == rows[tuple(xi[:n])]
            assert yi[n:] == [-100] * (len(yi) - n)
        assert x.shape[1] == max(lengths)  # padded to the longest row of this batch only


def test_example_batches_need_examples():
    with pytest.raises(ValueError, match="no SFT examples"):
        ExampleBatches([], batch_size=2, pad_id=2, seed=0)


# ---- conversations from JSONL ----------------------------------------------------------------


def test_jsonl_examples_read_both_formats_and_count_bad_lines(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}),
        json.dumps({"prompt": "2+2?", "completion": "4"}),
        "{not json",
        json.dumps({"text": "no conversation here"}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    examples, skipped = jsonl_examples(path)
    assert [e.id for e in examples] == ["chats.jsonl:1", "chats.jsonl:2"]
    assert examples[1].messages[-1] == {"role": "assistant", "content": "4"}
    assert skipped == {"malformed_record": 2, "no_assistant_turn": 1}


def test_load_examples_explains_an_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable conversations"):
        load_examples(SFTConfig(data=str(tmp_path / "empty.jsonl")), tmp_path / "unused.parquet")
    with pytest.raises(FileNotFoundError, match="sft.data"):
        load_examples(SFTConfig(data=str(tmp_path / "missing.jsonl")), tmp_path / "x.parquet")


def test_encoding_sets_aside_bad_roles(tok):
    bad = Example("b:1", [{"role": "robot", "content": "beep"},
                          {"role": "assistant", "content": "boop"}])
    encoded, skipped = encode_examples(native_format(tok), [bad, EXAMPLES[2]], seq_len=64)
    assert len(encoded) == 1 and skipped == {"bad_message": 1}


# ---- packing ---------------------------------------------------------------------------------


def packed_spans(doc_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each conversation in a row, from where the doc id changes."""
    starts = [i for i in range(len(doc_ids)) if i == 0 or doc_ids[i] != doc_ids[i - 1]]
    return list(zip(starts, [*starts[1:], len(doc_ids)], strict=True))


def test_packing_keeps_every_target_and_crosses_no_boundary(tok):
    pad, bos = tok.token_to_id("<|pad|>"), tok.token_to_id("<|bos|>")
    end = tok.token_to_id("<|end|>")
    examples = EXAMPLES * 3
    unpacked, _ = encode_examples(native_format(tok), examples, seq_len=1000)
    seq_len = 80
    rows, skipped = pack_examples(native_format(tok), examples, seq_len, pad)
    assert not skipped
    assert len(rows) < len(examples)  # several conversations share a row
    spans = [(x, y, start, stop) for x, y, doc_ids in rows
             for start, stop in packed_spans(doc_ids)]
    for x, _, doc_ids in rows:
        assert len(x) == len(doc_ids) == seq_len
        # Doc ids change exactly where a conversation starts.
        assert [start for start, _ in packed_spans(doc_ids)] == [
            i for i, t in enumerate(x) if t == bos]
    # In order, each conversation's inputs and targets are exactly the unpacked ones ...
    assert len(spans) == len(unpacked)
    for (x, y, start, stop), (ids, targets) in zip(spans, unpacked, strict=True):
        last = start + len(ids)  # its closing <|end|>: an input, or only the row's last target
        assert x[start:last] == ids and y[start:last] == targets
        # ... and after it nothing is learned: no target crosses into the next conversation.
        assert x[last:stop] == ([end] + [pad] * (stop - last - 1) if last < stop else [])
        assert y[last:stop] == [-100] * (stop - last)
    learned = sum(t != -100 for _, y, _ in rows for t in y)
    assert learned == sum(t != -100 for _, targets in unpacked for t in targets)
    assert sum(t == end for _, y, _ in rows for t in y) == len(examples)  # every <|end|> learned


def test_packing_sets_aside_long_and_bad_conversations(tok):
    pad = tok.token_to_id("<|pad|>")
    lengths = [len(render_chat(tok, e.messages)[0]) for e in EXAMPLES]
    seq_len = sorted(lengths)[1] - 1  # exactly two conversations fit a row
    bad = Example("b:1", [{"role": "robot", "content": "beep"}])
    rows, skipped = pack_examples(native_format(tok), [*EXAMPLES, bad], seq_len, pad)
    assert skipped == {"longer_than_seq_len": 2, "bad_message": 1}
    assert sum(x.count(tok.token_to_id("<|bos|>")) for x, _, _ in rows) == 2
    # A conversation of exactly seq_len + 1 tokens fills a row with nothing cut.
    rows, skipped = pack_examples(native_format(tok), EXAMPLES[:1], lengths[0] - 1, pad)
    assert not skipped and len(rows) == 1 and pad not in rows[0][0]
    assert rows[0][1][-1] == tok.token_to_id("<|end|>")


def test_packed_batches_are_deterministic(tok):
    pad = tok.token_to_id("<|pad|>")
    rows, _ = pack_examples(native_format(tok), EXAMPLES * 5, 64, pad)
    batches = PackedBatches(rows, batch_size=3, seed=5)
    x, y, doc_ids = batches(2, 1)
    assert x.shape == y.shape == doc_ids.shape == (3, 64)
    assert all(torch.equal(a, b) for a, b in
               zip((x, y, doc_ids), PackedBatches(rows, batch_size=3, seed=5)(2, 1), strict=True))
    assert {tuple(r) for r in x.tolist()} <= {tuple(r[0]) for r in rows}
    with pytest.raises(ValueError, match="no SFT examples"):
        PackedBatches([], batch_size=2, seed=0)


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_packed_sft_run_lowers_the_loss(tok, tmp_path):
    pad = tok.token_to_id("<|pad|>")
    rows, _ = pack_examples(native_format(tok), EXAMPLES * 4, 64, pad)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2,
                                    n_heads=4, n_kv_heads=2, max_seq_len=64))
    cfg = TrainConfig(seq_len=64, batch_size=4, max_steps=30, lr=1e-2, warmup_steps=3,
                      eval_every=1000, ckpt_every=1000, log_every=10, dtype="fp32")
    (tmp_path / "sft").mkdir()
    ctx = StageContext(name="sft", dir=tmp_path / "sft", root=tmp_path, recipe=None,
                       log=logging.getLogger("tests.sft.packed"))
    summary = train(model, cfg, PackedBatches(rows, cfg.batch_size, seed=0), ctx)
    assert summary["final_loss"] < 0.5 * summary["first_loss"]
