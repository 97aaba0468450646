"""Fixtures shared by several test modules."""

import shutil

import pytest
import torch

CHROMIUM = shutil.which("chromium")  # Debian's /usr/bin/chromium, driven through Playwright


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are fastest on one thread, and do not stall when other work holds the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A native model directory small enough to serve in tests: our chat format, random weights."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmforge.model.config import ModelConfig
    from llmforge.model.io import save_model
    from llmforge.model.transformer import Transformer
    from llmforge.tokenizer import load_tokenizer
    from llmforge.tokenizer.bpe import TokenizerConfig, train_tokenizer

    tmp = tmp_path_factory.mktemp("tiny_chat_model")
    texts = ["def add(a, b):\n    return a + b\n", "Hello world, say hi again. Stop here.\n",
             "The quick brown fox jumps over the lazy dog. 0123456789 é ü 🌍\n"] * 8
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                             "source": ["t"] * len(texts)}), tmp / "docs.parquet")
    train_tokenizer(TokenizerConfig(vocab_size=400), tmp / "docs.parquet", tmp / "tok.json")
    tok = load_tokenizer(tmp / "tok.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), dim=64, n_layers=2,
                                    n_heads=4, n_kv_heads=2, max_seq_len=256))
    out = tmp / "model"
    save_model(model, out)
    shutil.copy(tmp / "tok.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (skipped where there is none); Playwright's `expect` waits up to 30 s
    while it is open, as pages here wait on a CPU model."""
    if CHROMIUM is None:
        pytest.skip("needs a chromium binary on PATH (Debian's /usr/bin/chromium) for Playwright")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM)
            yield b
            b.close()
    finally:
        expect.set_options(timeout=5_000)  # Playwright's default
