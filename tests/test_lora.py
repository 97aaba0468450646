"""LoRA: a wrapped model starts equal to its base, trains only adapters, merges and saves."""

import json

import pytest
import torch
from torch import nn

from llmforge.align.lora import (
    ADAPTER_CONFIG,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from llmforge.model.config import ModelConfig
from llmforge.model.io import load_model, save_model
from llmforge.model.quant import Int8Linear, quantize_int4, quantize_int8
from llmforge.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(dim=32, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=64))
    # At init (std 0.02) the frozen tied output matrix caps every logit near +-0.6, so no adapter
    # could push the loss far below log(64); a trained model's embeddings are larger.
    with torch.no_grad():
        model.tok_emb.weight.mul_(5)
    return model


def tokens(seed=1, shape=(4, 16)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def nudge(model: nn.Module, seed=2) -> None:
    """Give the adapters non-zero B, as training would, so every check below means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def train(model: nn.Module, steps=30, lr=1e-2) -> list[float]:
    x = tokens(shape=(2, 17))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fresh_wrap_equals_base_and_only_adapters_train():
    model = tiny()
    x = tokens()
    ref = model(x)
    names = apply_lora(model, LoRAConfig())
    assert len(names) == 2 * 7 and "layers.1.mlp.w_down" in names
    assert torch.equal(model(x), ref)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    cfg = model.cfg
    kv = cfg.n_kv_heads * cfg.head_dim
    shapes = [(cfg.dim, cfg.dim), (cfg.dim, kv), (cfg.dim, kv), (cfg.dim, cfg.dim),
              (cfg.dim, cfg.hidden), (cfg.dim, cfg.hidden), (cfg.hidden, cfg.dim)]
    expected = cfg.n_layers * sum(8 * (i + o) for i, o in shapes)
    assert sum(p.numel() for p in lora_parameters(model)) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_training_lowers_loss_and_leaves_base_bitwise_unchanged():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["attn.w*", "re:.*mlp\\.w_up"]))
    losses = train(model)
    assert losses[-1] < 0.7 * losses[0]
    after = remove_lora(model, merge=False)
    assert len(after) == 2 * 5
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_merge_unmerge():
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig())
    nudge(model)
    x = tokens()
    unmerged = model(x)
    assert not torch.allclose(unmerged, tiny()(x), atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)  # not counted twice
    merge_lora(model)  # idempotent
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()
             if "lora_" not in k}
    for k, v in base.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0)


def test_remove_merged_then_save_and_load_model(tmp_path):
    model = tiny()
    apply_lora(model, LoRAConfig())
    nudge(model)
    x = tokens()
    ref = model(x)
    remove_lora(model, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=0)


def test_adapter_round_trip_and_mismatches(tmp_path):
    model = tiny()
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["attn.wq", "attn.wv"])
    apply_lora(model, cfg)
    nudge(model)
    x = tokens()
    ref = model(x)
    save_adapter(model, cfg, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # no temporary files left
    meta = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert meta["r"] == 4 and meta["wrapped"]["layers.0.attn.wq"] == [32, 32]

    fresh = tiny()  # same base weights (same seed), wrapped here by load_adapter
    assert load_adapter(fresh, tmp_path / "ad") == cfg
    assert torch.equal(fresh(x), ref)
    wrapped = tiny()  # already wrapped by the caller
    apply_lora(wrapped, cfg)
    load_adapter(wrapped, tmp_path / "ad")
    assert torch.equal(wrapped(x), ref)
    assert lora_state_dict(wrapped).keys() == lora_state_dict(model).keys()

    other = tiny(dim=64)
    with pytest.raises(ValueError, match="different base model: dim=32"):
        load_adapter(other, tmp_path / "ad")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # left untouched
    wrong_r = tiny()
    apply_lora(wrong_r, LoRAConfig(r=8, target_modules=["attn.wq", "attn.wv"]))
    with pytest.raises(ValueError, match="r=8"):
        load_adapter(wrong_r, tmp_path / "ad")
    # Weights from another save next to this config: caught by the checksum.
    save_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=["attn.wq", "attn.wv"]),
                 tmp_path / "ad2")
    nudge(model, seed=5)
    save_adapter(model, cfg, tmp_path / "ad3")
    (tmp_path / "ad3" / "adapter_model.safetensors").replace(
        tmp_path / "ad2" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        load_adapter(tiny(), tmp_path / "ad2")


def test_config_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"'attn\.wz' matches no linear layer.*layers\.0\.attn"):
        apply_lora(model, LoRAConfig(target_modules=["attn.wq", "attn.wz"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for bad, match in [({"r": 0}, "r must"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0},
                       "dropout"), ({"target_modules": []}, "target_modules"),
                       ({"target_modules": ["re:("]}, "bad regex")]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**bad).validate()
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    untied = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                     tie_embeddings=False))
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(untied, LoRAConfig(target_modules=["lm_head"]))


def test_bf16_base_trains_fp32_adapters():
    model = tiny().to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig())
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert model(tokens()).dtype == torch.float32  # logits, as always
    losses = train(model)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    remove_lora(model, merge=False)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_int8_base_trains_and_refuses_merge():
    model = tiny()
    x = tokens()
    ref = model(x)
    assert quantize_int8(model) == 2 * 7
    torch.testing.assert_close(model(x), ref, atol=0.05, rtol=0)  # int8 rounding only
    apply_lora(model, LoRAConfig())
    assert isinstance(model.layers[0].attn.wq.base, Int8Linear)
    losses = train(model)
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match="quantized Int8Linear"):
        merge_lora(model)
    with pytest.raises(ValueError, match="quantized Int8Linear"):
        remove_lora(model, merge=True)
    assert isinstance(model.layers[0].attn.wq, LoRALinear)  # nothing removed


def test_int4_base_forward_and_merge_error():
    model = tiny(dim=64)
    assert quantize_int4(model) > 0
    x = tokens()
    ref = model(x)
    apply_lora(model, LoRAConfig(target_modules=["attn.wq", "mlp.w_up"]))
    assert torch.equal(model(x), ref)
    nudge(model)
    assert not torch.allclose(model(x), ref, atol=1e-3)
    with pytest.raises(ValueError, match="quantized Int4Linear"):
        merge_lora(model)
