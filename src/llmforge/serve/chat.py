"""`llmforge chat`: a terminal conversation with a model directory, streamed as generated."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from llmforge.model.generate import generate
from llmforge.model.io import load_model
from llmforge.tokenizer import load_tokenizer, render_prompt, stop_ids
from llmforge.train.device import pick_device

HELP = "commands: /reset clears the history, /system TEXT sets a system prompt, /quit leaves"


def stream_text(tok, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a character split across tokens waits until whole."""
    ids: list[int] = []
    shown = ""
    for t in token_ids:
        ids.append(t)
        text = tok.decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text


def chat_loop(model_dir: Path, *, temperature: float, top_k: int, top_p: float,
              max_new_tokens: int, seed: int | None, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout) -> None:
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json (is this a model directory?)")
    model = load_model(model_dir, device=pick_device())
    tok = load_tokenizer(model_dir / "tokenizer.json")
    stops = stop_ids(tok)
    system: str | None = None
    history: list[dict] = []
    print(f"chatting with {model_dir} ({HELP})", file=stdout)
    while True:
        stdout.write("\n> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.rstrip("\n")
        if line == "/reset":
            history = []
            print("(history cleared)", file=stdout)
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            print(f"(system prompt: {system!r})", file=stdout)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = render_prompt(tok, messages)
        with torch.inference_mode():
            tokens = generate(model, prompt, max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, stop_ids=stops, seed=seed)
            reply = ""
            for piece in stream_text(tok, tokens):
                stdout.write(piece)
                stdout.flush()
                reply += piece
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
