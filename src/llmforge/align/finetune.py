"""What every alignment method shares: the model it starts from, full or LoRA fine-tuning, and
the model directory it writes.

A method starts from its upstream stage's model, or from any model `llmforge chat` opens (`base:
gguf:...`, an HF directory, `hf://owner/name`), and trains in that model's own chat format. With
`lora:` set only adapters train, over a base kept in fp32, bf16 or int8. The output is always a
whole model directory in the base's layout (adapters merged in, and also saved on their own
under `adapter/`), so the eval and serve stages take it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmforge.align.lora import LoRAConfig, apply_lora, load_adapter, remove_lora, save_adapter
from llmforge.model.quant import quantize_int8
from llmforge.serve.chat_model import ChatModel, open_chat_model, save_chat_model
from llmforge.train.parallel import full_state_dict

BASE_DTYPES = ("fp32", "bf16", "int8")


@dataclass
class FinetuneConfig:
    """Fields shared by every alignment method's config (which subclass this)."""

    base: str = ""  # "" = the upstream stage's model; else any model `llmforge chat` opens
    lora: LoRAConfig | None = None  # None = full fine-tuning
    base_dtype: str = "fp32"  # the frozen base under LoRA: fp32 | bf16 | int8

    def __post_init__(self) -> None:
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {', '.join(BASE_DTYPES)}, "
                             f"got {self.base_dtype!r}")
        if self.base_dtype != "fp32" and self.lora is None:
            raise ValueError(f"base_dtype={self.base_dtype} needs lora: only adapters can train "
                             f"over a bf16 or int8 base")
        if self.lora is not None:
            self.lora.validate()


def base_spec(cfg, upstream: Path | None, setting: str = "base") -> str:
    """The model a stage starts from: the config's `setting` (`base`, a distiller's `teacher`),
    else the upstream stage's model directory."""
    if spec := getattr(cfg, setting):
        return spec
    if upstream is None:
        raise ValueError(f"no {setting} model: set {setting} (a model directory, "
                         f"hf://owner/name or gguf:PATH)")
    return str(upstream / "model")


def open_for_training(cfg: FinetuneConfig, spec: str, device: torch.device) -> tuple[ChatModel,
                                                                                      dict]:
    """The base opened and made trainable as cfg (a method's config, with its `train`) says;
    also a summary of what trains."""
    if cfg.lora is not None and cfg.train.parallel == "fsdp":
        raise ValueError("LoRA trains under train.parallel=ddp: its adapters are a few percent "
                         "of the model, and FSDP's shards of them could not be saved as one")
    chat = open_chat_model(spec, device=device)
    model = chat.model
    total = sum(p.numel() for p in model.parameters())
    if cfg.lora is not None:
        if cfg.base_dtype == "bf16":
            model.to(torch.bfloat16)
        elif cfg.base_dtype == "int8":
            quantize_int8(model)
        cfg.lora.validate(model)
        apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    return chat, {"base": spec, "params": total, "trainable_params": trainable,
                  "method": "lora" if cfg.lora else "full"}


def save_trained(chat: ChatModel, cfg: FinetuneConfig, spec: str, out_dir: Path,
                 is_main: bool = True) -> None:
    """`out_dir/model`: the whole trained model in the base's layout; with LoRA also
    `out_dir/adapter`. Every rank calls this (gathering sharded weights is collective)."""
    model = chat.model
    if cfg.lora is None:
        state = full_state_dict(model)
        if is_main:
            save_chat_model(chat, out_dir / "model", state=state)
        return
    if not is_main:
        return
    save_adapter(model, cfg.lora, out_dir / "adapter")
    if cfg.base_dtype != "fp32":  # adapters fold exactly only into the fp32 weights
        chat = open_chat_model(spec, device=model.tok_emb.weight.device)
        load_adapter(chat.model, out_dir / "adapter")
    remove_lora(chat.model, merge=True)
    save_chat_model(chat, out_dir / "model")
