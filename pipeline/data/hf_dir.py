"""Hugging Face ``save_to_disk`` directories (a DatasetDict or a single Dataset) read into :class:`Table` objects.

There is one reader with two ways to get each split's Arrow table: ``datasets.load_from_disk`` when the ``datasets``
package is importable, else the Arrow stream files listed in the split's ``state.json``, read with pyarrow (so
``datasets`` is never a dependency). Everything after that (columns, ClassLabel names, the path recorded for
fingerprinting, split-name aliases) is shared, so both ways give the same tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data.readers import Table
from pipeline.data.splits import canonical_split
from pipeline.errors import DatasetError

__all__ = ["is_hf_dataset_dir", "read_hf_dir"]


def is_hf_dataset_dir(p: Path) -> bool:
    """A DatasetDict (dataset_dict.json) or a single Dataset (state.json / dataset_info.json) directory."""
    return any((p / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _split_dirs(root: Path) -> dict[str, Path]:
    """Split name -> directory: the splits listed in dataset_dict.json, or ``{'train': root}`` for a single Dataset."""
    dict_path = root / "dataset_dict.json"
    if not dict_path.is_file():
        return {"train": root}
    try:
        split_names = [str(s) for s in json.loads(dict_path.read_text(encoding="utf-8"))["splits"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{dict_path} is not valid ({e}); re-save the dataset with save_to_disk") from None
    split_dirs = {s: root / s for s in split_names}
    for s, d in split_dirs.items():
        if not d.is_dir():
            raise DatasetError(f"{root}: dataset_dict.json lists split {s!r} but {d} does not exist")
    return split_dirs


def _arrow_files(split_dir: Path) -> list[Path]:
    """The split's Arrow shards, in order, as listed in state.json (or ``data-*.arrow`` if there is no state.json)."""
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
    for f in files:
        if not f.is_file():
            raise DatasetError(f"{split_dir}: state.json lists {f.name}, which does not exist")
    return files


def _classlabel_names(features: Any) -> dict[str, list[str]]:
    """ClassLabel names per column from a serialized ``features`` dict, so HF label ids keep their readable names."""
    out: dict[str, list[str]] = {}
    for col, feat in (features if isinstance(features, dict) else {}).items():
        if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and feat.get("names"):
            out[col] = [str(n) for n in feat["names"]]
    return out


def _read_split_pyarrow(split_dir: Path, files: list[Path]) -> tuple[Any, dict[str, list[str]]]:
    """Arrow table and ClassLabel names of one split, straight from its Arrow files and dataset_info.json."""
    import pyarrow as pa

    tables = []
    for f in files:
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
    try:
        info = json.loads((split_dir / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        info = {}
    return table, _classlabel_names(info.get("features") if isinstance(info, dict) else None)


def _read_split_datasets(ds: Any) -> tuple[Any, dict[str, list[str]]]:
    """Arrow table and ClassLabel names of one loaded ``datasets.Dataset``."""
    return ds.with_format("arrow")[:], _classlabel_names(ds.features.to_dict())


def read_hf_dir(root: Path) -> dict[str, Table]:
    """Read a DatasetDict dir (dataset_dict.json) or a single Dataset dir (state.json / dataset_info.json).

    Returns one :class:`Table` per split, keyed by canonical split name ('dev' -> 'validation', ...).
    """
    split_dirs = _split_dirs(root)
    files = {s: _arrow_files(d) for s, d in split_dirs.items()}

    try:
        import datasets as hf_datasets  # optional: never a dependency of this project
    except ImportError:
        hf_datasets = None

    if hf_datasets is not None:
        try:
            loaded = hf_datasets.load_from_disk(str(root))
        except Exception as e:
            raise DatasetError(f"datasets.load_from_disk could not read {root}: {e}") from None
        is_dict = (root / "dataset_dict.json").is_file()
        arrow = {s: _read_split_datasets(loaded[s] if is_dict else loaded) for s in split_dirs}
    else:
        arrow = {s: _read_split_pyarrow(d, files[s]) for s, d in split_dirs.items()}

    out: dict[str, Table] = {}
    for s, (table, label_names) in arrow.items():
        canon = canonical_split(s)
        if canon in out:
            raise DatasetError(f"{root}: splits {s!r} and another split both map to {canon!r}; rename one of them")
        path = files[s][0] if len(files[s]) == 1 else split_dirs[s]  # a multi-shard split is fingerprinted as a dir
        out[canon] = Table(
            str(Path(path).resolve()),
            list(table.column_names),
            table.num_rows,
            lambda c, table=table: table.column(c).to_pandas(),
            label_names,
        )
    return out
