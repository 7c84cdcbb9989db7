"""Builds the csrc/ torch extension (`server._C`, ops under `torch.ops.s1serve`).

Metadata lives in pyproject.toml; this file only declares the extension. It must build against
the torch already installed (so install with `--no-build-isolation`): an isolated build env
would fetch a different torch, and the extension's ABI would not match the one at run time.
The CPU kernels are always built; the CUDA kernels (csrc/cuda/, plain CUDA) and their binding
when the installed torch has CUDA. A compile error fails the install: there is no silent fallback.
It also generates the gRPC stubs (server/api/v1/) from protos/.
"""

import runpy
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# at::parallel_for is header code that splits work with `#pragma omp parallel`: without -fopenmp
# the pragma is ignored and every CPU kernel runs on one thread. On Linux the resulting
# libgomp.so.1 dependency resolves to the one torch has already loaded; Apple's clang has no
# -fopenmp, so macOS builds run the CPU kernels on one thread.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CXX_FLAGS = ["-O3", *OPENMP]
# One list for the build and for the CI test that compiles csrc/cuda/ with nvcc alone.
NVCC_FLAGS = Path("csrc/cuda/nvcc_flags.txt").read_text().split()

sources = ["csrc/bindings.cpp", *sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp"))]
if torch.version.cuda is not None and CUDA_HOME is not None:
    sources += ["csrc/cuda_bindings.cpp", *sorted(str(p) for p in Path("csrc/cuda").glob("*.cu"))]
    extension = CUDAExtension(
        "server._C", sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=OPENMP
    )
else:
    extension = CppExtension("server._C", sources, extra_compile_args=CXX_FLAGS, extra_link_args=OPENMP)

# gRPC stubs are generated from protos/ on every build, never committed (needs grpcio-tools).
runpy.run_path("protos/generate.py")["generate"]()

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
