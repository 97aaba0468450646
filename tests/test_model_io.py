import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmforge.model.config import ModelConfig
from llmforge.model.io import (
    HF_ALLOW_PATTERNS,
    export_hf,
    load_model,
    resolve_model_path,
    save_model,
)
from llmforge.model.transformer import Transformer

VOCAB = 67


def build(tie: bool = True, n_kv_heads: int = 2, **overrides) -> Transformer:
    """Tiny model with non-default RoPE theta and non-unit norms, so a wrong mapping shows up."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        max_seq_len=64,
        rope_theta=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
        **overrides,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(tokens())


@pytest.mark.parametrize("tie", [True, False])
def test_native_round_trip_is_bitwise(tmp_path, tie):
    model = build(tie)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "llmforge"
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tie
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(logits(model), logits(loaded))


@pytest.mark.parametrize(("tie", "n_kv_heads"), [(True, 2), (False, 2), (False, 1)])
def test_export_hf_matches_transformers(tmp_path, tie, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    model = build(tie, n_kv_heads)
    export_hf(model, tmp_path, bos_token_id=1, eos_token_id=[2, 3])
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not tie
    assert "model.layers.1.self_attn.k_proj.weight" in stored

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert hf.config.eos_token_id == [2, 3]
    with torch.no_grad():
        hf_logits = hf(tokens()).logits
    assert (hf_logits - logits(model)).abs().max().item() <= 1e-4

    reloaded = load_model(tmp_path)
    assert reloaded.cfg == replace(model.cfg, ffn_hidden=model.cfg.hidden)  # HF stores it resolved
    assert torch.equal(logits(reloaded), logits(model))


def test_export_hf_casts_to_requested_dtype(tmp_path):
    export_hf(build(), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert load_model(tmp_path, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def test_loads_sharded_checkpoint_saved_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rope_theta=3000.0,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path)
    assert (model.cfg.ffn_hidden, model.cfg.n_kv_heads, model.cfg.rope_theta) == (160, 1, 3000.0)
    with torch.no_grad():
        assert (hf(tokens()).logits - logits(model)).abs().max().item() <= 1e-4


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | changes))


def edit_weights(path: Path, drop: str | None = None, add: str | None = None) -> None:
    tensors = load_file(path / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def one_line_error(exc_type, fn, match: str) -> None:
    with pytest.raises(exc_type, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_missing_files_raise(tmp_path):
    one_line_error(FileNotFoundError, lambda: load_model(tmp_path), "config.json")
    save_model(build(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    one_line_error(FileNotFoundError, lambda: load_model(tmp_path), "model.safetensors")


def test_corrupt_files_raise(tmp_path):
    save_model(build(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(ValueError, lambda: load_model(tmp_path), "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(ValueError, lambda: load_model(tmp_path), "config.json is not valid JSON")


def test_missing_shard_raises(tmp_path):
    export_hf(build(), tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(FileNotFoundError, lambda: load_model(tmp_path), "model-00001-of-00002")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "gemma"}, "unsupported model_type 'gemma'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, "RoPE scaling"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
    ],
)
def test_unsupported_hf_configs_raise(tmp_path, changes, match):
    export_hf(build(), tmp_path)
    edit_config(tmp_path, **changes)
    one_line_error(ValueError, lambda: load_model(tmp_path), match)


def test_hf_config_missing_required_key_raises(tmp_path):
    export_hf(build(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(ValueError, lambda: load_model(tmp_path), "intermediate_size")


def test_unknown_config_raises(tmp_path):
    save_model(build(), tmp_path)
    edit_config(tmp_path, format="other")
    one_line_error(ValueError, lambda: load_model(tmp_path), "neither")
    edit_config(tmp_path, format="llmforge", n_layer=3)
    one_line_error(ValueError, lambda: load_model(tmp_path), "n_layer")


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_missing_and_unexpected_tensors_raise(tmp_path, layout):
    save = save_model if layout == "native" else export_hf
    name = "layers.1.mlp.w_up.weight" if layout == "native" else "model.layers.1.mlp.up_proj.weight"
    save(build(), tmp_path)
    edit_weights(tmp_path, drop=name)
    one_line_error(ValueError, lambda: load_model(tmp_path), f"missing tensor.*{name}")
    save(build(), tmp_path)
    edit_weights(tmp_path, add="extra.bias")
    one_line_error(ValueError, lambda: load_model(tmp_path), "unexpected tensor.*extra.bias")


def test_untied_checkpoint_with_tied_config_raises(tmp_path):
    export_hf(build(tie=False), tmp_path)
    edit_config(tmp_path, tie_word_embeddings=True)
    one_line_error(ValueError, lambda: load_model(tmp_path), "unexpected tensor.*lm_head.weight")


@pytest.mark.parametrize("layout", ["native", "hf"])
def test_shape_mismatch_raises(tmp_path, layout):
    if layout == "native":
        save_model(build(), tmp_path)
        edit_config(tmp_path, vocab_size=VOCAB + 1)
    else:
        export_hf(build(), tmp_path)
        edit_config(tmp_path, intermediate_size=128)
    one_line_error(ValueError, lambda: load_model(tmp_path), "shape mismatch")


@pytest.mark.parametrize("tie", [True, False])
def test_attention_bias_exports_as_qwen2(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    model = build(tie, attn_bias=True)  # build() moves every 1-d parameter, biases included
    assert model.layers[0].attn.wq.bias.abs().sum() > 0
    export_hf(model, tmp_path, bos_token_id=1, eos_token_id=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])
    assert config["use_sliding_window"] is False
    stored = load_file(tmp_path / "model.safetensors")
    assert torch.equal(stored["model.layers.1.self_attn.v_proj.bias"],
                       model.layers[1].attn.wv.bias.detach())
    assert not any(name.endswith("o_proj.bias") for name in stored)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (hf(tokens()).logits - logits(model)).abs().max().item() <= 1e-4
    reloaded = load_model(tmp_path)
    assert reloaded.cfg == replace(model.cfg, ffn_hidden=model.cfg.hidden)
    assert torch.equal(logits(reloaded), logits(model))


def test_export_replaces_a_stale_sharded_index(tmp_path):
    export_hf(build(), tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    export_hf(build(), tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    load_model(tmp_path)


def write_shards(path: Path, shards: dict[str, dict[str, torch.Tensor]],
                 weight_map: dict[str, str]) -> None:
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_index_must_agree_with_the_shards(tmp_path):
    export_hf(build(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    shards = {"a.safetensors": {k: tensors[k] for k in first},
              "b.safetensors": {k: tensors[k] for k in second}}
    weight_map = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}
    write_shards(tmp_path, shards, weight_map)
    load_model(tmp_path)  # consistent: loads

    wrong = weight_map | {second[0]: "a.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    one_line_error(ValueError, lambda: load_model(tmp_path), f"not found in.*{second[0]}")

    shards["a.safetensors"][second[0]] = tensors[second[0]]  # stored in both shards
    save_file(shards["a.safetensors"], tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line_error(ValueError, lambda: load_model(tmp_path), f"{second[0]} is stored twice")

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    one_line_error(ValueError, lambda: load_model(tmp_path), "no weight_map")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download replaced by a recorder that returns a local dir: no network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, snapshot


def test_resolve_model_path_downloads_hf_specs(fake_hub):
    calls, snapshot = fake_hub
    assert resolve_model_path("hf://HuggingFaceTB/SmolLM2-135M") == snapshot
    assert resolve_model_path("hf://Qwen/Qwen2.5-0.5B@refs/pr/1") == snapshot
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    assert HF_ALLOW_PATTERNS == patterns
    assert calls == [
        ("HuggingFaceTB/SmolLM2-135M", {"revision": None, "allow_patterns": patterns}),
        ("Qwen/Qwen2.5-0.5B", {"revision": "refs/pr/1", "allow_patterns": patterns}),
    ]


def test_resolve_model_path_passes_local_paths_through(fake_hub, tmp_path):
    calls, _ = fake_hub
    assert resolve_model_path("runs/x/model") == Path("runs/x/model")
    assert resolve_model_path(tmp_path) == tmp_path
    assert calls == []


@pytest.mark.parametrize("spec", ["hf://", "hf://name", "hf://a/b/c", "hf://a/b@", "hf:///b"])
def test_resolve_model_path_rejects_bad_specs(fake_hub, spec):
    with pytest.raises(ValueError, match="owner/name"):
        resolve_model_path(spec)
    assert fake_hub[0] == []


def test_load_model_accepts_hf_specs(fake_hub):
    calls, snapshot = fake_hub
    model = build()
    export_hf(model, snapshot)
    loaded = load_model("hf://someone/tiny@main")
    assert calls[0][0] == "someone/tiny" and calls[0][1]["revision"] == "main"
    assert torch.equal(logits(loaded), logits(model))
