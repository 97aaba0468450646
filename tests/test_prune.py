"""Pruning: magnitude sparsity held through recovery; heads, MLP channels and blocks removed into
a valid smaller model that computes what the original computes without them; importance that
finds planted dead units; the `llmforge compress prune` stage end to end."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from llmforge.cli import main
from llmforge.compress import prune as P
from llmforge.config import load_recipe
from llmforge.model.config import ModelConfig
from llmforge.model.transformer import Transformer
from llmforge.serve.chat_model import open_chat_model, save_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
RECOVERY = ["seq_len=32", "batch_size=4", "max_steps=12", "lr=3e-3", "warmup_steps=2",
            "eval_every=6", "ckpt_every=12", "log_every=6", "eval_batches=4", "dtype=fp32"]


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    shape = {"vocab_size": 97, "dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2,
             "max_seq_len": 64}
    cfg = ModelConfig(**(shape | overrides))
    return Transformer(cfg).eval()


def calibration(n: int = 4, vocab: int = 97) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, vocab, (n, 33), generator=g)
    return [(rows[i : i + 2, :-1], rows[i : i + 2, 1:]) for i in range(0, n, 2)]


IDS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def logits(model: Transformer) -> torch.Tensor:
    return model(IDS)


# ---------------------------------------------------------------------------------------------
# Magnitude


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_zeroes_exactly_the_smallest_weights_of_each_matrix(sparsity):
    model = tiny()
    before = {n: p.detach().clone() for n, p in P.block_matrices(model)}
    masks = P.magnitude_prune(model, sparsity)
    assert len(masks.masks) == 3 * 7  # wq, wk, wv, wo, w_gate, w_up, w_down per block
    for name, p in P.block_matrices(model):
        w, mask = before[name], masks.masks[name][1]
        n_zero = round(sparsity * w.numel())
        assert int((p == 0).sum()) == n_zero == int((mask == 0).sum()), name
        zeroed, kept = w[mask == 0].abs(), w[mask == 1].abs()
        assert zeroed.max() <= kept.min(), name  # per matrix: a threshold of its own
        assert torch.equal(p[mask == 1], w[mask == 1])
    zeros, total = masks.zeros()
    assert zeros == sum(round(sparsity * w.numel()) for w in before.values())
    assert total == sum(w.numel() for w in before.values())
    # Embeddings, norms and the (tied) head are not block matrices: untouched.
    assert int((model.tok_emb.weight == 0).sum()) == 0


def test_masks_hold_zeros_under_training_with_any_optimizer():
    """Gradient hooks keep AdamW from moving a zero; re-masking before each forward keeps Muon's
    orthogonalised update (which touches every entry) from leaving any behind either."""
    from llmforge.train.loop import TrainConfig, make_optimizers

    for optimizer in ("adamw", "muon"):
        model = tiny().train()
        masks = P.magnitude_prune(model, 0.5)
        opts = make_optimizers(model, TrainConfig(optimizer=optimizer, lr=1e-2))
        objective = masks.objective()
        with masks.held():
            for x, y in calibration(8) * 2:
                loss, _ = objective(model, (x, y))
                loss.backward()
                for o in opts:
                    o.step()
                    o.zero_grad()
        for name, (p, mask) in masks.masks.items():
            assert torch.all(p[mask == 0] == 0), (optimizer, name)
            assert int((p == 0).sum()) == int((mask == 0).sum()), (optimizer, name)


# ---------------------------------------------------------------------------------------------
# Structured removal against reference computations


VARIANTS = {"gqa": {}, "mha": {"n_kv_heads": 4}, "qwen-like": {"attn_bias": True,
                                                               "qk_norm": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keeping_everything_reproduces_the_logits_exactly(variant):
    model = tiny(**VARIANTS[variant])
    want = logits(model)
    cfg = model.cfg
    heads = P.remove_heads(model, P.keep_top(torch.rand(cfg.n_layers, cfg.n_kv_heads),
                                             cfg.n_kv_heads))
    channels = P.remove_channels(model, P.keep_top(torch.rand(cfg.n_layers, cfg.hidden),
                                                   cfg.hidden))
    layers = P.remove_layers(model, list(range(cfg.n_layers)))
    for pruned in (heads, channels, layers):
        assert pruned.cfg == cfg
        assert torch.equal(logits(pruned), want)
    for method in ("heads", "mlp", "layers"):  # through prune() with "keep all" targets
        pc = P.PruneConfig(method=method, keep_fraction=1.0, n_layers_removed=0)
        assert torch.equal(logits(P.prune(model, pc, calibration()).model), want)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_removed_heads_compute_as_their_zeroed_output_columns(variant):
    model = tiny(**VARIANTS[variant])
    cfg = model.cfg
    per_group, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    keep = torch.tensor([[0], [1], [1]]) if cfg.n_kv_heads == 2 else torch.tensor(
        [[0, 2], [1, 3], [0, 1]])
    pruned = P.remove_heads(model, keep)
    n_kv = keep.shape[1]
    assert (pruned.cfg.n_heads, pruned.cfg.n_kv_heads) == (n_kv * per_group, n_kv)
    assert pruned.cfg.head_dim == hd == 16  # the width stays: dim / n_heads would be 32
    pruned.cfg.validate()
    reference = tiny(**VARIANTS[variant])
    with torch.no_grad():
        for i, groups in enumerate(keep.tolist()):
            for g in set(range(cfg.n_kv_heads)) - set(groups):
                reference.layers[i].attn.wo.weight[:, g * per_group * hd:
                                                   (g + 1) * per_group * hd] = 0
    torch.testing.assert_close(logits(pruned), logits(reference), atol=1e-5, rtol=1e-5)
    assert pruned.num_params() < model.num_params()


def test_removed_channels_compute_as_their_zeroed_down_columns():
    model = tiny()
    keep = P.keep_top(torch.rand(3, model.cfg.hidden, generator=torch.Generator().manual_seed(3)),
                      100)
    pruned = P.remove_channels(model, keep)
    assert pruned.cfg.hidden == 100 and pruned.cfg.ffn_hidden == 100
    reference = tiny()
    with torch.no_grad():
        for i, channels in enumerate(keep):
            dropped = torch.ones(model.cfg.hidden, dtype=torch.bool)
            dropped[channels] = False
            reference.layers[i].mlp.w_down.weight[:, dropped] = 0
    torch.testing.assert_close(logits(pruned), logits(reference), atol=1e-5, rtol=1e-5)


def test_removed_layers_compute_as_skipping_those_blocks():
    model = tiny()
    pruned = P.remove_layers(model, [0, 2])
    assert pruned.cfg.n_layers == 2
    reference = tiny()
    reference.layers = torch.nn.ModuleList([reference.layers[0], reference.layers[2]])
    assert torch.equal(logits(pruned), logits(reference))


def test_a_head_pruned_model_round_trips_through_hf_and_gguf(tiny_chat_model, tmp_path):
    """A head width other than dim / n_heads is written (HF head_dim, GGUF key_length) and read
    back."""
    from llmforge.interop.gguf import load_gguf_model, write_gguf

    chat = open_chat_model(str(tiny_chat_model))
    chat.model = P.remove_heads(chat.model, torch.tensor([[1], [0]]))
    assert chat.model.cfg.head_dim_override == 16
    x = torch.tensor([chat.format.prompt([{"role": "user", "content": "Say hi"}])])
    want = chat.model(x)
    save_chat_model(chat, tmp_path / "hf", hf=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["head_dim"] == 16
    back = open_chat_model(str(tmp_path / "hf"))
    a, b = back.model.cfg, chat.model.cfg
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.hidden) == (b.n_heads, b.n_kv_heads, 16, 192)
    assert torch.equal(back.model(x), want)
    with pytest.warns(UserWarning):  # our tokenizer is written as llama-bpe, with a warning
        path = write_gguf(chat.model, chat.tokenizer, tmp_path / "m.gguf")
    model, g = load_gguf_model(path)
    assert (g.config.n_heads, g.config.head_dim) == (2, 16)
    torch.testing.assert_close(model(x), want, atol=2e-2, rtol=0)  # f16 weights


# ---------------------------------------------------------------------------------------------
# Importance


def test_importance_ranks_planted_dead_units_last():
    model = tiny()
    cfg = model.cfg
    dead_group, dead_channel = 1, 17
    hd, per_group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    with torch.no_grad():
        for layer in model.layers:  # a group whose heads write nothing, a channel likewise
            layer.attn.wo.weight[:, dead_group * per_group * hd:
                                 (dead_group + 1) * per_group * hd] = 0
            layer.mlp.w_down.weight[:, dead_channel] = 0
    heads = P.head_importance(model, calibration())
    assert heads.shape == (3, 2) and torch.all(heads[:, dead_group] == 0)
    assert torch.all(heads[:, 1 - dead_group] > 0)
    channels = P.channel_importance(model, calibration())
    assert channels.shape == (3, cfg.hidden) and torch.all(channels[:, dead_channel] == 0)
    assert int((channels == 0).sum()) == 3  # every other channel matters somewhat
    passing = tiny()
    with torch.no_grad():  # a block that passes its input through unchanged
        passing.layers[1].attn.wo.weight.zero_()
        passing.layers[1].mlp.w_down.weight.zero_()
    influence = P.block_influence(passing, calibration())
    assert influence.argmin() == 1 and influence[1] == pytest.approx(0, abs=1e-6)
    assert influence[[0, 2]].min() > 1e-3
    # ... and prune() removes exactly those.
    cal = calibration()
    assert P.prune(model, P.PruneConfig(method="heads", keep_fraction=0.5),
                   cal).report["removed_groups"] == [[dead_group]] * 3
    mlp = P.prune(model, P.PruneConfig(method="mlp", keep_fraction=1 - 1 / cfg.hidden), cal)
    assert mlp.model.cfg.hidden == cfg.hidden - 1  # the dead channel went, changing nothing
    torch.testing.assert_close(logits(mlp.model), logits(model), atol=1e-5, rtol=1e-5)
    assert P.prune(passing, P.PruneConfig(method="layers", n_layers_removed=1),
                   cal).report["removed_layers"] == [1]
    for p in model.parameters():  # scoring leaves no gradients and no changed flags behind
        assert p.grad is None and p.requires_grad


# ---------------------------------------------------------------------------------------------
# Bad settings


@pytest.mark.parametrize(("override", "match"), [
    ("prune.sparsity=1.0", r"sparsity must be in \[0, 1\)"),
    ("prune.sparsity=-0.1", r"sparsity must be in \[0, 1\)"),
    ("prune.keep_fraction=0", r"keep_fraction must be in \(0, 1\]"),
    ("prune.keep_fraction=1.5", r"keep_fraction must be in \(0, 1\]"),
    ("prune.method=random", "method must be one of magnitude, heads, mlp, layers"),
    ("prune.n_layers_removed=-1", "n_layers_removed must be >= 0"),
    ("prune.recovery.max_steps=-1", "max_steps must be >= 0"),
    ("prune.recovery.lr=0", "need lr > 0"),
])
def test_bad_settings_are_one_line_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(None, [override])


def test_recovery_steps_may_be_zero():
    assert load_recipe(None, ["prune.recovery.max_steps=0"]).prune.recovery.max_steps == 0


@pytest.mark.parametrize(("cfg", "match"), [
    (P.PruneConfig(method="layers", n_layers_removed=3), "would remove all 3 layers"),
    (P.PruneConfig(method="heads", keep_fraction=0.2), "keeps 0 of 2 KV groups"),
    (P.PruneConfig(method="mlp", keep_fraction=0.001), "keeps 0 of 192 MLP hidden channels"),
])
def test_targets_that_leave_nothing_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        P.prune(tiny(), cfg, calibration())


def test_mlp_pruning_refuses_a_mixture_of_experts():
    with pytest.raises(ValueError, match="mixture of experts"):
        P.prune(tiny(n_experts=2), P.PruneConfig(method="mlp"), calibration())


# ---------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world say hi again stop here".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + " .\n"
             for _ in range(400)]
    path = tmp_path_factory.mktemp("prune_text") / "text.txt"
    path.write_text("".join(lines))
    return path


def stage(runs: Path, *overrides: str) -> dict:
    assert main(["compress", "prune", f"run_dir={runs}", "name=p", *overrides]) == 0
    return json.loads((runs / "p" / "prune" / "summary.json").read_text())


def greedy(model_dir: Path) -> list[int]:
    chat = open_chat_model(str(model_dir))
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids)
    try:
        [out] = engine.generate([chat.format.prompt([{"role": "user", "content": "Say hi"}])],
                                SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    finally:
        engine.shutdown()
    return out.choices[0].token_ids


@pytest.mark.parametrize(("method", "layout"), [("heads", "native"), ("mlp", "hf"),
                                                 ("layers", "native")])
def test_stage_writes_a_smaller_model_that_serves_and_recovers(method, layout, tiny_chat_model,
                                                               text_file, tmp_path):
    base = tiny_chat_model
    if layout == "hf":
        save_chat_model(open_chat_model(str(tiny_chat_model)), tmp_path / "hf", hf=True)
        base = tmp_path / "hf"
    summary = stage(tmp_path, f"prune.base={base}", f"prune.data={text_file}",
                    f"prune.method={method}", "prune.keep_fraction=0.5",
                    "prune.calibration_rows=8", *[f"prune.recovery.{o}" for o in RECOVERY])
    assert summary["params_after"] < summary["params_before"]
    out = tmp_path / "p" / "prune" / "model"
    chat = open_chat_model(str(out))
    assert chat.model.num_params() == summary["params_after"]
    assert (chat.format.template is not None) == (layout == "hf")
    shape = summary["shape_after"]
    assert shape == {"heads": {"n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
                               "hidden": 192},
                     "mlp": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                             "hidden": 96},
                     "layers": {"n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
                                "hidden": 192}}[method]
    held = summary["held_out"]
    assert held["recovered"]["loss"] < held["pruned"]["loss"]
    assert summary["recovery"]["steps"] == 12
    assert len(greedy(out)) == 6


def test_stage_magnitude_keeps_its_zeros_and_its_size(tiny_chat_model, text_file, tmp_path):
    summary = stage(tmp_path, f"prune.base={tiny_chat_model}", f"prune.data={text_file}",
                    "prune.method=magnitude", "prune.sparsity=0.5", "prune.calibration_rows=4",
                    *[f"prune.recovery.{o}" for o in RECOVERY])
    assert summary["params_after"] == summary["params_before"]
    assert summary["zero_weights"] == summary["of_weights"] // 2
    base = open_chat_model(str(tiny_chat_model)).model
    masks = P.magnitude_prune(base, 0.5)
    out = open_chat_model(str(tmp_path / "p" / "prune" / "model")).model
    trained = dict(out.named_parameters())
    for name, (p, mask) in masks.masks.items():
        assert torch.all(trained[name][mask == 0] == 0), name
        assert not torch.equal(trained[name], p), name  # recovery did train them
    held = summary["held_out"]
    assert held["recovered"]["loss"] < held["pruned"]["loss"]
    assert len(greedy(tmp_path / "p" / "prune" / "model")) == 6


def test_stage_without_recovery_and_with_its_own_calibration(tiny_chat_model, text_file,
                                                             tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("def add(a, b):\n    return a + b\n" * 40)
    summary = stage(tmp_path, f"prune.base={tiny_chat_model}", f"prune.data={text_file}",
                    f"prune.calibration={calib}", "prune.method=layers",
                    "prune.n_layers_removed=1", "prune.recovery.max_steps=0",
                    "prune.recovery.seq_len=32", "prune.recovery.dtype=fp32")
    assert summary["recovery"] == {}
    assert summary["held_out"]["recovered"] == summary["held_out"]["pruned"]
    assert len(summary["block_influence"]) == 2 and len(summary["removed_layers"]) == 1
    assert not (tmp_path / "p" / "prune" / "checkpoints").exists()


def test_stage_errors_are_one_line(tiny_chat_model, tmp_path, capsys):
    runs = [f"run_dir={tmp_path}", "name=p", f"prune.base={tiny_chat_model}"]
    assert main(["compress", "prune", *runs]) == 2
    assert "error: prune: set prune.data to a text file" in capsys.readouterr().err
    assert main(["compress", "prune", *runs, "prune.sparsity=1"]) == 2
    assert "sparsity must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_config_dataclasses_are_plain():
    """The recovery section is a TrainConfig the loop takes as it is."""
    from llmforge.train.loop import TrainConfig

    rc = P.PruneConfig().recovery
    assert isinstance(rc, TrainConfig) and dataclasses.asdict(rc)["max_steps"] == 100
