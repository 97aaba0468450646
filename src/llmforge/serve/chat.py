"""`llmforge chat`: a terminal conversation with a model, streamed as generated."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from llmforge.model.generate import generate
from llmforge.serve.chat_model import open_chat_model
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
    rest = tok.decode(ids)[len(shown):]
    if rest:  # a reply that really ends in U+FFFD, or stopped mid-character
        yield rest


def chat_loop(model: str | Path, *, temperature: float, top_k: int, top_p: float,
              max_new_tokens: int, seed: int | None, stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout) -> None:
    """Converse with a model directory, an HF directory, `hf://owner/name` or `gguf:PATH`."""
    chat = open_chat_model(str(model), device=pick_device())
    system: str | None = None
    history: list[dict] = []
    print(f"chatting with {chat.name} ({HELP})", file=stdout)
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
        if line == "/system" or line.startswith("/system "):
            system = line.removeprefix("/system").strip() or None
            print(f"(system prompt: {system!r})", file=stdout)
            continue
        history.append({"role": "user", "content": line})
        context = chat.model.cfg.max_seq_len
        budget = context - min(max_new_tokens, context // 2)
        prompt = _fit_prompt(chat.format.prompt, system, history, budget)
        if prompt is None:
            print("(message too long for this model's context; try a shorter one)", file=stdout)
            history.pop()
            continue
        with torch.inference_mode():
            tokens = generate(chat.model, prompt, max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, stop_ids=chat.stop_ids, seed=seed)
            reply = ""
            for piece in stream_text(chat.tokenizer, tokens):
                stdout.write(piece)
                stdout.flush()
                reply += piece
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def _fit_prompt(prompt_ids: Callable[[list[dict]], list[int]], system: str | None,
                history: list[dict], budget: int) -> list[int] | None:
    """The prompt for the newest turns that fit in `budget` tokens; older turns are dropped
    from `history` in place, a user/assistant pair at a time."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = prompt_ids(messages)
        if len(prompt) <= budget:
            return prompt
        if len(history) <= 1:
            return None
        del history[:2]
