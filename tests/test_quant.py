"""Weight-only int4 and int8: exact on weights already on a 4-bit grid, close otherwise, served
as is."""

import pytest
import torch
from tokenizers import Tokenizer, models
from torch import Tensor, nn

from llmforge.model.config import ModelConfig
from llmforge.model.generate import generate
from llmforge.model.quant import Int4Linear, Int8Linear, quantize_groups, quantize_int4
from llmforge.model.transformer import Transformer
from llmforge.serve.engine import Engine
from llmforge.serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_linear(out_features=64, in_features=128, group=32, seed=0) -> tuple[nn.Linear, Tensor]:
    """A layer whose weights are Q4_1 values: low + code * scale with codes 0 and 15 in each
    group, as a Q4_1 quantiser leaves them."""
    g = torch.Generator().manual_seed(seed)
    shape = (out_features, in_features // group, group)
    codes = torch.randint(0, 16, shape, generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(shape[:2], generator=g)[..., None] * 0.01 + 1e-3
    low = -torch.rand(shape[:2], generator=g)[..., None] * 0.05
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight.data = (low + codes * scale).view(out_features, in_features)
    return layer, codes.view(out_features, in_features)



def test_weights_on_a_4bit_grid_get_their_own_codes_back():
    layer, codes = grid_linear()
    found, _, _ = quantize_groups(layer.weight.detach(), 32)
    assert torch.equal(found.float(), codes)
    q = Int4Linear(layer)
    w = layer.weight.detach()
    # Only the bf16 rounding of each group's scale and offset remains.
    assert float((q.dequantized() - w).norm() / w.norm()) < 5e-3


def test_int4_layer_multiplies_by_its_dequantized_weight_and_adds_the_bias():
    torch.manual_seed(0)
    layer = nn.Linear(96, 48, bias=True)
    q = Int4Linear(layer)
    x = torch.randn(2, 5, 96)
    expected = x @ q.dequantized().t() + layer.bias
    assert torch.allclose(q(x), expected, atol=0.05, rtol=0.02)
    # Gaussian weights in 4 bits: about a tenth of their norm is error.
    w = layer.weight.detach()
    assert float((q.dequantized() - w).norm() / w.norm()) < 0.15


def test_int8_kernel_for_inference_and_dequantised_weights_for_gradients():
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(128, 64, bias=True))
    x = torch.randn(3, 5, 128)
    reference = nn.functional.linear(x, layer.dequantized(), layer.bias)
    with torch.inference_mode():  # the CPU kernel, on bf16 activations
        served = layer(x)
    torch.testing.assert_close(served, reference, rtol=0.02, atol=0.02)
    x.requires_grad_()  # a LoRA base: gradients flow to the input, the codes stay frozen
    trained = layer(x)
    torch.testing.assert_close(trained, reference, rtol=1e-5, atol=1e-5)
    trained.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(0).expand_as(x))
    assert not any(p.requires_grad for p in layer.parameters())


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Linear(nn.Linear(100, 16), group_size=32)
    with pytest.raises(ValueError, match="out_features of 16"):
        Int4Linear(nn.Linear(64, 40), group_size=32)


def test_quantized_model_serves_and_batching_still_equals_unbatched():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=128)).eval()
    prompts = [[1, 2, 3], list(range(5, 40)), [7] * 12]
    with torch.inference_mode():
        before = model(torch.tensor([prompts[1]]))
    assert quantize_int4(model) == 2 * 7  # q, k, v, o, gate, up, down per block
    with torch.inference_mode():
        after = model(torch.tensor([prompts[1]]))
    # A close but not identical model: 4-bit noise moves the logits a little.
    assert 0 < float((after - before).abs().max()) < 0.2 * float(before.abs().max())
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    engine = Engine(model, tok, max_num_seqs=2, max_prefill_tokens=16)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    outs = engine.generate(prompts, params)
    engine.shutdown()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.choices[0].token_ids == list(generate(model, prompt, 12))
