"""Verifiable rewards, user reward functions, group advantages and the GRPO loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmforge.align.rewards import (
    RewardFn,
    arithmetic_reward,
    group_advantages,
    grpo_loss,
    gsm8k_reward,
    load_reward_function,
)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def _gsm8k_records(n: int) -> list[dict]:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"shared data not found at {GSM8K_TEST}")
    with GSM8K_TEST.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_gsm8k_reward_on_real_answers():
    for record in _gsm8k_records(5):
        answer = record["answer"]
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        assert gsm8k_reward(answer, answer) == 1.0  # the reference's own working
        assert gsm8k_reward(f"So the answer is {final}.", answer) == 1.0
        assert gsm8k_reward(f"#### {final}", answer) == 1.0
        wrong = str(int(final) + 1)
        assert gsm8k_reward(f"So the answer is {wrong}.", answer) == 0.0
        # The "####" line wins over numbers after it, but a wrong #### answer is wrong.
        assert gsm8k_reward(f"#### {final}\nsteps: 1 2 3", answer) == 1.0
        assert gsm8k_reward(f"{final} apples\n#### {wrong}", answer) == 0.0
        # The last number counts, not the first.
        assert gsm8k_reward(f"First {final}, then {wrong}", answer) == 0.0


def test_gsm8k_reward_number_formats():
    assert gsm8k_reward("The answer is 1,234.", "blah\n#### 1234") == 1.0
    assert gsm8k_reward("The answer is $1,234.00", "#### 1,234") == 1.0  # references use commas
    assert gsm8k_reward("It drops by -10 degrees.", "x\n#### -10") == 1.0
    assert gsm8k_reward("It drops by 10 degrees.", "x\n#### -10") == 0.0
    assert gsm8k_reward("The total is 2.5 liters.", "#### 2.5") == 1.0
    assert gsm8k_reward("The total is 2.50", "#### 2.5") == 1.0
    assert gsm8k_reward("between 3-4", "#### 4") == 1.0  # a dash between numbers is no sign
    assert gsm8k_reward("I don't know.", "#### 4") == 0.0
    assert gsm8k_reward("", "#### 4") == 0.0
    with pytest.raises(ValueError, match="reference"):
        gsm8k_reward("4", "no number here")


def test_arithmetic_reward():
    assert arithmetic_reward("12 + 30 = 42", 42) == 1.0
    assert arithmetic_reward("The result is 42.", 42.0) == 1.0
    assert arithmetic_reward("The result is 41", 42) == 0.0
    assert arithmetic_reward("7 - 10 = -3", -3) == 1.0
    assert arithmetic_reward("1/4 = 0.25", 0.25) == 1.0
    assert arithmetic_reward("no idea", 0) == 0.0


def test_load_reward_function(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def length(prompt, completion, **record):\n"
        "    return record.get('scale', 1) * len(completion) / 10\n"
        "def crashes(prompt, completion, **record):\n"
        "    return 1 / len(completion)\n"
        "def returns_text(prompt, completion, **record):\n"
        "    return 'good'\n"
        "def returns_nan(prompt, completion, **record):\n"
        "    return float('nan')\n"
        "NOT_A_FUNCTION = 3\n"
    )
    fn = load_reward_function(f"{module}:length")
    assert isinstance(fn, RewardFn)
    assert fn("p", "abcde") == 0.5
    assert fn("p", "abcde", scale=2) == 1.0
    assert fn.errors == 0 and fn.calls == 2

    crashing = load_reward_function(f"{module}:crashes")
    assert crashing("p", "ab") == 0.5
    assert crashing("p", "") == 0.0  # ZeroDivisionError: reward 0, counted, training goes on
    assert crashing.errors == 1 and "ZeroDivisionError" in crashing.last_error

    nan = load_reward_function(f"{module}:returns_nan")
    assert nan("p", "c") == 0.0 and nan.errors == 1

    with pytest.raises(TypeError, match="must return a float, got str"):
        load_reward_function(f"{module}:returns_text")("p", "c")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reward_function(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(AttributeError, match="no function 'absent'"):
        load_reward_function(f"{module}:absent")
    with pytest.raises(TypeError, match="not a function"):
        load_reward_function(f"{module}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="module.py:function"):
        load_reward_function(str(module))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(ImportError, match="broken.py"):
        load_reward_function(f"{broken}:f")


def test_group_advantages_shapes_and_zero_variance():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0,   # mixed
                            1.0, 1.0, 1.0, 1.0,   # all right: nothing to learn
                            0.3, 0.3, 0.3, 0.3,   # all equal, not representable exactly
                            0.0, 0.0, 0.0, 1.0])
    adv, zero_var = group_advantages(rewards, 4)
    assert adv.shape == (4, 4)
    assert zero_var == 0.5
    assert (adv[1:3] == 0).all()
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()  # unbiased, as TRL
    torch.testing.assert_close(adv[0], (torch.tensor([0.5, -0.5, 0.5, -0.5])) / (std + 1e-4))
    # [N, G] input gives the same; lists work too.
    adv2, zero_var2 = group_advantages(rewards.view(4, 4), 4)
    torch.testing.assert_close(adv, adv2)
    assert zero_var2 == zero_var
    adv3, _ = group_advantages(rewards.tolist(), 4)
    torch.testing.assert_close(adv, adv3)


def test_group_advantages_std_vs_none():
    rewards = torch.tensor([[0.0, 2.0, 4.0], [5.0, 5.0, 8.0]])
    none, _ = group_advantages(rewards, 3, scale="none")
    torch.testing.assert_close(none, torch.tensor([[-2.0, 0.0, 2.0], [-1.0, -1.0, 2.0]]))
    scaled, zero_var = group_advantages(rewards, 3, scale="std", eps=0.0)
    assert zero_var == 0.0
    torch.testing.assert_close(scaled, none / rewards.std(dim=1, keepdim=True))
    # Std scaling makes advantages independent of the reward's scale; "none" does not.
    torch.testing.assert_close(group_advantages(rewards * 10, 3, eps=0.0)[0], scaled)
    torch.testing.assert_close(group_advantages(rewards * 10, 3, scale="none")[0], none * 10)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        group_advantages(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(8), 4, scale="mad")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(8), 1)


MASK = torch.tensor([[1, 1, 1, 0, 0],
                     [1, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0, 0.5])


def _logps(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return -torch.rand(3, 5, generator=gen, dtype=torch.float64) * 3


def test_grpo_on_policy_loss_is_minus_mean_advantage():
    logp = _logps()
    adv = ADV.double()
    lengths = MASK.sum(1).double()
    loss, m = grpo_loss(logp, logp, adv, MASK, token_level=True)
    # DAPO: every valid token weighs the same, so longer sequences weigh more.
    assert loss.item() == pytest.approx(-(adv * lengths).sum().item() / lengths.sum().item())
    assert m["ratio"] == pytest.approx(1.0)
    assert m["clip_fraction"] == 0.0 and m["kl"] == 0.0
    loss_seq, _ = grpo_loss(logp, logp, adv, MASK, token_level=False)
    assert loss_seq.item() == pytest.approx(-adv.mean().item())  # original GRPO
    # With equal lengths the two normalisations agree.
    full = torch.ones(3, 5, dtype=torch.bool)
    a, _ = grpo_loss(logp, logp, adv, full, token_level=True)
    b, _ = grpo_loss(logp, logp, adv, full, token_level=False)
    assert a.item() == pytest.approx(b.item()) == pytest.approx(-adv.mean().item())


def test_grpo_masked_positions_do_not_count():
    logp = _logps()
    noisy = logp.clone()
    noisy[~MASK] = 50.0  # garbage at padding
    for token_level in (True, False):
        a, ma = grpo_loss(logp, logp, ADV.double(), MASK, token_level=token_level)
        b, mb = grpo_loss(noisy, logp, ADV.double(), MASK, token_level=token_level)
        assert a.item() == pytest.approx(b.item())
        assert ma == mb


def test_grpo_clipping():
    old = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # Ratios 1.1 (inside), 1.5 (above), 0.9 (inside), 0.5 (below), same for both sequences.
    ratios = torch.tensor([1.1, 1.5, 0.9, 0.5], dtype=torch.float64)
    new = ratios.log().expand(2, 4).clone().requires_grad_()
    loss, m = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    # A > 0 clips ratio 1.5 (above 1.2); A < 0 clips ratio 0.5 (below 0.8): 2 of 8 tokens.
    assert m["clip_fraction"] == pytest.approx(2 / 8)
    assert m["ratio"] == pytest.approx(ratios.mean().item())
    per_pos = -torch.minimum(ratios * adv[:, None], ratios.clamp(0.8, 1.2) * adv[:, None])
    assert loss.item() == pytest.approx(per_pos.mean().item())
    loss.backward()
    assert new.grad[0, 1] == 0 and new.grad[1, 3] == 0  # clipped tokens carry no gradient
    assert new.grad[0, 3] != 0 and new.grad[1, 1] != 0  # the pessimistic side is never clipped
    # Clip-higher (DAPO): a wider upper bound lets ratio 1.5 through for A > 0.
    _, m_high = grpo_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert m_high["clip_fraction"] == pytest.approx(1 / 8)
    _, m_wide = grpo_loss(new, old, adv, mask, clip_eps=0.6)
    assert m_wide["clip_fraction"] == 0.0


def test_grpo_k3_kl():
    logp = _logps()
    adv = ADV.double()
    base, _ = grpo_loss(logp, logp, adv, MASK)
    same, m_same = grpo_loss(logp, logp, adv, MASK, logp_ref=logp, kl_coef=0.5)
    assert m_same["kl"] == pytest.approx(0.0, abs=1e-12)
    assert same.item() == pytest.approx(base.item())
    ref = _logps(seed=1)
    with_kl, m = grpo_loss(logp, logp, adv, MASK, logp_ref=ref, kl_coef=0.5)
    delta = (ref - logp)[MASK]
    expected_kl = (delta.exp() - delta - 1).mean().item()
    assert m["kl"] > 0 and m["kl"] == pytest.approx(expected_kl)
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * expected_kl)
    # A reference without a coefficient is logged, not optimised.
    logged, m_logged = grpo_loss(logp, logp, adv, MASK, logp_ref=ref)
    assert logged.item() == pytest.approx(base.item()) and m_logged["kl"] == pytest.approx(m["kl"])
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, logp, adv, MASK, kl_coef=0.1)


def test_grpo_gradient_sign():
    old = _logps()
    for token_level in (True, False):
        new = old.clone().requires_grad_()
        adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
        loss, _ = grpo_loss(new, old, adv, MASK, token_level=token_level)
        loss.backward()
        # Descent moves along -grad: up for A > 0, down for A < 0, untouched for A = 0 / padding.
        assert (new.grad[0][MASK[0]] < 0).all()
        assert (new.grad[1][MASK[1]] > 0).all()
        assert (new.grad[2] == 0).all() and (new.grad[~MASK] == 0).all()
        # One descent step raises the positive-advantage sequence's log-probs.
        stepped = new.detach() - 0.1 * new.grad
        assert (stepped[0][MASK[0]] > old[0][MASK[0]]).all()


def test_grpo_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[B\]"):
        grpo_loss(x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_loss(x, x, torch.zeros(2), torch.ones(2, 4))


def test_advantages_feed_grpo_end_to_end():
    # 2 prompts x 4 samples: one group all wrong (no signal), one mixed.
    rewards = [gsm8k_reward(c, "#### 7") for c in ["7", "8", "7", "9", "1", "2", "3", "4"]]
    adv, zero_var = group_advantages(rewards, 4)
    assert zero_var == 0.5
    logp = _logps().repeat(3, 1)[:8]
    mask = torch.ones(8, 5, dtype=torch.bool)
    loss, _ = grpo_loss(logp, logp, adv.flatten().double(), mask)
    assert math.isfinite(loss.item())
