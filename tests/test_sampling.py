"""The batched sampler: each row gets exactly its own settings, seeds, and raw logprobs."""

from __future__ import annotations

import pytest
import torch

from llmforge.serve.sampling import SamplingParams, apply_penalties, sample

V = 50


def _logits(b: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * scale


def _run(logits, params, seeds=None, history=None, n_prompt=None, default_seed=0):
    """sample() with fresh generators; history defaults to one prompt token per row."""
    b = logits.size(0)
    history = history if history is not None else [[0] for _ in range(b)]
    n_prompt = n_prompt if n_prompt is not None else [len(h) for h in history]
    seeds = seeds if seeds is not None else [None] * b
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    default = torch.Generator().manual_seed(default_seed)
    return sample(logits, params, history, n_prompt, gens, default)


def _counts(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double()


def _probs_logits(probs: list[float]) -> torch.Tensor:
    """Logits [V] whose softmax is probs on the first tokens and ~0 elsewhere."""
    x = torch.full((V,), -1e4)
    x[: len(probs)] = torch.tensor(probs).log()
    return x


# --- validate -------------------------------------------------------------------------------


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(
        max_tokens=0, temperature=0, top_p=1, top_k=-1, min_p=1, repetition_penalty=2,
        presence_penalty=-2, frequency_penalty=2, n=16, logprobs=20, prompt_logprobs=0,
        seed=-5, stop=("a",) * 8, stop_token_ids=(0, 7),
    ).validate()  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", -1),
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", False),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.1),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("n", 0),
        ("n", 17),
        ("n", True),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", True),
        ("prompt_logprobs", 21),
        ("seed", 1.0),
        ("seed", "1"),
        ("seed", 2**64),
        ("stop", ("a",) * 9),
        ("stop", ("a", "")),
        ("stop", "abc"),
        ("stop_token_ids", (1, -1)),
    ],
)
def test_validate_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


# --- greedy, filters, frequencies --------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = _logits(8)
    tokens, _, _ = _run(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(tokens, logits.argmax(-1))


def test_mixed_batch_rows_behave_as_alone():
    logits = _logits(6, seed=1, scale=0.5)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0, top_k=3, top_p=0.5),
        SamplingParams(temperature=0.7, top_k=5, seed=12),
        SamplingParams(temperature=1.3, top_p=0.6, seed=13),
        SamplingParams(temperature=1.0, min_p=0.2, seed=14),
    ]
    seeds = [p.seed for p in params]
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    alone_gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    hist = [[0]] * 6
    for _ in range(20):  # several steps, so the generators' advance is checked too
        batched, _, _ = sample(logits, params, hist, [1] * 6, gens)
        for i, p in enumerate(params):
            alone, _, _ = sample(logits[i : i + 1], [p], hist[:1], [1], alone_gens[i : i + 1])
            assert batched[i] == alone[0], f"row {i}"
    assert batched[0] == logits[0].argmax() and batched[2] == logits[2].argmax()


def test_top_k_1_is_argmax_at_temperature_1():
    logits = _logits(1, scale=0.3).expand(500, V)
    tokens, _, _ = _run(logits, [SamplingParams(temperature=1.0, top_k=1)] * 500)
    assert (tokens == logits[0].argmax()).all()


def test_top_p_keeps_exactly_the_nucleus():
    # Sorted mass 0.4, 0.7, 0.9: top_p=0.8 keeps the first three tokens (shuffled in the vocab).
    x = _probs_logits([0.3, 0.05, 0.4, 0.05, 0.2])
    tokens, _, _ = _run(x.expand(4000, V), [SamplingParams(top_p=0.8)] * 4000)
    assert set(tokens.tolist()) == {0, 2, 4}


def test_min_p_keeps_tokens_above_fraction_of_max():
    # max 0.4 * min_p 0.3 = 0.12: keeps 0.4, 0.25 and 0.13, drops 0.08, 0.06 and the ~0 rest.
    x = _probs_logits([0.08, 0.4, 0.13, 0.25, 0.06, 0.08])
    tokens, _, _ = _run(x.expand(4000, V), [SamplingParams(min_p=0.3)] * 4000)
    assert set(tokens.tolist()) == {1, 2, 3}


def test_frequencies_match_softmax_over_temperature():
    n, t = 20000, 0.7
    logits = _logits(1, seed=3)
    tokens, _, _ = _run(logits.expand(n, V), [SamplingParams(temperature=t)] * n)
    want = (logits[0].double() / t).softmax(-1)
    tv = 0.5 * (_counts(tokens) / n - want).abs().sum()
    assert tv < 0.02


def test_frequencies_match_renormalised_filtered_distribution():
    n = 20000
    logits = _logits(1, seed=4, scale=1.0)
    tokens, _, _ = _run(logits.expand(n, V), [SamplingParams(top_k=8, top_p=0.7)] * n)
    probs = logits[0].double().softmax(-1)
    top = probs.topk(8)
    p8 = top.values / top.values.sum()
    keep = (p8.cumsum(0) - p8) < 0.7
    want = torch.zeros(V, dtype=torch.double)
    want[top.indices[keep]] = p8[keep] / p8[keep].sum()
    got = _counts(tokens) / n
    assert set(tokens.tolist()) == set(top.indices[keep].tolist())
    assert 0.5 * (got - want).abs().sum() < 0.02


# --- seeds -------------------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch():
    x = _logits(4, seed=5, scale=0.5)
    row = SamplingParams(temperature=1.0, seed=42)
    others_a = [SamplingParams(temperature=0.5, top_k=4), SamplingParams(temperature=0)]
    others_b = [SamplingParams(temperature=1.0, top_p=0.5, seed=7), SamplingParams(min_p=0.1)]
    a, _, _ = _run(torch.stack([x[0], x[1], x[2]]), [row, *others_a], seeds=[42, None, None])
    b, _, _ = _run(torch.stack([x[3], x[2], x[0]]), [*others_b, row], seeds=[7, None, 42])
    c, _, _ = _run(x[:1], [row], seeds=[42])
    assert a[0] == b[2] == c[0]
    # And over many independent single draws: identical sequences for one seed, not for two.
    flat = _logits(1, seed=6, scale=0.1).expand(64, V)
    s1, _, _ = _run(flat, [row] * 64, seeds=list(range(64)))
    s2, _, _ = _run(flat, [row] * 64, seeds=list(range(64)))
    s3, _, _ = _run(flat, [row] * 64, seeds=list(range(100, 164)))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


# --- penalties ---------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    x = torch.zeros(1, V)
    x[0, 3], x[0, 5], x[0, 8] = 2.0, -1.0, 3.0
    out = apply_penalties(x, [SamplingParams(repetition_penalty=2.0)], [[3, 9, 5]], [2])
    assert out[0, 3] == 1.0 and out[0, 5] == -2.0  # 3 from the prompt, 5 from the output
    assert out[0, 8] == 3.0 and torch.equal(out[0, 10:], x[0, 10:])
    # Greedy sees the penalised logits: 3 wins unpenalised, 8 wins once 3 repeats.
    x[0, 8] = 1.5
    tokens, _, _ = _run(x, [SamplingParams(temperature=0, repetition_penalty=2.0)], history=[[3]])
    assert tokens[0] == 8


def test_presence_frequency_count_output_tokens_only():
    x = _logits(2, seed=7)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    hist = [[7, 7, 9, 9, 9, 4], [1, 2]]
    out = apply_penalties(x, [p, SamplingParams()], hist, [2, 2])
    want = x.clone()
    want[0, 9] -= 0.5 + 3 * 0.25
    want[0, 4] -= 0.5 + 0.25
    assert torch.allclose(out, want)  # token 7 only in the prompt: untouched; row 1 untouched
    assert out[0, 7] == x[0, 7] and torch.equal(out[1], x[1])


def test_no_penalties_leave_logits_untouched():
    x = _logits(2)
    assert apply_penalties(x, [SamplingParams()] * 2, [[1, 2], [3]], [1, 1]) is x


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_are_raw_and_tops_sorted():
    x = _logits(4, seed=8)
    params = [
        SamplingParams(temperature=0, logprobs=5),
        SamplingParams(temperature=1.5, top_k=3, repetition_penalty=1.5, logprobs=3, seed=1),
        SamplingParams(logprobs=0),
        SamplingParams(),
    ]
    hist = [[0, 1, 2]] * 4
    tokens, chosen, tops = _run(x, params, seeds=[None, 1, None, None], history=hist)
    raw = x.log_softmax(-1)
    assert torch.allclose(chosen, raw.gather(-1, tokens[:, None]).squeeze(-1), atol=1e-5)
    assert [len(t) for t in tops] == [5, 3, 0, 0]
    for i in (0, 1):
        ids = [t for t, _ in tops[i]]
        vals = [v for _, v in tops[i]]
        assert vals == sorted(vals, reverse=True)
        assert ids == raw[i].topk(len(ids)).indices.tolist()
        assert torch.allclose(torch.tensor(vals), raw[i, ids], atol=1e-5)
    # The greedy row's token is the argmax, so it heads its tops with the same logprob.
    assert tops[0][0] == (tokens[0].item(), chosen[0].item())
