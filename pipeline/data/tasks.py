"""Named tasks (sst2, cola, mrpc, stsb, trec): where their files live, their fixed layout, and how to read them.

The files come from the offline data directory (``$LST_DATA_DIR``, default ``<repo>/../shared/data``; see
``shared/data/README.md`` for the file formats).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data.readers import Table, from_frame, read_delimited
from pipeline.errors import DatasetError

__all__ = ["NAMED_TASKS", "TaskSpec", "default_data_dir", "load_named", "named_task"]


@dataclass(frozen=True)
class TaskSpec:
    """Fixed layout of a named task: files per split, columns, label type and metric."""

    subdirs: tuple[str, ...]  # first existing one wins (lowercase documented layout, then GLUE's own dir name)
    files: dict[str, str]  # split -> file name (labeled splits only)
    text: str
    pair: str | None
    label: str
    force: str  # 'int' | 'float' | 'text' (string labels mapped through label_names)
    metric: str
    label_names: list[str] | None
    header_names: tuple[str, ...] | None = None  # for header-less files (CoLA)

    @property
    def columns(self) -> dict[str, str | None]:
        return {"text": self.text, "text_pair": self.pair, "label": self.label}


_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(("sst2", "SST-2"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence", None, "label",
                     "int", "accuracy", ["negative", "positive"]),
    "cola": TaskSpec(("cola", "CoLA"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence", None, "label",
                     "int", "matthews", ["unacceptable", "acceptable"],
                     header_names=("source", "label", "original_label", "sentence")),
    "mrpc": TaskSpec(("mrpc", "MRPC"), {"train": "train.tsv", "validation": "dev.tsv"}, "#1 String", "#2 String",
                     "Quality", "int", "f1", ["not_paraphrase", "paraphrase"]),
    "stsb": TaskSpec(("stsb", "STS-B"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence1", "sentence2",
                     "score", "float", "pearson_spearman", None),
    "trec": TaskSpec(("trec", "TREC"), {"train": "train_5500.label", "test": "TREC_10.label"}, "text", None, "coarse",
                     "text", "accuracy", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
}

NAMED_TASKS: tuple[str, ...] = tuple(_TASKS)


def default_data_dir() -> Path:
    """Directory holding the named tasks: ``$LST_DATA_DIR`` if set, else the ``shared/data`` folder next to the repo.

    The default is computed from this file's location (not the working directory) so that tests, CLI runs and DVC
    stages started from anywhere all find the same data.
    """
    env = os.environ.get("LST_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[3] / "shared" / "data"  # parents[3]: the folder holding the repo


def _data_dir_hint(data_dir: Path, explicit: bool) -> str:
    """Explain where named-task data was looked for, so a missing file points at the setting to change."""
    if explicit:
        return f"data_dir was passed as {data_dir} (LST_DATA_DIR is ignored when data_dir is given)"
    env = os.environ.get("LST_DATA_DIR")
    if env:
        return f"LST_DATA_DIR points to {data_dir}"
    return f"LST_DATA_DIR is not set, so the default data dir {data_dir} was used; set LST_DATA_DIR to change it"


def named_task(spec: str) -> str | None:
    """The named task a spec refers to ('SST-2', 'sts_b', ... are accepted), or None if it names none."""
    task = spec.strip().lower().replace("-", "").replace("_", "")
    return task if task in _TASKS else None


def _read_trec(path: Path) -> Table:
    """TREC ``COARSE:fine question`` lines, latin-1; the coarse label is kept (the 6-class task)."""
    try:
        raw = path.read_bytes().decode("latin-1")
    except OSError as e:
        raise DatasetError(f"could not read {path}: {e}") from None
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    coarse, fine, text = [], [], []
    for i, line in enumerate(lines):
        line = line.rstrip("\r")
        head, sep, question = line.partition(" ")
        c, colon, f = head.partition(":")
        if not sep or not colon or not c:
            raise DatasetError(f"{path}, row {i}: expected 'COARSE:fine question text', got {line[:80]!r}")
        coarse.append(c)
        fine.append(f)
        text.append(question)
    df = pd.DataFrame({"coarse": coarse, "fine": fine, "text": text})
    return from_frame(df, path)


def load_named(task: str, data_dir: Path, explicit_dir: bool) -> tuple[dict[str, Table], TaskSpec]:
    """Read every split file of ``task`` (a name from :data:`NAMED_TASKS`) from ``data_dir``."""
    spec = _TASKS[task]
    base = next((data_dir / d for d in spec.subdirs if (data_dir / d).is_dir()), data_dir / spec.subdirs[0])
    tables: dict[str, Table] = {}
    for split, fname in spec.files.items():
        path = (base / fname).resolve()
        if not path.is_file():
            raise DatasetError(
                f"{task}: missing data file {path} (split {split!r}); {_data_dir_hint(data_dir, explicit_dir)}. "
                f"See shared/data/README.md for the expected layout"
            )
        if task == "trec":
            tables[split] = _read_trec(path)
        else:
            tables[split] = read_delimited(path, "\t", csv.QUOTE_NONE, spec.header_names)
    return tables, spec
