"""The AVX512-BF16 linear (csrc/cpu/linear_dpbf16.cpp) against torch on fresh random inputs, and the
layer that takes it for decode steps where the CPU has AVX512-BF16 but no AMX. The kernel tests are
skipped where the CPU (or a forced lower ISA) lacks AVX512-BF16; the forced-ISA test checks that it
turns off there, so the layer falls back to linear_few_rows on the AVX2 path."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import server._C  # noqa: F401  (registers torch.ops.s1serve)
from server.models.packed_linear import DPBF16_ROWS, PackedLinear, amx_available, dpbf16_available, pack_for_amx

from .test_fused_ops import fresh_generator
from .test_linear_amx import needs_amx
from .test_ops import relative_error

needs_dpbf16 = pytest.mark.skipif(not dpbf16_available(), reason="no AVX512-BF16 here")


@needs_dpbf16
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (64, 48), (32, 112)])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 37, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_the_dpbf16_linear_matches_torch_linear(in_features, out_features, rows, bias):
    """48 and 112 outputs are 3 and 7 blocks of 16 (blocks left over from groups of four), 5 to 37
    rows leave a partial group of six rows."""
    gen, seed = fresh_generator()
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    torch.ops.s1serve.linear_dpbf16(out, x, pack_for_amx(weight), b)
    want = nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert relative_error(out.double(), want) < 8e-3, seed


@needs_dpbf16
def test_a_row_through_the_dpbf16_linear_does_not_depend_on_the_rows_beside_it():
    gen, seed = fresh_generator()
    weight = pack_for_amx(torch.randn(960, 576, generator=gen).bfloat16())
    x = torch.randn(DPBF16_ROWS, 576, generator=gen).bfloat16()
    together = torch.empty(DPBF16_ROWS, 960, dtype=torch.bfloat16)
    torch.ops.s1serve.linear_dpbf16(together, x, weight, None)
    for rows in (1, 4, 20):
        for i in (0, rows - 1, DPBF16_ROWS - rows):
            alone = torch.empty(rows, 960, dtype=torch.bfloat16)
            torch.ops.s1serve.linear_dpbf16(alone, x[i : i + rows].contiguous(), weight, None)
            assert torch.equal(alone[0], together[i]), (seed, rows, i)


@pytest.mark.skipif(not dpbf16_available() or amx_available(), reason="AMX takes the packed weights here, or no AVX512-BF16")
def test_a_bf16_packed_linear_takes_the_dpbf16_kernel_up_to_its_limit_and_onednn_above():
    linear = nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(linear, batch_hint=8)
    assert packed.tile_kernel == "dpbf16" and packed.weight is None  # the packed copy replaces the plain one
    with torch.inference_mode():
        for rows in (1, 5, DPBF16_ROWS, DPBF16_ROWS + 1, 200):
            x = torch.randn(rows, 64).bfloat16()
            want = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
            assert relative_error(packed(x).double(), want) < 8e-3, rows
    assert PackedLinear(nn.Linear(64, 100).bfloat16(), batch_hint=8).tile_weight is None  # not whole blocks of 16


@pytest.mark.parametrize("kernel", [pytest.param("amx", marks=needs_amx), pytest.param("dpbf16", marks=needs_dpbf16)])
def test_the_packed_bf16_linears_refuse_what_they_do_not_cover(kernel):
    """linear_amx and linear_dpbf16 share their argument checks (csrc/cpu/tile_linear_args.h)."""
    linear = getattr(torch.ops.s1serve, f"linear_{kernel}")
    x = torch.randn(2, 64).bfloat16()
    packed = pack_for_amx(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="pack_for_amx"):
        linear(torch.empty(2, 32, dtype=torch.bfloat16), x, packed.view(2, 2, 16, 32), None)
    with pytest.raises(RuntimeError, match="in_features"):
        linear(torch.empty(2, 32, dtype=torch.bfloat16), torch.randn(2, 96).bfloat16(), packed, None)
    with pytest.raises(RuntimeError, match="bias"):
        linear(torch.empty(2, 32, dtype=torch.bfloat16), x, packed, torch.randn(31).bfloat16())
    with pytest.raises(RuntimeError, match="out must be"):
        linear(torch.empty(2, 32), x, packed, None)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_dpbf16_is_off_on_a_forced_lower_isa_and_the_layer_streams_the_plain_weight(isa):
    code = ("import torch, server._C; from torch import nn; from server.models.packed_linear import PackedLinear; "
            "p = PackedLinear(nn.Linear(64, 96).bfloat16(), 8); "
            "print(torch.ops.s1serve.cpu_has_dpbf16(), p.tile_weight is None, p.few_rows > 0)")
    check = subprocess.run([sys.executable, "-c", code], env={**os.environ, "S1SERVE_CPU_ISA": isa},
                           capture_output=True, text=True, check=True)
    assert check.stdout.split() == ["False", "True", "True"]
