"""Device and precision choice, so no stage hard-codes "cuda" or "bf16"."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    if name.split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only on CPUs with AVX-512 BF16 or AMX; elsewhere they are emulated."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, dtype: str) -> bool:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights and optimizer stay fp32) where the hardware has it."""
    if use_bf16(device, dtype):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
