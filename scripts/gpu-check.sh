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
# 4. With the Llama-3 tokenizer present: decode and SMC steps of a Llama-3.2-1B-shaped model
#    (random weights, f32) at n = 1, 64, 256.
# Results go to OUT_DIR (default target/gpu-check): agreement.log, bench.jsonl, demo.txt,
# sizes.jsonl, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${GPU_BUNDLE:-target/gpu-bundle}
out=${1:-target/gpu-check}
device=${SMC_STEER_DEVICE:-cuda:0}
# Each step's time limit in seconds (a hung step must not take the lease's remaining time).
limit=${GPU_CHECK_STEP_S:-300}
mkdir -p "$out"
status=0

# CUDA's libraries: the bundle's copies (from the wheels) where it has them; otherwise those
# of NVIDIA's pip wheels on the machine (PyTorch's, under site-packages/nvidia/cu*/lib) or of a
# CUDA installation, unless the loader already finds them.
if [ -d "$bundle/lib" ]; then
    export LD_LIBRARY_PATH=$PWD/$bundle/lib:${LD_LIBRARY_PATH:-}
elif ! ldconfig -p 2>/dev/null | grep -q 'libcublasLt\.so\.13'; then
    for dir in $(python3 -c 'import glob, nvidia
for p in nvidia.__path__: print(*glob.glob(p + "/cu*/lib"))' 2>/dev/null) \
        /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        if [ -e "$dir/libcublasLt.so.13" ]; then
            export LD_LIBRARY_PATH=$dir:${LD_LIBRARY_PATH:-}
            echo "CUDA libraries from $dir"
            break
        fi
    done
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$out/nvidia-smi.txt"
head -15 "$out/nvidia-smi.txt"

echo "== 1. agreement (device $device)"
SMC_STEER_TEST_DEVICE=$device timeout "$limit" "$bundle/bin/it" lm_device --nocapture --test-threads 1 \
    2>&1 | tee "$out/agreement.log" || status=1

echo "== 2. bench on $device"
SMC_BENCH_ONLY=decode timeout "$limit" "$bundle/bin/bench" --json --device "$device" --attention gather \
    --ns 1,64,256,1024 --steps 8 2>&1 | tee "$out/bench.jsonl" || status=1

echo "== 3. README demo on $device"
timeout "$limit" "$bundle/bin/smc-steer" run --device "$device" --prompt "The Fed says" --max-word-letters 5 \
    --particles 16 2>&1 | tee "$out/demo.txt" || status=1

# 4. A 1 B model (random weights at Llama-3.2-1B's published shape, as the CPU bench's
#    `sizes` group makes them), f32 on the GPU, when the Llama-3 tokenizer is here
#    (scripts/fetch-tokenizers.sh).
if [ -d models/tokenizers/llama3 ]; then
    echo "== 4. Llama-3.2-1B shape (random weights) on $device"
    SMC_BENCH_ONLY=sizes timeout "$limit" "$bundle/bin/bench" --json --device "$device" --attention gather \
        --sizes llama-3.2-1b --formats f32 --ns 1,64,256 --steps 8 2>&1 \
        | tee "$out/sizes.jsonl" || status=1
fi

echo "results in $out (exit $status)"
exit $status
