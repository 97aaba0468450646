"""Preference losses: sequence log-probs, DPO / IPO / hinge, Bradley-Terry reward model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.align.preference import dpo_loss, reward_model_loss, sequence_logprobs


def test_sequence_logprobs_matches_naive_loop():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) > 0.3
    targets[~mask] = -100  # ignored positions may hold anything
    for chunk in (1, 3, 256):
        total, count = sequence_logprobs(logits, targets, mask, chunk_size=chunk)
        for b in range(B):
            expected, n = 0.0, 0
            for t in range(T):
                if mask[b, t]:
                    expected += torch.log_softmax(logits[b, t], -1)[targets[b, t]].item()
                    n += 1
            assert total[b].item() == pytest.approx(expected, abs=1e-5)
            assert count[b].item() == n


def test_sequence_logprobs_gradient_and_bf16():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, requires_grad=True)
    targets = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    total, _ = sequence_logprobs(logits, targets, mask, chunk_size=2)
    total.sum().backward()
    ref = logits.detach().clone().requires_grad_()
    torch.log_softmax(ref, -1).gather(-1, targets[..., None]).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    # bf16 logits: the result is float32 and close to the fp32 computation.
    low, _ = sequence_logprobs(logits.detach().bfloat16(), targets, mask)
    assert low.dtype == torch.float32
    high, _ = sequence_logprobs(logits.detach().bfloat16().float(), targets, mask)
    torch.testing.assert_close(low, high)


def test_sequence_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        sequence_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long),
                          torch.ones(2, 3))


def _four(pc, pr, rc, rr, grad=False):
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=grad) for v in (pc, pr, rc, rr)]
    return ts


def test_dpo_sigmoid_at_reference_is_log2_and_gradient_prefers_chosen():
    pc, pr, rc, rr = _four([-5.0, -3.0], [-4.0, -6.0], [-5.0, -3.0], [-4.0, -6.0], grad=True)
    loss, metrics = dpo_loss(pc, pr, rc.detach(), rr.detach())
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # Descent moves along -grad: chosen log-probs up, rejected down.
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dh of -log sigma(beta h) at h = 0 is -beta/2, averaged over B = 2.
    torch.testing.assert_close(pc.grad, torch.full((2,), -0.1 / 2 / 2, dtype=torch.float64))
    assert metrics["rewards/margins"] == 0.0 and metrics["rewards/accuracy"] == 0.0


def test_dpo_label_smoothing():
    zero = torch.zeros(1, dtype=torch.float64)
    beta = 0.1

    def loss_at(h, eps):
        return dpo_loss(torch.tensor([h], dtype=torch.float64), zero, zero, zero, beta=beta,
                        label_smoothing=eps)[0].item()

    # Both are log 2 at h = 0; eps = 0 is plain DPO.
    assert loss_at(0.0, 0.0) == pytest.approx(math.log(2))
    assert loss_at(0.0, 0.2) == pytest.approx(math.log(2))
    assert loss_at(3.0, 0.0) == pytest.approx(-F.logsigmoid(torch.tensor(0.3)).item())
    hs = torch.linspace(0, 200, 4001).tolist()
    plain = [loss_at(h, 0.0) for h in hs]
    assert all(a > b for a, b in zip(plain, plain[1:], strict=False))  # always wants more margin
    eps = 0.1
    smooth = [loss_at(h, eps) for h in hs]
    best = hs[min(range(len(hs)), key=smooth.__getitem__)]
    # cDPO stops at the margin where sigma(beta h) = 1 - eps.
    assert best == pytest.approx(math.log((1 - eps) / eps) / beta, abs=0.1)
    expected = -(1 - eps) * math.log(1 / (1 + math.exp(-0.3))) - eps * math.log(
        1 / (1 + math.exp(0.3)))
    assert loss_at(3.0, eps) == pytest.approx(expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(zero, zero, zero, zero, label_smoothing=0.5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_minimum_at_half_inverse_beta(beta):
    zero = torch.zeros(1, dtype=torch.float64)
    hs = [i / 100 for i in range(-1000, 1001)]
    losses = [dpo_loss(torch.tensor([h], dtype=torch.float64), zero, zero, zero, beta=beta,
                       kind="ipo")[0].item() for h in hs]
    best = hs[min(range(len(hs)), key=losses.__getitem__)]
    assert best == pytest.approx(1 / (2 * beta), abs=1e-6)
    assert min(losses) == pytest.approx(0.0, abs=1e-12)
    assert losses[hs.index(0.0)] == pytest.approx((1 / (2 * beta)) ** 2)
    # h enters through either side: a rejected ratio of -1/(2 beta) is the same minimum.
    at_min = torch.tensor([-1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    loss, _ = dpo_loss(zero, at_min, zero, zero, beta=beta, kind="ipo")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and at_min.grad.abs().item() < 1e-9


def test_hinge():
    zero = torch.zeros(2, dtype=torch.float64)
    h = torch.tensor([5.0, 20.0], dtype=torch.float64)
    loss, _ = dpo_loss(h, zero, zero, zero, beta=0.1, kind="hinge")
    assert loss.item() == pytest.approx((0.5 + 0.0) / 2)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_length_normalize_is_division_by_lengths(kind):
    pc, pr, rc, rr = _four([-12.0, -30.0], [-8.0, -9.0], [-10.0, -33.0], [-6.0, -10.0])
    lc, lr = torch.tensor([4, 10]), torch.tensor([2, 3])
    loss, metrics = dpo_loss(pc, pr, rc, rr, kind=kind, chosen_len=lc, rejected_len=lr,
                             length_normalize=True)
    manual, manual_metrics = dpo_loss(pc / lc, pr / lr, rc / lc, rr / lr, kind=kind)
    plain, _ = dpo_loss(pc, pr, rc, rr, kind=kind)
    assert loss.item() == pytest.approx(manual.item())
    assert metrics == pytest.approx(manual_metrics)
    assert loss.item() != pytest.approx(plain.item())
    # Lengths are ignored unless asked for.
    unnormalised, _ = dpo_loss(pc, pr, rc, rr, kind=kind, chosen_len=lc, rejected_len=lr)
    assert unnormalised.item() == pytest.approx(plain.item())


def test_length_normalize_needs_lengths():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="rejected_len"):
        dpo_loss(x, x, x, x, length_normalize=True, chosen_len=[1, 2])
    with pytest.raises(ValueError, match="chosen_len"):
        dpo_loss(x, x, x, x, length_normalize=True)
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(x, x, x, x, kind="kto")


def test_dpo_metrics_hand_computed():
    pc, pr, rc, rr = _four([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # chosen rewards 0.1*[1, 0]; rejected 0.1*[-1, 1]; margins [0.2, -0.1]
    assert m["rewards/chosen"] == pytest.approx(0.05)
    assert m["rewards/rejected"] == pytest.approx(0.0)
    assert m["rewards/margins"] == pytest.approx(0.05)
    assert m["rewards/accuracy"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-1.5)
    assert m["logps/rejected"] == pytest.approx(-2.0)
    assert all(isinstance(v, float) for v in m.values())
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.1))) / 2
    assert loss.item() == pytest.approx(expected)


def test_reward_model_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.5, 1.0])
    rejected = torch.tensor([1.0, 1.5, 1.0])
    loss, m = reward_model_loss(chosen, rejected)
    # differences 1, -1, 0
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["margin"] == pytest.approx(0.0)
    margin = torch.tensor([1.0, 0.0, -2.0])  # per-pair margins: logits 0, -1, 2
    loss_m, m_m = reward_model_loss(chosen, rejected, margin=margin)
    expected_m = (math.log(2) + math.log1p(math.exp(1)) + math.log1p(math.exp(-2))) / 3
    assert loss_m.item() == pytest.approx(expected_m, rel=1e-6)
    assert m_m == m  # metrics describe the scores, not the margin
    scalar, _ = reward_model_loss(chosen, rejected, margin=0.5)
    expected_s = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))
                  + math.log1p(math.exp(0.5))) / 3
    assert scalar.item() == pytest.approx(expected_s, rel=1e-6)


def test_linear_reward_model_learns_separable_preferences():
    gen = torch.Generator().manual_seed(0)
    dim = 16
    true_w = torch.randn(dim, generator=gen)

    def pairs(n):
        a, b = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
        better = (a @ true_w > b @ true_w)[:, None]
        return torch.where(better, a, b), torch.where(better, b, a)

    train_c, train_r = pairs(512)
    test_c, test_r = pairs(512)
    torch.manual_seed(0)
    scorer = torch.nn.Linear(dim, 1)
    opt = torch.optim.Adam(scorer.parameters(), lr=0.05)
    for _ in range(200):
        loss, _ = reward_model_loss(scorer(train_c).squeeze(-1), scorer(train_r).squeeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, metrics = reward_model_loss(scorer(test_c).squeeze(-1), scorer(test_r).squeeze(-1))
    assert metrics["accuracy"] > 0.9
