"""Sampling settings of one request, checked once at the door, and the batched token sampler."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 8


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_range(name: str, v: object, lo: float, hi: float, lo_open: bool = False) -> None:
    # `not (...)` so that NaN fails too; bools are not numbers here.
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if not (ok and (lo < v if lo_open else lo <= v) and v <= hi):
        raise ValueError(
            f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}"
        )


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output
    stop_token_ids: tuple[int, ...] = ()  # extra to the model's own end-of-turn ids
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob + top-k others
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)

    def validate(self) -> None:
        """Raise ValueError naming the bad field: a bad request fails at the door, not mid-batch."""
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        _check_range("temperature", self.temperature, 0, 2)
        _check_range("top_p", self.top_p, 0, 1, lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (-1 or 0: off), got {self.top_k!r}")
        _check_range("min_p", self.min_p, 0, 1)
        _check_range("repetition_penalty", self.repetition_penalty, 0, 2, lo_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2, 2)
        _check_range("frequency_penalty", self.frequency_penalty, -2, 2)
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {v!r}")
        # torch.Generator.manual_seed takes [-2**63, 2**64); seed + i for n choices must fit too.
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be None or a 64-bit int, got {self.seed!r}")
        if not isinstance(self.stop, tuple | list):
            raise ValueError(f"stop must be a tuple of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP:
            raise ValueError(f"stop has {len(self.stop)} entries, at most {MAX_STOP} allowed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop entries must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple | list) or any(
            not _is_int(t) or t < 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")


def _scatter_index(
    rows: list[int], seqs: list[list[int]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(row, token id) index pairs for every token of seqs[j], placed in row rows[j]."""
    r = torch.tensor([i for i, s in zip(rows, seqs, strict=True) for _ in s], dtype=torch.long)
    ids = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
    return r.to(device), ids.to(device)


def apply_penalties(
    logits: Tensor, params: list[SamplingParams], history: list[list[int]], n_prompt: list[int]
) -> Tensor:
    """Repetition penalty (prompt + output), then presence/frequency (output only), per row.

    Returns `logits` itself, untouched, when no row asks, so greedy stays bit-exact argmax.
    """
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    out = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    dev = logits.device
    if rep:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[_scatter_index(rep, [history[i] for i in rep], dev)] = True
        pen = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
    if out:
        r, ids = _scatter_index(out, [history[i][n_prompt[i] :] for i in out], dev)
        counts = torch.zeros_like(logits).index_put_(
            (r, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True
        )
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        logits = logits - pres * (counts > 0) - freq * counts
    return logits


def filtered_probs(x: Tensor, params: list[SamplingParams]) -> Tensor:
    """Unnormalised probabilities of temperature-scaled logits [B, V] after top-k, top-p, min-p.

    A filter nobody in the batch uses costs nothing; rows that don't use one get a neutral value,
    which leaves them bit-identical to running without that filter.
    """
    m, vocab = x.shape
    dev = x.device
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    use_k = any(k < vocab for k in ks)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        sx, order = x.sort(dim=-1, descending=True, stable=True)
        if use_k:
            kt = torch.tensor(ks, device=dev)[:, None]
            sx = sx.masked_fill(torch.arange(vocab, device=dev) >= kt, float("-inf"))
        if use_p:
            tp = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]
            sp = sx.softmax(-1)
            before = F.pad(sp.cumsum(-1)[:, :-1], (1, 0))  # mass ranked above; 0 for the first
            # Smallest head reaching top_p: a token goes once those above it already reach it.
            sx = sx.masked_fill(before >= torch.tensor(tp, device=dev)[:, None], float("-inf"))
        x = torch.empty_like(sx).scatter_(-1, order, sx)
    probs = x.softmax(-1)
    if any(p.min_p > 0 for p in params):
        mp = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)[:, None]
        probs = probs.masked_fill(probs < mp * probs.amax(-1, keepdim=True), 0.0)
    return probs


def token_logprobs(
    logits: Tensor, token_ids: Tensor, ks: list[int | None]
) -> tuple[Tensor, list[list[tuple[int, float]]]]:
    """Raw log-probs of token_ids [N] under logits [N, V], and each row's top-ks[i] (id, logprob).

    logit - logsumexp, no full log_softmax; top-k work only for rows with ks[i] > 0. Also fits
    prompt_logprobs (rows = prompt positions, token_ids = the next prompt tokens).
    """
    logits = logits.float()
    lse = logits.logsumexp(-1)
    chosen = logits.gather(-1, token_ids[:, None]).squeeze(-1) - lse
    tops: list[list[tuple[int, float]]] = [[] for _ in ks]
    rows = [i for i, k in enumerate(ks) if k]
    if rows:
        r = torch.tensor(rows, device=logits.device)
        kmax = min(max(ks[i] for i in rows), logits.size(-1))
        vals, ids = logits[r].topk(kmax, -1)
        vals, ids = (vals - lse[r, None]).tolist(), ids.tolist()
        for j, i in enumerate(rows):
            tops[i] = list(zip(ids[j][: ks[i]], vals[j][: ks[i]], strict=True))
    return chosen, tops


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    history: list[list[int]],
    n_prompt: list[int],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, list[list[tuple[int, float]]]]:
    """Pick the next token of every row [B, V] under its own settings, in one engine step.

    Order (vLLM/HF): penalties -> temperature -> top-k -> top-p -> min-p -> sample. Returns
    (tokens [B] long, raw logprob of each token [B], top (id, logprob) lists for rows with
    params.logprobs > 0, else []). Generators must live on logits.device.
    """
    logits = logits.float()
    x = apply_penalties(logits, params, history, n_prompt)
    tokens = x.argmax(-1)  # temperature-0 rows keep this
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        sp = [params[i] for i in rows]
        r = torch.tensor(rows, device=x.device)
        xs = x if len(rows) == len(params) else x[r]
        temp = torch.tensor([p.temperature for p in sp], device=x.device, dtype=x.dtype)
        probs = filtered_probs(xs / temp[:, None], sp)
        # Exponential race: argmax(p / E), E ~ Exp(1), picks i with probability p_i, and unlike
        # torch.multinomial each row draws its own noise, so a seeded row's tokens don't depend
        # on what else is in the batch.
        q = torch.empty_like(probs)
        free = [j for j, i in enumerate(rows) if generators[i] is None]
        if len(free) == len(rows):
            q.exponential_(generator=default_generator)
        elif free:
            q[free] = torch.empty_like(q[free]).exponential_(generator=default_generator)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                q[j].exponential_(generator=generators[i])
        q.clamp_(min=torch.finfo(q.dtype).tiny)  # E = 0 would make 0/0 = NaN win the argmax
        tokens[r] = (probs / q).argmax(-1)
    chosen, tops = token_logprobs(logits, tokens, [p.logprobs for p in params])
    return tokens, chosen, tops
