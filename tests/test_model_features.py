"""Model options beyond the Llama core: RoPE scaling, QK-norm, z-loss, document masking,
activation checkpointing, mixture of experts, attention biases and the named presets."""

import pytest
import torch
import torch.nn.functional as F

from llmforge.config import load_recipe
from llmforge.model.config import ModelConfig
from llmforge.model.io import export_hf, load_model, save_model
from llmforge.model.moe import MoE
from llmforge.model.presets import PRESETS
from llmforge.model.transformer import Transformer
from llmforge.schema import ConfigError
from llmforge.train.flops import flops_per_token

VOCAB = 61
pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed: int = 0, **overrides) -> Transformer:
    kw = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**(kw | overrides)))


def tokens(b: int = 2, t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scaling", [
    {"rope_scaling": "linear", "rope_factor": 4.0},
    {"rope_scaling": "llama3", "rope_factor": 8.0, "rope_original_max_len": 16,
     "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    transformers = pytest.importorskip("transformers")
    model = build(**scaling, rope_theta=500.0).eval()
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens(t=60)
    with torch.no_grad():
        diff = (model(x) - hf(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-4
    assert load_model(tmp_path).cfg.rope_scaling == scaling["rope_scaling"]  # and back


def test_rope_scaling_slows_only_long_wavelengths():
    from llmforge.model.transformer import rope_frequencies

    plain = rope_frequencies(ModelConfig(dim=64, n_heads=1, rope_theta=500000.0))
    scaled = rope_frequencies(ModelConfig(dim=64, n_heads=1, rope_theta=500000.0,
                                          rope_scaling="llama3", rope_factor=32.0))
    assert scaled[0] == plain[0]  # the fastest rotation is kept
    assert scaled[-1] == pytest.approx(plain[-1] / 32)  # the slowest is stretched by the factor
    assert torch.all(scaled <= plain)


def test_qk_norm_adds_per_head_norms_and_still_trains():
    model = build(qk_norm=True)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight"} <= names
    x = tokens()
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert model.layers[0].attn.q_norm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="qk_norm"):
        export_hf(model, "unused")  # the Llama layout cannot hold it: refuse, never drop it


def test_z_loss_is_added_in_training_only_with_its_exact_gradient():
    plain, with_z = build(seed=3), build(seed=3, z_loss=1e-2)
    x = tokens()
    inputs, targets = x[:, :-1], x[:, 1:]
    logits = plain(inputs).detach().requires_grad_(True)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    reference = reference + 1e-2 * torch.logsumexp(logits, -1).square().mean()
    loss = with_z(inputs, targets)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    # Gradient through the fused loss equals autograd's through the explicit formula.
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(VOCAB, 8, requires_grad=True)
    t = torch.randint(0, VOCAB, (6,))
    from llmforge.model.loss import linear_cross_entropy

    linear_cross_entropy(h, w, t, z_loss=0.1, chunk_rows=4).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    z = h2 @ w2.T
    (F.cross_entropy(z, t) + 0.1 * torch.logsumexp(z, -1).square().mean()).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with_z.eval()  # evaluation reports the plain cross-entropy
    assert with_z(inputs, targets).item() == pytest.approx(plain(inputs, targets).item())


def test_document_masking_isolates_packed_documents():
    model = build().eval()
    first, second = tokens(b=1, t=12, seed=4), tokens(b=1, t=9, seed=5)
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 12 + [1] * 9])
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids)
        unmasked = model(packed)
    # The second document's logits do not depend on the first document's tokens (RoPE
    # positions stay global, so the comparison keeps the positions and swaps the tokens).
    shifted = torch.cat([torch.zeros(1, 12, dtype=torch.long), second], dim=1)
    with torch.no_grad():
        same_positions = model(shifted, doc_ids=doc_ids)
    torch.testing.assert_close(masked[:, 12:], same_positions[:, 12:])
    assert not torch.allclose(masked[:, 12:], unmasked[:, 12:], atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients():
    a, b = build(seed=1), build(seed=1)
    b.activation_checkpointing = True
    x = tokens()
    for model in (a, b):
        model.train()
        model(x[:, :-1], x[:, 1:]).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_moe_model_trains_saves_and_counts_active_flops(tmp_path):
    model = build(n_experts=4, moe_top_k=2, moe_aux_coef=0.01)
    assert isinstance(model.layers[0].mlp, MoE)
    x = tokens()
    model.train()
    loss = model(x[:, :-1], x[:, 1:])
    model.eval()
    plain = model(x[:, :-1], x[:, 1:])
    assert loss.item() > plain.item()  # the balancing loss is added in training
    loss.backward()
    assert model.layers[1].mlp.router.weight.grad.abs().sum() > 0
    save_model(model, tmp_path / "moe")
    again = load_model(tmp_path / "moe").eval()
    torch.testing.assert_close(again(x), model(x))
    dense = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    moe = ModelConfig(**{**dense.to_dict(), "n_experts": 4, "moe_top_k": 2})
    extra_mlp = 6 * 2 * (3 * 32 * dense.hidden + 32 * 4)  # a second expert and the router
    assert flops_per_token(moe, 16) - flops_per_token(dense, 16) == extra_mlp


def test_attention_bias_starts_at_zero_and_round_trips(tmp_path):
    model = build(attn_bias=True)
    bias = model.layers[0].attn.wq.bias
    assert bias is not None and torch.all(bias == 0)
    assert model.layers[0].attn.wo.bias is None  # Qwen2: biases on q, k, v only
    with torch.no_grad():
        bias.add_(0.5)
    save_model(model, tmp_path / "m")
    assert torch.equal(load_model(tmp_path / "m").layers[0].attn.wq.bias, bias)


@pytest.mark.parametrize("name, expected", [
    # Published totals of the models these presets copy (tied embeddings counted once).
    ("smollm2-135m", 134_515_008),
    ("smollm2-360m", 361_821_120),
    ("qwen2.5-0.5b", 494_032_768),
    ("llama3.2-1b", 1_235_814_400),
])
def test_published_presets_have_the_published_parameter_counts(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelConfig(**PRESETS[name]))
    assert model.num_params() == expected


def test_own_presets_span_1m_to_1b():
    counts = {}
    for name, shape in PRESETS.items():
        if shape.get("vocab_size"):
            continue
        with torch.device("meta"):
            counts[name] = Transformer(ModelConfig(**shape, vocab_size=32768)).num_params()
    assert min(counts.values()) < 2e6 and max(counts.values()) > 0.9e9
    assert counts["gpt2-124m"] == pytest.approx(110e6, rel=0.05)


def test_recipe_preset_with_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: smollm2-135m, n_layers: 2}\n")
    model = load_recipe(recipe).model
    assert (model.dim, model.n_layers, model.vocab_size) == (576, 2, 49152)
    assert load_recipe(recipe, ["model.qk_norm=true"]).model.qk_norm
    recipe.write_text("model: {preset: gpt5}\n")
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        load_recipe(recipe)


@pytest.mark.parametrize("changes, field", [
    ({"rope_scaling": "yarn"}, "rope_scaling"),
    ({"rope_factor": 0.5}, "rope_factor"),
    ({"n_experts": 1}, "n_experts"),
    ({"n_experts": 4, "moe_top_k": 5}, "moe_top_k"),
    ({"z_loss": -1.0}, "z_loss"),
])
def test_bad_feature_settings_are_rejected(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(vocab_size=10, **changes).validate()
