"""Tests for pipeline.data: real named tasks from shared/data, custom files in every format, and every error path.

The named-task tests read the real files (a few MB, well under a second each), because the formats' quirks (QUOTE_NONE,
CoLA's missing header, MRPC's BOM, TREC's latin-1) are exactly what a synthetic fixture would not reproduce.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import (
    NAMED_TASKS,
    DatasetBundle,
    DatasetError,
    default_data_dir,
    load_dataset,
    sha256_path,
)

DATA_DIR = default_data_dir()
_has_data = pytest.mark.skipif(not (DATA_DIR / "sst2" / "train.tsv").is_file(), reason=f"no shared data at {DATA_DIR}")


def needs_data(test):
    """Tests on the real named-task files: integration tier, skipped where the shared data is absent."""
    return pytest.mark.integration(_has_data(test))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that need LST_DATA_DIR set it themselves; an outer setting must not leak in."""
    monkeypatch.delenv("LST_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def sst2() -> DatasetBundle:
    return load_dataset("sst2")


# ----------------------------------------------------------------------------------------------------------------------
# Named tasks on the real data
# ----------------------------------------------------------------------------------------------------------------------


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_data_dir() == Path(__file__).resolve().parents[2] / "shared" / "data"
    monkeypatch.setenv("LST_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()


@needs_data
@pytest.mark.parametrize(
    "task,n_train,n_dev,counts_train,counts_dev,metric",
    [
        ("sst2", 67_349, 872, [29_780, 37_569], [428, 444], "accuracy"),
        ("cola", 8_551, 1_043, [2_528, 6_023], [322, 721], "matthews"),
        ("mrpc", 3_668, 408, [1_194, 2_474], [129, 279], "f1"),
    ],
)
def test_glue_classification_tasks(task, n_train, n_dev, counts_train, counts_dev, metric) -> None:
    b = load_dataset(task)
    assert b.name == task and b.task_type == "classification" and b.metric == metric
    assert list(b.splits) == ["train", "validation"] and b.dev_carve is None
    tr, dv = b.splits["train"], b.splits["validation"]
    assert (len(tr), len(dv)) == (n_train, n_dev)
    assert tr.labels.dtype == np.int64 and b.num_labels() == 2 and len(b.label_names) == 2
    assert np.bincount(tr.labels).tolist() == counts_train
    assert np.bincount(dv.labels).tolist() == counts_dev
    np.testing.assert_array_equal(tr.source_rows, np.arange(n_train))
    assert tr.source_rows.dtype == np.int64
    assert (tr.text_pairs is not None) == (task == "mrpc")
    for split, path in b.files.items():
        assert Path(path).is_absolute() and Path(path).is_file()
    assert all(isinstance(t, str) and t.strip() for t in tr.texts)


@needs_data
def test_sst2_details(sst2: DatasetBundle) -> None:
    assert sst2.label_names == ["negative", "positive"]
    assert sst2.columns == {"text": "sentence", "text_pair": None, "label": "label"}
    tr = sst2.splits["train"]
    # Texts are kept byte-for-byte (GLUE's SST-2 rows end in a space before the tab).
    assert tr.texts[0] == "hide new secretions from the parental units "
    assert tr.labels[0] == 0 and tr.labels[2] == 1
    # SST-2 is PTB-tokenised: it holds `` and '' quote tokens and no bare '"' at all; they must survive untouched.
    assert not any('"' in t for t in tr.texts)
    assert tr.texts[9] == "are more deeply thought through than in most ` right-thinking ' films "
    assert Path(sst2.files["train"]) == (DATA_DIR / "sst2" / "train.tsv").resolve()


@needs_data
def test_sst2_loads_fast() -> None:
    t0 = time.perf_counter()
    load_dataset("sst2")
    assert time.perf_counter() - t0 < 2.0


@needs_data
def test_bare_double_quotes_read_intact() -> None:
    """Rows with bare '"' (CoLA, MRPC) must not be merged or split: QUOTE_NONE keeps them as literal characters."""
    cola = load_dataset("cola").splits["train"]
    assert cola.texts[3056] == 'Susan whispered "Shut up".'
    assert cola.texts[3057] == 'Susan whispered "Shut up" at them.'
    mrpc = load_dataset("mrpc")
    tr = mrpc.splits["train"]
    assert tr.texts[0] == 'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.'
    assert tr.text_pairs[0] == 'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his evidence.'
    assert tr.labels[0] == 1
    # The BOM on MRPC's first header cell does not leak into the label column name.
    assert mrpc.columns == {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}


def test_bare_quote_in_tsv_field(tmp_path: Path) -> None:
    """A field that *starts* with '"' is where default CSV quoting merges rows; .tsv files are read with QUOTE_NONE."""
    p = tmp_path / "quotes.tsv"
    p.write_text('sentence\tlabel\n" a bare quote opens this row \t1\nnext row\t0\nit \'s "fine\t1\n', encoding="utf-8")
    s = load_dataset(str(p), dev_fraction=0).splits["train"]
    assert s.texts == ['" a bare quote opens this row ', "next row", 'it \'s "fine']
    assert s.labels.tolist() == [1, 0, 1]


@needs_data
def test_stsb_regression() -> None:
    b = load_dataset("stsb")
    assert b.task_type == "regression" and b.metric == "pearson_spearman" and b.num_labels() == 1
    assert b.label_names is None
    tr, dv = b.splits["train"], b.splits["validation"]
    assert (len(tr), len(dv)) == (5_749, 1_500)
    assert tr.labels.dtype == np.float32 and dv.labels.dtype == np.float32
    assert tr.labels.min() >= 0.0 and tr.labels.max() <= 5.0
    assert tr.labels[:2].tolist() == pytest.approx([5.0, 3.8])
    assert tr.texts[0] == "A plane is taking off." and tr.text_pairs[0] == "An air plane is taking off."
    assert len(tr.text_pairs) == len(tr.texts)


@needs_data
def test_trec_coarse_and_carved_dev() -> None:
    b = load_dataset("trec")
    assert b.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"] and b.num_labels() == 6
    assert b.metric == "accuracy"
    tr, dv, te = b.splits["train"], b.splits["validation"], b.splits["test"]
    assert len(tr) + len(dv) == 5_452 and len(dv) == 545 and len(te) == 500
    assert b.dev_carve == {"from": "train", "fraction": 0.1, "seed": 0, "n": 545}
    assert b.files["validation"] == b.files["train"]
    # Carved rows are disjoint and together cover the train file exactly once.
    assert sorted(np.concatenate([tr.source_rows, dv.source_rows]).tolist()) == list(range(5_452))
    counts = Counter(b.label_names[i] for i in np.concatenate([tr.labels, dv.labels]))
    assert counts == {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
    assert sum(counts.values()) == 5_452
    assert te.texts[0] == "How far is it from Denver to Aspen ?" and b.label_names[te.labels[0]] == "NUM"
    # latin-1 decoding: the one non-ASCII byte in train decodes without error.
    assert any("\u00f0" in t for t in tr.texts + dv.texts)


@needs_data
def test_named_task_aliases_and_fixed_columns() -> None:
    assert load_dataset("SST-2", max_examples=3).name == "sst2"
    with pytest.raises(DatasetError, match="fixed"):
        load_dataset("sst2", text_column="text")


@needs_data
def test_named_test_split_is_not_offered() -> None:
    with pytest.raises(DatasetError, match=r"available: \['train', 'validation'\]"):
        load_dataset("sst2", splits=["test"])


# ----------------------------------------------------------------------------------------------------------------------
# Custom files
# ----------------------------------------------------------------------------------------------------------------------


def _rows(n: int) -> list[dict]:
    return [{"text": f"example number {i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(n)]


def test_csv_string_labels_and_carving(tmp_path: Path) -> None:
    p = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f'"{r["text"]}, quoted",{r["label"]}' for r in _rows(50)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    b = load_dataset(str(p))
    assert b.name == "reviews" and b.task_type == "classification" and b.metric == "accuracy"
    assert b.label_names == ["neg", "neutral", "pos"] and b.num_labels() == 3
    assert len(b.splits["train"]) == 45 and len(b.splits["validation"]) == 5
    assert b.dev_carve == {"from": "train", "fraction": 0.1, "seed": 0, "n": 5}
    tr = b.splits["train"]
    for text, y, row in zip(tr.texts, tr.labels, tr.source_rows):
        assert text == f"example number {row}, quoted"
        assert b.label_names[y] == ["pos", "neg", "neutral"][row % 3]
    assert b.files == {"train": str(p.resolve()), "validation": str(p.resolve())}


def test_tsv_null_text_stays_text_and_int_labels(tmp_path: Path) -> None:
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\tother\nnull\t1\tx\nNA\t0\ty\nN/A\t2\tz\n", encoding="utf-8")
    b = load_dataset(str(p), dev_fraction=0)
    s = b.splits["train"]
    assert s.texts == ["null", "NA", "N/A"] and s.labels.tolist() == [1, 0, 2]
    assert s.labels.dtype == np.int64 and b.label_names is None and b.num_labels() == 3
    assert b.columns == {"text": "sentence", "text_pair": None, "label": "label"} and b.dev_carve is None


def test_jsonl_float_labels_regression_and_pairs(tmp_path: Path) -> None:
    p = tmp_path / "sim.jsonl"
    recs = [{"a": f"first {i}", "b": f"second {i}", "score": i / 4} for i in range(20)]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    b = load_dataset(str(p), text_column="a", text_pair_column="b", label_column="score", dev_fraction=0.25, seed=3)
    assert b.task_type == "regression" and b.metric == "pearson_spearman" and b.num_labels() == 1
    assert b.label_names is None
    for s in b.splits.values():
        assert s.labels.dtype == np.float32
        for t, tp, y, r in zip(s.texts, s.text_pairs, s.labels, s.source_rows):
            assert (t, tp, float(y)) == (f"first {r}", f"second {r}", r / 4)
    assert len(b.splits["validation"]) == 5


def test_json_integral_floats_are_classes_and_bools(tmp_path: Path) -> None:
    p = tmp_path / "ints.json"
    p.write_text(json.dumps([{"text": "a", "label": 1.0}, {"text": "b", "label": 0.0}]), encoding="utf-8")
    s = load_dataset(str(p), dev_fraction=0).splits["train"]
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [1, 0]
    q = tmp_path / "bools.jsonl"
    q.write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n', encoding="utf-8")
    b = load_dataset(str(q), dev_fraction=0)
    assert b.splits["train"].labels.tolist() == [1, 0] and b.task_type == "classification"


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "data.parquet"
    table = pa.table({
        "id": list(range(30)),
        "sentence": [f"s {i}" for i in range(30)],
        "label": [bool(i % 2) for i in range(30)],
    })
    pq.write_table(table, p)
    b = load_dataset(str(p))
    assert b.columns["text"] == "sentence" and b.task_type == "classification"
    for s in b.splits.values():
        assert s.labels.tolist() == [r % 2 for r in s.source_rows]
    q = tmp_path / "reg.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "label": [0.5, 1.0, 2.25]}), q)
    r = load_dataset(str(q), dev_fraction=0)
    assert r.task_type == "regression" and r.splits["train"].labels.tolist() == [0.5, 1.0, 2.25]


def test_split_spec_form(tmp_path: Path) -> None:
    for name, labels in (("tr", "ab" * 10), ("dv", "ba"), ("te", "c")):
        (tmp_path / f"{name}.csv").write_text(
            "text,label\n" + "".join(f"{name} {i},{y}\n" for i, y in enumerate(labels)), encoding="utf-8"
        )
    spec = f"train={tmp_path / 'tr.csv'},dev={tmp_path / 'dv.csv'},test={tmp_path / 'te.csv'}"
    b = load_dataset(spec)
    assert list(b.splits) == ["train", "validation", "test"] and b.dev_carve is None
    assert [len(s) for s in b.splits.values()] == [20, 2, 1]
    # One mapping over all splits: 'c' only occurs in test but still gets an id.
    assert b.label_names == ["a", "b", "c"]
    assert b.splits["test"].labels.tolist() == [2] and b.splits["validation"].labels.tolist() == [1, 0]
    assert b.files["test"] == str((tmp_path / "te.csv").resolve()) and b.name == "tr"
    # Without a validation file, one is carved from train.
    c = load_dataset(f"train={tmp_path / 'tr.csv'},test={tmp_path / 'te.csv'}")
    assert c.dev_carve["n"] == 2 and len(c.splits["train"]) == 18
    with pytest.raises(DatasetError, match="unknown split 'holdout'"):
        load_dataset(f"train={tmp_path / 'tr.csv'},holdout={tmp_path / 'te.csv'}")


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face save_to_disk directories, written by hand with pyarrow
# ----------------------------------------------------------------------------------------------------------------------


def _write_hf_split(d: Path, columns: dict, label_names: list[str] | None = None, shards: int = 1) -> None:
    d.mkdir(parents=True)
    table = pa.table(columns)
    files = []
    n = table.num_rows
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]))
        files.append({"filename": name})
    (d / "state.json").write_text(json.dumps({
        "_data_files": files, "_fingerprint": "0" * 16, "_format_columns": None, "_format_kwargs": {},
        "_format_type": None, "_output_all_columns": False, "_split": None,
    }))
    features = {c: {"dtype": "string", "_type": "Value"} for c in columns}
    if label_names is not None:
        features["label"] = {"names": label_names, "_type": "ClassLabel"}
    (d / "dataset_info.json").write_text(json.dumps({"features": features}))


@pytest.fixture
def no_hf_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the pyarrow fallback even where the optional `datasets` package is installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def test_hf_dataset_dict_dir(tmp_path: Path, no_hf_datasets: None) -> None:
    root = tmp_path / "my_glue"
    n = 40
    _write_hf_split(root / "train", {"sentence": [f"t {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
                    ["negative", "positive"], shards=2)
    _write_hf_split(root / "validation", {"sentence": ["v 0", "v 1"], "label": [1, 0]}, ["negative", "positive"])
    _write_hf_split(root / "test", {"sentence": ["x 0", "x 1"], "label": [-1, -1]}, ["negative", "positive"])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    b = load_dataset(str(root))
    assert b.name == "my_glue" and list(b.splits) == ["train", "validation"]
    assert b.label_names == ["negative", "positive"] and b.dev_carve is None
    tr = b.splits["train"]
    assert len(tr) == n and tr.texts[25] == "t 25" and tr.labels.tolist() == [i % 2 for i in range(n)]
    assert any("test" in note for note in b.notes)  # the unlabeled test split was skipped, and said so
    assert Path(b.files["train"]).is_dir()  # two shards -> the split dir is the unit to fingerprint
    assert Path(b.files["validation"]).name == "data-00000-of-00001.arrow"
    assert len(sha256_path(b.files["train"])) == 64
    with pytest.raises(DatasetError, match="no labels"):
        load_dataset(str(root), splits=["test"])


def test_hf_single_dataset_dir(tmp_path: Path, no_hf_datasets: None) -> None:
    d = tmp_path / "single"
    _write_hf_split(d, {"text": [f"q {i}" for i in range(20)], "label": ["b", "a"] * 10})
    b = load_dataset(str(d), seed=1)
    assert b.label_names == ["a", "b"] and set(b.splits) == {"train", "validation"}
    assert b.dev_carve["n"] == 2 and len(b.splits["train"]) == 18


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face save_to_disk directories written by the real `datasets` library: read with datasets.load_from_disk,
# and through the pyarrow fallback, which must give the same bundle
# ----------------------------------------------------------------------------------------------------------------------


def _save_dataset_dict(root: Path) -> None:
    hf = pytest.importorskip("datasets")
    features = hf.Features({"sentence": hf.Value("string"), "label": hf.ClassLabel(names=["negative", "positive"])})
    hf.DatasetDict({
        "train": hf.Dataset.from_dict({"sentence": [f"t {i}" for i in range(30)], "label": [i % 2 for i in range(30)]},
                                      features=features),
        "validation": hf.Dataset.from_dict({"sentence": ["v 0", "v 1", "v 2"], "label": [1, 0, 1]}, features=features),
        "test": hf.Dataset.from_dict({"sentence": ["x 0", "x 1"], "label": [-1, -1]}, features=features),
    }).save_to_disk(str(root), num_shards={"train": 2, "validation": 1, "test": 1})


def _save_single_dataset(root: Path) -> None:
    hf = pytest.importorskip("datasets")
    hf.Dataset.from_dict({
        "a": [f"first {i}" for i in range(20)],
        "b": [f"second {i}" for i in range(20)],
        "score": [i / 4 for i in range(20)],
    }).save_to_disk(str(root))


def _assert_same_bundle(x: DatasetBundle, y: DatasetBundle) -> None:
    assert (x.name, x.task_type, x.metric, x.label_names) == (y.name, y.task_type, y.metric, y.label_names)
    assert (x.files, x.columns, x.dev_carve, x.notes) == (y.files, y.columns, y.dev_carve, y.notes)
    assert list(x.splits) == list(y.splits)
    for s in x.splits:
        a, b = x.splits[s], y.splits[s]
        assert (a.texts, a.text_pairs) == (b.texts, b.text_pairs)
        assert a.labels.dtype == b.labels.dtype and a.labels.tolist() == b.labels.tolist()
        np.testing.assert_array_equal(a.source_rows, b.source_rows)


def test_hf_datasets_save_to_disk_dict(tmp_path: Path) -> None:
    root = tmp_path / "real_glue"
    _save_dataset_dict(root)
    b = load_dataset(str(root))
    assert b.name == "real_glue" and list(b.splits) == ["train", "validation"] and b.dev_carve is None
    assert b.label_names == ["negative", "positive"] and b.task_type == "classification" and b.num_labels() == 2
    assert b.columns == {"text": "sentence", "text_pair": None, "label": "label"}
    tr, dv = b.splits["train"], b.splits["validation"]
    assert tr.texts == [f"t {i}" for i in range(30)] and tr.labels.tolist() == [i % 2 for i in range(30)]
    assert tr.labels.dtype == np.int64 and tr.source_rows.tolist() == list(range(30))
    assert dv.texts == ["v 0", "v 1", "v 2"] and dv.labels.tolist() == [1, 0, 1]
    assert b.notes == ["skipped split 'test': no labels in column 'label'"]
    assert b.files["train"] == str((root / "train").resolve())  # two shards -> the split dir
    assert b.files["validation"] == str((root / "validation" / "data-00000-of-00001.arrow").resolve())
    with pytest.raises(DatasetError, match="no labels"):
        load_dataset(str(root), splits=["test"])


def test_hf_pyarrow_fallback_matches_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, single = tmp_path / "real_glue", tmp_path / "pairs"
    _save_dataset_dict(root)
    _save_single_dataset(single)
    kw = {"text_column": "a", "text_pair_column": "b", "label_column": "score", "dev_fraction": 0.25, "seed": 3}
    with_datasets = load_dataset(str(root)), load_dataset(str(single), **kw)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails: the pyarrow reader is used
    fallback = load_dataset(str(root)), load_dataset(str(single), **kw)
    for x, y in zip(with_datasets, fallback):
        _assert_same_bundle(x, y)
    reg = fallback[1]
    assert reg.task_type == "regression" and reg.label_names is None and reg.splits["train"].labels.dtype == np.float32
    for s in reg.splits.values():
        for t, tp, y, r in zip(s.texts, s.text_pairs, s.labels, s.source_rows):
            assert (t, tp, float(y)) == (f"first {r}", f"second {r}", r / 4)


def test_plain_dir_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a Hugging Face datasets directory"):
        load_dataset(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Carving, splits, max_examples
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def csv100(tmp_path: Path) -> Path:
    p = tmp_path / "hundred.csv"
    p.write_text("text,label\n" + "".join(f"row {i},{i % 4}\n" for i in range(100)), encoding="utf-8")
    return p


def test_dev_carving_is_deterministic(csv100: Path) -> None:
    a = load_dataset(str(csv100), seed=7)
    b = load_dataset(str(csv100), seed=7)
    c = load_dataset(str(csv100), seed=8)
    va, vb, vc = (x.splits["validation"].source_rows for x in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)
    assert len(va) == 10 and np.all(np.diff(va) > 0)
    assert not set(va) & set(a.splits["train"].source_rows)
    assert a.dev_carve == {"from": "train", "fraction": 0.1, "seed": 7, "n": 10}
    assert len(load_dataset(str(csv100), dev_fraction=0.25).splits["validation"]) == 25
    assert set(load_dataset(str(csv100), dev_fraction=0).splits) == {"train"}


def test_splits_restriction_does_not_change_carving(csv100: Path) -> None:
    full = load_dataset(str(csv100))
    only = load_dataset(str(csv100), splits=["dev"])
    assert list(only.splits) == ["validation"] and list(only.files) == ["validation"]
    np.testing.assert_array_equal(only.splits["validation"].source_rows, full.splits["validation"].source_rows)
    with pytest.raises(DatasetError, match=r"\['test'\] not available.*available: \['train', 'validation'\]"):
        load_dataset(str(csv100), splits=["train", "test"])


def test_max_examples(csv100: Path) -> None:
    full = load_dataset(str(csv100))
    b = load_dataset(str(csv100), max_examples=5)
    for name, s in b.splits.items():
        assert len(s) == 5
        np.testing.assert_array_equal(s.source_rows, full.splits[name].source_rows[:5])
        assert s.texts == full.splits[name].texts[:5]
    assert len(load_dataset(str(csv100), max_examples=1000).splits["train"]) == 90
    with pytest.raises(DatasetError, match="max_examples"):
        load_dataset(str(csv100), max_examples=0)


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_error_missing_named_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LST_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as e:
        load_dataset("cola")
    msg = str(e.value)
    assert str(tmp_path / "cola" / "train.tsv") in msg and f"LST_DATA_DIR points to {tmp_path}" in msg
    with pytest.raises(DatasetError, match="data_dir was passed"):
        load_dataset("trec", data_dir=tmp_path)


def test_error_missing_file_in_split_spec(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*nope.csv"):
        load_dataset(f"train={tmp_path / 'nope.csv'}")


def test_error_unknown_spec() -> None:
    with pytest.raises(DatasetError) as e:
        load_dataset("imdb")
    assert "'imdb'" in str(e.value) and all(t in str(e.value) for t in NAMED_TASKS)


def test_error_missing_column_lists_columns(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("review,stars\ngood,1\nbad,0\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"columns are \['review', 'stars'\].*text_column"):
        load_dataset(str(p))
    with pytest.raises(DatasetError, match=r"columns are \['review', 'stars'\].*label_column"):
        load_dataset(str(p), text_column="review")
    with pytest.raises(DatasetError, match=r"no label column 'rating'.*\['review', 'stars'\]"):
        load_dataset(str(p), text_column="review", label_column="rating")
    assert load_dataset(str(p), text_column="review", label_column="stars", dev_fraction=0).splits["train"].labels.tolist() == [1, 0]


def test_error_blank_texts_give_rows(tmp_path: Path) -> None:
    p = tmp_path / "blank.tsv"
    p.write_text("text\tlabel\nok\t1\n   \t0\nfine\t1\n\t0\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"2 example\(s\).*rows \[1, 3\]"):
        load_dataset(str(p))
    q = tmp_path / "missing.jsonl"
    q.write_text('{"text": "a", "label": 1}\n{"label": 0}\n{"text": null, "label": 0}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"rows \[1, 2\]"):
        load_dataset(str(q))


def test_error_bad_labels_give_rows(tmp_path: Path) -> None:
    p = tmp_path / "lab.csv"
    p.write_text("text,label\na,1\nb,\nc,0\nd,1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"missing or unparseable 'label' label at rows \[1\]"):
        load_dataset(str(p))
    q = tmp_path / "mixed.csv"
    q.write_text("text,label\na,1\nb,oops\nc,0\nd,1\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"mixes numbers and text.*rows \[1\]"):
        load_dataset(str(q))
    r = tmp_path / "neg.csv"
    r.write_text("text,label\na,1\nb,-1\nc,0\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"negative class ids at rows \[1\]"):
        load_dataset(str(r))
    s = tmp_path / "nan.jsonl"
    s.write_text('{"text": "a", "label": 0.5}\n{"text": "b", "label": NaN}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"rows \[1\]"):
        load_dataset(str(s))


def test_error_empty_split_and_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "header_only.csv"
    p.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no examples"):
        load_dataset(str(p))
    q = tmp_path / "empty.csv"
    q.write_text("", encoding="utf-8")
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(str(q))


def test_error_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "data.txt"
    p.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"unsupported file extension '\.txt'.*\.parquet"):
        load_dataset(str(p))


def test_error_malformed_tsv_row(tmp_path: Path) -> None:
    p = tmp_path / "bad.tsv"
    p.write_text("text\tlabel\na\t1\nb\t0\textra\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="could not parse"):
        load_dataset(str(p))


def test_error_bad_arguments(csv100: Path) -> None:
    with pytest.raises(DatasetError, match="dev_fraction"):
        load_dataset(str(csv100), dev_fraction=1.0)
    with pytest.raises(DatasetError, match="non-empty"):
        load_dataset("  ")
