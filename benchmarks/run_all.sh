#!/usr/bin/env bash
# Runs every benchmark on this machine and keeps the JSON under benchmarks/results/<host-kind>/.
# Usage: bash benchmarks/run_all.sh [outdir]   (each `lst bench` prints one JSON line)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/cpu-2core}"
mkdir -p "$out"
run() { local name=$1; shift; echo "== $name" >&2; lst bench "$@" --json --no-progress | tail -n 1 > "$out/$name.json"; cat "$out/$name.json"; }
run extract extract
run memory memory
run memory_attn0 memory --attention-dropout 0
run train_minilm train --examples 20000
run train_mpnet train --backbone mpnet --examples 2000
run sweep sweep
