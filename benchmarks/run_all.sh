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
# T5 encoder-decoder LST: a random model with T5-small's layout (no T5 weights can be downloaded)
t5dir="${TMPDIR:-/tmp}/lst-random-t5-small"
python -c "from pipeline.backbones.tiny import make_tiny_backbone; make_tiny_backbone('t5', '$t5dir', shape='t5-small')"
run train_t5small_random_labels train --backbone "$t5dir" --examples 2000 --label-words auto
run memory_t5small_random_labels memory --backbone "$t5dir" --label-words auto
