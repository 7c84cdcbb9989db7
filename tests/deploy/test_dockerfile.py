"""Structural facts of the container image, read from the Dockerfile (no Docker engine here)."""

import json
import re
import tomllib
from pathlib import Path

from server.api.config import ServerConfig

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_multi_stage_build_compiles_the_extension_for_hopper_and_ampere():
    steps = instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) == 2 and steps[stages[0]][1].endswith("AS builder")
    builder = " ".join(args for _, args in steps[stages[0] : stages[1]])
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0a"' in builder and "pip wheel --no-build-isolation" in builder
    assert "cuda" in next(args for op, args in steps if op == "ARG")  # an official CUDA + PyTorch base
    assert any(op == "COPY" and args.startswith("--from=builder /wheels") for op, args in final_stage())


def test_the_image_installs_the_gpu_extra_with_flash_attn_built_in_the_builder():
    steps = instructions()
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    builder = " ".join(args for _, args in steps[stages[0] : stages[1]])
    assert re.search(r"pip wheel --no-build-isolation --no-deps --wheel-dir /wheels \"flash-attn==", builder)
    assert 'FLASH_ATTN_CUDA_ARCHS="80;90"' in builder
    install = " ".join(args for op, args in final_stage() if op == "RUN")
    assert 'echo "[gpu]"' in install and "--find-links /wheels" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("flash-attn") for req in extras["gpu"])
    default = next(args for op, args in steps if op == "ARG" and args.startswith("WITH_FLASH_ATTN="))
    assert default == "WITH_FLASH_ATTN=1"


def test_runs_as_a_non_root_user():
    users = [args for op, args in final_stage() if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_exposed_ports_are_the_server_defaults():
    exposed = {int(p) for op, args in final_stage() if op == "EXPOSE" for p in args.split()}
    assert exposed == {ServerConfig.grpc_port, ServerConfig.http_port}


def test_entrypoint_is_the_installed_console_script_and_health_is_checked():
    stage = dict((op, args) for op, args in final_stage() if op in ("ENTRYPOINT", "CMD", "HEALTHCHECK"))
    assert json.loads(stage["ENTRYPOINT"]) == ["s1serve"] and json.loads(stage["CMD"]) == ["serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "s1serve" in scripts
    assert f"http://127.0.0.1:{ServerConfig.http_port}/health" in stage["HEALTHCHECK"]


def test_weights_are_not_baked_in_and_the_context_is_small():
    copied = " ".join(args for op, args in instructions() if op in ("COPY", "ADD"))
    assert not re.search(r"safetensors|\.gguf|models?/", copied)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests/", "*.safetensors", "*.gguf"} <= set(ignored)
