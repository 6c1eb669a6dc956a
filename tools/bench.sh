#!/usr/bin/env bash
# Prints wall time and peak RSS of the standard scenarios, one row each (see BENCHMARKS.md).
# Usage: tools/bench.sh [filter]   (release build; runs on whatever machine you are on)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin wafer --example engine_speed
filter="${1:-}"
row() {
  local name="$1"; shift
  [[ -n "$filter" && "$name" != *"$filter"* ]] && return 0
  local out
  out=$( { /usr/bin/time -f "TIME %e %M" "$@" > /dev/null; } 2>&1 | grep '^TIME' )
  read -r _ wall rss <<< "$out"
  printf '| %-52s | %8s s | %8.1f MB | `%s` |\n' "$name" "$wall" "$(echo "$rss / 1024" | bc -l)" "$*"
}
echo "| scenario | wall | peak RSS | command |"
echo "|---|---|---|---|"
row "graph: llama-3.1-405b train" target/release/wafer graph llama-3.1-405b --phase train
row "engine: synthetic GEMV 16K, 64x64, detailed, 1 thread" target/release/examples/engine_speed 64 64 16384 1 8
row "engine: synthetic MeshGEMV 16K, 420x420, 1 thread" target/release/examples/engine_speed 420 420 16384 1 20
row "engine: synthetic MeshGEMV 16K, 420x420, 2 threads" target/release/examples/engine_speed 420 420 16384 2 20
row "engine: synthetic MeshGEMV 32K, full WSE-2, 1 thread" target/release/examples/engine_speed 757 996 32768 1 28
row "engine: synthetic MeshGEMV 32K, full WSE-2, 2 threads" target/release/examples/engine_speed 757 996 32768 2 28
# Compiled programs through `wafer run` (issue 4's targets; see BENCHMARKS.md for the numbers).
W=target/release/wafer
row "run: gpt-tiny train, 64x64, detailed, 1 thread" $W run gpt-tiny --hw cs2 --mesh 64x64 --phase train --fidelity detailed --threads 1
row "run: llama-tiny prefill 1024, 64x64, detailed, 1 thread" $W run llama-tiny --hw cs2 --mesh 64x64 --phase prefill --fidelity detailed --threads 1
row "run: gpt2-small prefill 4, full WSE-2 (cs2), 1 thread" $W run gpt2-small --hw cs2 --phase prefill --seq 4 --threads 1
row "run: gpt2-small prefill 4, full WSE-2 (cs2), 2 threads" $W run gpt2-small --hw cs2 --phase prefill --seq 4 --threads 2
row "run: llama-3-8b decode ctx 4096, full WSE-3 (cs3), 1 thread" $W run llama-3-8b --hw cs3 --phase decode --context 4096 --threads 1
row "run: llama-3-8b decode ctx 4096, full WSE-3 (cs3), 2 threads" $W run llama-3-8b --hw cs3 --phase decode --context 4096 --threads 2
row "demo: gpt2-small prefill 8 on cs2 vs h100, trace + heatmap" $W demo --out-dir /tmp/waferscale-bench-demo
# Fast fidelity's loop aggregation against detailed: gpt-tiny deepened to 96 layers (the shipped tiny
# models have 2, too few to aggregate), weight-streaming training on 32x32.
DEEP=$(mktemp --suffix=.json)
sed 's/"n_layer": 2,/"n_layer": 96,/' models/tiny/gpt-tiny.json > "$DEEP"
row "run: gpt-tiny x96 layers WS train, 32x32, detailed, 2 threads" $W run "$DEEP" --hw wse2 --mesh 32x32 --mode ws --phase train --seq 16 --fidelity detailed --threads 2
row "run: gpt-tiny x96 layers WS train, 32x32, fast, 2 threads" $W run "$DEEP" --hw wse2 --mesh 32x32 --mode ws --phase train --seq 16 --fidelity fast --threads 2
# gpt3-175b training step on a CS-2 (issue 4's 20 s target): weight streaming in 1024 micro-batches of one
# 2048-token sequence. Capped at 5 minutes and 12 GB of address space: today it reaches neither the end
# nor a bounded memory (see BENCHMARKS.md).
row "run: gpt3-175b train 1024x2048, cs2, WS (capped 300 s, 12 GB)" bash -c "ulimit -v 12000000; timeout 300 $W run gpt3-175b --hw cs2 --phase train --batch 1024 --seq 2048 --json || true"
