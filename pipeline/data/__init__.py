"""Datasets: named GLUE-style tasks and user files turned into labelled text splits.

Modules, one job each: :mod:`~pipeline.data.loader` (the :func:`load_dataset` entry point, column resolution, dev
carving), :mod:`~pipeline.data.readers` (CSV/TSV/JSONL/Parquet files), :mod:`~pipeline.data.hf_dir` (Hugging Face
``save_to_disk`` directories), :mod:`~pipeline.data.labels` (label inference and id mapping),
:mod:`~pipeline.data.tasks` (the named tasks and their data directory), :mod:`~pipeline.data.splits` (split names and
split specs) and :mod:`~pipeline.data.rows` (row numbers in error messages).
"""

from pipeline.data.loader import DatasetBundle, SplitData, load_dataset, sha256_path
from pipeline.data.splits import SPLIT_NAMES
from pipeline.data.tasks import NAMED_TASKS, default_data_dir
from pipeline.errors import DatasetError

__all__ = [
    "DatasetError",
    "SplitData",
    "DatasetBundle",
    "NAMED_TASKS",
    "SPLIT_NAMES",
    "default_data_dir",
    "load_dataset",
    "sha256_path",
]
