"""Shared fixtures: tiny random backbones of each family (built once per session) and store comparison."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

# One intra-op thread: on 2 shared cores, two torch threads contend with the reader/writer threads
# and with each other (a tiny side-network step went from 0.6 s to 55 s for 40 steps under load).
torch.set_num_threads(1)

from pipeline.backbones import make_tiny_backbone
from pipeline.cache.inspect import store_arrays  # noqa: F401 - tests import it from here


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-backbones")
    return {f: str(make_tiny_backbone(f, root / f)) for f in ("bert", "t5", "gpt2", "llama")}


def assert_same_store(a: str, b: str) -> None:
    xa, xb = store_arrays(a), store_arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)
