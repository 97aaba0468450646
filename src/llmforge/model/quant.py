"""Weight-only int4 and int8: fewer bytes per weight for decoding and for frozen bases.

Single-stream decoding reads every weight once per token, so its speed is memory bandwidth
over model bytes. Int4Linear keeps each group of `group_size` input weights as 4-bit codes with
one scale and one offset (asymmetric, as GGUF's Q4_1) and multiplies with PyTorch's packed int4
CPU kernel in bf16. Requantising a Q4_1 GGUF's dequantised weights at the file's group size
finds its own codes again (each group's minimum and maximum are codes 0 and 15), so serving
such a file this way loses only bf16 rounding of the scales; a symmetric Q4_0 group need not
use code 15, so its codes may shift. The output projection (tied embedding) keeps its dtype:
its quality matters most.

Int8Linear (one scale per output row) dequantises with ordinary ops, so unlike the int4
kernel, which has no backward, gradients flow through it: a frozen base for LoRA training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 15  # 4-bit codes 0..15
# The kernel dequantises code q as (q - 8) * scale + zero, so zero is the value of code 8.
_MID = 8
ROW_TILE = 16  # the packed layout holds output rows in tiles of 16


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if not fits_int4(linear, group_size):
            raise ValueError(f"a {out_features}x{in_features} layer does not fit the int4 "
                             f"kernel: in_features must be a multiple of the group size "
                             f"{group_size}, out_features of {ROW_TILE}")
        if linear.weight.device.type != "cpu":
            raise ValueError("int4 weights run on the CPU kernel; load the model on the CPU")
        self.in_features, self.out_features, self.group_size = (in_features, out_features,
                                                                group_size)
        codes, scale, low = quantize_groups(linear.weight.detach().float(), group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes, 1))
        # [in/group, out, 2]: the kernel's layout of (scale, zero) per group and output row.
        zero = low + _MID * scale
        self.register_buffer("scales_zeros",
                             torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                      self.scales_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> Tensor:
        """The float weight this layer multiplies by (for checks and comparisons)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_zeros).float().t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


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
        w = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

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


def _replace_linears(model: nn.Module, eligible, make) -> int:
    replaced = 0
    for parent in model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and eligible(child):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced
