"""Labels: parse raw label columns, infer the task type, and map every split through *one* shared id mapping."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.rows import ROWS_MEANING, rows_text
from pipeline.errors import DatasetError

__all__ = ["RawLabels", "convert_labels"]

_MISSING, _NUM, _TEXT, _BAD = 0, 1, 2, 3


@dataclass
class RawLabels:
    """One split's label column before conversion, and where each row came from (for error messages)."""

    values: pd.Series
    rows: np.ndarray  # int64: row index of each example in its source file
    path: str


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


_UNPARSEABLE = type("_Unparseable", (), {"__repr__": lambda self: "<list or mapping>"})()


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
    values = series.astype(object)
    if any(isinstance(v, (list, dict, tuple, set, np.ndarray)) for v in values):  # unhashable: unparseable
        values = values.map(lambda v: _UNPARSEABLE if isinstance(v, (list, dict, tuple, set, np.ndarray)) else v)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    cls = [_classify_label(u) for u in uniques]
    u_kind = np.array([c[0] for c in cls] + [_MISSING], dtype=np.int8)  # index -1 -> the NA sentinel
    u_num = np.array([c[1] if c[0] == _NUM else np.nan for c in cls] + [np.nan], dtype=np.float64)
    u_text = np.array([c[1] if c[0] == _TEXT else None for c in cls] + [None], dtype=object)
    used_num = [c for c in cls if c[0] == _NUM]
    all_bool = bool(used_num) and all(c[2] for c in used_num)
    return _ParsedLabels(u_kind[codes], u_num[codes], u_text[codes], all_bool)


def convert_labels(
    raw: dict[str, RawLabels],
    column: str,
    force: str | None,
    fixed_names: list[str] | None,
) -> tuple[dict[str, np.ndarray], str, list[str] | None]:
    """Turn raw label columns of all splits into ids/floats with *one* shared mapping.

    The mapping is decided over all splits together so a class id means the same thing in train, validation and
    test. ``force`` is 'int' / 'float' / 'text' (names fixed by the task) for named tasks; None infers it:
    strings -> sorted class names, booleans -> 0/1, integral numbers -> int64, any fractional value -> regression.
    Returns (labels per split, 'classification' | 'regression', class names or None).
    """
    parsed = {s: _parse_labels(r.values) for s, r in raw.items()}

    for s, p in parsed.items():
        bad = (p.kind == _MISSING) | (p.kind == _BAD)
        if bad.any():
            rows = raw[s].rows[bad]
            raise DatasetError(
                f"{len(rows)} example(s) in split {s!r} ({raw[s].path}) have a missing or unparseable {column!r} label "
                f"at rows {rows_text(rows)} ({ROWS_MEANING}); fix or remove those rows"
            )

    n_num = sum(int((p.kind == _NUM).sum()) for p in parsed.values())
    n_text = sum(int((p.kind == _TEXT).sum()) for p in parsed.values())

    def _rows_of(kind: int) -> str:
        parts = []
        for s, p in parsed.items():
            m = p.kind == kind
            if m.any():
                parts.append(f"split {s!r} ({raw[s].path}) rows {rows_text(raw[s].rows[m])}")
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
                    f"{rows_text(raw[s].rows[unknown])} ({ROWS_MEANING})"
                )
            out[s] = np.fromiter((index[t] for t in p.text), dtype=np.int64, count=len(p.text))
        return out, "classification", list(fixed_names)

    if force is not None and n_text:
        raise DatasetError(
            f"label column {column!r} must be numeric for this task, but {n_text} label(s) are not numbers: "
            f"{_rows_of(_TEXT)} ({ROWS_MEANING})"
        )
    if n_num and n_text:
        minority, what = (_TEXT, "text") if n_text <= n_num else (_NUM, "numbers")
        raise DatasetError(
            f"label column {column!r} mixes numbers and text labels; {min(n_num, n_text)} label(s) are {what}: "
            f"{_rows_of(minority)} ({ROWS_MEANING}). Make every label a class name or every label a number"
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
                parts.append(f"split {s!r} rows {rows_text(raw[s].rows[m])}")
        raise DatasetError(f"label column {column!r} must hold integer class ids, but some are fractional: {'; '.join(parts)}")

    out = {s: p.num.astype(np.int64) for s, p in parsed.items()}
    for s, y in out.items():
        neg = y < 0
        if neg.any():
            raise DatasetError(
                f"{int(neg.sum())} label(s) in split {s!r} ({raw[s].path}) are negative class ids at rows "
                f"{rows_text(raw[s].rows[neg])} ({ROWS_MEANING}); class ids must be 0..K-1 "
                "(GLUE-style -1 means 'unlabeled': drop those rows or that split)"
            )
    if fixed_names is None and "train" in out and len(out["train"]):
        k = int(out["train"].max()) + 1
        for s, y in out.items():
            over = y >= k
            if s != "train" and over.any():
                raise DatasetError(
                    f"label(s) in split {s!r} ({raw[s].path}) at rows {rows_text(raw[s].rows[over])} are class ids "
                    f"never seen in the train split (which has ids 0..{k - 1}); fix those labels or add examples "
                    "of every class to the train split"
                )
    names = fixed_names
    if names is None and all(p.all_bool for p in parsed.values() if len(p.kind)):
        names = ["False", "True"]
    if names is not None:
        for s, y in out.items():
            over = y >= len(names)
            if over.any():
                raise DatasetError(
                    f"label(s) in split {s!r} ({raw[s].path}) at rows {rows_text(raw[s].rows[over])} are >= the "
                    f"{len(names)} known classes {names}"
                )
    return out, "classification", names
