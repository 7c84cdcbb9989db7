"""The CUDA kernels compile with nvcc for Hopper and Ampere, on machines without a GPU too.

They are plain CUDA (no torch headers), so this is quick, and a CUDA syntax or type error is
caught in CI, not first on a GPU machine.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).parents[2] / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cuda_kernel_compiles_for_sm90a_and_sm80(source, tmp_path):
    flags = (CUDA_DIR / "nvcc_flags.txt").read_text().split()  # the extension build's flags
    cmd = [NVCC, "-c", *flags, str(CUDA_DIR / source), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="the CUDA toolkit is not installed")
def test_cuda_binding_type_checks_against_torch_headers(tmp_path):
    """The thin binding needs torch's c10/cuda headers, which the CPU wheel ships except for one
    CMake-generated file; an empty stand-in for it lets g++ type-check the binding here."""
    import torch

    torch_include = Path(torch.__file__).parent / "include"
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    candidates = [Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), None)
    if cuda_include is None:
        pytest.skip("no CUDA headers next to nvcc")
    cmd = ["g++", "-fsyntax-only", "-std=c++20", f"-I{tmp_path}", f"-I{torch_include}",
           f"-I{torch_include / 'torch/csrc/api/include'}", f"-I{cuda_include}", f"-I{CUDA_DIR.parent}",
           str(CUDA_DIR.parent / "cuda_bindings.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_the_build_carries_line_info_and_ptx_for_newer_gpus(tmp_path):
    """Profilers map SASS to source lines (-lineinfo), and a GPU newer than sm_90a JIT-compiles
    the embedded compute_90 PTX instead of failing with "no kernel image"."""
    flags = (CUDA_DIR / "nvcc_flags.txt").read_text().split()
    assert "-lineinfo" in flags and any(f.endswith("code=compute_90") for f in flags)
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if not cuobjdump.exists():
        pytest.skip("no cuobjdump next to nvcc")
    subprocess.run([NVCC, "-c", *flags, str(CUDA_DIR / "reshape_and_cache.cu"), "-o", str(tmp_path / "k.o")],
                   check=True, capture_output=True, timeout=600)
    listing = subprocess.run([str(cuobjdump), "--list-ptx", "--list-elf", str(tmp_path / "k.o")],
                             capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in listing and "sm_80" in listing and "compute_90" in listing, listing
