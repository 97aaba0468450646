"""DPO on the training loop: pairs rendered in our chat format, reference log-probs stored.

The reference model's log-probs of every chosen and rejected reply are computed once, before
training, by the policy itself (which starts as the reference), and travel with the batches;
so training holds one model, not two. Only the final reply of each pair is scored: the
conversation before it is context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmforge.align.finetune import FinetuneConfig
from llmforge.align.hh import PreferencePair
from llmforge.align.preference import dpo_loss, sequence_logprobs
from llmforge.align.sft import pad_batch
from llmforge.tokenizer.chat_format import ChatFormat
from llmforge.train.data import draw_indices
from llmforge.train.loop import Objective, TrainConfig

Row = tuple[list[int], list[int]]  # (inputs, targets with -100 outside the reply)


def encode_pairs(chat: ChatFormat, pairs: list[PreferencePair],
                 seq_len: int) -> tuple[list[tuple[Row, Row]], Counter]:
    """(chosen row, rejected row) per pair; pairs that do not fit seq_len are counted."""
    rows, skipped = [], Counter()
    for pair in pairs:
        try:
            context = len(chat.prompt(pair.prompt))
            both = [_reply_row(chat, pair.prompt, reply, context)
                    for reply in (pair.chosen, pair.rejected)]
        except ValueError:
            skipped["bad_message"] += 1
            continue
        if max(len(x) for x, _ in both) > seq_len:
            skipped["longer_than_seq_len"] += 1
            continue
        rows.append((both[0], both[1]))
    return rows, skipped


def _reply_row(chat: ChatFormat, prompt: list[dict], reply: str, context: int) -> Row:
    """The reply's tokens are the targets: the learnable ones past the prompt."""
    ids, mask = chat.conversation([*prompt, {"role": "assistant", "content": reply}])
    targets = [t if i + 1 >= context and mask[i + 1] else -100 for i, t in enumerate(ids[1:])]
    return ids[:-1], targets


def reference_logprobs(model: nn.Module, rows: list[tuple[Row, Row]], pad_id: int,
                       batch_size: int = 8) -> Tensor:
    """[N, 2] summed log-probs of each (chosen, rejected) reply under `model` as it is now."""
    return score_pairs(lambda x, y: sequence_logprobs(model(x), y, y != -100)[0], model, rows,
                       pad_id, batch_size)


@torch.inference_mode()
def score_pairs(score: Callable[[Tensor, Tensor], Tensor], model: nn.Module,
                rows: list[tuple[Row, Row]], pad_id: int, batch_size: int = 8) -> Tensor:
    """[N, 2] `score(inputs, targets)` of each (chosen, rejected) row, batched, with `model` in
    eval mode for the pass (and back in its own mode after)."""
    was_training = model.training
    model.eval()
    flat = [row for pair in rows for row in pair]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(flat), batch_size):
        x, y = (t.to(device) for t in pad_batch(flat[start : start + batch_size], pad_id))
        out.append(score(x, y).float().cpu())
    model.train(was_training)
    return torch.cat(out).view(-1, 2)


class PreferenceBatches:
    """Micro-batch (step, micro): B pairs drawn by a seeded RNG as (inputs [2B, T], targets,
    reference log-probs [2B]), chosen rows first. Without reference log-probs (a reward
    model's batches) just (inputs, targets)."""

    def __init__(self, rows: list[tuple[Row, Row]], reference: Tensor | None, batch_size: int,
                 pad_id: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if not rows:
            raise ValueError("no preference pairs to train on")
        self.rows, self.reference, self.pad_id, self.seed = rows, reference, pad_id, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __call__(self, step: int, micro: int) -> tuple[Tensor, ...]:
        picked = draw_indices(self.seed, step, micro, len(self.rows), self.batch_size,
                              self.rank, self.world_size)
        x, y = pad_batch([self.rows[i][0] for i in picked] + [self.rows[i][1] for i in picked],
                         self.pad_id)
        if self.reference is None:
            return x, y
        ref = self.reference[torch.as_tensor(picked)]
        return x, y, torch.cat((ref[:, 0], ref[:, 1]))


def dpo_objective(beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0,
                  length_normalize: bool = False) -> Objective:
    """The loop's objective for PreferenceBatches: `dpo_loss` on the policy's log-probs."""
    def objective(forward: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, y, ref = batch
        logps, counts = sequence_logprobs(forward(x), y, y != -100)
        n = x.size(0) // 2
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, kind=kind,
                        label_smoothing=label_smoothing, chosen_len=counts[:n],
                        rejected_len=counts[n:], length_normalize=length_normalize)

    return objective


def _dpo_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=100, lr=5e-6, warmup_steps=10, batch_size=8, eval_every=25,
                       ckpt_every=50, weight_decay=0.0)


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(FinetuneConfig):
    data: str = ""  # preference pairs: HH-RLHF transcripts or {"prompt", "chosen", "rejected"}
    max_pairs: int = 0  # 0 = all
    val_fraction: float = 0.1  # held out by a hash of the pair's id
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    label_smoothing: float = 0.0  # cDPO: the assumed fraction of flipped labels
    length_normalize: bool = False  # log-probs per token instead of summed
    train: TrainConfig = field(default_factory=_dpo_train_defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if not self.beta > 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("need beta > 0 and 0 <= label_smoothing < 0.5")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def objective(self) -> Objective:
        return dpo_objective(self.beta, self.loss, self.label_smoothing, self.length_normalize)


def held_out(model: nn.Module, rows: list[tuple[Row, Row]], reference: Tensor, pad_id: int,
             cfg: DPOConfig) -> dict[str, float]:
    """DPO's loss and metrics (over summed log-probs) on held-out pairs, plus how often the
    policy itself gives the chosen reply more probability than the rejected one
    (`logp_accuracy`): a preference accuracy that means the same before training as after."""
    logps = reference_logprobs(model, rows, pad_id)  # the policy's log-probs as it is now
    loss, metrics = dpo_loss(logps[:, 0], logps[:, 1], reference[:, 0], reference[:, 1],
                             beta=cfg.beta, kind=cfg.loss, label_smoothing=cfg.label_smoothing)
    return {"loss": loss.item(), **metrics,
            "logp_accuracy": (logps[:, 0] > logps[:, 1]).float().mean().item()}
