"""A model ready to chat: weights, tokenizer, how a conversation becomes ids, and when to stop.

Three kinds of source open the same way:
- a model directory trained here (our chat format, `<|end|>` ends a turn);
- a Hugging Face model directory or `hf://owner/name[@revision]` (the model's own Jinja chat
  template; generation stops at its eos token(s) from generation_config.json and
  tokenizer_config.json);
- `gguf:PATH`, or `gguf:PACKAGE/FILE` for a file an installed package ships (weights,
  tokenizer and chat template all from the GGUF file).

Stopping at the template's end-of-turn token is what keeps a chat model from running on into
an invented next turn, so every source must name at least one stop id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llmforge.model.io import NATIVE_FORMAT, export_hf, load_model, resolve_model_path, save_model
from llmforge.model.transformer import Transformer
from llmforge.tokenizer import BOS, CHAT_TEMPLATE, load_tokenizer, stop_ids
from llmforge.tokenizer.bpe import END
from llmforge.tokenizer.chat_format import ChatFormat, native_format, template_format
from llmforge.tokenizer.templates import load_chat_template

GGUF_PREFIX = "gguf:"
# BOS spellings of the tokenizers we open; the first one present in the vocabulary wins.
_BOS_TOKENS = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


@dataclass
class ChatModel:
    name: str
    model: Transformer
    tokenizer: Tokenizer
    format: ChatFormat  # conversations and prompts as ids, in the model's own chat format
    stop_ids: list[int]
    bos_id: int | None = None  # the sequence-start token, where the tokenizer has one

    @property
    def prefix_id(self) -> int:
        """The token text with no context is scored after: BOS if there is one, else a stop."""
        return self.bos_id if self.bos_id is not None else self.stop_ids[0]


def open_chat_model(spec: str, device: str | torch.device = "cpu") -> ChatModel:
    """Open a model directory, an HF directory, `hf://owner/name` or `gguf:PATH` for chat."""
    if spec.startswith(GGUF_PREFIX):
        from llmforge.interop.gguf import resolve_gguf_path

        return _open_gguf(resolve_gguf_path(spec.removeprefix(GGUF_PREFIX)), device)
    path = resolve_model_path(spec)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (is this a model directory?)")
    model = load_model(path, device=device)
    if _read_json(path / "config.json").get("format") == NATIVE_FORMAT:
        tok = load_tokenizer(path / "tokenizer.json")
        return ChatModel(spec, model, tok, native_format(tok), stop_ids(tok),
                         _vocab_bos(tok, tok.token_to_id(BOS)))
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
    return ChatModel(spec, model, tok, template_format(tok, template, specials),
                     _require_stops(sorted(set(eos)), path), bos)


def save_chat_model(chat: ChatModel, out_dir: Path, *, hf: bool | None = None,
                    dtype: torch.dtype = torch.float32,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """A directory `open_chat_model` reopens as the same chat model: our native layout for a
    model in our format, else (or with hf=True) the Hugging Face layout with the chat template,
    special tokens and stop ids that transformers and vLLM read. `state` replaces the model's
    own weights (the gathered state of a sharded model)."""
    out_dir = Path(out_dir)
    fmt = chat.format
    hf = fmt.template is not None if hf is None else hf
    if not hf and fmt.template is not None:
        raise ValueError("a model with its own chat template is saved in the Hugging Face layout")
    if hf:
        export_hf(chat.model, out_dir, dtype=dtype, bos_token_id=chat.bos_id,
                  eos_token_id=chat.stop_ids, state=state)
    else:
        save_model(chat.model, out_dir, state=state)
    chat.tokenizer.save(str(out_dir / "tokenizer.json"))
    if not hf:
        return
    ours = fmt.template is None
    specials = {"bos_token": BOS, "eos_token": END, "pad_token": "<|pad|>"} if ours \
        else fmt.special_tokens
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "chat_template": CHAT_TEMPLATE if ours else fmt.template,
        "clean_up_tokenization_spaces": False, "add_bos_token": False,
        "model_max_length": chat.model.cfg.max_seq_len,
    })
    pad = chat.tokenizer.token_to_id(specials.get("pad_token") or "")
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": chat.bos_id, "eos_token_id": chat.stop_ids,
        **({"pad_token_id": pad} if pad is not None else {}),
        "do_sample": False, "max_new_tokens": 256,
    })


def _open_gguf(path: Path, device: str | torch.device) -> ChatModel:
    from llmforge.interop.gguf import load_gguf_model

    model, gguf = load_gguf_model(path, device=device)
    if gguf.chat_template is None:
        raise ValueError(f"{path}: the GGUF file has no tokenizer.chat_template")
    stops = _require_stops(_ids(gguf.eos_id), path)
    chat_format = template_format(gguf.tokenizer, gguf.chat_template, gguf.special_tokens)
    return ChatModel(f"{GGUF_PREFIX}{path}", model, gguf.tokenizer, chat_format, stops,
                     _vocab_bos(gguf.tokenizer, gguf.bos_id))


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


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
