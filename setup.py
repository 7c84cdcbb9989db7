"""Builds the csrc/ torch extension (`server._C`, ops under `torch.ops.s1serve`).

Metadata lives in pyproject.toml; this file only declares the extension. It must build against
the torch already installed (so install with `--no-build-isolation`): an isolated build env
would fetch a different torch, and the extension's ABI would not match the one at run time.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

sources = ["csrc/bindings.cpp", *sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp"))]
setup(
    ext_modules=[CppExtension("server._C", sources, extra_compile_args=["-O3"])],
    cmdclass={"build_ext": BuildExtension},
)
