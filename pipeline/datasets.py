"""Dataset loading for stage one (extraction).

Stage one tokenizes every example up front and the cache fingerprint records which files the examples came from, so
this module's job is to turn a user's dataset *spec* into plain, validated, deterministic Python/numpy data:

* a named task (``sst2``, ``cola``, ``mrpc``, ``stsb``, ``trec``) read from the offline data directory
  (``$LST_DATA_DIR``, default ``<repo>/../shared/data``; see ``shared/data/README.md`` for the file formats),
* one file (``.csv``, ``.tsv``, ``.jsonl``/``.json``, ``.parquet``) that becomes the train split,
* ``train=a.csv,validation=b.csv[,test=c.csv]``: one file per split,
* a local Hugging Face ``datasets`` directory written by ``save_to_disk`` (read with ``datasets`` when it is
  importable, otherwise straight from the Arrow stream files with pyarrow, so ``datasets`` is never a dependency).

Every problem a user can cause (missing file, missing column, blank text, bad label, ...) raises
:class:`DatasetError` with a message that says what is wrong and how to fix it, because a stack trace from deep inside
pandas after minutes of model loading is the worst way to learn that a column is called ``sentence``, not ``text``.

Determinism matters because the activation cache is keyed by what was loaded: the same spec, seed and data always give
the same examples in the same order, and ``source_rows`` ties every example back to its row in the source file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

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

NAMED_TASKS: tuple[str, ...] = ("sst2", "cola", "mrpc", "stsb", "trec")
SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

# Split-name aliases accepted in split specs and HF dataset dicts; everything maps onto the canonical three names so
# that downstream code (cache layout, training loop) only ever sees 'train' / 'validation' / 'test'.
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validation": "validation",
    "dev": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}

# How many row numbers an error message shows before saying "...": enough to find the pattern, short enough to read.
_MAX_ROWS_IN_MESSAGE = 10


class DatasetError(ValueError):
    """Bad dataset input; message says what is wrong and how to fix it."""


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


# ----------------------------------------------------------------------------------------------------------------------
# Data directory and small helpers
# ----------------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Directory holding the named tasks: ``$LST_DATA_DIR`` if set, else the ``shared/data`` folder next to the repo.

    The default is computed from this file's location (not the working directory) so that tests, CLI runs and DVC
    stages started from anywhere all find the same data.
    """
    env = os.environ.get("LST_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "data"


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


def _rows_text(rows: np.ndarray | list[int]) -> str:
    """Format row numbers for an error message: the first few, and how many more."""
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
    more = len(rows) - _MAX_ROWS_IN_MESSAGE
    return f"[{shown}{', ...' if more > 0 else ''}]" + (f" ({more} more)" if more > 0 else "")


_ROWS_MEANING = "rows are 0-based data rows of the file, header excluded"


def _data_dir_hint(data_dir: Path, explicit: bool) -> str:
    """Explain where named-task data was looked for, so a missing file points at the setting to change."""
    if explicit:
        return f"data_dir was passed as {data_dir} (LST_DATA_DIR is ignored when data_dir is given)"
    env = os.environ.get("LST_DATA_DIR")
    if env:
        return f"LST_DATA_DIR points to {data_dir}"
    return f"LST_DATA_DIR is not set, so the default data dir {data_dir} was used; set LST_DATA_DIR to change it"


# ----------------------------------------------------------------------------------------------------------------------
# Raw tables: a uniform view over CSV/TSV/JSONL/Parquet/Arrow so the validation code is written once
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Column names plus a lazy column getter; lazy so wide Parquet/Arrow files only decode the columns used."""

    path: str  # absolute path recorded in DatasetBundle.files
    columns: list[str]
    nrows: int
    get: Callable[[str], pd.Series]
    label_names: dict[str, list[str]] = field(default_factory=dict)  # HF ClassLabel names per column, if known


def _from_frame(df: pd.DataFrame, path: Path) -> _Table:
    cols = [str(c) for c in df.columns]
    df.columns = cols
    return _Table(str(path), cols, len(df), lambda c: df[c])


def _read_delimited(path: Path, sep: str, quoting: int) -> _Table:
    """Read CSV/TSV as strings only; label types are inferred later, uniformly for every format.

    ``keep_default_na=False`` keeps texts such as 'null' or 'NA' as text; ``index_col=False`` stops pandas from
    silently turning the first column into the index when rows end with a trailing delimiter; ``utf-8-sig`` drops a
    leading BOM (GLUE's MRPC header starts with one) so the first column name matches what the user typed.
    """
    try:
        df = pd.read_csv(
            path,
            sep=sep,
            quoting=quoting,
            dtype=str,
            keep_default_na=False,
            index_col=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path} is empty: expected a header row naming the columns, then one example per row") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not valid UTF-8 ({e}); re-save it as UTF-8") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        hint = (
            "TSV files are read without quote handling (csv.QUOTE_NONE), so every row needs exactly one field per "
            "header column: check for tabs inside the text"
            if sep == "\t"
            else "check for unbalanced double quotes or a wrong number of commas in that line"
        )
        raise DatasetError(f"could not parse {path}: {e}. {hint}") from None
    return _from_frame(df, path)


def _read_json_records(path: Path) -> _Table:
    """Read JSON Lines (one object per line) or a JSON array of objects, keeping native value types.

    Parsed by hand rather than with ``pandas.read_json`` because pandas guesses dtypes (dates, numbers in text
    columns) and reports bad lines without their number.
    """
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not valid UTF-8 ({e}); re-save it as UTF-8") from None
    records: list[Any]
    if raw.lstrip().startswith("["):
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(f"could not parse {path} as a JSON array: {e}") from None
        where = [f"item {i}" for i in range(len(records))]
    else:
        records, where = [], []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) are not examples
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"could not parse line {lineno} of {path} as JSON ({e}); a .jsonl file needs one JSON object per line"
                ) from None
            where.append(f"line {lineno}")
    if not records:
        raise DatasetError(f"{path} holds no records: expected one JSON object per line")
    columns: dict[str, None] = {}
    for rec, w in zip(records, where):
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}, {w}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got {type(rec).__name__}")
        for k in rec:
            columns.setdefault(str(k), None)
    cols = list(columns)

    def get(c: str) -> pd.Series:
        # A record without the key gives None, which the text/label checks report as missing with its row number.
        return pd.Series([rec.get(c) for rec in records], dtype=object)

    return _Table(str(path), cols, len(records), get)


def _read_parquet(path: Path) -> _Table:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
        raise DatasetError(f"could not read {path} as Parquet: {e}") from None
    cols = list(pf.schema_arrow.names)
    nrows = pf.metadata.num_rows

    def get(c: str) -> pd.Series:
        return pf.read(columns=[c]).column(0).to_pandas()

    return _Table(str(path), cols, nrows, get)


def _read_file(path: Path) -> _Table:
    """Dispatch on extension; the extension (not content sniffing) decides so behaviour is predictable."""
    if not path.exists():
        raise DatasetError(f"data file not found: {path}")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    ext = path.suffix.lower()
    if ext == ".csv":
        return _read_delimited(path, ",", csv.QUOTE_MINIMAL)
    if ext == ".tsv":
        return _read_delimited(path, "\t", csv.QUOTE_NONE)
    if ext in (".jsonl", ".json"):
        return _read_json_records(path)
    if ext == ".parquet":
        return _read_parquet(path)
    raise DatasetError(
        f"unsupported file extension {ext or '(none)'!r} for {path}; supported: {', '.join(SUPPORTED_EXTENSIONS)} "
        "(or a directory written by datasets' save_to_disk)"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face save_to_disk directories
# ----------------------------------------------------------------------------------------------------------------------


def _is_hf_dataset_dir(p: Path) -> bool:
    return (p / "state.json").is_file() or (p / "dataset_info.json").is_file()


def _classlabel_names(info_path: Path) -> dict[str, list[str]]:
    """ClassLabel names from dataset_info.json, so HF label ids keep their human-readable names."""
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    out: dict[str, list[str]] = {}
    for col, feat in (info.get("features") or {}).items():
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names"):
            out[col] = [str(n) for n in feat["names"]]
    return out


def _read_hf_split_pyarrow(split_dir: Path) -> _Table:
    """Read one ``save_to_disk`` Dataset directory from its Arrow stream files, listed in state.json."""
    import pyarrow as pa

    state_path = split_dir / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        files = [split_dir / f["filename"] for f in state["_data_files"]]
    except FileNotFoundError:
        files = sorted(split_dir.glob("data-*.arrow"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{state_path} is not a valid datasets state file ({e}); re-save the dataset with save_to_disk") from None
    if not files:
        raise DatasetError(f"{split_dir} has no data-*.arrow files; re-save the dataset with save_to_disk")
    tables = []
    for f in files:
        if not f.is_file():
            raise DatasetError(f"{split_dir}: state.json lists {f.name}, which does not exist")
        try:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        except pa.ArrowInvalid:
            try:  # older/other writers use the Arrow file (random access) format
                with pa.memory_map(str(f)) as src:
                    tables.append(pa.ipc.open_file(src).read_all())
            except Exception as e:
                raise DatasetError(f"could not read Arrow data {f}: {e}") from None
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    path = files[0] if len(files) == 1 else split_dir
    return _Table(
        str(Path(path).resolve()),
        list(table.column_names),
        table.num_rows,
        lambda c: table.column(c).to_pandas(),
        _classlabel_names(split_dir / "dataset_info.json"),
    )


def _read_hf_split_datasets(ds: Any, split_dir: Path) -> _Table:
    """Wrap a ``datasets.Dataset`` (used only when the ``datasets`` package happens to be installed)."""
    names: dict[str, list[str]] = {}
    for col, feat in ds.features.items():
        if getattr(feat, "names", None):
            names[col] = [str(n) for n in feat.names]
    files = sorted(split_dir.glob("data-*.arrow"))
    path = files[0] if len(files) == 1 else split_dir
    return _Table(
        str(Path(path).resolve()),
        list(ds.column_names),
        len(ds),
        lambda c: pd.Series(list(ds[c])),
        names,
    )


def _read_hf_dir(root: Path) -> dict[str, _Table]:
    """Read a DatasetDict dir (dataset_dict.json) or a single Dataset dir (state.json / dataset_info.json)."""
    is_dict = (root / "dataset_dict.json").is_file()
    if is_dict:
        try:
            split_names = [str(s) for s in json.loads((root / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{root / 'dataset_dict.json'} is not valid ({e}); re-save the dataset with save_to_disk") from None
        split_dirs = {s: root / s for s in split_names}
        for s, d in split_dirs.items():
            if not d.is_dir():
                raise DatasetError(f"{root}: dataset_dict.json lists split {s!r} but {d} does not exist")
    else:
        split_dirs = {"train": root}

    try:
        import datasets as hf_datasets  # optional: never a dependency of this project
    except ImportError:
        hf_datasets = None

    tables: dict[str, _Table] = {}
    if hf_datasets is not None:
        try:
            loaded = hf_datasets.load_from_disk(str(root))
        except Exception as e:
            raise DatasetError(f"datasets.load_from_disk could not read {root}: {e}") from None
        if is_dict:
            for s, d in split_dirs.items():
                tables[s] = _read_hf_split_datasets(loaded[s], d)
        else:
            tables["train"] = _read_hf_split_datasets(loaded, root)
    else:
        for s, d in split_dirs.items():
            tables[s] = _read_hf_split_pyarrow(d)

    out: dict[str, _Table] = {}
    for s, t in tables.items():
        canon = _SPLIT_ALIASES.get(s.lower(), s)
        if canon in out:
            raise DatasetError(f"{root}: splits {s!r} and another split both map to {canon!r}; rename one of them")
        out[canon] = t
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Text and label conversion
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
            f"{column!r} text at rows {_rows_text(bad)} ({_ROWS_MEANING}); remove or fill those rows"
        )
    return s.tolist()


_MISSING, _NUM, _TEXT, _BAD = 0, 1, 2, 3


def _classify_label(v: Any) -> tuple[int, Any, bool]:
    """Classify one raw label value -> (kind, value, is_bool). Called once per *unique* value, so speed is moot."""
    if v is None:
        return _MISSING, None, False
    if isinstance(v, (bool, np.bool_)):
        return _NUM, float(v), True
    if isinstance(v, (int, np.integer)):
        return _NUM, float(v), False
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return _MISSING, None, False
        return (_NUM, float(v), False) if math.isfinite(v) else (_BAD, v, False)
    if isinstance(v, str):
        t = v.strip()
        if not t:
            return _MISSING, None, False
        try:
            x = float(t)
        except ValueError:
            return _TEXT, t, False
        return (_NUM, x, False) if math.isfinite(x) else (_BAD, t, False)
    return _BAD, v, False


@dataclass
class _ParsedLabels:
    kind: np.ndarray  # int8 per row: _MISSING/_NUM/_TEXT/_BAD
    num: np.ndarray  # float64 per row (NaN where not numeric)
    text: np.ndarray  # object per row (stripped string where _TEXT)
    all_bool: bool


def _parse_labels(series: pd.Series) -> _ParsedLabels:
    """Classify raw labels, factorizing first: labels have few distinct values, so this stays fast at any size."""
    n = len(series)
    if pd.api.types.is_bool_dtype(series) and not series.isna().any():
        return _ParsedLabels(np.full(n, _NUM, np.int8), series.to_numpy(dtype=np.float64), np.empty(n, object), True)
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        num = series.to_numpy(dtype=np.float64, na_value=np.nan)
        kind = np.where(np.isnan(num), _MISSING, np.where(np.isfinite(num), _NUM, _BAD)).astype(np.int8)
        return _ParsedLabels(kind, num, np.empty(n, object), False)
    codes, uniques = pd.factorize(series.astype(object), use_na_sentinel=True)
    cls = [_classify_label(u) for u in uniques]
    u_kind = np.array([c[0] for c in cls] + [_MISSING], dtype=np.int8)  # index -1 -> the NA sentinel
    u_num = np.array([c[1] if c[0] == _NUM else np.nan for c in cls] + [np.nan], dtype=np.float64)
    u_text = np.array([c[1] if c[0] == _TEXT else None for c in cls] + [None], dtype=object)
    used_num = [c for c in cls if c[0] == _NUM]
    all_bool = bool(used_num) and all(c[2] for c in used_num)
    return _ParsedLabels(u_kind[codes], u_num[codes], u_text[codes], all_bool)


@dataclass
class _RawSplit:
    """One split before label conversion: checked texts, the raw label column, and where each row came from."""

    texts: list[str]
    pairs: list[str] | None
    labels: pd.Series
    rows: np.ndarray
    path: str


def _convert_labels(
    raw: dict[str, _RawSplit],
    column: str,
    force: str | None,
    fixed_names: list[str] | None,
) -> tuple[dict[str, np.ndarray], str, list[str] | None]:
    """Turn raw label columns of all splits into ids/floats with *one* shared mapping.

    The mapping is decided over all splits together so a class id means the same thing in train, validation and
    test. ``force`` is 'int' / 'float' / 'text' (names fixed by the task) for named tasks; None infers it:
    strings -> sorted class names, booleans -> 0/1, integral numbers -> int64, any fractional value -> regression.
    """
    parsed = {s: _parse_labels(r.labels) for s, r in raw.items()}

    for s, p in parsed.items():
        bad = (p.kind == _MISSING) | (p.kind == _BAD)
        if bad.any():
            rows = raw[s].rows[bad]
            raise DatasetError(
                f"{len(rows)} example(s) in split {s!r} ({raw[s].path}) have a missing or unparseable {column!r} label "
                f"at rows {_rows_text(rows)} ({_ROWS_MEANING}); fix or remove those rows"
            )

    n_num = sum(int((p.kind == _NUM).sum()) for p in parsed.values())
    n_text = sum(int((p.kind == _TEXT).sum()) for p in parsed.values())

    def _rows_of(kind: int) -> str:
        parts = []
        for s, p in parsed.items():
            m = p.kind == kind
            if m.any():
                parts.append(f"split {s!r} ({raw[s].path}) rows {_rows_text(raw[s].rows[m])}")
        return "; ".join(parts)

    if force == "text":  # class names are fixed by the task (TREC): map them, refuse unknown ones
        assert fixed_names is not None
        index = {n: i for i, n in enumerate(fixed_names)}
        out = {}
        for s, p in parsed.items():
            unknown = np.array([p.kind[i] != _TEXT or p.text[i] not in index for i in range(len(p.kind))], dtype=bool)
            if unknown.any():
                raise DatasetError(
                    f"{int(unknown.sum())} label(s) in split {s!r} ({raw[s].path}) are not one of {fixed_names} at rows "
                    f"{_rows_text(raw[s].rows[unknown])} ({_ROWS_MEANING})"
                )
            out[s] = np.fromiter((index[t] for t in p.text), dtype=np.int64, count=len(p.text))
        return out, "classification", list(fixed_names)

    if force is not None and n_text:
        raise DatasetError(
            f"label column {column!r} must be numeric for this task, but {n_text} label(s) are not numbers: "
            f"{_rows_of(_TEXT)} ({_ROWS_MEANING})"
        )
    if n_num and n_text:
        minority, what = (_TEXT, "text") if n_text <= n_num else (_NUM, "numbers")
        raise DatasetError(
            f"label column {column!r} mixes numbers and text labels; {min(n_num, n_text)} label(s) are {what}: "
            f"{_rows_of(minority)} ({_ROWS_MEANING}). Make every label a class name or every label a number"
        )

    if n_text:  # string classes
        names = sorted({str(t) for p in parsed.values() for t in p.text[p.kind == _TEXT]})
        index = {n: i for i, n in enumerate(names)}
        out = {s: np.fromiter((index[t] for t in p.text), dtype=np.int64, count=len(p.text)) for s, p in parsed.items()}
        return out, "classification", names

    all_num = np.concatenate([p.num for p in parsed.values()]) if parsed else np.empty(0)
    integral = bool(np.all(np.abs(all_num) < 2**53) and np.all(all_num == np.round(all_num)))

    if force == "float" or (force is None and not integral):
        return {s: p.num.astype(np.float32) for s, p in parsed.items()}, "regression", None

    if not integral:  # force == 'int'
        parts = []
        for s, p in parsed.items():
            m = p.num != np.round(p.num)
            if m.any():
                parts.append(f"split {s!r} rows {_rows_text(raw[s].rows[m])}")
        raise DatasetError(f"label column {column!r} must hold integer class ids, but some are fractional: {'; '.join(parts)}")

    out = {s: p.num.astype(np.int64) for s, p in parsed.items()}
    for s, y in out.items():
        neg = y < 0
        if neg.any():
            raise DatasetError(
                f"{int(neg.sum())} label(s) in split {s!r} ({raw[s].path}) are negative class ids at rows "
                f"{_rows_text(raw[s].rows[neg])} ({_ROWS_MEANING}); class ids must be 0..K-1 "
                "(GLUE-style -1 means 'unlabeled': drop those rows or that split)"
            )
    names = fixed_names
    if names is None and all(p.all_bool for p in parsed.values() if len(p.kind)):
        names = ["False", "True"]
    if names is not None:
        for s, y in out.items():
            over = y >= len(names)
            if over.any():
                raise DatasetError(
                    f"label(s) in split {s!r} ({raw[s].path}) at rows {_rows_text(raw[s].rows[over])} are >= the "
                    f"{len(names)} known classes {names}"
                )
    return out, "classification", names


# ----------------------------------------------------------------------------------------------------------------------
# Named tasks
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TaskSpec:
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


_TASKS: dict[str, _TaskSpec] = {
    "sst2": _TaskSpec(("sst2", "SST-2"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence", None, "label",
                      "int", "accuracy", ["negative", "positive"]),
    "cola": _TaskSpec(("cola", "CoLA"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence", None, "label",
                      "int", "matthews", ["unacceptable", "acceptable"],
                      header_names=("source", "label", "original_label", "sentence")),
    "mrpc": _TaskSpec(("mrpc", "MRPC"), {"train": "train.tsv", "validation": "dev.tsv"}, "#1 String", "#2 String",
                      "Quality", "int", "f1", ["not_paraphrase", "paraphrase"]),
    "stsb": _TaskSpec(("stsb", "STS-B"), {"train": "train.tsv", "validation": "dev.tsv"}, "sentence1", "sentence2",
                      "score", "float", "pearson_spearman", None),
    "trec": _TaskSpec(("trec", "TREC"), {"train": "train_5500.label", "test": "TREC_10.label"}, "text", None, "coarse",
                      "text", "accuracy", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
}


def _normalize_task(spec: str) -> str:
    return spec.strip().lower().replace("-", "").replace("_", "")


def _read_trec(path: Path) -> _Table:
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
    return _from_frame(df, path)


def _load_named(task: str, data_dir: Path, explicit_dir: bool) -> tuple[dict[str, _Table], _TaskSpec]:
    spec = _TASKS[task]
    base = next((data_dir / d for d in spec.subdirs if (data_dir / d).is_dir()), data_dir / spec.subdirs[0])
    tables: dict[str, _Table] = {}
    for split, fname in spec.files.items():
        path = (base / fname).resolve()
        if not path.is_file():
            raise DatasetError(
                f"{task}: missing data file {path} (split {split!r}); {_data_dir_hint(data_dir, explicit_dir)}. "
                f"See shared/data/README.md for the expected layout"
            )
        if task == "trec":
            tables[split] = _read_trec(path)
        elif spec.header_names is not None:
            try:
                df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, header=None, names=list(spec.header_names),
                                 dtype=str, keep_default_na=False, index_col=False, encoding="utf-8")
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise DatasetError(f"could not parse {path}: {e}") from None
            tables[split] = _from_frame(df, path)
        else:
            tables[split] = _read_delimited(path, "\t", csv.QUOTE_NONE)
    return tables, spec


# ----------------------------------------------------------------------------------------------------------------------
# Spec parsing and column resolution
# ----------------------------------------------------------------------------------------------------------------------


def _parse_split_spec(spec: str) -> dict[str, Path] | None:
    """Parse ``train=a.csv,validation=b.csv``; None if ``spec`` is not of that form."""
    if "=" not in spec:
        return None
    first_key = spec.split("=", 1)[0].strip().lower()
    if first_key not in _SPLIT_ALIASES:
        return None
    out: dict[str, Path] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise DatasetError(f"bad split spec part {part!r}: expected split=path, e.g. 'train=a.csv,validation=b.csv'")
        if key not in _SPLIT_ALIASES:
            raise DatasetError(
                f"unknown split {key!r} in {spec!r}; use train, validation (alias dev) or test, e.g. 'train=a.csv,validation=b.csv'"
            )
        canon = _SPLIT_ALIASES[key]
        if canon in out:
            raise DatasetError(f"split {canon!r} is given twice in {spec!r}")
        out[canon] = Path(value.strip()).expanduser().resolve()
    return out


def _resolve_columns(
    tables: dict[str, _Table],
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
) -> dict[str, str | None]:
    """Pick the text/pair/label columns (explicit, else conventional defaults) and check every split has them."""
    first = tables.get("train") or next(iter(tables.values()))
    cols = first.columns

    def missing(what: str, arg: str, tried: str) -> DatasetError:
        return DatasetError(
            f"{first.path} has no {what} column ({tried}); its columns are {cols}. Pass {arg}=<one of those>"
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
    for split, t in tables.items():
        for role, c in (("text", text), ("text pair", pair), ("label", label)):
            if c is not None and c not in t.columns:
                raise DatasetError(
                    f"split {split!r} ({t.path}) has no {role} column {c!r}; its columns are {t.columns}"
                    + (". Every split must be labeled" if role == "label" else "")
                )
    return {"text": text, "text_pair": pair, "label": label}


def _is_unlabeled(t: _Table, label: str) -> bool:
    """An HF split with no label column, or only None/-1 labels (GLUE test splits), carries no supervision."""
    if label not in t.columns:
        return True
    s = t.get(label)
    if len(s) == 0:
        return False
    if s.isna().all():
        return True
    return bool(pd.api.types.is_numeric_dtype(s) and (s == -1).all())


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
            canon = _SPLIT_ALIASES.get(str(s).strip().lower(), str(s).strip())
            if canon not in want:
                want.append(canon)

    explicit_dir = data_dir is not None
    ddir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
    notes: list[str] = []

    task = _normalize_task(spec)
    if task in _TASKS:
        tables, tspec = _load_named(task, ddir, explicit_dir)
        fixed = {"text": tspec.text, "text_pair": tspec.pair, "label": tspec.label}
        for arg, role in ((text_column, "text"), (text_pair_column, "text_pair"), (label_column, "label")):
            if arg is not None and arg != fixed[role]:
                raise DatasetError(
                    f"columns of the named task {task!r} are fixed ({fixed}); do not pass {role}_column={arg!r}, "
                    "or load the file as a custom dataset instead"
                )
        name, columns, force, fixed_names, metric = task, fixed, tspec.force, tspec.label_names, tspec.metric
    else:
        split_files = _parse_split_spec(spec)
        path = Path(spec).expanduser()
        if split_files is not None:
            tables = {s: _read_file(p) for s, p in split_files.items()}
            name = (split_files.get("train") or next(iter(split_files.values()))).stem
        elif path.is_file():
            tables = {"train": _read_file(path.resolve())}
            name = path.stem
        elif path.is_dir():
            if not ((path / "dataset_dict.json").is_file() or _is_hf_dataset_dir(path)):
                raise DatasetError(
                    f"{path.resolve()} is a directory but not a Hugging Face datasets directory (no dataset_dict.json, "
                    "state.json or dataset_info.json); pass a data file or a save_to_disk directory"
                )
            tables = _read_hf_dir(path.resolve())
            name = path.resolve().name
        else:
            raise DatasetError(
                f"unknown dataset {spec!r}: not a named task ({', '.join(NAMED_TASKS)}), not an existing file "
                f"({', '.join(SUPPORTED_EXTENSIONS)}), not a save_to_disk directory, and not a split spec like "
                "'train=a.csv,validation=b.csv'"
            )
        if split_files is None and path.is_dir():
            # HF dicts often ship unlabeled test splits (label -1); skip those unless explicitly requested.
            lab = label_column or next((c for c in ("label", "labels") if any(c in t.columns for t in tables.values())), None)
            if lab is not None:
                for s in [s for s, t in tables.items() if _is_unlabeled(t, lab)]:
                    if want is not None and s in want:
                        raise DatasetError(f"split {s!r} of {path.resolve()} has no labels (column {lab!r} missing or all -1)")
                    notes.append(f"skipped split {s!r}: no labels in column {lab!r}")
                    del tables[s]
            if not tables:
                raise DatasetError(f"{path.resolve()} has no labeled split")
        columns = _resolve_columns(tables, text_column, text_pair_column, label_column)
        force, metric = None, None
        fixed_names = next((t.label_names[columns["label"]] for t in tables.values() if columns["label"] in t.label_names), None)

    # Check every split is non-empty, texts are real text, then convert labels with one shared mapping.
    raw: dict[str, _RawSplit] = {}
    for split, t in tables.items():
        if t.nrows == 0:
            raise DatasetError(f"split {split!r} ({t.path}) has no examples; it has a header (columns {t.columns}) but no data rows")
        for role in ("text", "text_pair", "label"):
            c = columns[role]
            if c is not None and c not in t.columns:
                raise DatasetError(f"split {split!r} ({t.path}) has no {role} column {c!r}; its columns are {t.columns}")
        rows = np.arange(t.nrows, dtype=np.int64)
        texts = _texts(t.get(columns["text"]), rows, split, t.path, columns["text"])
        pairs = _texts(t.get(columns["text_pair"]), rows, split, t.path, columns["text_pair"]) if columns["text_pair"] else None
        raw[split] = _RawSplit(texts, pairs, t.get(columns["label"]), rows, t.path)
    labels, task_type, label_names = _convert_labels(raw, columns["label"], force, fixed_names)
    if metric is None:
        metric = "pearson_spearman" if task_type == "regression" else "accuracy"
    if task_type == "regression":
        label_names = None

    data = {s: SplitData(r.texts, r.pairs, labels[s], r.rows) for s, r in raw.items()}
    files = {s: r.path for s, r in raw.items()}

    # Carve validation from train when there is none: seeded, deterministic, rows removed from train.
    dev_carve = None
    if "validation" not in data and "train" in data and dev_fraction > 0:
        train = data["train"]
        n = len(train)
        if n < 2:
            raise DatasetError(f"cannot carve a validation split from {n} train example(s); provide a validation file")
        n_dev = min(max(1, int(round(n * dev_fraction))), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        dev_idx, train_idx = np.sort(perm[:n_dev]), np.sort(perm[n_dev:])
        data["validation"], data["train"] = train.take(dev_idx), train.take(train_idx)
        files["validation"] = files["train"]
        dev_carve = {"from": "train", "fraction": float(dev_fraction), "seed": int(seed), "n": int(n_dev)}

    if want is not None:
        unknown = [s for s in want if s not in data]
        if unknown:
            raise DatasetError(f"split(s) {unknown} not available for {name!r}; available: {sorted(data, key=_split_order)}")
        data = {s: data[s] for s in want}
        files = {s: files[s] for s in want}
    else:
        data = {s: data[s] for s in sorted(data, key=_split_order)}
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


def _split_order(s: str) -> tuple[int, str]:
    """train, validation, test first, then any other split names alphabetically."""
    return (SPLIT_NAMES.index(s) if s in SPLIT_NAMES else len(SPLIT_NAMES), s)
