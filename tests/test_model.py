import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.model.config import ModelConfig
from llmforge.model.generate import filter_logits, generate
from llmforge.model.transformer import Transformer

VOCAB = 61


def tiny(**overrides) -> ModelConfig:
    kw = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    return ModelConfig(**(kw | overrides))


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides))


def tokens(b: int = 2, t: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_config_resolves_head_dim_and_ffn_width():
    cfg = ModelConfig(vocab_size=10, dim=256, n_heads=4)
    assert cfg.head_dim == 64
    assert cfg.hidden == 704  # 8/3 * 256 = 682.7, rounded up to a multiple of 64
    assert ModelConfig(vocab_size=10, ffn_hidden=100).hidden == 100


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 30, "n_heads": 4}, "n_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": 0}, "n_layers"),
        ({"dim": 24, "n_heads": 8, "n_kv_heads": 8}, "dim/n_heads"),
        ({"ffn_hidden": -1}, "ffn_hidden"),
        ({"norm_eps": 0.0}, "norm_eps"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field) as err:
        Transformer(tiny(**overrides))
    assert "\n" not in str(err.value)


def test_validate_can_defer_vocab_size():
    ModelConfig().validate(require_vocab=False)
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig().validate()


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 3})
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_logits_shape_and_dtype(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads)
    logits = model(tokens(3, 11))
    assert logits.shape == (3, 11, VOCAB)
    assert logits.dtype == torch.float32


def test_tied_vs_untied():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.lm_head is None and tied.output_weight is tied.tok_emb.weight
    assert "lm_head.weight" not in tied.state_dict()
    assert untied.output_weight is untied.lm_head.weight
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    assert tied.num_params(include_embedding=False) == tied.num_params() - VOCAB * 32


def test_residual_projections_get_smaller_init():
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=256, n_layers=8, n_heads=4))
    layer = model.layers[0]
    expected = 0.02 / math.sqrt(16)
    assert layer.attn.wo.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert layer.mlp.w_down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert layer.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)


def masked_targets() -> torch.Tensor:
    targets = tokens(2, 20, seed=2)
    targets[0, :5] = -100
    targets[1, -3:] = -100
    return targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_matches_plain_cross_entropy(reduction):
    model = build()
    model.loss_chunk_rows = 7  # 40 rows -> 6 chunks, the last one ragged
    idx, targets = tokens(), masked_targets()
    with torch.no_grad():
        ours = model(idx, targets, reduction=reduction)
        logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bad_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction"):
        build()(tokens(), tokens(), reduction="none")


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_gradients_match_unchunked(tie):
    model = build(tie_embeddings=tie)
    model.loss_chunk_rows = 7
    idx, targets = tokens(), masked_targets()

    model(idx, targets).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(idx).view(-1, VOCAB), targets.view(-1)).backward()

    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_sequence(n_kv_heads):
    model = build(n_kv_heads=n_kv_heads)
    idx = tokens(2, 20)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 24)
        # Prefill, single tokens, and a multi-token append after a prefix (needs an offset mask).
        pieces = [idx[:, :7], idx[:, 7:8], idx[:, 8:9], idx[:, 9:15], idx[:, 15:]]
        incremental = torch.cat([model(p, cache=cache) for p in pieces], dim=1)
    assert cache.length == 20
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_limits_is_rejected():
    model = build()
    with pytest.raises(ValueError, match="exceeds"):
        model(tokens(1, 49))
    cache = model.new_cache(1, 8)
    model(tokens(1, 6), cache=cache)
    with pytest.raises(ValueError, match="exceeds"):
        model(tokens(1, 3), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 49)


def test_runs_under_bf16_autocast():
    model = build()
    idx = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
        loss.backward()
        with torch.no_grad():
            logits = model(idx[:, :5], cache=model.new_cache(2, 8))
    assert torch.isfinite(loss) and logits.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_generate_uses_cache_correctly_and_is_deterministic():
    model = build()
    prompt = [3, 1, 4, 1, 5]
    out = list(generate(model, prompt, 12))
    assert out == list(generate(model, prompt, 12))
    assert out == greedy_reference(model, prompt, 12)


def test_generate_stops_at_stop_id_without_yielding_it():
    model = build()
    prompt = [3, 1, 4, 1, 5]
    full = list(generate(model, prompt, 12))
    stop = full[4]
    out = list(generate(model, prompt, 12, stop_ids={stop}))
    assert out == full[: full.index(stop)]


def test_generate_stops_at_max_seq_len():
    model = build()  # max_seq_len 48
    assert len(list(generate(model, list(range(40)), 100))) == 8
    assert list(generate(model, list(range(48)), 5)) == []
    with pytest.raises(ValueError, match="max_seq_len"):
        list(generate(model, list(range(49)), 5))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build()
    prompt = [7, 8, 9]
    a = list(generate(model, prompt, 10, temperature=1.0, seed=123))
    assert a == list(generate(model, prompt, 10, temperature=1.0, seed=123))
    assert all(0 <= t < VOCAB for t in a)
    greedy = list(generate(model, prompt, 10))
    assert list(generate(model, prompt, 10, temperature=0.7, top_k=1, seed=5)) == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).log_softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [True, True, False, False]
    # probs ~[0.64, 0.24, 0.09, 0.03]: a token survives while the mass ranked above it is <= top_p
    for top_p, n_kept in [(0.0, 1), (0.5, 1), (0.7, 2), (0.95, 3), (0.99, 4)]:
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        assert kept.tolist() == [i < n_kept for i in range(4)], top_p
