"""Weight-only int4 and int8: fewer bytes per weight for decoding and for frozen bases.

Single-stream decoding reads every weight once per token, so its speed is memory bandwidth
over model bytes. Int4Linear keeps each group of `group_size` input weights as 4-bit codes with
one scale and one offset (asymmetric, as GGUF's Q4_1) and multiplies with PyTorch's packed int4
CPU kernel in bf16. Requantising a Q4_1 GGUF's dequantised weights at the file's group size
finds its own codes again (each group's minimum and maximum are codes 0 and 15), so serving
such a file this way loses only bf16 rounding of the scales; a symmetric Q4_0 group need not
use code 15, so its codes may shift. The output projection (tied embedding) keeps its dtype:
its quality matters most.

The kernel runs on the CPU only. Elsewhere (a GPU) Int4Linear dequantises its codes in forward
with ordinary ops: no kernel to build or install, at the cost of materialising each weight per
call. Its state dict is the same on every device, the codes in plain order (below), so a model
directory written from either loads on either.

Int8Linear (one scale per output row) dequantises with ordinary ops, so unlike the int4
kernel, which has no backward, gradients flow through it: a frozen base for LoRA training.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 15  # 4-bit codes 0..15
GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the CPU kernel takes
# The kernel dequantises code q as (q - 8) * scale + zero, so zero is the value of code 8.
_MID = 8
ROW_TILE = 16  # the packed layout holds output rows in tiles of 16


class Int4Linear(nn.Module):
    """Codes in `qweight` ([out, in/2] uint8, two a byte) and `scales_zeros` ([in/group, out, 2]
    bf16: each group's scale and the value of its code 8), so w = (code - 8) * scale + zero.

    On the CPU `qweight` holds the kernel's packed order; on other devices, and always in the
    state dict, plain order: byte j of a row holds columns 2j (low nibble) and 2j+1 (high).
    """

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES} (the CPU kernel's), "
                             f"got {group_size}")
        if not fits_int4(linear, group_size):
            raise ValueError(f"a {out_features}x{in_features} layer does not fit the int4 "
                             f"kernel: in_features must be a multiple of the group size "
                             f"{group_size}, out_features of {ROW_TILE}")
        self.in_features, self.out_features, self.group_size = (in_features, out_features,
                                                                group_size)
        codes, scale, low = quantize_groups(linear.weight.detach().float(), group_size)
        self.register_buffer("qweight", _pack(codes))
        zero = low + _MID * scale
        self.register_buffer("scales_zeros",
                             torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.qweight.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size,
                                                          self.scales_zeros)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self._weight(x.dtype))
        return y if self.bias is None else y + self.bias

    def codes(self) -> Tensor:
        """The [out, in] codes (uint8, 0..15), whichever order `qweight` holds them in."""
        return _unpack(self.qweight, self.qweight.device.type == "cpu")

    def dequantized(self) -> Tensor:
        """The float weight this layer multiplies by (for checks and comparisons)."""
        return self._weight(torch.float32)

    def _weight(self, dtype: torch.dtype) -> Tensor:
        scale, zero = (t.t()[..., None] for t in self.scales_zeros.to(dtype).unbind(-1))
        groups = self.codes().view(self.out_features, -1, self.group_size).to(dtype)
        return ((groups - _MID) * scale + zero).view(self.out_features, self.in_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = _plain(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Plain order in, this device's order stored; anything else is left for the base
        # class to report.
        stored = state_dict.get(prefix + "qweight")
        if (stored is not None and stored.dtype == torch.uint8
                and stored.shape == self.qweight.shape):
            state_dict[prefix + "qweight"] = _pack(_unpack(stored.to(self.qweight.device),
                                                           kernel_order=False))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn, recurse=True):
        # A move onto or off the CPU changes which order the codes must be in (as nn.RNNBase
        # re-flattens its weights after a move).
        kernel_order = self.qweight.device.type == "cpu"
        super()._apply(fn, recurse)
        if kernel_order != (self.qweight.device.type == "cpu"):
            self.qweight = _pack(_unpack(self.qweight, kernel_order))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _pack(codes: Tensor) -> Tensor:
    """[out, in] codes as `qweight` for their device: the kernel's order on the CPU."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return _plain(codes)


def _plain(codes: Tensor) -> Tensor:
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | codes[:, 1::2] << 4


def _unpack(qweight: Tensor, kernel_order: bool) -> Tensor:
    nibbles = torch.stack((qweight & 15, qweight >> 4), -1).view(qweight.shape[0], -1)
    if not kernel_order:
        return nibbles
    codes = torch.empty_like(nibbles).view(-1)
    codes[_kernel_order(*nibbles.shape).to(qweight.device)] = nibbles.view(-1)
    return codes.view(nibbles.shape)


@functools.lru_cache(maxsize=8)
def _kernel_order(out_features: int, in_features: int) -> Tensor:
    """Where each nibble of the CPU kernel's packed weight (low nibble first) comes from, as a
    flat [out, in] index. Packing only moves codes around, so packing every index, four bits
    at a time, spells out the permutation without depending on the kernel's private layout.
    Cached per shape: a model has a handful."""
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int32)
    order = torch.zeros(n, dtype=torch.int32)
    for shift in range(0, max(n - 1, 1).bit_length(), 4):
        digits = ((index >> shift) & 15).view(out_features, in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1)
        order |= _unpack(packed, kernel_order=False).view(-1).to(torch.int32) << shift
    return order


def quantize_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes [out, in] (int32, 0..15), scale and low [out, in/group] with w ≈ low + code*scale."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, LEVELS)
    return codes.to(torch.int32).view(out_features, in_features), scale, low


def fits_int4(linear: nn.Linear, group_size: int) -> bool:
    return linear.in_features % group_size == 0 and linear.out_features % ROW_TILE == 0


class Int8Linear(nn.Module):
    """Symmetric int8 with one scale per output row: half of bf16's bytes. The weights are
    buffers, so nothing here can train by accident."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_int8", (w / scale).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantized(self) -> Tensor:
        return self.weight_int8.float() * self.scale

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            # Inference on a CPU: PyTorch's int8 kernel reads the codes as they are, in bf16 as
            # the int4 kernel does (its fp32 path is ~10x slower). It has no backward, so a
            # LoRA base that gradients pass through dequantises instead.
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8,
                                                   self.scale.view(-1).to(torch.bfloat16))
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        w = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def quantize_int4(model: nn.Module, group_size: int = 32) -> int:
    """Replace the transformer blocks' linear layers with Int4Linear (those whose shape the
    kernel takes; the rest keep their dtype); returns how many."""
    return _replace_linears(model, lambda layer: fits_int4(layer, group_size),
                            lambda layer: Int4Linear(layer, group_size))


def quantize_int8(model: nn.Module) -> int:
    """Replace the transformer blocks' linear layers with Int8Linear; returns how many."""
    return _replace_linears(model, lambda layer: True, Int8Linear)


def apply_quantization(model: nn.Module, quantization: dict[str, Any]) -> int:
    """Quantize the blocks' linear layers as a config's "quantization" entry says (the form
    `quantization_of` gives); returns how many. A saved quantized model gets its modules back
    this way, the stored codes then loaded over them."""
    method = quantization.get("method") if isinstance(quantization, dict) else None
    if method == "int8":
        return quantize_int8(model)
    if method == "int4":
        return quantize_int4(model, int(quantization.get("group_size", 32)))
    raise ValueError(f"unknown quantization {quantization!r} (method int8 or int4)")


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """{"method": "int8"} or {"method": "int4", "group_size": G} for a model whose layers are
    Int8Linear or Int4Linear, None for one with neither."""
    found = {("int4", m.group_size) if isinstance(m, Int4Linear) else ("int8", None)
             for m in model.modules() if isinstance(m, Int4Linear | Int8Linear)}
    if len(found) > 1:
        raise ValueError(f"a model quantized in more than one way cannot be saved: {found}")
    if not found:
        return None
    method, group_size = found.pop()
    return {"method": method} | ({"group_size": group_size} if group_size else {})


def _replace_linears(model: nn.Module, eligible, make) -> int:
    replaced = 0
    for parent in model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and eligible(child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced
