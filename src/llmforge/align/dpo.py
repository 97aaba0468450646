"""DPO on the training loop: pairs rendered in our chat format, reference log-probs stored.

The reference model's log-probs of every chosen and rejected reply are computed once, before
training, by the policy itself (which starts as the reference), and travel with the batches;
so training holds one model, not two. Only the final reply of each pair is scored: the
conversation before it is context.
"""

from __future__ import annotations

from collections import Counter

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from llmforge.align.hh import PreferencePair
from llmforge.align.preference import dpo_loss, sequence_logprobs
from llmforge.align.sft import pad_batch
from llmforge.tokenizer import render_chat, render_prompt
from llmforge.train.data import draw_indices
from llmforge.train.loop import Objective

Row = tuple[list[int], list[int]]  # (inputs, targets with -100 outside the reply)


def encode_pairs(tok: Tokenizer, pairs: list[PreferencePair],
                 seq_len: int) -> tuple[list[tuple[Row, Row]], Counter]:
    """(chosen row, rejected row) per pair; pairs that do not fit seq_len are counted."""
    rows, skipped = [], Counter()
    for pair in pairs:
        try:
            context = len(render_prompt(tok, pair.prompt))
            both = [_reply_row(tok, pair.prompt, reply, context)
                    for reply in (pair.chosen, pair.rejected)]
        except ValueError:
            skipped["bad_message"] += 1
            continue
        if max(len(x) for x, _ in both) > seq_len:
            skipped["longer_than_seq_len"] += 1
            continue
        rows.append((both[0], both[1]))
    return rows, skipped


def _reply_row(tok: Tokenizer, prompt: list[dict], reply: str, context: int) -> Row:
    ids, _ = render_chat(tok, [*prompt, {"role": "assistant", "content": reply}])
    targets = [t if i + 1 >= context else -100 for i, t in enumerate(ids[1:])]
    return ids[:-1], targets


@torch.inference_mode()
def reference_logprobs(model: nn.Module, rows: list[tuple[Row, Row]], pad_id: int,
                       batch_size: int = 8) -> Tensor:
    """[N, 2] summed log-probs of each (chosen, rejected) reply under `model` as it is now."""
    was_training = model.training
    model.eval()
    flat = [row for pair in rows for row in pair]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(flat), batch_size):
        x, y = (t.to(device) for t in pad_batch(flat[start : start + batch_size], pad_id))
        out.append(sequence_logprobs(model(x), y, y != -100)[0].cpu())
    model.train(was_training)
    return torch.cat(out).view(-1, 2)


class PreferenceBatches:
    """Micro-batch (step, micro): B pairs drawn by a seeded RNG as (inputs [2B, T], targets,
    reference log-probs [2B]), chosen rows first."""

    def __init__(self, rows: list[tuple[Row, Row]], reference: Tensor, batch_size: int,
                 pad_id: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if not rows:
            raise ValueError("no preference pairs to train on")
        self.rows, self.reference, self.pad_id, self.seed = rows, reference, pad_id, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __call__(self, step: int, micro: int) -> tuple[Tensor, Tensor, Tensor]:
        picked = draw_indices(self.seed, step, micro, len(self.rows), self.batch_size,
                              self.rank, self.world_size)
        x, y = pad_batch([self.rows[i][0] for i in picked] + [self.rows[i][1] for i in picked],
                         self.pad_id)
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
