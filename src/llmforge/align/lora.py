"""LoRA: train small low-rank adapters next to frozen base weights, then merge or keep them apart.

A wrapped layer computes `base(x) + (x @ A.T @ B.T) * alpha / r` with A [r, in] and B [out, r].
B starts at zero, so a freshly wrapped model computes exactly what its base did; only A and B
train, which cuts optimizer state to a few percent of the model and lets the base stay in bf16
or weight-only int8 (`Int8Linear`) while the adapters train in fp32. `remove_lora(merge=True)`
folds the adapters into plain nn.Linear layers, so `save_model` writes an ordinary model
directory that the eval, export and serve stages load unchanged; `save_adapter` keeps them as
a small separate file instead. Full fine-tuning needs nothing from here: skip `apply_lora`.

We do not use `peft`: it wraps our nn.Linear layers fine, but refuses Int4Linear, imports
transformers and accelerate, and renames every state-dict key; this file is the few pieces
of it we need, in our own names and formats.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmforge.model.quant import Int4Linear, Int8Linear

ADAPTER_FORMAT = "llmforge-lora"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                   "mlp.w_gate", "mlp.w_up", "mlp.w_down")
# Config fields that only shape training, not what the weights mean: an adapter may move
# between bases that differ in these.
_TRAINING_ONLY_FIELDS = {"z_loss", "moe_aux_coef", "init_std"}


_BASE_TYPES = (nn.Linear, Int4Linear, Int8Linear)


@dataclass
class LoRAConfig:
    """Which layers get adapters and how big they are.

    `target_modules` patterns: a plain pattern is an fnmatch glob matched against a module's
    full name or any dotted suffix of it (`attn.wq` matches `layers.3.attn.wq`); a pattern
    starting with `re:` is a regular expression that must match the whole name.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self, model: nn.Module | None = None) -> None:
        """Fail with a message naming the field; with a model, every pattern must match one of
        its linear layers (a typo would otherwise silently train fewer layers)."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) \
                or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        pats = self.target_modules
        if not isinstance(pats, list | tuple) or not pats \
                or not all(isinstance(p, str) and p for p in pats):
            raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of non-empty "
                             f"strings, got {pats!r}")
        for p in pats:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"LoRAConfig.target_modules: bad regex {p!r}: {e}") from None
        if model is not None:
            _targets(model, self)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Module]:
    """The base layers `cfg` selects, by name; raises for a pattern that selects none."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters; remove_lora it first")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, _BASE_TYPES)}
    chosen: dict[str, nn.Module] = {}
    for pattern in cfg.target_modules:
        hits = {n: m for n, m in linears.items() if _matches(n, pattern)}
        if not hits:
            names = list(linears)
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8
                                            else "")
            raise ValueError(f"LoRAConfig.target_modules pattern {pattern!r} matches no linear "
                             f"layer; the model's linear layers are: {shown or 'none'}")
        chosen |= hits
    if "lm_head" in chosen:
        raise ValueError("cannot put LoRA on lm_head: the model multiplies by lm_head.weight "
                         "directly (chunked loss), so an adapter there would never be used")
    return chosen


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update, kept in fp32 whatever the base."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, _BASE_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear, Int4Linear or Int8Linear, "
                            f"not {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(iter(base.buffers() if isinstance(base, Int4Linear | Int8Linear)
                           else base.parameters())).device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        # nn.Linear's own init (the LoRA paper's "random Gaussian" in practice); B = 0 makes
        # the product zero at the start while A still receives gradients.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def delta_weight(self) -> Tensor:
        """B @ A * scaling in fp32: the [out, in] update that merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:  # the update is already inside the base weight
            return y
        # Cast into the adapters' fp32 so their gradients and updates keep full precision over
        # a bf16 base; the sum comes back in the base's output dtype.
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def _float_weight(self, what: str) -> Tensor:
        if not isinstance(self.base, nn.Linear):
            raise ValueError(f"cannot {what} LoRA into a quantized {type(self.base).__name__} "
                             f"base: its weights are integer codes; load the float model, "
                             f"load_adapter onto it, then {what}")
        return self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (for export or adapter-free inference). The
        sum is formed in fp32, then rounded once to the base dtype."""
        if self.merged:
            return
        w = self._float_weight("merge")
        w.copy_(w.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again: exact up to float rounding for an fp32 base (for bf16 it
        costs one more rounding). Train only while unmerged: the update subtracted is the
        current one, so changing A or B while merged would leave the difference behind."""
        if not self.merged:
            return
        w = self._float_weight("unmerge")
        w.copy_(w.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the layers `cfg` selects in place and freeze every other parameter, so an optimizer
    over `model.parameters()` (filtered by requires_grad) trains only the adapters. Returns the
    wrapped layer names."""
    cfg.validate()
    chosen = _targets(model, cfg)
    model.requires_grad_(False)
    for name, base in chosen.items():
        _set_module(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout))
    return list(chosen)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Put the base layers back, with the updates folded in (merge=True) or dropped. Every
    parameter becomes trainable again, as in a freshly built model. Returns the names."""
    layers = lora_layers(model)
    if merge:
        for m in layers.values():  # check every layer before changing any
            m._float_weight("merge")
    for name, m in layers.items():
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        _set_module(model, name, m.base)
    model.requires_grad_(True)
    return list(layers)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, under the model's own state-dict names."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary name in the same directory, then rename: readers see the old file
    or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base_config(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: Path | str) -> None:
    """adapter_model.safetensors (A and B only) and adapter_config.json: the LoRA settings,
    the wrapped layers with their shapes, the base model's config and the weights' sha256, so
    loading onto the wrong base, or a weights file from another save, is a clear error."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to save")
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    weights = out_dir / ADAPTER_WEIGHTS
    _atomic_write(weights, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    meta = {
        "format": ADAPTER_FORMAT,
        "r": cfg.r,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "wrapped": {n: [m.base.out_features, m.base.in_features] for n, m in layers.items()},
        "base_config": _base_config(model),
        "weights_sha256": _sha256(weights),
    }
    _atomic_write(out_dir / ADAPTER_CONFIG,
                  lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))


def _read_adapter_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {path.parent}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an llmforge LoRA adapter config")
    missing = [k for k in ("r", "alpha", "dropout", "target_modules", "wrapped", "weights_sha256")
               if k not in meta]
    if missing:
        raise ValueError(f"{path} is missing {', '.join(missing)}")
    return meta


def _check_base(model: nn.Module, meta: dict[str, Any], where: Path) -> None:
    saved, ours = meta.get("base_config"), _base_config(model)
    if saved is not None and ours is not None:
        keys = (set(saved) | set(ours)) - _TRAINING_ONLY_FIELDS
        diff = sorted(k for k in keys if saved.get(k) != ours.get(k))
        if diff:
            shown = ", ".join(f"{k}={saved.get(k)!r} (model has {ours.get(k)!r})"
                              for k in diff[:5])
            raise ValueError(f"{where}: adapter was trained on a different base model: {shown}")


def load_adapter(model: nn.Module, adapter_dir: Path | str) -> LoRAConfig:
    """Load a saved adapter onto `model`: onto its existing (unmerged, same-shaped) LoRA layers,
    or, if it has none, onto layers wrapped here with the saved config. Everything is checked
    before the model is changed. Returns the adapter's LoRAConfig."""
    adapter_dir = Path(adapter_dir)
    meta = _read_adapter_config(adapter_dir / ADAPTER_CONFIG)
    cfg = LoRAConfig(r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                     target_modules=list(meta["target_modules"]))
    cfg.validate()
    _check_base(model, meta, adapter_dir)
    layers = lora_layers(model)
    found = {n: m.base for n, m in layers.items()} if layers else _targets(model, cfg)
    shapes = {n: [m.out_features, m.in_features] for n, m in found.items()}
    if shapes != meta["wrapped"]:
        saved = meta["wrapped"]
        odd = sorted(set(shapes) ^ set(saved)) or [n for n in shapes if shapes[n] != saved[n]]
        raise ValueError(f"{adapter_dir}: adapter layers do not match this model's "
                         f"(names or [out, in] shapes differ at: {', '.join(odd[:5])})")
    for n, m in layers.items():
        if m.merged or m.r != cfg.r or m.scaling != cfg.scaling:
            raise ValueError(f"{adapter_dir}: layer {n} has r={m.r}, alpha={m.alpha}, "
                             f"merged={m.merged}; the adapter needs r={cfg.r}, alpha={cfg.alpha}, "
                             f"unmerged")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}")
    if _sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights} does not match {ADAPTER_CONFIG} (sha256 differs): a save "
                         f"was interrupted or files from different saves are mixed")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from None
    expected = {f"{n}.lora_{x}": (cfg.r, s[1]) if x == "A" else (s[0], cfg.r)
                for n, s in shapes.items() for x in "AB"}
    bad = sorted(k for k in set(expected) | set(tensors)
                 if k not in tensors or tuple(tensors[k].shape) != expected.get(k))
    if bad:
        raise ValueError(f"{weights}: missing, unexpected or misshapen tensors: "
                         f"{', '.join(bad[:5])}")
    if not layers:
        apply_lora(model, cfg)
        layers = lora_layers(model)
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_A.copy_(tensors[f"{n}.lora_A"])
            m.lora_B.copy_(tensors[f"{n}.lora_B"])
    return cfg
