"""Data-file readers: CSV, TSV, JSON Lines / JSON and Parquet, each turned into one uniform :class:`Table`.

Every reader gives the same lazy view (column names, row count, a column getter), so the text and label checks that
follow are written once for every format. The file extension, not content sniffing, picks the reader, so behaviour is
predictable.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from pipeline.errors import DatasetError

__all__ = ["SUPPORTED_EXTENSIONS", "Table", "from_frame", "read_delimited", "read_file"]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class Table:
    """Column names plus a lazy column getter; lazy so wide Parquet/Arrow files only decode the columns used."""

    path: str  # absolute path recorded in DatasetBundle.files
    columns: list[str]
    nrows: int
    get: Callable[[str], pd.Series]
    label_names: dict[str, list[str]] = field(default_factory=dict)  # HF ClassLabel names per column, if known


def from_frame(df: pd.DataFrame, path: Path) -> Table:
    cols = [str(c) for c in df.columns]
    df.columns = cols
    return Table(str(path), cols, len(df), lambda c: df[c])


def read_delimited(path: Path, sep: str, quoting: int, header_names: tuple[str, ...] | None = None) -> Table:
    """Read CSV/TSV as strings only; label types are inferred later, uniformly for every format.

    ``keep_default_na=False`` keeps texts such as 'null' or 'NA' as text; ``index_col=False`` stops pandas from
    silently turning the first column into the index when rows end with a trailing delimiter; ``utf-8-sig`` drops a
    leading BOM (GLUE's MRPC header starts with one) so the first column name matches what the user typed.
    ``header_names`` reads a file without a header row (GLUE's CoLA) under those column names.
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
            **({} if header_names is None else {"header": None, "names": list(header_names)}),
        )
    except pd.errors.EmptyDataError:
        expected = "one example per row" if header_names else "a header row naming the columns, then one example per row"
        raise DatasetError(f"{path} is empty: expected {expected}") from None
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
    return from_frame(df, path)


def _read_json_records(path: Path) -> Table:
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

    return Table(str(path), cols, len(records), get)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-Parquet bytes
        raise DatasetError(f"could not read {path} as Parquet: {e}") from None
    cols = list(pf.schema_arrow.names)
    nrows = pf.metadata.num_rows

    def get(c: str) -> pd.Series:
        return pf.read(columns=[c]).column(0).to_pandas()

    return Table(str(path), cols, nrows, get)


def read_file(path: Path) -> Table:
    """Dispatch on extension; the extension (not content sniffing) decides so behaviour is predictable."""
    if not path.exists():
        raise DatasetError(f"data file not found: {path}")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    ext = path.suffix.lower()
    if ext == ".csv":
        return read_delimited(path, ",", csv.QUOTE_MINIMAL)
    if ext == ".tsv":
        return read_delimited(path, "\t", csv.QUOTE_NONE)
    if ext in (".jsonl", ".json"):
        return _read_json_records(path)
    if ext == ".parquet":
        return _read_parquet(path)
    raise DatasetError(
        f"unsupported file extension {ext or '(none)'!r} for {path}; supported: {', '.join(SUPPORTED_EXTENSIONS)} "
        "(or a directory written by datasets' save_to_disk)"
    )
