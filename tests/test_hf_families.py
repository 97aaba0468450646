"""Hugging Face llama, mistral and qwen2 checkpoints, as transformers saves them (sharded), load
into our Transformer with the same logits, export back bitwise, and every variant we would
compute differently is refused with a one-line error naming the config key."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmforge.model.io import export_hf, load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
SEQ = 48
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    # Large enough that logits are O(1): a wrong mapping cannot hide under the tolerance.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (config class, model class, family-specific config)
CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-rope-llama3": ("LlamaConfig", "LlamaForCausalLM",
                          dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "mistral-untied": ("MistralConfig", "MistralForCausalLM",
                       dict(tie_word_embeddings=False, sliding_window=None)),
    # A window covering every position (64 = max_position_embeddings) changes nothing.
    "mistral-tied-full-window": ("MistralConfig", "MistralForCausalLM",
                                 dict(tie_word_embeddings=True, sliding_window=64)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                   "rope_theta": 1e6})),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    # Sliding switched on, but max_window_layers (28) >= num_hidden_layers: no layer slides.
    "qwen2-untied-window-unused": ("Qwen2Config", "Qwen2ForCausalLM",
                                   dict(tie_word_embeddings=False, use_sliding_window=True,
                                        sliding_window=16)),
}
FAMILY_CASE = {"llama": "llama-untied", "mistral": "mistral-untied", "qwen2": "qwen2-untied"}


def build_hf(case: str):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: move them so mapping errors show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def shard_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case built once and saved sharded by transformers: name -> (hf model, dir)."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model = build_hf(case)
            path = tmp_path_factory.mktemp(case)
            model.save_pretrained(path, max_shard_size="50KB")
            cache[case] = model, path
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_exports_bitwise_and_reloads(saved, tmp_path, case):
    hf, src = saved(case)
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("*.safetensors"))) > 1  # really sharded
    hf_config = json.loads((src / "config.json").read_text())

    model = load_model(src).eval()
    assert model.cfg.attn_bias == (hf_config["model_type"] == "qwen2")
    assert model.cfg.tie_embeddings == hf_config["tie_word_embeddings"]
    ids = token_ids()
    with torch.no_grad():
        reference = hf(ids).logits
        ours = model(ids)
    assert reference.std() > 0.1  # logits large enough for the comparison to mean something
    diff = (ours - reference).abs().max().item()
    print(f"\n{case}: max |logits diff| ours vs transformers = {diff:.3g}")
    assert diff <= 1e-4

    out = tmp_path / "export"
    export_hf(model, out, bos_token_id=1, eos_token_id=2)
    exported = load_file(out / "model.safetensors")
    original = shard_tensors(src)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    state = hf.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            assert name not in exported
        else:
            assert torch.equal(exported[name], tensor), name

    architecture = "Qwen2ForCausalLM" if model.cfg.attn_bias else "LlamaForCausalLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == architecture
    with torch.no_grad():
        back_diff = (back(ids).logits - reference).abs().max().item()
    print(f"{case}: max |logits diff| transformers on our export vs original = {back_diff:.3g}")
    assert back_diff <= 1e-5
    again = load_model(out).eval()
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


def copy_of(saved, family: str, tmp_path: Path) -> Path:
    _, src = saved(FAMILY_CASE[family])
    dst = tmp_path / family
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg |= changes
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "DROP"}))


def one_line_error(path: Path, match: str, exc_type=ValueError) -> None:
    with pytest.raises(exc_type, match=match) as err:
        load_model(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", list(FAMILY_CASE))
def test_truncated_shard_names_the_file(saved, tmp_path, family):
    path = copy_of(saved, family, tmp_path)
    shard = sorted(path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    one_line_error(path, f"{shard.name} is not a readable safetensors file")


@pytest.mark.parametrize("family", list(FAMILY_CASE))
def test_config_with_more_layers_than_weights_names_missing_tensors(saved, tmp_path, family):
    path = copy_of(saved, family, tmp_path)
    changes = {"num_hidden_layers": 3}
    if "layer_types" in json.loads((path / "config.json").read_text()):
        changes["layer_types"] = ["full_attention"] * 3
    edit_config(path, **changes)
    one_line_error(path, r"missing tensor\(s\) model\.layers\.2\.")


@pytest.mark.parametrize("family", list(FAMILY_CASE))
def test_config_with_fewer_layers_than_weights_names_extra_tensors(saved, tmp_path, family):
    path = copy_of(saved, family, tmp_path)
    edit_config(path, num_hidden_layers=1, layer_types="DROP")
    one_line_error(path, r"unexpected tensor\(s\) model\.layers\.1\.")


@pytest.mark.parametrize("family", list(FAMILY_CASE))
def test_missing_shard_file_is_named(saved, tmp_path, family):
    path = copy_of(saved, family, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    (path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    one_line_error(path, "missing from", FileNotFoundError)


def test_qwen2_weights_without_biases_are_refused(saved, tmp_path):
    """A Llama checkpoint relabelled qwen2 lacks the q/k/v biases Qwen2 always has."""
    path = copy_of(saved, "llama", tmp_path)
    edit_config(path, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    one_line_error(path, r"missing tensor\(s\) model\.layers\.0\.self_attn\.k_proj\.bias")


REFUSED = [
    # (family, config changes, the key the message must name)
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("mistral", {"sliding_window": 16}, "sliding_window=16 < max_position_embeddings=64"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
               "layer_types": "DROP"}, "use_sliding_window=true with sliding_window=16"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
               "layer_types": ["full_attention", "sliding_attention"]}, "sliding_window=16"),
    *[(family, {"hidden_act": "gelu"}, "hidden_act") for family in FAMILY_CASE],
    *[(family, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                    "original_max_position_embeddings": 16}}, "rope_type='yarn'")
      for family in FAMILY_CASE],
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ("qwen2", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("mistral", {"model_type": "gemma"}, "unsupported model_type 'gemma'"),
]


@pytest.mark.parametrize(("family", "changes", "match"), REFUSED)
def test_settings_we_would_compute_differently_are_refused(saved, tmp_path, family, changes,
                                                           match):
    path = copy_of(saved, family, tmp_path)
    edit_config(path, **changes)
    one_line_error(path, "config.json: .*" + re.escape(match))


@pytest.mark.parametrize(("family", "changes"), [
    ("mistral", {"sliding_window": None}),
    ("mistral", {"sliding_window": 64}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 16}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0,
               "layer_types": "DROP"}),
    ("llama", {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
])
def test_inert_settings_are_accepted(saved, tmp_path, family, changes):
    path = copy_of(saved, family, tmp_path)
    edit_config(path, **changes)
    hf, _ = saved(FAMILY_CASE[family])
    with torch.no_grad():
        diff = (load_model(path)(token_ids()) - hf(token_ids()).logits).abs().max().item()
    assert diff <= 1e-4
