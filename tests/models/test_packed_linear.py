"""oneDNN linears with packed weights compute nn.Linear's outputs, and the CPU engine runs them."""

import pytest
import torch
from torch import nn

from server.models.packed_linear import (
    PackedLinear,
    onednn_linear_available,
    pack_linears,
    packs,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_nn_linear(rows, bias):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(200, generator=gen))
    x = torch.randn(rows, 96, generator=gen)
    packed = PackedLinear(linear, batch_hint=64)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-4)
        # strided and 3-D inputs, as the decoder's split views hand them over
        wide = torch.randn(rows, 192, generator=gen)
        torch.testing.assert_close(packed(wide[:, ::2]), linear(wide[:, ::2]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(packed(x.view(1, rows, 96)), linear(x).view(1, rows, 200), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not packs(torch.bfloat16), reason="oneDNN takes no bf16 weights on this CPU (AVX2)")
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bf16_linear_matches_nn_linear_in_bf16(rows):
    """bf16 weights packed for oneDNN (AVX512-BF16 / AMX where the CPU has them) compute what
    torch's bf16 linear computes, to bf16 rounding of the output."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    linear = nn.Linear(96, 200, bias=True).bfloat16()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=gen))
        linear.bias.copy_(torch.randn(200, generator=gen))
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    packed = PackedLinear(linear, batch_hint=64)
    with torch.inference_mode():
        reference = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        torch.testing.assert_close(packed(x).float(), reference, rtol=2e-2, atol=2e-1)


def test_pack_linears_replaces_fp32_and_bf16_linears_and_leaves_other_dtypes():
    """bf16 only where oneDNN takes bf16 weights (AVX-512); on an AVX2 CPU a bf16 layer keeps
    torch's linear instead of failing the load."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.Linear(16, 16, bias=False)), nn.Linear(16, 4).bfloat16(),
                          nn.Linear(4, 4).half())
    bf16 = packs(torch.bfloat16)
    assert pack_linears(model, batch_hint=8) == 2 + bf16
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert isinstance(model[2], PackedLinear if bf16 else nn.Linear)
    assert isinstance(model[3], nn.Linear)


def test_the_cpu_engine_in_fp32_runs_packed_linears(make_llm, llama_dir):
    """So the greedy-equality tests against transformers exercise this path."""
    llm = make_llm(llama_dir, num_kv_blocks=16)
    assert llm.engine.runner.linear_backend == "onednn-packed"
    assert not any(isinstance(m, nn.Linear) for m in llm.engine.runner.model.modules())
