"""Muon: Newton-Schulz orthogonalisation, the optimizer step, routing, resuming, and FSDP2."""

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from llmforge.train.muon import Muon, newton_schulz, split_for_muon

pytestmark = pytest.mark.usefixtures("one_thread")


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _train(model, optimizers, x, y, steps):
    for _ in range(steps):
        loss = _mse(model, x, y)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_approximates_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    ortho = newton_schulz(G, steps=5)
    assert ortho.shape == G.shape and ortho.dtype == G.dtype
    sv = torch.linalg.svdvals(ortho)
    assert sv.min() > 0.6 and sv.max() < 1.2, sv  # the quintic's band, not exactly 1
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    assert torch.cosine_similarity(ortho.flatten(), polar.flatten(), dim=0) > 0.9
    # A stack of matrices (MoE experts) is orthogonalised one matrix at a time.
    stack = torch.randn(3, *shape)
    each = torch.stack([newton_schulz(m, steps=5) for m in stack])
    torch.testing.assert_close(newton_schulz(stack, steps=5), each)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr,scale", [("match_adamw", 0.2 * math.sqrt(12)),
                                             ("spectral", math.sqrt(12 / 5))])
def test_steps_match_formula_with_lr_read_from_group(adjust_lr, scale, nesterov):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 5))
    g1, g2 = torch.randn(12, 5), torch.randn(12, 5)
    opt = Muon([w], lr=0.5, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
               adjust_lr=adjust_lr)
    expected = w.detach().clone()
    buf = torch.zeros(12, 5)
    for lr, g in ((0.01, g1), (0.03, g2)):
        opt.param_groups[0]["lr"] = lr  # as the training loop's schedule does
        w.grad = g
        opt.step()
        buf = 0.9 * buf + g
        update = g + 0.9 * buf if nesterov else buf
        expected = expected * (1 - lr * 0.1) - lr * scale * newton_schulz(update, steps=5)
        torch.testing.assert_close(w.detach(), expected)


def test_muon_solves_least_squares():
    torch.manual_seed(0)
    X = torch.randn(16, 64)
    Y = (torch.randn(16, 16) / 4) @ X
    W = nn.Parameter(torch.zeros(16, 16))
    opt = Muon([W])
    initial = ((W @ X - Y) ** 2).mean().item()
    for _ in range(100):
        loss = ((W @ X - Y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = ((W @ X - Y) ** 2).mean().item()
    assert final < 0.05 * initial, (initial, final)


def test_split_for_muon_routes_parameters():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.experts = nn.Parameter(torch.zeros(3, 8, 4))
            self.norm = nn.LayerNorm(4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    m = Tiny()
    muon, other = split_for_muon(m.named_parameters())
    assert {id(p) for p in muon} == {id(m.proj.weight), id(m.experts)}
    assert {id(p) for p in other} == {id(m.tok_emb.weight), id(m.proj.bias), id(m.norm.weight),
                                      id(m.norm.bias), id(m.lm_head.weight)}


def test_mlp_trains_with_muon_and_adamw():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.sin(x @ torch.randn(8, 1))
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    muon_params, other = split_for_muon(model.named_parameters())
    assert len(muon_params) == 2 and len(other) == 2
    opts = [Muon(muon_params), torch.optim.AdamW(other, lr=1e-2)]
    with torch.no_grad():
        initial = _mse(model, x, y).item()
    _train(model, opts, x, y, steps=150)
    with torch.no_grad():
        final = _mse(model, x, y).item()
    assert final < 0.2 * initial, (initial, final)


def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    a = nn.Sequential(nn.Linear(6, 16, bias=False), nn.Tanh(), nn.Linear(16, 3, bias=False))
    opt_a = Muon(a.parameters(), weight_decay=0.1)
    _train(a, [opt_a], x, y, steps=3)

    b = copy.deepcopy(a)
    opt_b = Muon(b.parameters(), weight_decay=0.1)
    saved = io.BytesIO()
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)
    opt_b.load_state_dict(torch.load(saved))

    _train(a, [opt_a], x, y, steps=4)
    _train(b, [opt_b], x, y, steps=4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kwargs,name", [
    ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum"),
    ({"ns_steps": 0}, "ns_steps"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"adjust_lr": "rms"}, "adjust_lr"),
])
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon([nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_parameter_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(4,\)"):
        Muon([nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\)"):
        Muon([nn.Parameter(torch.zeros(1, 2, 3, 4))])
    opt = Muon([nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(4, 4))], "lr": -1.0})
    Muon([nn.Parameter(torch.zeros(2, 3, 4))])  # stacked experts are accepted


def _train_plain_and_sharded(hidden: int, out: int):
    """A small MLP and its fully_shard copy, each trained 3 steps with Muon on the same data
    (needs a process group); returns (plain, sharded, sharded's optimizer)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, out)
    plain = nn.Sequential(nn.Linear(8, hidden, bias=False), nn.Tanh(),
                          nn.Linear(hidden, out, bias=False))
    sharded = copy.deepcopy(plain)
    fully_shard(sharded)
    opt_sharded = Muon(sharded.parameters(), weight_decay=0.1)
    _train(plain, [Muon(plain.parameters(), weight_decay=0.1)], x, y, steps=3)
    _train(sharded, [opt_sharded], x, y, steps=3)
    return plain, sharded, opt_sharded


def test_fully_shard_matches_unsharded(tmp_path):
    """FSDP2 on one gloo rank: the DTensor path (gather, orthogonalise, re-shard) is taken."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        plain, sharded, opt_sharded = _train_plain_and_sharded(hidden=16, out=4)
        for p_plain, p_sharded in zip(plain.parameters(), sharded.parameters(), strict=True):
            assert isinstance(p_sharded, DTensor) and isinstance(p_sharded.grad, DTensor)
            buf = opt_sharded.state[p_sharded]["momentum_buffer"]
            assert isinstance(buf, DTensor)  # sharded like its weight, so checkpoints reshard
            torch.testing.assert_close(p_sharded.detach().full_tensor(), p_plain.detach(),
                                       atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # 7 and 5 rows split unevenly over 2 ranks: shards of 4+3 and 3+2 rows.
        plain, sharded, _ = _train_plain_and_sharded(hidden=7, out=5)
        expected_rows = [(4, 3), (3, 2)][rank]
        assert tuple(p.to_local().shape[0] for p in sharded.parameters()) == expected_rows
        for p_plain, p_sharded in zip(plain.parameters(), sharded.parameters(), strict=True):
            torch.testing.assert_close(p_sharded.detach().full_tensor(), p_plain.detach(),
                                       atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(),
                    reason="forks two ranks; spawning them would re-import torch (slow)")
def test_fully_shard_two_ranks_uneven_shards(tmp_path):
    """Two real ranks: each keeps exactly its own (uneven) slice of the orthogonalised update."""
    torch.multiprocessing.start_processes(_two_rank_worker, args=(str(tmp_path / "pg"),),
                                          nprocs=2, start_method="fork")
