#!/usr/bin/env bash
# Build smc-steer with `--features cuda` on a machine without a GPU or a CUDA installation:
# NVIDIA's compiler, headers and libraries come from their PyPI wheels, unpacked into a local
# folder. Produces a bundle for scripts/gpu-check.sh (see docs/gpu.md).
#
#   scripts/build-cuda.sh            # toolkit into target/cuda-toolkit, build into target/cuda
#
# Environment:
#   CUDA_COMPUTE_CAP  GPU architecture to compile for (default 90: H100 / H200)
#   CUDA_WHEEL_VERSION  version of the `nvidia-cuda-nvcc` wheel (default 13.0.88; the cu12
#                     wheels ship ptxas only, without the nvcc driver, so CUDA 13 is the
#                     first line that builds from PyPI)
#   JOBS              cargo jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cap=${CUDA_COMPUTE_CAP:-90}
ver=${CUDA_WHEEL_VERSION:-13.0.88}
major=${ver%%.*}
toolkit=$root/target/cuda-toolkit
bundle=$root/target/gpu-bundle
jobs=${JOBS:-$(nproc)}

if [ ! -x "$toolkit/bin/nvcc" ]; then
    echo "== downloading the CUDA $ver toolkit wheels from PyPI"
    wheels=$root/target/cuda-wheels
    mkdir -p "$wheels"
    # nvcc (driver, cudafe++, ptxas, fatbinary, nvlink), its device front end (nvvm: cicc,
    # libdevice) and headers (crt), the runtime and its headers, cuBLAS, cuRAND and NVRTC
    # (candle links them), and CCCL (thrust headers for sort.cu).
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
        "nvidia-cuda-nvcc==$ver" "nvidia-cuda-crt==$ver" "nvidia-nvvm==$ver" \
        "nvidia-cuda-runtime==$major.0.*" "nvidia-cublas==$major.0.*" \
        "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==$major.0.*" "nvidia-cuda-cccl==$major.0.*"
    rm -rf "$toolkit.tmp" && mkdir -p "$toolkit.tmp"
    for w in "$wheels"/*.whl; do
        python3 -m zipfile -e "$w" "$toolkit.tmp/unpacked"
    done
    # Every wheel holds nvidia/cu13/{bin,include,lib,nvvm,...}: merge them into one tree.
    cp -a "$toolkit.tmp/unpacked/nvidia/cu$major/." "$toolkit.tmp/tree/" 2>/dev/null \
        || { mkdir -p "$toolkit.tmp/tree" && cp -a "$toolkit.tmp/unpacked/nvidia/cu$major/." "$toolkit.tmp/tree/"; }
    chmod +x "$toolkit.tmp/tree/bin/"* "$toolkit.tmp/tree/nvvm/bin/"* 2>/dev/null || true
    # Wheels ship versioned sonames only; the linker wants the plain names.
    for lib in cudart cublas cublasLt curand nvrtc; do
        so=$(ls "$toolkit.tmp/tree/lib/lib$lib.so."* 2>/dev/null | head -1 || true)
        [ -n "$so" ] && ln -sf "$(basename "$so")" "$toolkit.tmp/tree/lib/lib$lib.so"
    done
    # libcuda comes with the GPU driver, not with any wheel. cudarc links it dynamically,
    # so link against a stub holding the driver API's symbols; at run time the driver's
    # own libcuda.so.1 is loaded instead.
    mkdir -p "$toolkit.tmp/tree/lib/stubs"
    python3 - "$toolkit.tmp/tree/include/cuda.h" > "$toolkit.tmp/stub.c" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
names = set(re.findall(r'\b(cu[A-Z]\w*)\s*\(', text))
# `#define cuFoo cuFoo_v2` aliases: the exported symbol is the target.
names |= set(re.findall(r'#define\s+cu\w+\s+(cu\w+)', text))
for n in sorted(names):
    print(f"void {n}(void) {{}}")
PY
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$toolkit.tmp/tree/lib/stubs/libcuda.so" "$toolkit.tmp/stub.c"
    rm -rf "$toolkit" && mv "$toolkit.tmp/tree" "$toolkit" && rm -rf "$toolkit.tmp"
fi

export CUDA_ROOT=$toolkit CUDA_PATH=$toolkit CUDA_HOME=$toolkit
export PATH=$toolkit/bin:$PATH
export CUDA_COMPUTE_CAP=$cap
export LIBRARY_PATH=$toolkit/lib:$toolkit/lib/stubs:${LIBRARY_PATH:-}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$toolkit/lib -L native=$toolkit/lib/stubs"
export CARGO_TARGET_DIR=$root/target/cuda
nvcc --version | tail -2

start=$(date +%s)
echo "== cargo build --release --features cuda (compute capability $cap)"
cargo build --release --features cuda -j "$jobs" --bin smc-steer --example bench
echo "== the device test binary"
cargo test --release --features cuda -j "$jobs" --test it --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "it" and m.get("executable"):
        print(m["executable"])' > "$CARGO_TARGET_DIR/it-test-path"
end=$(date +%s)

rm -rf "$bundle" && mkdir -p "$bundle/bin"
cp "$CARGO_TARGET_DIR/release/smc-steer" "$CARGO_TARGET_DIR/release/examples/bench" "$bundle/bin/"
cp "$(cat "$CARGO_TARGET_DIR/it-test-path")" "$bundle/bin/it"
# The CUDA libraries the binaries load (the driver's libcuda excepted), for a GPU machine
# without a CUDA installation. BUNDLE_LIBS=0 leaves them out (cuBLAS alone is ~600 MB).
if [ "${BUNDLE_LIBS:-1}" = 1 ]; then
    mkdir -p "$bundle/lib"
    cp -a "$toolkit"/lib/lib{cudart,cublas,cublasLt,curand,nvrtc}*.so* "$bundle/lib/" 2>/dev/null || true
fi
echo "built in $((end - start)) s; bundle in $bundle:"
ls -la "$bundle/bin"
