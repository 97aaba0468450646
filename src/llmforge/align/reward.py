"""Reward model: our Transformer with a scalar head, trained on preference pairs (Bradley-Terry).

RLHF's reward signal: the score of a reply is a linear read-out of the backbone's final hidden
state at the reply's last position, the one that has seen all of it. Training runs on the one
loop with `PreferenceBatches(rows, None, ...)` and `reward_objective`; the pairs are the DPO
rows (`dpo.encode_pairs`), so both methods take the same data. A saved reward model is an
ordinary model directory plus the head's two small files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from llmforge.align.dpo import Row, score_pairs
from llmforge.align.finetune import FinetuneConfig
from llmforge.align.preference import reward_model_loss
from llmforge.model.config import ModelConfig
from llmforge.model.io import load_model
from llmforge.model.transformer import Transformer, causal_mask_args
from llmforge.train.loop import Objective, TrainConfig

HEAD_FORMAT = "llmforge-reward-head"
HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_config.json"


def _reward_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, lr=1e-5, warmup_steps=10, batch_size=8, eval_every=50,
                       ckpt_every=100, weight_decay=0.0)


@dataclass
class RewardConfig(FinetuneConfig):
    data: str = ""  # preference pairs: HH-RLHF transcripts or {"prompt", "chosen", "rejected"}
    max_pairs: int = 0  # 0 = all
    val_fraction: float = 0.1  # held out by a hash of the pair's id
    margin: float = 0.0  # Bradley-Terry margin (Llama 2): the chosen score must win by this
    train: TrainConfig = field(default_factory=_reward_train_defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.train.parallel != "ddp":
            raise ValueError("train.parallel must be ddp: the reward head is saved from the "
                             "whole model on rank 0")


class RewardModel(nn.Module):
    """Scores [B] for right-padded rows: `score` read off the final-norm hidden state at each
    row's last reply position (its last target != -100).

    The head starts at zero: every score is 0, so the first Bradley-Terry loss is exactly
    log 2, and the untrained model prefers nothing rather than whatever a random head implies.
    An untied backbone's lm_head takes no part in a score, so it is frozen (DDP demands a
    gradient for every trainable parameter); it stays in the weights, so the backbone saves
    and loads as an ordinary model.
    """

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        if backbone.lm_head is not None:
            backbone.lm_head.requires_grad_(False)
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.dim, 1, device=backbone.tok_emb.weight.device)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    @property
    def cfg(self) -> ModelConfig:
        return self.backbone.cfg

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks, which FSDP2 shards one by one."""
        return self.backbone.layers

    @property
    def activation_checkpointing(self) -> bool:
        return self.backbone.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.backbone.activation_checkpointing = on

    def num_params(self) -> int:
        return self.backbone.num_params() + sum(p.numel() for p in self.score.parameters())

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """float32 scores [B] of inputs idx [B, T] whose replies are where targets != -100."""
        bb, T = self.backbone, idx.size(1)
        if T > bb.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={bb.cfg.max_seq_len}")
        mask = causal_mask_args(T, 0, idx.device)
        hidden, _ = bb.hidden_states(idx, bb.rope_cos[:T], bb.rope_sin[:T], None, mask)
        rows = torch.arange(idx.size(0), device=idx.device)
        return self.score(hidden[rows, _last_reply_position(targets)]).squeeze(-1).float()


def _last_reply_position(targets: Tensor) -> Tensor:
    """[B] index of each row's last target != -100; every row must have one."""
    scored = targets != -100
    if not scored.any(-1).all():
        raise ValueError("a row has no reply tokens (every target is -100) to score")
    return targets.size(1) - 1 - scored.flip(-1).int().argmax(-1)


def reward_objective(margin: float = 0.0) -> Objective:
    """The loop's objective for `PreferenceBatches(rows, None, ...)`: Bradley-Terry on the
    chosen (first half) and rejected (second half) scores, with an optional margin."""
    def objective(forward: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict]:
        x, y = batch
        scores = forward(x, y)
        chosen, rejected = scores.chunk(2)
        loss, metrics = reward_model_loss(chosen, rejected, margin)
        metrics |= {"chosen_reward": chosen.detach().mean().item(),
                    "rejected_reward": rejected.detach().mean().item()}
        return loss, metrics

    return objective


def preference_accuracy(model: RewardModel, rows: list[tuple[Row, Row]], pad_id: int,
                        batch_size: int = 8) -> dict:
    """Held-out (chosen, rejected) pairs: the fraction scored chosen > rejected, the mean
    score difference, and the number of pairs."""
    if not rows:
        raise ValueError("no preference pairs to score")
    chosen, rejected = score_pairs(model, model, rows, pad_id, batch_size).unbind(1)
    diff = chosen - rejected
    return {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item(),
            "pairs": len(rows)}


def save_reward_model(model: RewardModel, out_dir: Path | str) -> None:
    """The head only: reward_head.safetensors and reward_config.json. The backbone goes into
    the same directory as an ordinary model (`save_model`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.score.state_dict().items()}
    save_file(tensors, out_dir / HEAD_WEIGHTS, metadata={"format": "pt"})
    meta = {"format": HEAD_FORMAT, "dim": model.cfg.dim}
    (out_dir / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def load_reward_model(model_dir: Path | str, device: str | torch.device = "cpu") -> RewardModel:
    """A model directory with a reward head: the backbone (`load_model`) plus the head."""
    model_dir = Path(model_dir)
    missing = [name for name in (HEAD_WEIGHTS, HEAD_CONFIG) if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} has no reward head (missing {', '.join(missing)}):"
                                f" is it a plain language model rather than a reward model?")
    meta = json.loads((model_dir / HEAD_CONFIG).read_text())
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{model_dir / HEAD_CONFIG} is not an llmforge reward head config")
    backbone = load_model(model_dir, device=device)
    if meta.get("dim") != backbone.cfg.dim:
        raise ValueError(f"{model_dir}: reward head dim {meta.get('dim')} does not match the "
                         f"model's dim {backbone.cfg.dim}")
    model = RewardModel(backbone)
    model.score.load_state_dict(load_file(model_dir / HEAD_WEIGHTS, device=str(device)))
    return model
