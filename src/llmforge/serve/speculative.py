"""Speculative decoding's arithmetic: the distributions drafts are drawn from and judged by, the
step's random numbers, and the acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

A draft token x drawn from the draft's q stands with probability min(1, p(x)/q(x)) under the
target's p; the first that falls is replaced by a draw from max(0, p - q) renormalised, and when
all stand one more token comes from p. Each token is then distributed exactly as the target's
alone, whatever the draft. p and q are the distributions after the request's temperature,
top-k, top-p and min-p; a greedy row's are one-hot argmaxes, which turns the rule into "stands
while the target's argmax agrees", so greedy output is the target's token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from llmforge.serve.sampling import SamplingParams, filtered_probs


@dataclass(frozen=True)
class SpecStats:
    """Running totals; the engine swaps in a new object each step, so a reader on another thread
    always sees one consistent set."""

    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the target
    steps: int = 0  # sequence-steps that verified at least one draft token

    def plus(self, proposed: int, accepted: int, steps: int) -> SpecStats:
        return SpecStats(self.proposed + proposed, self.accepted + accepted, self.steps + steps)

    @property
    def acceptance_rate(self) -> float:
        """Accepted over proposed draft tokens; NaN before any was proposed."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a sequence gains per verification: its accepted drafts plus the target's own
        (vLLM's mean acceptance length); NaN before any verification."""
        return 1 + self.accepted / self.steps if self.steps else float("nan")


def check_same_vocab(target: Tokenizer, draft: Tokenizer) -> None:
    """Raise ValueError unless both tokenizers map the same strings to the same ids: the draft's
    token ids are checked as the target's, so they must mean the same text."""
    a, b = target.get_vocab(with_added_tokens=True), draft.get_vocab(with_added_tokens=True)
    if a == b:
        return
    differ = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
    raise ValueError(f"the draft model's tokenizer differs from the target's ({len(a)} vs "
                     f"{len(b)} tokens, {len(differ)} differ, e.g. {differ[:3]}); a draft must "
                     f"share the target's vocabulary")


def sampling_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """The normalised distributions [N, V] row i's token is drawn from: temperature, top-k,
    top-p and min-p as `sample` applies them (no penalties); one-hot argmaxes for greedy rows."""
    probs = F.one_hot(logits.argmax(-1), logits.size(-1)).to(logits.dtype)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        sp = [params[i] for i in rows]
        r = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([p.temperature for p in sp], device=logits.device,
                            dtype=logits.dtype)[:, None]
        kept = filtered_probs(logits[r] / temp, sp)
        probs[r] = kept / kept.sum(-1, keepdim=True)
    return probs


@dataclass
class Noise:
    """One step's random numbers. Drawing is argmax(probs / E), E ~ Exp(1) (as in `sample`)."""

    draft: Tensor  # [B, K, V] exponential: the draft's K draws
    accept: Tensor  # [B, K] uniform: the acceptance tests
    final: Tensor  # [B, V] exponential: the token after the accepted drafts


def draw_noise(params: list[SamplingParams], generators: list[torch.Generator | None],
               ks: list[int], vocab: int, default: torch.Generator,
               device: torch.device) -> Noise:
    """A seeded row draws from its own generator, exactly its ks[i] drafts' worth in a fixed
    order, so its tokens depend on its seed alone, never on the batch. Greedy rows and rows
    without drafts draw nothing: exponentials of 1 and uniforms of 0 leave argmaxes as they are
    and let a draft stand exactly when the target gives it probability 1."""
    b, k = len(ks), max(ks)
    noise = Noise(torch.ones(b, k, vocab, device=device), torch.zeros(b, k, device=device),
                  torch.ones(b, vocab, device=device))
    rows = [i for i, p in enumerate(params) if ks[i] and p.temperature > 0]
    free = [i for i in rows if generators[i] is None]
    if free:
        noise.draft[free] = noise.draft[free].exponential_(generator=default)
        noise.accept[free] = noise.accept[free].uniform_(generator=default)
        noise.final[free] = noise.final[free].exponential_(generator=default)
    for i in rows:
        if (gen := generators[i]) is not None:
            noise.draft[i, : ks[i]].exponential_(generator=gen)
            noise.accept[i, : ks[i]].uniform_(generator=gen)
            noise.final[i].exponential_(generator=gen)
    tiny = torch.finfo(noise.draft.dtype).tiny  # E = 0 would make 0/0 = NaN win the argmax
    noise.draft.clamp_(min=tiny)
    noise.final.clamp_(min=tiny)
    return noise


def accept(p: Tensor, q: Tensor, drafts: Tensor, ks: Tensor, noise: Noise) -> tuple[Tensor, Tensor]:
    """How many leading drafts of each row stand [B], and the token that follows them [B].

    p [B, K+1, V]: the target's distributions at each draft's position and one past the last;
    q [B, K, V]: the draft's; drafts [B, K]; ks [B]: how many drafts row i proposed (<= K).
    """
    k = drafts.size(1)
    px = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qx = q.gather(-1, drafts[..., None]).squeeze(-1)
    stands = (noise.accept * qx < px) & (torch.arange(k, device=p.device) < ks[:, None])
    n = stands.long().cumprod(-1).sum(-1)
    rows = torch.arange(p.size(0), device=p.device)
    p_next = p[rows, n]
    q_next = q[rows, n.clamp(max=k - 1)] * (n < ks)[:, None]  # all stood: the bonus, from p
    residual = (p_next - q_next).clamp(min=0)
    # p == q to rounding: the draft could only fall by rounding, and p is then the answer.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n, (residual / noise.final).argmax(-1)
