"""Long runs (`python -m pytest -m slow`; not in CI): the real default job at a real size."""

from __future__ import annotations

import pytest

from pipeline.extract.config import ExtractConfig
from pipeline.extract.runner import run_extract
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import train

pytestmark = pytest.mark.slow


def test_sst2_20k_one_epoch_cached_at_a_small_reader_budget(tmp_path):
    """20,000 SST-2 examples, one epoch from the cache at --reader-memory 128MB (bytes mode): the
    side network learns the task (earlier full runs: 0.85-0.87 dev accuracy after 1-3 epochs)."""
    cache = str(tmp_path / "sst2.zarr")
    run_extract(ExtractConfig(backbone="minilm", dataset="sst2", out=cache, max_examples=20000, progress=False))
    s = train(TrainConfig(cache=cache, out=str(tmp_path / "run"), epochs=1, reader_memory="128MB", progress=False))
    assert s["dev_score"] > 0.80, s
