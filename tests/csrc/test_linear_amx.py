"""The AMX bf16 linear (csrc/cpu/linear_amx.cpp) against torch on fresh random inputs, its weight
layout, and the layer that takes it for decode steps. Skipped where the CPU (or a forced lower
ISA) has no AMX-BF16; the forced-ISA rerun in test_fused_ops.py checks that AMX turns off there."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import server._C  # noqa: F401  (registers torch.ops.s1serve)
from server.models.packed_linear import AMX_ROWS, PackedLinear, amx_available, pack_for_amx

from .test_fused_ops import fresh_generator
from .test_ops import relative_error

needs_amx = pytest.mark.skipif(not amx_available(), reason="no AMX-BF16 here")


@needs_amx
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 576), (64, 48)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 37, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_the_amx_linear_matches_torch_linear(in_features, out_features, rows, bias):
    """48 outputs are three blocks of 16 (an odd block computed alone); 17 and 37 rows leave a
    partial tile of x, 1 to 64 rows one to four tiles."""
    gen, seed = fresh_generator()
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    torch.ops.s1serve.linear_amx(out, x, pack_for_amx(weight), b)
    want = nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert relative_error(out.double(), want) < 8e-3, seed


@needs_amx
def test_a_row_through_the_amx_linear_does_not_depend_on_the_rows_beside_it():
    """Each output is summed over the input features in one order whatever the batch: a sequence
    decodes the same bf16 tokens alone and in a batch of up to AMX_ROWS."""
    gen, seed = fresh_generator()
    weight = pack_for_amx(torch.randn(960, 576, generator=gen).bfloat16())
    x = torch.randn(AMX_ROWS, 576, generator=gen).bfloat16()
    together = torch.empty(AMX_ROWS, 960, dtype=torch.bfloat16)
    torch.ops.s1serve.linear_amx(together, x, weight, None)
    for rows in (1, 20):
        for i in (0, rows - 1):
            alone = torch.empty(rows, 960, dtype=torch.bfloat16)
            torch.ops.s1serve.linear_amx(alone, x[i : i + rows].contiguous(), weight, None)
            assert torch.equal(alone[0], together[i]), (seed, rows, i)


def test_pack_for_amx_puts_each_weight_where_the_tiles_read_it():
    weight = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).bfloat16()
    packed = pack_for_amx(weight)
    assert packed.shape == (2, 2, 16, 16, 2)
    for block, tile, pair, n, j in ((0, 0, 0, 0, 1), (1, 1, 15, 15, 1), (1, 0, 3, 7, 0)):
        assert packed[block, tile, pair, n, j] == weight[16 * block + n, 32 * tile + 2 * pair + j]


@needs_amx
def test_a_bf16_packed_linear_takes_the_amx_kernel_up_to_its_limit_and_onednn_above():
    linear = nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(linear, batch_hint=8)
    assert packed.tile_kernel == "amx" and packed.weight is None  # the AMX tiles replace the plain copy
    with torch.inference_mode():
        for rows in (1, 5, AMX_ROWS, AMX_ROWS + 1, 200):
            x = torch.randn(rows, 64).bfloat16()
            want = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
            assert relative_error(packed(x).double(), want) < 8e-3, rows
    ragged = PackedLinear(nn.Linear(64, 100).bfloat16(), batch_hint=8)  # 100 outputs: not whole tiles
    assert ragged.tile_weight is None


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_amx_is_off_on_a_forced_lower_isa(isa):
    code = "import torch, server._C; print(torch.ops.s1serve.cpu_has_amx_bf16())"
    check = subprocess.run([sys.executable, "-c", code], env={**os.environ, "S1SERVE_CPU_ISA": isa},
                           capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "False"
