#!/usr/bin/env bash
# The GPU check, one command, on a machine with an NVIDIA GPU and its driver (no Rust, no
# network needed): run from the repository root with the bundle that scripts/build-cuda.sh
# produced (target/gpu-bundle) and the model file (models/, or SMC_STEER_MODEL).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# 1. CPU-vs-GPU agreement through a whole SMC run (tests/it/lm_device.rs, tolerance 1e-3).
# 2. The bench on the GPU at n = 1, 64, 256, 1024: decode_step_ms, smc_step_ms,
#    tokens_per_second, kv_bytes, each tagged with the device name (JSON lines).
# 3. The README demo on the GPU.
# Results go to OUT_DIR (default target/gpu-check): agreement.log, bench.jsonl, demo.txt,
# nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${GPU_BUNDLE:-target/gpu-bundle}
out=${1:-target/gpu-check}
device=${SMC_STEER_DEVICE:-cuda:0}
mkdir -p "$out"
status=0

# CUDA's libraries: the bundle's copies (from the wheels) unless the system has its own.
if [ -d "$bundle/lib" ]; then
    export LD_LIBRARY_PATH=$PWD/$bundle/lib:${LD_LIBRARY_PATH:-}
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"
head -15 "$out/nvidia-smi.txt"

echo "== 1. agreement (device $device)"
SMC_STEER_TEST_DEVICE=$device "$bundle/bin/it" lm_device --nocapture --test-threads 1 \
    2>&1 | tee "$out/agreement.log" || status=1

echo "== 2. bench on $device"
SMC_BENCH_ONLY=decode "$bundle/bin/bench" --json --device "$device" --attention gather \
    --ns 1,64,256,1024 --steps 8 2>&1 | tee "$out/bench.jsonl" || status=1

echo "== 3. README demo on $device"
"$bundle/bin/smc-steer" run --device "$device" --prompt "The Fed says" --max-word-letters 5 \
    --particles 16 2>&1 | tee "$out/demo.txt" || status=1

echo "results in $out (exit $status)"
exit $status
