"""Dataset loading for stage one (extraction): :func:`load_dataset` turns a user's dataset *spec* into plain,
validated, deterministic Python/numpy data.

A spec is one of:

* a named task (``sst2``, ``cola``, ``mrpc``, ``stsb``, ``trec``; see :mod:`pipeline.data.tasks`),
* one file (``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``; see :mod:`pipeline.data.readers`) that becomes
  the train split,
* ``train=a.csv,validation=b.csv[,test=c.csv]``: one file per split (see :mod:`pipeline.data.splits`),
* a local Hugging Face ``datasets`` directory written by ``save_to_disk`` (see :mod:`pipeline.data.hf_dir`).

Every problem a user can cause (missing file, missing column, blank text, bad label, ...) raises
:class:`DatasetError` with a message that says what is wrong and how to fix it, because a stack trace from deep inside
pandas after minutes of model loading is the worst way to learn that a column is called ``sentence``, not ``text``.

Determinism matters because the activation cache is keyed by what was loaded: the same spec, seed and data always give
the same examples in the same order, and ``source_rows`` ties every example back to its row in the source file.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.hf_dir import is_hf_dataset_dir, read_hf_dir
from pipeline.data.labels import RawLabels, convert_labels
from pipeline.data.readers import SUPPORTED_EXTENSIONS, Table, read_file
from pipeline.data.rows import ROWS_MEANING, rows_text
from pipeline.data.splits import canonical_split, parse_split_spec, split_order
from pipeline.data.tasks import NAMED_TASKS, default_data_dir, load_named, named_task
from pipeline.errors import DatasetError

__all__ = ["DatasetBundle", "SplitData", "load_dataset", "sha256_path"]


@dataclass
class SplitData:
    """One split, ready to tokenize.

    ``source_rows`` keeps each example's row index in its source file (0-based data rows, header excluded), so that
    after dev carving or truncation every cached example can still be traced back to the line it came from.
    """

    texts: list[str]
    text_pairs: list[str] | None  # second segment for pair tasks (MRPC, STS-B), else None
    labels: np.ndarray  # int64 class ids, or float32 for regression
    source_rows: np.ndarray  # int64: row index of each example in its source file (data rows, header excluded)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> SplitData:
        """Return the examples at positions ``idx`` (in that order); used for carving and truncation."""
        idx = np.asarray(idx, dtype=np.int64)
        return SplitData(
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=self.labels[idx],
            source_rows=self.source_rows[idx],
        )


@dataclass
class DatasetBundle:
    """Everything stage one needs to know about a dataset: examples per split, task type, and provenance."""

    name: str  # 'sst2', or the file stem / dir name for custom data
    task_type: str  # 'classification' | 'regression'
    metric: str  # 'accuracy' | 'f1' (mrpc) | 'matthews' (cola) | 'pearson_spearman' (stsb, custom regression)
    label_names: list[str] | None  # index -> original label string (string labels and named tasks), None for regression
    splits: dict[str, SplitData]  # canonical split names: 'train', 'validation', 'test'
    files: dict[str, str]  # split -> absolute path of the file (or HF split directory) it came from
    columns: dict[str, str | None]  # {'text': ..., 'text_pair': ..., 'label': ...}
    dev_carve: dict | None  # when validation was carved from train: {'from': 'train', 'fraction', 'seed', 'n'}
    notes: list[str] = field(default_factory=list)  # non-fatal facts worth logging (e.g. an unlabeled split skipped)

    def num_labels(self) -> int:
        """Width of the task head: 1 for regression, else the number of classes."""
        if self.task_type == "regression":
            return 1
        if self.label_names is not None:
            return len(self.label_names)
        top = [int(s.labels.max()) for s in self.splits.values() if len(s.labels)]
        return (max(top) + 1) if top else 0


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory (sorted relative names + contents of every file under it).

    ``DatasetBundle.files`` holds files for CSV/TSV/JSONL/Parquet/named tasks and, for HF ``save_to_disk`` splits with
    several Arrow shards, the split directory; this one helper fingerprints both the same way everywhere.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            h.update(sha256_path(f).encode())
        return h.hexdigest()
    raise DatasetError(f"cannot fingerprint {p}: no such file or directory")


# ----------------------------------------------------------------------------------------------------------------------
# Custom data: reading the spec, dropping unlabeled HF splits, resolving columns
# ----------------------------------------------------------------------------------------------------------------------


def _read_custom(spec: str) -> tuple[dict[str, Table], str, Path | None]:
    """Read a file, split spec or save_to_disk directory -> (tables per split, dataset name, HF root dir or None)."""
    split_files = parse_split_spec(spec)
    path = Path(spec).expanduser()
    if split_files is not None:
        tables = {s: read_file(p) for s, p in split_files.items()}
        return tables, (split_files.get("train") or next(iter(split_files.values()))).stem, None
    if path.is_file():
        return {"train": read_file(path.resolve())}, path.stem, None
    if path.is_dir():
        root = path.resolve()
        if not is_hf_dataset_dir(root):
            raise DatasetError(
                f"{root} is a directory but not a Hugging Face datasets directory (no dataset_dict.json, "
                "state.json or dataset_info.json); pass a data file or a save_to_disk directory"
            )
        return read_hf_dir(root), root.name, root
    raise DatasetError(
        f"unknown dataset {spec!r}: not a named task ({', '.join(NAMED_TASKS)}), not an existing file "
        f"({', '.join(SUPPORTED_EXTENSIONS)}), not a save_to_disk directory, and not a split spec like "
        "'train=a.csv,validation=b.csv'"
    )


def _is_unlabeled(t: Table, label: str) -> bool:
    """An HF split with no label column, or only None/-1 labels (GLUE test splits), carries no supervision."""
    if label not in t.columns:
        return True
    s = t.get(label)
    if len(s) == 0:
        return False
    if s.isna().all():
        return True
    return bool(pd.api.types.is_numeric_dtype(s) and (s == -1).all())


def _drop_unlabeled_splits(
    tables: dict[str, Table], root: Path, label_column: str | None, want: list[str] | None, notes: list[str]
) -> None:
    """HF dicts often ship unlabeled test splits (label -1); skip those (with a note) unless explicitly requested."""
    lab = label_column or next((c for c in ("label", "labels") if any(c in t.columns for t in tables.values())), None)
    if lab is not None:
        for s in [s for s, t in tables.items() if _is_unlabeled(t, lab)]:
            if want is not None and s in want:
                raise DatasetError(f"split {s!r} of {root} has no labels (column {lab!r} missing or all -1)")
            notes.append(f"skipped split {s!r}: no labels in column {lab!r}")
            del tables[s]
    if not tables:
        raise DatasetError(f"{root} has no labeled split")


def _column_option(arg: str, value: str = "NAME") -> str:
    """How a user names a column: the `lst extract` flag, and the keyword for callers of the library."""
    return f"--{arg.replace('_', '-')} {value} ({arg}={value} from Python)"


def _resolve_columns(
    tables: dict[str, Table],
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
) -> dict[str, str | None]:
    """Pick the text/pair/label columns (explicit, else conventional defaults) and check every split has them."""
    first = tables.get("train") or next(iter(tables.values()))
    cols = first.columns

    def missing(what: str, arg: str, tried: str) -> DatasetError:
        return DatasetError(
            f"{first.path} has no {what} column ({tried}); its columns are {cols}. Name one with "
            f"{_column_option(arg)}"
        )

    text, pair = text_column, text_pair_column
    if text is None:
        if "text" in cols:
            text = "text"
        elif "sentence" in cols:
            text = "sentence"
        elif "sentence1" in cols and "sentence2" in cols and pair is None:
            text, pair = "sentence1", "sentence2"  # GLUE-style pair files
        else:
            raise missing("text", "text_column", "looked for 'text' or 'sentence'")
    label = label_column
    if label is None:
        label = next((c for c in ("label", "labels") if c in cols), None)
        if label is None:
            raise missing("label", "label_column", "looked for 'label' or 'labels'")
    if len({text, pair, label} - {None}) < (3 if pair else 2):
        raise DatasetError(f"text, text pair and label columns must differ, got text={text!r}, text_pair={pair!r}, label={label!r}")
    columns = {"text": text, "text_pair": pair, "label": label}
    _check_columns(tables, columns)
    return columns


def _check_columns(tables: dict[str, Table], columns: dict[str, str | None]) -> None:
    """Every split must have every chosen column."""
    for split, t in tables.items():
        for role, c in (("text", columns["text"]), ("text pair", columns["text_pair"]), ("label", columns["label"])):
            if c is not None and c not in t.columns:
                raise DatasetError(
                    f"split {split!r} ({t.path}) has no {role} column {c!r}; its columns are {t.columns}"
                    + (". Every split must be labeled" if role == "label" else "")
                )


# ----------------------------------------------------------------------------------------------------------------------
# Tables -> checked splits, dev carving
# ----------------------------------------------------------------------------------------------------------------------


def _texts(series: pd.Series, rows: np.ndarray, split: str, path: str, column: str) -> list[str]:
    """Return texts as ``str``; refuse empty/whitespace-only/missing ones, which would tokenize to nothing."""
    s = series
    if not (pd.api.types.is_string_dtype(s) and not pd.api.types.is_object_dtype(s)):
        s = s.astype(object).map(
            lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else (v if isinstance(v, str) else str(v))
        )
    missing = s.isna().to_numpy()
    blank = missing | s.fillna("").str.strip().eq("").to_numpy()
    if blank.any():
        bad = rows[blank]
        raise DatasetError(
            f"{len(bad)} example(s) in split {split!r} ({path}) have an empty, whitespace-only or missing "
            f"{column!r} text at rows {rows_text(bad)} ({ROWS_MEANING}); remove or fill those rows"
        )
    return s.tolist()


def _carve_dev(data: dict[str, SplitData], files: dict[str, str], dev_fraction: float, seed: int) -> dict | None:
    """Carve validation from train when there is none: seeded, deterministic, rows removed from train (in place)."""
    if "validation" in data or "train" not in data or not dev_fraction > 0:
        return None
    train = data["train"]
    n = len(train)
    if n < 2:
        raise DatasetError(f"cannot carve a validation split from {n} train example(s); provide a validation file")
    n_dev = min(max(1, int(round(n * dev_fraction))), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    dev_idx, train_idx = np.sort(perm[:n_dev]), np.sort(perm[n_dev:])
    data["validation"], data["train"] = train.take(dev_idx), train.take(train_idx)
    files["validation"] = files["train"]
    return {"from": "train", "fraction": float(dev_fraction), "seed": int(seed), "n": int(n_dev)}


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------------


def load_dataset(
    spec: str,
    *,
    data_dir: str | Path | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    splits: list[str] | None = None,
    max_examples: int | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetBundle:
    """Load a dataset spec into a validated :class:`DatasetBundle`.

    ``spec`` is a named task (see :data:`NAMED_TASKS`), a data file (the train split), ``train=a,validation=b[,test=c]``,
    or a ``save_to_disk`` directory. If there is no validation split, a seeded random ``dev_fraction`` of train is
    carved off (``dev_fraction=0`` disables carving). ``splits`` restricts the returned splits (carving and the label
    mapping still see every split, so ids and train rows do not depend on which splits were asked for);
    ``max_examples`` keeps the first N examples of each split after carving.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"dataset spec must be a non-empty string, got {spec!r}; named tasks: {', '.join(NAMED_TASKS)}")
    if not (0.0 <= float(dev_fraction) < 1.0):
        raise DatasetError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, (int, np.integer)) or max_examples < 1):
        raise DatasetError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    want: list[str] | None = None
    if splits is not None:
        if isinstance(splits, str):
            splits = [splits]
        want = []
        for s in splits:
            canon = canonical_split(str(s).strip())
            if canon not in want:
                want.append(canon)

    explicit_dir = data_dir is not None
    ddir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    notes: list[str] = []

    task = named_task(spec)
    if task is not None:
        tables, tspec = load_named(task, ddir, explicit_dir)
        columns = tspec.columns
        for arg, role in ((text_column, "text"), (text_pair_column, "text_pair"), (label_column, "label")):
            if arg is not None and arg != columns[role]:
                raise DatasetError(
                    f"columns of the named task {task!r} are fixed ({columns}); drop "
                    f"{_column_option(f'{role}_column', repr(arg))}, or load the file as a custom dataset instead"
                )
        _check_columns(tables, columns)
        name, force, fixed_names, metric = task, tspec.force, tspec.label_names, tspec.metric
    else:
        tables, name, hf_root = _read_custom(spec)
        if hf_root is not None:
            _drop_unlabeled_splits(tables, hf_root, label_column, want, notes)
        columns = _resolve_columns(tables, text_column, text_pair_column, label_column)
        force, metric = None, None
        fixed_names = next((t.label_names[columns["label"]] for t in tables.values() if columns["label"] in t.label_names), None)

    # Check every split is non-empty, texts are real text, then convert labels with one shared mapping.
    texts: dict[str, tuple[list[str], list[str] | None]] = {}
    raw: dict[str, RawLabels] = {}
    for split, t in tables.items():
        if t.nrows == 0:
            raise DatasetError(f"split {split!r} ({t.path}) has no examples; it has a header (columns {t.columns}) but no data rows")
        rows = np.arange(t.nrows, dtype=np.int64)
        texts[split] = (
            _texts(t.get(columns["text"]), rows, split, t.path, columns["text"]),
            _texts(t.get(columns["text_pair"]), rows, split, t.path, columns["text_pair"]) if columns["text_pair"] else None,
        )
        raw[split] = RawLabels(t.get(columns["label"]), rows, t.path)
    labels, task_type, label_names = convert_labels(raw, columns["label"], force, fixed_names)
    if metric is None:
        metric = "pearson_spearman" if task_type == "regression" else "accuracy"
    if task_type == "regression":
        label_names = None

    data = {s: SplitData(*texts[s], labels[s], r.rows) for s, r in raw.items()}
    files = {s: r.path for s, r in raw.items()}
    dev_carve = _carve_dev(data, files, dev_fraction, seed)

    if want is not None:
        unknown = [s for s in want if s not in data]
        if unknown:
            raise DatasetError(f"split(s) {unknown} not available for {name!r}; available: {sorted(data, key=split_order)}")
        data = {s: data[s] for s in want}
        files = {s: files[s] for s in want}
    else:
        data = {s: data[s] for s in sorted(data, key=split_order)}
        files = {s: files[s] for s in data}

    if max_examples is not None:
        data = {s: (d.take(np.arange(max_examples)) if len(d) > max_examples else d) for s, d in data.items()}

    return DatasetBundle(
        name=name,
        task_type=task_type,
        metric=metric,
        label_names=label_names,
        splits=data,
        files=files,
        columns=columns,
        dev_carve=dev_carve,
        notes=notes,
    )
