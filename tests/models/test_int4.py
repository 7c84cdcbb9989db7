"""--quantization int4: 4-bit weights in groups of 32 against the weights they dequantize to, and
an engine that serves them."""

import pytest
import torch
from torch import nn

from server.engine.model_runner import cpu_has_native_bf16
from server.errors import InvalidConfigError
from server.models.int4 import INT4_GROUP, Int4Weight, dequantize_int4, quantize_int4
from server.models.packed_linear import INT4_ROWS, PackedLinear, amx_available, dpbf16_available, onednn_linear_available

from ..csrc.test_fused_ops import fresh_generator
from ..csrc.test_ops import relative_error

pytestmark = pytest.mark.skipif(not onednn_linear_available() or not cpu_has_native_bf16(), reason="needs oneDNN with bf16")

# bf16 activations, scales and zeros, fp32 accumulation: outputs within 1% of the largest, as for
# any bf16 linear of these sizes (the bf16 test in test_packed_linear.py allows the same).
TOLERANCE = 1e-2


def test_quantizing_keeps_every_weight_within_half_a_step_of_its_group():
    gen, seed = fresh_generator()
    weight = torch.randn(48, 96, generator=gen)
    weight[3, :INT4_GROUP] = 0.25  # a constant group
    q, scale, zero = quantize_int4(weight)
    assert q.min() >= 0 and q.max() <= 15
    error = (dequantize_int4(q, scale, zero) - weight).abs().view(48, -1, INT4_GROUP)
    assert (error <= scale.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-7).all(), seed
    assert torch.equal(dequantize_int4(q, scale, zero)[3, :INT4_GROUP], weight[3, :INT4_GROUP])


def test_q4_1_weights_requantize_to_the_same_values():
    """The default model is the dequantization of a Q4_1 GGUF (d * q + m per block of 32, q in
    [0, 15]): quantizing it again gives back those values, so --quantization int4 serves the file's
    own 4-bit weights."""
    gen, seed = fresh_generator()
    q = torch.randint(0, 16, (40, 128), generator=gen)
    q[:, ::INT4_GROUP] = 0  # llama.cpp's Q4_1 maps each block's minimum to 0 and maximum to 15
    q[:, 1::INT4_GROUP] = 15
    d = torch.rand(40, 128 // INT4_GROUP, generator=gen) * 0.1 + 1e-3
    m = torch.randn(40, 128 // INT4_GROUP, generator=gen) * 0.1
    weight = q * d.repeat_interleave(INT4_GROUP, 1) + m.repeat_interleave(INT4_GROUP, 1)
    again = quantize_int4(weight)
    assert torch.equal(again[0], q.int()), seed
    torch.testing.assert_close(dequantize_int4(*again), weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_an_int4_linear_computes_the_linear_of_its_dequantized_weights(rows, bias):
    """Up to INT4_ROWS rows through the int4 kernel, more through oneDNN over the dequantized
    weights: the same weights either way."""
    gen, seed = fresh_generator()
    linear = nn.Linear(192, 96, bias=bias).bfloat16()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 192, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(96, generator=gen))
    dequantized = dequantize_int4(*quantize_int4(linear.weight))
    packed = PackedLinear(linear, batch_hint=64, int4=True)
    assert packed.weight is None  # no plain bf16 copy beside the 4-bit one
    x = torch.randn(rows, 192, generator=gen).bfloat16()
    with torch.inference_mode():
        want = nn.functional.linear(x.double(), dequantized.double(), None if not bias else linear.bias.double())
        assert relative_error(packed(x), want) < TOLERANCE, (seed, rows)
        if rows <= INT4_ROWS:
            q, scale, zero = quantize_int4(linear.weight)
            direct = Int4Weight(q, scale, zero, torch.bfloat16).matmul(x)
            assert relative_error(direct, want - (0 if not bias else linear.bias.double())) < TOLERANCE, seed


def test_an_int4_engine_serves_the_default_model_and_refuses_fp32():
    from server.engine import LLM, SamplingParams
    from server.models.default_model import default_model_dir

    llm = LLM(default_model_dir(), dtype="bfloat16", quantization="int4", max_num_seqs=4, num_kv_blocks=64)
    # The LM head stays bf16, on AMX or AVX512-BF16 registers where the CPU has them.
    tiles = " + amx" if amx_available() else " + dpbf16" if dpbf16_available() else ""
    assert llm.engine.runner.linear_backend == f"onednn-packed{tiles} + int4"
    prompt = llm.engine.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = llm.generate([prompt, prompt], SamplingParams(temperature=0, max_tokens=12))
    assert "Paris" in out[0].text and out[0].token_ids == out[1].token_ids
    with pytest.raises(InvalidConfigError, match="quantization"):
        LLM(default_model_dir(), dtype="float32", quantization="int4", num_kv_blocks=8)
    with pytest.raises(InvalidConfigError, match="quantization must be int4"):
        LLM(default_model_dir(), quantization="int3")
