"""Weights I/O (safetensors only): our native layout and the Hugging Face Llama layout.

Both layouts hold the same tensors under different names; `_name_pairs` is the single mapping used
in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer

NATIVE_FORMAT = "llmforge"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Per-layer names: ours -> HF (under "layers.N." and "model.layers.N." respectively).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every stored tensor; tied models store the embedding only."""
    pairs = [(ours, hf) for ours, hf in _TOP_NAMES.items()]
    if cfg.tie_embeddings:
        pairs = [(ours, hf) for ours, hf in pairs if ours != "lm_head.weight"]
    for i in range(cfg.n_layers):
        pairs += [(f"layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in _LAYER_NAMES.items()]
    return pairs


def _cpu_state(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    return {
        k: v.detach().to("cpu", dtype or v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_model(model: Transformer, out_dir: Path,
               state: dict[str, Tensor] | None = None) -> None:
    """Native layout: config.json (ModelConfig fields + format tag) and model.safetensors.

    `state` replaces the model's own state dict (the gathered weights of a sharded model).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()} if state else None
    save_file(tensors or _cpu_state(model), out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    _write_json(out_dir / "config.json", {**model.cfg.to_dict(), "format": NATIVE_FORMAT})


def export_hf(
    model: Transformer,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
) -> None:
    """Hugging Face Llama layout that `LlamaForCausalLM.from_pretrained` loads directly.

    Tokenizer files and generation_config.json are the caller's job.
    """
    unsupported = [name for name, on in (("attn_bias", model.cfg.attn_bias),
                   ("qk_norm", model.cfg.qk_norm), ("n_experts", model.cfg.n_experts)) if on]
    if unsupported:
        raise ValueError(f"cannot export to the Hugging Face Llama layout: it has no "
                         f"{', '.join(unsupported)}; keep the native model directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(model, dtype)
    tensors = {hf: state[ours] for ours, hf in _name_pairs(model.cfg)}
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    _write_json(out_dir / "config.json", _hf_config(model.cfg, dtype, bos_token_id, eos_token_id))


def _hf_config(
    cfg: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Legacy key for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _hf_rope(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        # torch_dtype for transformers 4.x, dtype for 5.x.
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": cfg.rope_scaling or "default",
                            "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope |= {"low_freq_factor": cfg.rope_low_freq_factor,
                 "high_freq_factor": cfg.rope_high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_original_max_len}
    return rope


def _rope_from_hf(rope: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's RoPE-scaling fields from HF rope_parameters (5.x) or rope_scaling (4.x)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported RoPE scaling {rope!r} (plain, linear or llama3 only)")
    fields = {"rope_scaling": kind, "rope_factor": float(rope["factor"])}
    if kind == "llama3":
        fields |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
                   "rope_high_freq_factor": float(rope["high_freq_factor"]),
                   "rope_original_max_len": int(rope["original_max_position_embeddings"])}
    return fields


def _required(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"HF config.json is missing required key {key!r}")
    return hf[key]


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF Llama config onto ModelConfig, refusing variants we would compute wrongly."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(f"unsupported {key}=true (Llama without biases only)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    n_heads = _required(hf, "num_attention_heads")
    cfg = ModelConfig(
        vocab_size=_required(hf, "vocab_size"),
        dim=_required(hf, "hidden_size"),
        n_layers=_required(hf, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=_required(hf, "intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope_from_hf(rope),
    )
    head_dim = hf.get("head_dim") or cfg.head_dim
    if head_dim != cfg.head_dim:
        raise ValueError(
            f"unsupported head_dim={head_dim} (must equal hidden_size/num_attention_heads="
            f"{cfg.head_dim})"
        )
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    index = path / INDEX_FILE
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"shard {name} listed in {INDEX_FILE} is missing from {path}")
        try:
            tensors.update(load_file(path / name))
        except SafetensorError as e:
            raise ValueError(f"{path / name} is not a readable safetensors file: {e}") from None
    # Old HF checkpoints may carry the derived RoPE buffer; the model recomputes it.
    return {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}


def _names_list(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def _check_state(state: dict[str, Tensor], expected: dict[str, Tensor], where: Path) -> None:
    """Demand an exact name-and-shape match: a partial load must never pass silently."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {_names_list(missing)}")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor(s) {_names_list(unexpected)}")
    for name, ref in expected.items():
        if state[name].shape != ref.shape:
            raise ValueError(
                f"{where}: shape mismatch for {name}: weights {tuple(state[name].shape)} "
                f"vs config {tuple(ref.shape)}"
            )


def load_model(
    path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Load a native llmforge dir or a Hugging Face Llama dir (single-file or sharded)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = _read_json(config_path)
    native = raw.get("format") == NATIVE_FORMAT
    if native:
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "format"})
    elif raw.get("model_type") == "llama":
        cfg = _config_from_hf(raw)
    elif "model_type" in raw:
        raise ValueError(f"unsupported model_type {raw['model_type']!r} in {config_path}")
    else:
        raise ValueError(f"{config_path} is neither an llmforge nor a Hugging Face Llama config")
    tensors = _read_tensors(path)
    with torch.device(device):
        model = Transformer(cfg)
    file_name = dict(_name_pairs(cfg)) if not native else {k: k for k in model.state_dict()}
    model.to(dtype)
    # Check in the checkpoint's own names so errors point at what is actually in the files.
    expected = {file_name[k]: v for k, v in model.state_dict().items()}
    _check_state(tensors, expected, path)
    model.load_state_dict({ours: tensors[name] for ours, name in file_name.items()})
    return model
