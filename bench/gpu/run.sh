#!/usr/bin/env bash
# One-shot GPU check for a lent H100/H200 (target: under 8 minutes; nothing outside the repository).
# It has never run yet: no GPU has been lent so far. Writes everything under $OUT (the device
# tool's output folder) or bench/results/gpu-<time>/.
#   bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc $rc, $((SECONDS - t0)) s" | tee -a "$summary"; return $rc; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/torch.txt" 2>&1
# 1. the ops, built against this machine's torch (the CUDA kernels and their binding)
step build 240 python -m pip install --no-build-isolation --no-deps -e . || { tail -40 "$OUT/build.log"; exit 1; }
python -m pip install -q "pytest>=8" hypothesis > /dev/null 2>&1
# 2. every gpu-marked test
step pytest-gpu 150 python -m pytest -q -m gpu tests --maxfail=25 -p no:cacheprovider  # a first run: see every failure, bounded
# 3. compute-sanitizer on a small case
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 90 compute-sanitizer --tool "$tool" --error-exitcode 9 python bench/gpu/small_case.py
  done
else
  echo "compute-sanitizer: not installed" | tee -a "$summary"
fi
# 4. decode bandwidth: (1, 32k), (4, 16k), (64, 4k), (256, 1k) against torch and flash-attn
step decode-bandwidth 90 python bench/gpu/decode_bandwidth.py --out "$OUT/decode_bandwidth.json"
# 5. the engine's decode tokens/s at batch 1 and 64 on a random 7B-shaped model
step engine-decode 150 python bench/gpu/engine_decode.py --out "$OUT/engine_decode.json"
# 6. tensor parallelism on NCCL when there are two GPUs
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step tensor-parallel-nccl 90 python -m pytest -q tests/engine/test_tensor_parallel.py -k nccl -p no:cacheprovider
fi
cat "$summary"
