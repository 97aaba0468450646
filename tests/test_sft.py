"""SFT data: documented functions become (docstring -> code) chats, loss on the answer only."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmforge.align.sft import (
    Example,
    ExampleBatches,
    SFTConfig,
    docstring_examples,
    encode_examples,
    is_validation,
    jsonl_examples,
    load_examples,
    pad_batch,
)
from llmforge.tokenizer import (
    TokenizerConfig,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)


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
    encoded, _ = encode_examples(tok, EXAMPLES, seq_len=64)
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
    encoded, _ = encode_examples(tok, EXAMPLES, seq_len=24)
    for ids, targets in encoded:
        assert len(ids) == len(targets) <= 24
    prompt_len = len(render_chat(tok, [{"role": "user", "content": request(EXAMPLES[0])}])[0])
    # A window that ends before the answer starts has nothing to learn: it is dropped.
    none, skipped = encode_examples(tok, EXAMPLES[:1], seq_len=prompt_len)
    assert none == [] and skipped == {"no_assistant_tokens_within_seq_len": 1}
    one, _ = encode_examples(tok, EXAMPLES[:1], seq_len=prompt_len + 1)
    assert len(one) == 1 and sum(t != -100 for t in one[0][1]) == 1


def test_pad_batch():
    x, y = pad_batch([([5, 6, 7], [6, 7, -100]), ([9], [10])], pad_id=2)
    assert torch.equal(x, torch.tensor([[5, 6, 7], [9, 2, 2]]))
    assert torch.equal(y, torch.tensor([[6, 7, -100], [10, -100, -100]]))
    assert x.dtype == y.dtype == torch.long


def test_example_batches_are_deterministic_and_padded(tok):
    pad = tok.token_to_id("<|pad|>")
    encoded, _ = encode_examples(tok, EXAMPLES, seq_len=64)
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
    encoded, skipped = encode_examples(tok, [bad, EXAMPLES[2]], seq_len=64)
    assert len(encoded) == 1 and skipped == {"bad_message": 1}
