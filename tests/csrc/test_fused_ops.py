"""The fused element-wise CPU ops (csrc/cpu/fused_ops.cpp) and the one-row GEMV
(csrc/cpu/linear_gemv.cpp) against torch on fresh random inputs, and every CPU kernel on each vector ISA the machine has: the checks run
again in a subprocess with $S1SERVE_CPU_ISA forcing AVX2 and the baseline (the ISA is fixed per
process at the first kernel call)."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import server._C  # noqa: F401  (registers torch.ops.s1serve)
from server.models.decoder import RMSNorm, RotaryEmbedding, _rotate_half

from .test_ops import relative_error

DTYPES = [torch.float32, torch.bfloat16]
# bf16 rounds where torch rounds, so results differ only by fp32 summation order (and an ulp of
# bf16 where that order tips a rounding); fp32 by summation order alone.
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = int(torch.randint(0, 2**31, ()).item())
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [576, 64, 37])  # SmolLM2's hidden size, a head, and a ragged tail
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_rms_norm_and_its_residual_form_match_the_torch_code(dtype, dim, rows):
    gen, seed = fresh_generator()
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=gen).to(dtype)
    x = torch.randn(rows, dim, generator=gen).to(dtype) * 3
    residual = torch.randn(rows, dim, generator=gen).to(dtype)
    with torch.inference_mode():
        assert relative_error(norm(x), norm._norm(x)) < TOLERANCE[dtype], seed
        want_residual = x + residual
        got, got_residual = norm(x, residual.clone())
        assert torch.equal(got_residual, want_residual), seed  # the add is one rounding, like torch's
        assert relative_error(got, norm._norm(want_residual)) < TOLERANCE[dtype], seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1536, 40, 7])
def test_silu_and_mul_matches_torch(dtype, dim):
    gen, seed = fresh_generator()
    gate_up = (torch.randn(9, 2 * dim, generator=gen) * 6).to(dtype)  # |x| up to ~25: both sigmoid branches
    out = torch.empty(9, dim, dtype=dtype)
    torch.ops.s1serve.silu_and_mul(out, gate_up)
    gate, up = gate_up.split(dim, dim=-1)
    assert relative_error(out, nn.functional.silu(gate) * up) < TOLERANCE[dtype], seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 20])
def test_rotary_embedding_in_place_matches_rotate_half(dtype, head_dim):
    gen, seed = fresh_generator()
    rope = RotaryEmbedding(head_dim, 10000.0, 4096)
    positions = torch.randint(0, 4096, (11,), generator=gen)
    cos, sin = rope.tables(positions, dtype)
    qkv = torch.randn(11, (9 + 2 * 3) * head_dim, generator=gen).to(dtype)  # q and k as views of one row, like qkv_proj
    q = qkv[:, : 9 * head_dim].view(11, 9, head_dim)
    k = qkv[:, 9 * head_dim : 12 * head_dim].view(11, 3, head_dim)
    want_q, want_k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    v_before = qkv[:, 12 * head_dim :].clone()
    torch.ops.s1serve.rotary_embedding(q, k, cos, sin)
    assert relative_error(q, want_q) < TOLERANCE[dtype] and relative_error(k, want_k) < TOLERANCE[dtype], seed
    assert torch.equal(qkv[:, 12 * head_dim :], v_before)  # v, beside them in the row, untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 577), (40, 3), (64, 49)])
@pytest.mark.parametrize("rows", [1, 5, 13])
@pytest.mark.parametrize("bias", [False, True])
def test_the_few_rows_linear_matches_torch_linear(dtype, in_features, out_features, rows, bias):
    """K a multiple of 32 takes AVX512-BF16's dot product where the CPU has it; 40 takes the
    widening path; odd weight-row counts exercise the four-row step's tail, 5 and 13 rows of x
    the six-row tiles' tails."""
    gen, seed = fresh_generator()
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    out = torch.empty(rows, out_features, dtype=dtype)
    torch.ops.s1serve.linear_few_rows(out, x, weight, b)
    want = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    assert relative_error(out.double(), want) < {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype], seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_through_the_few_rows_linear_does_not_depend_on_the_rows_beside_it(dtype):
    """Each output is summed in one order whatever the number of rows: a sequence decodes the
    same tokens alone and in a batch of up to FEW_ROWS."""
    gen, seed = fresh_generator()
    weight = torch.randn(577, 576, generator=gen).to(dtype)
    x = torch.randn(13, 576, generator=gen).to(dtype)
    together = torch.empty(13, 577, dtype=dtype)
    torch.ops.s1serve.linear_few_rows(together, x, weight, None)
    for i in (0, 6, 12):
        alone = torch.empty(1, 577, dtype=dtype)
        torch.ops.s1serve.linear_few_rows(alone, x[i : i + 1].contiguous(), weight, None)
        assert torch.equal(alone[0], together[i]), (seed, i)


def test_a_packed_linear_takes_the_few_rows_kernel_up_to_its_limit_and_onednn_above():
    from server.models.packed_linear import PackedLinear, few_rows_limit

    linear = nn.Linear(64, 96)
    packed = PackedLinear(linear, batch_hint=8)
    assert packed.few_rows == few_rows_limit(torch.float32)
    with torch.inference_mode():
        for rows in (1, 5, packed.few_rows, packed.few_rows + 1, 40):
            x = torch.randn(rows, 64)
            assert relative_error(packed(x), linear(x)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 17, 32, 33, 1000, 49152])
def test_argmax_rows_matches_torch_max_and_takes_the_first_of_tied_maxima(dtype, vocab):
    """Greedy sampling's argmax: values from a few integers, so rows hold many ties, in and
    across the kernel's 16 lanes and its scalar tail."""
    gen, seed = fresh_generator()
    logits = torch.randint(-3, 4, (37, vocab), generator=gen).to(dtype)
    got = torch.empty(37, dtype=torch.long)
    torch.ops.s1serve.argmax_rows(got, logits)
    assert torch.equal(got, logits.float().max(dim=-1).indices), f"seed {seed}"
    noisy = torch.randn(5, vocab, generator=gen).to(dtype)
    torch.ops.s1serve.argmax_rows(got[:5], noisy)
    assert torch.equal(got[:5], noisy.float().argmax(dim=-1)), f"seed {seed}"


def test_the_fused_ops_refuse_what_they_do_not_cover():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.s1serve.rms_norm(torch.empty_like(x), x, torch.ones(9), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.s1serve.silu_and_mul(torch.empty(4, 4, dtype=torch.float64), x.double())
    with pytest.raises(RuntimeError, match="side by side"):
        torch.ops.s1serve.silu_and_mul(torch.empty(4, 3), torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.s1serve.linear_few_rows(torch.empty(1, 3), torch.randn(2, 8), torch.randn(3, 8), None)


def test_the_kernels_run_the_best_isa_the_cpu_has():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = "avx512" if " avx512f " in flags and " avx512bw " in flags else "avx2" if " avx2 " in flags else "baseline"
    if os.environ.get("S1SERVE_CPU_ISA") is None:
        assert torch.ops.s1serve.cpu_isa() == expected


@pytest.mark.skipif(os.environ.get("S1SERVE_CPU_ISA") is not None, reason="already the forced run")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_cpu_kernel_matches_its_reference_on_a_forced_isa(isa):
    """This file and the attention kernels' tests, rerun on a lower ISA than the CPU's best: each
    kernel body is compiled per ISA (csrc/cpu/isa.h), so each build is checked, not just the one
    this CPU picks."""
    env = {**os.environ, "S1SERVE_CPU_ISA": isa}
    check = subprocess.run([sys.executable, "-c", "import torch, server._C; print(torch.ops.s1serve.cpu_isa())"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == isa
    tests = [f"{__file__}", f"{os.path.dirname(__file__)}/test_ops.py", "-k", "match or split_their"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
