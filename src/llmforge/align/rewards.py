"""Verifiable rewards and the GRPO objective.

Verifiers score a completion against a known answer (GSM8K, arithmetic) or through a user's own
Python function; `group_advantages` turns a group of G rewards per prompt into advantages;
`grpo_loss` is the clipped policy-gradient objective over token log-probs. Pure math: sampling
and the training loop live elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

# A number: optional sign (not when glued to a preceding word or digit, as in "3-4"), digits
# with optional thousands commas, optional decimals; or a bare ".5".
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number in `text` (commas stripped), or None when there is none."""
    matches = _NUMBER.findall(text)
    for match in reversed(matches):
        value = _to_number(match)
        if value is not None:
            return value
    return None


def extract_answer(completion: str) -> float | None:
    """The answer a completion commits to: the number after its last "####", else its last
    number (GSM8K's convention, as in lm-evaluation-harness's strict and flexible matches)."""
    if "####" in completion:
        value = last_number(completion.rsplit("####", 1)[1].split("\n", 1)[0])
        if value is not None:
            return value
    return last_number(completion)


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def gsm8k_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the final number of the GSM8K reference
    (the "#### N" line of its `answer` field, or a bare number), else 0.0."""
    reference = extract_answer(answer)
    if reference is None:
        raise ValueError(f"no final number in the reference answer {answer[-80:]!r}")
    return 1.0 if _same(extract_answer(completion), reference) else 0.0


def arithmetic_reward(completion: str, expected: int | float) -> float:
    """1.0 when the completion's final number equals `expected`, else 0.0."""
    return 1.0 if _same(extract_answer(completion), float(expected)) else 0.0


class RewardFn:
    """A user reward function that cannot kill training: an exception counts in `errors`
    (the latest kept in `last_error`) and scores 0.0. A return that is not a real number is a
    bug in the function, not in one sample, so it raises TypeError."""

    def __init__(self, fn: Callable[..., object], name: str):
        self.fn = fn
        self.name = name
        self.calls = 0
        self.errors = 0
        self.last_error: str | None = None

    def __call__(self, prompt: str, completion: str, **record: object) -> float:
        self.calls += 1
        try:
            value = self.fn(prompt, completion, **record)
        except Exception as exc:  # the user's code: any failure is one bad sample
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return 0.0
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"reward function {self.name} must return a float, got {type(value).__name__} "
                f"{value!r:.80}"
            )
        value = float(value)
        if not math.isfinite(value):
            self.errors += 1
            self.last_error = f"non-finite reward {value}"
            return 0.0
        return value

    def __repr__(self) -> str:
        return f"RewardFn({self.name}, calls={self.calls}, errors={self.errors})"


def load_reward_function(spec: str) -> RewardFn:
    """Load "path/to/module.py:func", a callable (prompt, completion, **record) -> float, as a
    `RewardFn`. A missing file, a module that fails to import or a missing / non-callable
    function raises at once, before any training."""
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text or not func_name:
        raise ValueError(f"reward function must be 'module.py:function', got {spec!r}")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"reward function file not found: {path}")
    module_name = f"llmforge_user_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ImportError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if fn is None:
        raise AttributeError(f"{path} defines no function {func_name!r}")
    if not callable(fn):
        raise TypeError(f"{path}:{func_name} is a {type(fn).__name__}, not a function")
    return RewardFn(fn, f"{path.name}:{func_name}")


def group_advantages(
    rewards: Tensor | Sequence[float],
    group_size: int,
    *,
    scale: str = "std",
    eps: float = 1e-4,
) -> tuple[Tensor, float]:
    """Group-relative advantages [N, G] from rewards [N*G] (prompt-major) or [N, G].

    "std" is GRPO (Shao et al. 2024, DeepSeekMath): (r − mean_group) / (std_group + eps), with
    the unbiased std as TRL computes it; "none" is Dr. GRPO (Liu et al. 2025): r − mean_group.
    Also returns the fraction of groups whose rewards are all equal: their advantages are 0 and
    they teach nothing, so a fraction near 1 means RL is not learning.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    r = torch.as_tensor(rewards)
    r = r.float() if not r.is_floating_point() else r
    if r.dim() == 1:
        if r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        r = r.view(-1, group_size)
    elif r.dim() != 2 or r.size(1) != group_size:
        raise ValueError(f"rewards must be [N*G] or [N, {group_size}], got {tuple(r.shape)}")
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    advantages = centred.masked_fill(flat, 0.0)  # exactly 0, not mean-rounding noise
    zero_variance = flat.float().mean().item() if r.size(0) else 0.0
    return advantages, zero_variance


def grpo_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    logp_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    token_level: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy-gradient loss over token log-probs [B, T] with one advantage per sequence.

    Per token, with ρ = exp(logp_new − logp_old): −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)
    (PPO's clipped surrogate, Schulman et al. 2017, as GRPO uses it; ε_high defaults to ε_low,
    a larger one is DAPO's clip-higher), plus kl_coef · (exp(ref − new) − (ref − new) − 1), the
    k3 estimator of KL(πθ ‖ πref) (Schulman, "Approximating KL divergence").
    `token_level` averages over all valid tokens of the batch (DAPO, Yu et al. 2025); otherwise
    each sequence's tokens are averaged, then the sequences (the original GRPO).
    Metrics over valid tokens: clip_fraction (tokens where the clipped term is the one used),
    kl (mean k3; 0 without `logp_ref`), ratio (mean ρ).
    """
    if logp_new.shape != logp_old.shape or mask.shape != logp_new.shape:
        raise ValueError(
            f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [B], got {tuple(advantages.shape)}")
    if kl_coef and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref (the reference model's token log-probs)")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    keep = mask.bool()
    valid = keep.to(logp_new.dtype)
    adv = advantages.to(logp_new.dtype)[:, None]
    ratio = torch.exp(logp_new - logp_old.detach())
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if logp_ref is not None:
        delta = logp_ref.detach() - logp_new
        kl = torch.exp(delta) - delta - 1
        if kl_coef:
            per_token = per_token + kl_coef * kl
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    if token_level:
        loss = per_token.sum() / valid.sum().clamp_min(1)
    else:
        per_seq = per_token.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
        loss = per_seq.mean()
    with torch.no_grad():
        n = valid.sum().clamp_min(1)
        is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        zero = torch.zeros_like(ratio)
        metrics = {
            "clip_fraction": ((is_clipped & keep).sum() / n).item(),
            "kl": 0.0 if kl is None else (torch.where(keep, kl, zero).sum() / n).item(),
            "ratio": (torch.where(keep, ratio, zero).sum() / n).item(),
        }
    return loss, metrics
