"""Preference losses: sequence log-probs, DPO and its IPO / hinge variants, Bradley-Terry.

Pure tensor math, no model or data loading: the caller runs the policy (and the frozen reference)
on chosen and rejected completions, reduces each to a summed log-prob with `sequence_logprobs`,
and hands the four [B] tensors to `dpo_loss`; a reward model's two [B] scores go to
`reward_model_loss`. Each loss returns a scalar (mean over the batch) and a dict of detached
float metrics named as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_KINDS = ("sigmoid", "ipo", "hinge")


def sequence_logprobs(
    logits: Tensor, targets: Tensor, mask: Tensor, *, chunk_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Sum over t of log softmax(logits[b, t])[targets[b, t]] where mask[b, t], and the count.

    `logits` [B, T, V] must already be aligned with `targets` [B, T] (shift before calling);
    targets at masked-out positions may hold anything (e.g. -100). The log-sum-exp runs over
    chunks of `chunk_size` positions, in float32, so no full [B, T, V] log-softmax is built
    beside the logits. Returns (sum [B] float32, count [B] int64).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"expected logits [B, T, V] with targets and mask [B, T], got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = mask.bool()
    safe = targets.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.cat(
        [
            torch.logsumexp(logits[:, start : start + chunk_size].float(), dim=-1)
            for start in range(0, logits.size(1), chunk_size)
        ],
        dim=1,
    )
    token_logps = torch.where(mask, picked - lse, torch.zeros_like(lse))
    return token_logps.sum(-1), mask.sum(-1)


def _per_token(logps: Tensor, lengths: Tensor | list | None, name: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"length_normalize=True needs {name} (token counts per sequence)")
    lengths = torch.as_tensor(lengths, device=logps.device).to(logps.dtype)
    if lengths.shape != logps.shape:
        raise ValueError(f"{name} has shape {tuple(lengths.shape)}, log-probs {tuple(logps.shape)}")
    return logps / lengths.clamp_min(1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: Tensor | list | None = None,
    rejected_len: Tensor | list | None = None,
    length_normalize: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Direct preference loss over summed sequence log-probs [B]; mean over the batch.

    With h = (log πθ(y⁺) − log πref(y⁺)) − (log πθ(y⁻) − log πref(y⁻)):

    - "sigmoid" (DPO, Rafailov et al. 2023): −(1−ε)·log σ(βh) − ε·log σ(−βh); ε is
      `label_smoothing`, the conservative DPO (cDPO) noise rate, 0 for plain DPO.
    - "ipo" (IPO, Azar et al. 2023): (h − 1/(2β))², β playing the role of τ. TRL feeds IPO
      per-token averaged log-probs; pass `length_normalize=True` with the lengths to match it.
    - "hinge" (SLiC, Zhao et al. 2023): max(0, 1 − βh).

    `length_normalize` divides every log-prob by its sequence's token count (`chosen_len`,
    `rejected_len`) first. Metrics: implicit rewards β·(log πθ − log πref) for chosen and
    rejected (batch means), their mean margin, the fraction with chosen reward > rejected, and the
    mean policy log-probs (all as the loss saw them, i.e. per token when normalised).
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"kind must be one of {DPO_KINDS}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and kind != "sigmoid":
        raise ValueError(f"label_smoothing applies to kind='sigmoid' only, not {kind!r}")
    if length_normalize:
        policy_chosen = _per_token(policy_chosen, chosen_len, "chosen_len")
        ref_chosen = _per_token(ref_chosen, chosen_len, "chosen_len")
        policy_rejected = _per_token(policy_rejected, rejected_len, "rejected_len")
        ref_rejected = _per_token(ref_rejected, rejected_len, "rejected_len")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio.float()
        rejected_rewards = beta * rejected_ratio.float()
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logps/chosen": policy_chosen.float().mean().item(),
            "logps/rejected": policy_rejected.float().mean().item(),
        }
    return losses.mean(), metrics


def reward_model_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry pairwise loss −log σ(r⁺ − r⁻ − m), mean over the batch.

    `margin` m (a float or [B]) is Llama 2's (Touvron et al. 2023) preference-strength margin;
    None means 0. Metrics: accuracy (fraction with r⁺ > r⁻) and the mean of r⁺ − r⁻.
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen {tuple(chosen_scores.shape)} and rejected {tuple(rejected_scores.shape)} "
            "scores differ in shape"
        )
    diff = chosen_scores - rejected_scores
    logits = diff
    if margin is not None:
        logits = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (diff > 0).float().mean().item(),
            "margin": diff.float().mean().item(),
        }
    return loss, metrics
