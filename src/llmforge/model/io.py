"""Weights I/O (safetensors only): our native layout and the Hugging Face Llama-family layouts.

Hugging Face checkpoints of model_type llama (SmolLM2 too), mistral and qwen2 load; export writes
Llama, or Qwen2 for a model with q/k/v biases. The layouts hold the same tensors under different
names; `_name_pairs` is the single mapping used in both directions.

A model with Int8Linear / Int4Linear layers (model/quant.py) is saved as their codes and scales
(the modules' state dicts: int8 codes and a scale per row; int4 codes two a byte in plain order
and a bf16 scale and zero per group), with the method in config.json: "quantization" in ours,
`quantization_config` with quant_method "llmforge" in the HF layout (which transformers does not
read). Its embedding (and untied output) is stored in bf16 and loads back as fp32: a third
less on disk for SmolLM2-135M in int4, for +0.1% in loss there (logits 1% apart), less than
what int8 blocks cost it. `load_model` rebuilds the quantized layers and loads the stored
codes into them unchanged.
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
from llmforge.model.quant import Int4Linear, Int8Linear, apply_quantization, quantization_of
from llmforge.model.transformer import Transformer

NATIVE_FORMAT = "llmforge"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_FAMILIES = ("llama", "mistral", "qwen2")
HF_PREFIX = "hf://"
# What resolve_model_path fetches from the Hub: configs, weights, tokenizer, chat templates.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]

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
# Qwen2's biases: q, k and v only (o_proj has none).
_BIAS_NAMES = {
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# quantization_config's quant_method for our quantized layers.
HF_QUANT_METHOD = "llmforge"
# Defaults of the transformers config classes for keys a config.json may leave out.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}


def _name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every stored tensor; tied models store the embedding only."""
    pairs = [(ours, hf) for ours, hf in _TOP_NAMES.items()]
    if cfg.tie_embeddings:
        pairs = [(ours, hf) for ours, hf in pairs if ours != "lm_head.weight"]
    layer_names = _LAYER_NAMES | (_BIAS_NAMES if cfg.attn_bias else {})
    for i in range(cfg.n_layers):
        pairs += [(f"layers.{i}.{a}", f"model.layers.{i}.{b}") for a, b in layer_names.items()]
    return pairs


def _hf_names(cfg: ModelConfig, names) -> dict[str, str]:
    """Our name -> HF name for each of `names`; a quantized layer's codes and scales sit under
    its HF module name, as its weight would."""
    modules = {ours.rpartition(".")[0]: hf.rpartition(".")[0] for ours, hf in _name_pairs(cfg)}
    hf_names = {}
    for name in names:
        module, _, tensor = name.rpartition(".")
        hf_names[name] = f"{modules[module]}.{tensor}"
    return hf_names


def resolve_model_path(spec: str | Path) -> Path:
    """A local model directory for `spec`: `hf://owner/name[@revision]` is downloaded from the
    Hugging Face Hub (configs, safetensors, tokenizer and chat template files only) into the
    Hub cache; anything else is a local path and passes through unchanged."""
    if isinstance(spec, Path) or not spec.startswith(HF_PREFIX):
        return Path(spec)
    repo_id, sep, revision = spec.removeprefix(HF_PREFIX).partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (sep and not revision):
        raise ValueError(f"bad Hugging Face model spec {spec!r}: expected "
                         f"{HF_PREFIX}owner/name or {HF_PREFIX}owner/name@revision")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec} needs huggingface_hub: pip install 'llmforge[hf]'") from None
    local = snapshot_download(repo_id, revision=revision or None,
                              allow_patterns=HF_ALLOW_PATTERNS)
    return Path(local)


def _cpu_state(state: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}


def _stored_state(model: Transformer, state: dict[str, Tensor] | None,
                  dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """What a save writes: floats in `dtype` (default: as they are); in a quantized model the
    quantized layers' tensors as they are and the embedding and output in bf16."""
    state = state or model.state_dict()
    if quantization_of(model) is None:
        return _cpu_state(state, dtype)
    quantized = {name for name, m in model.named_modules()
                 if isinstance(m, Int4Linear | Int8Linear)}
    stored = {}
    for name, v in state.items():
        if name in ("tok_emb.weight", "lm_head.weight"):
            to = torch.bfloat16
        else:
            to = v.dtype if dtype is None or name.rpartition(".")[0] in quantized else dtype
        stored[name] = v.detach().to("cpu", to).contiguous()
    return stored


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_weights(tensors: dict[str, Tensor], out_dir: Path) -> None:
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    # A sharded index left by an earlier save would win over the new file when loading.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)


def save_model(model: Transformer, out_dir: Path,
               state: dict[str, Tensor] | None = None) -> None:
    """Native layout: config.json (ModelConfig fields + format tag) and model.safetensors.

    `state` replaces the model's own state dict (the gathered weights of a sharded model).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(_stored_state(model, state), out_dir)
    quantization = quantization_of(model)
    _write_json(out_dir / "config.json", {**model.cfg.to_dict(), "format": NATIVE_FORMAT,
                                          **({"quantization": quantization} if quantization
                                             else {})})


def export_hf(
    model: Transformer,
    out_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    state: dict[str, Tensor] | None = None,
) -> None:
    """Hugging Face layout that `AutoModelForCausalLM.from_pretrained` loads directly: Qwen2
    (`Qwen2ForCausalLM`) when the model has q/k/v biases, Llama (`LlamaForCausalLM`) otherwise.

    `state` replaces the model's own state dict, as in `save_model`. Tokenizer files and
    generation_config.json are the caller's job.
    """
    unsupported = [name for name, on in (("qk_norm", model.cfg.qk_norm),
                                         ("n_experts", model.cfg.n_experts)) if on]
    if unsupported:
        raise ValueError(f"cannot export to the Hugging Face Llama or Qwen2 layout: neither has "
                         f"{', '.join(unsupported)}; keep the native model directory")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _stored_state(model, state, dtype)
    names = _hf_names(model.cfg, state)
    _write_weights({names[ours]: t for ours, t in state.items()}, out_dir)
    config = _hf_config(model.cfg, dtype, bos_token_id, eos_token_id)
    quantization = quantization_of(model)
    if quantization:
        config["quantization_config"] = {"quant_method": HF_QUANT_METHOD, **quantization}
    _write_json(out_dir / "config.json", config)


def _hf_config(
    cfg: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
) -> dict[str, Any]:
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Legacy key for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _hf_rope(cfg),
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        # torch_dtype for transformers 4.x, dtype for 5.x.
        "torch_dtype": str(dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.attn_bias:  # Qwen2: q/k/v biases are built in, there is no bias switch
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": cfg.n_layers,
            "layer_types": ["full_attention"] * cfg.n_layers,
            **({"head_dim": cfg.head_dim} if cfg.head_dim_override else {}),
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common,
        "head_dim": cfg.head_dim,
        "attention_bias": False,
        "mlp_bias": False,
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


def _rope_key(rope: dict[str, Any], key: str) -> Any:
    if key not in rope:
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} needs rope_parameters[{key!r}]")
    return rope[key]


def _rope_from_hf(hf: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """ModelConfig's RoPE fields from HF rope_scaling (4.x) or rope_parameters (5.x), looked up
    in transformers' order: rope_scaling wins, rope_theta falls back to the top level."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"unsupported RoPE scaling {rope!r} (one flat dict expected, "
                         f"not per-layer-type parameters)")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"unsupported partial_rotary_factor={partial} (RoPE on whole heads only)")
    fields: dict[str, Any] = {
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return fields
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported RoPE scaling rope_type={kind!r} in {rope!r} "
                         f"(default, linear or llama3 only)")
    fields |= {"rope_scaling": kind, "rope_factor": float(_rope_key(rope, "factor"))}
    if kind == "llama3":
        original = rope.get("original_max_position_embeddings",
                            hf.get("original_max_position_embeddings", max_positions))
        fields |= {"rope_low_freq_factor": float(_rope_key(rope, "low_freq_factor")),
                   "rope_high_freq_factor": float(_rope_key(rope, "high_freq_factor")),
                   "rope_original_max_len": int(original)}
    return fields


def _required(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"HF config.json is missing required key {key!r}")
    return hf[key]


def _sliding_window_check(hf: dict[str, Any], family: str, max_positions: int) -> None:
    """Sliding-window attention is not implemented: accept a config only where it has no
    effect (switched off, or a window covering every position the model can see)."""
    window = hf.get("sliding_window")
    if family == "mistral":
        on, what = window is not None, "sliding_window"
    elif family == "qwen2":
        # transformers: the window applies when use_sliding_window is set, and then only to the
        # layers marked sliding_attention (by default those from max_window_layers on).
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
            if odd:
                raise ValueError(f"unsupported layer_types entries {odd} (full_attention or "
                                 f"sliding_attention only)")
            sliding_layers = "sliding_attention" in layer_types
        else:
            sliding_layers = hf.get("max_window_layers", 28) < hf["num_hidden_layers"]
        on = bool(hf.get("use_sliding_window", False)) and window is not None and sliding_layers
        what = "use_sliding_window=true with sliding_window"
    else:
        return
    if not on:
        return
    if not isinstance(window, int) or isinstance(window, bool):
        raise ValueError(f"unsupported sliding_window={window!r} (an integer or null expected)")
    if window < max_positions:
        raise ValueError(
            f"unsupported {what}={window} < max_position_embeddings={max_positions}: llmforge "
            f"has no sliding-window attention, so this {family} model would compute differently"
        )


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF llama/mistral/qwen2 config onto ModelConfig, refusing every setting we would
    compute differently from transformers (each error names the config key)."""
    family = hf.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"unsupported model_type {family!r} ({', '.join(HF_FAMILIES)} only)")
    method = (hf.get("quantization_config") or {}).get("quant_method", HF_QUANT_METHOD)
    if method != HF_QUANT_METHOD:
        raise ValueError(f"unsupported quantization_config (quant_method={method!r}): "
                         f"unquantized or llmforge-quantized checkpoints only")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    if family == "llama":
        # Llama's attention_bias puts a bias on o_proj too; Qwen2 biases are q/k/v only.
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                raise ValueError(f"unsupported {key}=true (Llama without biases only)")
    n_layers = _required(hf, "num_hidden_layers")
    n_heads = _required(hf, "num_attention_heads")
    max_positions = hf.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[family]
    _sliding_window_check(hf, family, max_positions)
    head_dim = hf.get("head_dim") or 0  # a width other than hidden_size / heads (pruned heads)
    cfg = ModelConfig(
        vocab_size=_required(hf, "vocab_size"),
        dim=_required(hf, "hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=_required(hf, "intermediate_size"),
        max_seq_len=max_positions,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attn_bias=family == "qwen2",
        head_dim_override=0 if head_dim * n_heads == hf["hidden_size"] else head_dim,
        **_rope_from_hf(hf, max_positions),
    )
    cfg.validate()
    return cfg


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file} is not a readable safetensors file: {msg}") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint.

    Every file is read completely before anything is returned, so a damaged shard fails the
    whole load; the index must agree with what the shards hold.
    """
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}")
    tensors: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"shard {name} listed in {INDEX_FILE} is missing from {path}")
        for key, tensor in _load_safetensors(path / name).items():
            if key in tensors:
                raise ValueError(f"{path}: tensor {key} is stored twice, in {origin[key]} "
                                 f"and {name}")
            tensors[key], origin[key] = tensor, name
    if weight_map is not None:
        misplaced = {k for k, f in weight_map.items() if origin.get(k) != f}
        if misplaced:
            raise ValueError(f"{index} lists tensor(s) not found in the named shard: "
                             f"{_names_list(misplaced)}")
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
        if not ref.is_floating_point() and state[name].dtype != ref.dtype:
            raise ValueError(f"{where}: {name} holds {state[name].dtype}, not the quantized "
                             f"codes' {ref.dtype}")


def load_model(
    path: Path | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Transformer:
    """Load a native llmforge dir or a Hugging Face llama/mistral/qwen2 dir (single-file or
    sharded safetensors); `path` may also be `hf://owner/name[@revision]`.

    Nothing is returned unless every tensor the config implies is present with its shape and
    no other tensor is. A quantized directory (see the module docstring) comes back with its
    Int8Linear / Int4Linear layers holding the stored codes; `dtype` is then that of the
    remaining float weights.
    """
    path = resolve_model_path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = _read_json(config_path)
    native = raw.get("format") == NATIVE_FORMAT
    if native:
        quantization = raw.get("quantization")
        cfg = ModelConfig.from_dict({k: v for k, v in raw.items()
                                     if k not in ("format", "quantization")})
    elif "model_type" in raw:
        try:
            cfg = _config_from_hf(raw)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        quantization = raw.get("quantization_config")
    else:
        raise ValueError(f"{config_path} is neither an llmforge nor a Hugging Face "
                         f"({', '.join(HF_FAMILIES)}) config")
    tensors = _read_tensors(path)
    with torch.device(device):
        model = Transformer(cfg)
    model.to(dtype)
    if quantization:
        try:
            apply_quantization(model, quantization)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
    state = model.state_dict()
    file_name = {k: k for k in state} if native else _hf_names(cfg, state)
    # Check in the checkpoint's own names so errors point at what is actually in the files.
    expected = {file_name[k]: v for k, v in state.items()}
    _check_state(tensors, expected, path)
    model.load_state_dict({ours: tensors[name] for ours, name in file_name.items()})
    return model
