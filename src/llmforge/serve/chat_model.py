"""A model ready to chat: weights, tokenizer, how a conversation becomes ids, and when to stop.

Three kinds of source open the same way:
- a model directory trained here (our chat format, `<|end|>` ends a turn);
- a Hugging Face model directory or `hf://owner/name[@revision]` (the model's own Jinja chat
  template; generation stops at its eos token(s) from generation_config.json and
  tokenizer_config.json);
- `gguf:PATH` (weights, tokenizer and chat template all from the GGUF file).

Stopping at the template's end-of-turn token is what keeps a chat model from running on into
an invented next turn, so every source must name at least one stop id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmforge.model.io import NATIVE_FORMAT, load_model, resolve_model_path
from llmforge.model.transformer import Transformer
from llmforge.tokenizer import BOS, load_tokenizer, render_prompt, stop_ids
from llmforge.tokenizer.templates import load_chat_template, render_chat_template

GGUF_PREFIX = "gguf:"
# BOS spellings of the tokenizers we open; the first one present in the vocabulary wins.
_BOS_TOKENS = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


@dataclass
class ChatModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    prompt_ids: Callable[[list[dict]], list[int]]  # messages -> ids ending in the reply's start
    stop_ids: list[int]
    bos_id: int | None = None  # the sequence-start token, where the tokenizer has one

    @property
    def prefix_id(self) -> int:
        """The token text with no context is scored after: BOS if there is one, else a stop."""
        return self.bos_id if self.bos_id is not None else self.stop_ids[0]


def open_chat_model(spec: str, device: str | torch.device = "cpu") -> ChatModel:
    """Open a model directory, an HF directory, `hf://owner/name` or `gguf:PATH` for chat."""
    if spec.startswith(GGUF_PREFIX):
        return _open_gguf(Path(spec.removeprefix(GGUF_PREFIX)), device)
    path = resolve_model_path(spec)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (is this a model directory?)")
    model = load_model(path, device=device)
    if _read_json(path / "config.json").get("format") == NATIVE_FORMAT:
        tok = load_tokenizer(path / "tokenizer.json")
        return ChatModel(spec, model, tok, lambda messages: render_prompt(tok, messages),
                         stop_ids(tok), _vocab_bos(tok, tok.token_to_id(BOS)))
    template = load_chat_template(path)
    if template is None:
        raise ValueError(f"{path}: no chat template (tokenizer_config.json 'chat_template' or "
                         f"chat_template.jinja); it is not a chat model")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = _read_json(path / "tokenizer_config.json")
    specials = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
    eos = _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
    eos += _ids(tok.token_to_id(specials["eos_token"]) if specials["eos_token"] else None)
    bos = tok.token_to_id(specials["bos_token"]) if specials["bos_token"] else None
    if bos is None:  # else the id generation_config.json or config.json declares
        bos = next((ids[0] for name in ("generation_config.json", "config.json")
                    if (ids := _ids(_read_json(path / name).get("bos_token_id")))), None)
    bos = _vocab_bos(tok, bos)
    return ChatModel(spec, model, tok, _template_prompt(tok, template, specials),
                     _require_stops(sorted(set(eos)), path), bos)


def _open_gguf(path: Path, device: str | torch.device) -> ChatModel:
    from llmforge.interop.gguf import load_gguf_model

    model, gguf = load_gguf_model(path, device=device)
    if gguf.chat_template is None:
        raise ValueError(f"{path}: the GGUF file has no tokenizer.chat_template")
    stops = _require_stops(_ids(gguf.eos_id), path)
    prompt = _template_prompt(gguf.tokenizer, gguf.chat_template, gguf.special_tokens)
    return ChatModel(f"{GGUF_PREFIX}{path}", model, gguf.tokenizer, prompt, stops,
                     _vocab_bos(gguf.tokenizer, gguf.bos_id))


def _template_prompt(tok: Tokenizer, template: str,
                     specials: dict[str, str | None]) -> Callable[[list[dict]], list[int]]:
    """Messages -> ids through the model's own template; its text already holds any BOS."""
    def prompt_ids(messages: list[dict]) -> list[int]:
        text = render_chat_template(template, messages, add_generation_prompt=True,
                                    **{k: v for k, v in specials.items() if v is not None})
        return tok.encode(text, add_special_tokens=False).ids

    return prompt_ids


def _require_stops(ids: list[int], where: Path) -> list[int]:
    if not ids:
        raise ValueError(f"{where}: no eos token id to stop generation at; a chat model without "
                         f"one would never stop")
    return ids


def _vocab_bos(tok: Tokenizer, bos: int | None) -> int | None:
    """`bos`, or where none is declared, the first well-known BOS spelling in the vocabulary."""
    if bos is not None:
        return bos
    vocab = tok.get_vocab(with_added_tokens=True)
    return next((vocab[t] for t in _BOS_TOKENS if t in vocab), None)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _token_text(value) -> str | None:
    """tokenizer_config stores a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
