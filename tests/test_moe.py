import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.model.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")


def build(dim=16, hidden=24, n_experts=4, top_k=2, seed=0, std=0.2) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, n_experts, top_k)
    moe.init_weights(std=std, out_std=std)
    return moe


def inputs(*shape, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow, obvious version: per token, softmax -> top-k -> renormalise -> weighted experts."""
    flat = x.reshape(-1, x.size(-1))
    probs = (flat @ moe.router.weight.T).softmax(-1)
    outs, counts = [], torch.zeros(moe.n_experts)
    for t in range(flat.size(0)):
        top_p, top_i = probs[t].topk(moe.top_k)
        top_p = top_p / top_p.sum()
        y = 0
        for p, e in zip(top_p, top_i.tolist(), strict=True):
            y = y + p * swiglu(flat[t], moe.w_gate[e], moe.w_up[e], moe.w_down[e])
            counts[e] += 1
        outs.append(y)
    f = counts / counts.sum()
    aux = moe.n_experts * (f * probs.mean(0)).sum()
    return torch.stack(outs).reshape(x.shape), aux


def test_identical_experts_with_top1_equal_the_dense_mlp():
    moe = build(n_experts=4, top_k=1)
    dense = [torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 24, bias=False)]
    dense.append(torch.nn.Linear(24, 16, bias=False))
    with torch.no_grad():
        for param, lin in zip((moe.w_gate, moe.w_up, moe.w_down), dense, strict=True):
            param.copy_(lin.weight.expand_as(param))  # every expert slice is the dense weight
    x = inputs(2, 9, 16)
    y, _ = moe(x)
    _, chosen, weights = moe.route(x.reshape(-1, 16))
    assert chosen.unique().numel() > 1  # tokens really were spread over several experts
    assert torch.equal(weights, torch.ones_like(weights))
    expected = swiglu(x, *(lin.weight for lin in dense))
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_matches_slow_reference_outputs_and_gradients():
    moe = build(n_experts=4, top_k=2)
    x = inputs(2, 7, 16).requires_grad_()
    y, aux = moe(x)
    y_ref, aux_ref = reference(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(aux, aux_ref, atol=1e-6, rtol=0)
    assert aux.dtype == torch.float32 and aux.dim() == 0

    probe = inputs(2, 7, 16, seed=2)  # a random cotangent, so every output element matters
    wrt = [x, *moe.parameters()]
    grads = torch.autograd.grad((y * probe).sum() + aux, wrt)
    grads_ref = torch.autograd.grad((y_ref * probe).sum() + aux_ref, wrt)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_when_balanced_and_larger_when_collapsed(top_k):
    n_experts = dim = 4
    moe = MoE(dim, 8, n_experts, top_k)
    with torch.no_grad():
        moe.router.weight.copy_(3.0 * torch.eye(n_experts))
    # Token i prefers expert i, then expert i+1: every expert gets exactly top_k of the 8 slots
    # (two copies of each token), while the mean probabilities P_i are far from uniform.
    x = torch.eye(dim) + 0.5 * torch.eye(dim).roll(1, dims=1)
    x = torch.cat([x, 2 * x]).reshape(2, 4, dim)
    _, aux = moe(x)
    counts = torch.bincount(moe.route(x.reshape(-1, dim))[1].flatten(), minlength=n_experts)
    assert counts.tolist() == [2 * top_k] * n_experts
    assert aux.item() == pytest.approx(1.0, abs=1e-5)

    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # positive inputs all prefer expert 0
    x = torch.rand(2, 5, dim) + 0.1
    _, aux = moe(x)
    probs, chosen, _ = moe.route(x.reshape(-1, dim))
    assert (chosen[:, 0] == 0).all()
    f = torch.bincount(chosen.flatten(), minlength=n_experts) / chosen.numel()
    assert aux.item() == pytest.approx(n_experts * (f * probs.mean(0)).sum().item(), abs=1e-6)
    assert aux.item() > 1.2


def test_gradients_reach_every_parameter():
    moe = build(n_experts=4, top_k=2)
    y, aux = moe(inputs(2, 7, 16))
    (y.sum() + aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_experts_without_tokens_get_zero_gradients():
    moe = build(n_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
    y, aux = moe(inputs(2, 7, 16).abs())  # positive inputs: every token picks expert 2
    (y.sum() + aux).backward()
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        assert p.grad[2].abs().sum() > 0
        assert p.grad[[0, 1, 3]].eq(0).all()


def test_training_fits_a_teacher_mixture():
    teacher = build(dim=8, hidden=16, n_experts=4, top_k=2, seed=10, std=0.5)
    student = build(dim=8, hidden=16, n_experts=4, top_k=2, seed=11, std=0.1)
    x = inputs(4, 16, 8, seed=3)
    with torch.no_grad():
        target, _ = teacher(x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        y, aux = student(x)
        loss = F.mse_loss(y, target)
        opt.zero_grad()
        (loss + 0.01 * aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    moe = build(n_experts=4, top_k=2)
    x = inputs(2, 7, 16)
    y32, aux32 = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
        chosen = moe.route(x.reshape(-1, 16))[1]
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert aux.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert torch.equal(chosen, moe.route(x.reshape(-1, 16))[1])  # router ran in fp32
    torch.testing.assert_close(aux, aux32)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    (y.float().sum() + aux).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


def test_active_param_count_and_init():
    moe = MoE(dim=64, hidden=96, n_experts=8, top_k=2)
    assert moe.active_param_count() == 8 * 64 + 2 * 3 * 64 * 96
    assert sum(p.numel() for p in moe.parameters()) == 8 * 64 + 8 * 3 * 64 * 96
    moe.init_weights(std=0.05, out_std=0.01)
    assert moe.w_gate.std().item() == pytest.approx(0.05, rel=0.05)
    assert moe.router.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert moe.w_down.std().item() == pytest.approx(0.01, rel=0.05)
    assert math.isclose(moe.w_down.mean().item(), 0.0, abs_tol=1e-3)


def test_empty_batch_gives_zero_output_and_loss():
    moe = build()
    y, aux = moe(torch.zeros(0, 3, 16))
    assert y.shape == (0, 3, 16) and aux.item() == 0.0


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((16, 24, 1, 1), "n_experts"),
        ((16, 24, 4, 0), "top_k"),
        ((16, 24, 4, 5), "top_k"),
        ((0, 24, 4, 2), "dim"),
        ((16, 0, 4, 2), "hidden"),
    ],
)
def test_bad_arguments_name_the_argument(args, name):
    with pytest.raises(ValueError, match=name):
        MoE(*args)
