"""Weight-only quantization into a model that chat, serve and eval open as it is.

int8 and int4 replace the blocks' linear layers with Int8Linear / Int4Linear (model/quant.py)
and write a model directory in the source's own layout: ours native, a Hugging Face or GGUF
source the Hugging Face layout with its chat template, specials and stop ids. The weights file
holds the codes and scales, and config.json the method (see model/io.py), so `load_model`
rebuilds the same layers with the same codes. The tied embedding and output stay float (bf16
on disk): their quality matters most.

q8_0 and q4_0 write a llama.cpp GGUF file instead (interop/gguf.py's `write_gguf`), with the
model's chat template and special tokens, which `gguf:FILE` opens here too.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llmforge.model.quant import GROUP_SIZES, apply_quantization, quantization_of
from llmforge.serve.chat_model import ChatModel, open_chat_model, save_chat_model
from llmforge.tokenizer import CHAT_TEMPLATE
from llmforge.tokenizer.bpe import PAD

METHODS = ("int8", "int4", "q8_0", "q4_0")
GGUF_METHODS = ("q8_0", "q4_0")


def quantize_model(spec: str, out: Path, *, method: str, group_size: int = 32) -> Path:
    """Quantize the model `spec` (anything `open_chat_model` opens) with `method` into `out`: a
    model directory (int8, int4: groups of `group_size` input weights) or a .gguf file."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} ({', '.join(METHODS)})")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    chat = open_chat_model(spec)
    if quantization_of(chat.model):
        raise ValueError(f"{spec} is quantized already ({quantization_of(chat.model)}); "
                         f"quantize its float original")
    out = Path(out)
    if method in GGUF_METHODS:
        return _write_gguf(chat, out, method)
    if method == "int4":
        _check_groups_fit(chat.model, group_size)
    apply_quantization(chat.model, {"method": method, "group_size": group_size})
    save_chat_model(chat, out)
    return out


def _check_groups_fit(model: nn.Module, group_size: int) -> None:
    """Every block layer's input width must split into groups, else it would stay float."""
    widths = {m.in_features for m in model.layers.modules() if isinstance(m, nn.Linear)}
    odd = sorted(w for w in widths if w % group_size)
    if odd:
        fitting = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        raise ValueError(f"int4 group size {group_size} does not divide the input width(s) "
                         f"{odd} of the model's layers; use one that does "
                         f"({', '.join(map(str, fitting)) or 'none fits'})")


def _write_gguf(chat: ChatModel, out: Path, method: str) -> Path:
    from llmforge.interop.gguf import write_gguf

    fmt, tok = chat.format, chat.tokenizer
    specials = fmt.special_tokens if fmt.template is not None else {"pad_token": PAD}
    # The GGUF names one eos, the only stop our reader knows: the model's own eos token where
    # it is one of the stops, else the first stop (the end of turn, for ours).
    eos = tok.token_to_id(specials.get("eos_token") or "")
    pad = tok.token_to_id(specials.get("pad_token") or "")
    return write_gguf(chat.model, tok, out, dtype=method,
                      chat_template=fmt.template or CHAT_TEMPLATE, bos_id=chat.bos_id,
                      eos_id=eos if eos in chat.stop_ids else chat.stop_ids[0], pad_id=pad)
