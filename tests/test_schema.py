"""The cache schema (pipeline/cache/schema.py): the README tree is generated from it, manifests
round-trip, stores hold exactly its keys, and unknown, missing, mistyped or absurd attributes are
refused with a CacheError before anything is allocated from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import schema
from pipeline.cache.schema import FORMAT_VERSION, SplitManifest, StoreManifest
from pipeline.cache.store import ActivationCache, CacheError, SplitPlan, create_store
from pipeline.extract.runner import ExtractConfig, run_extract

README = Path(__file__).resolve().parents[1] / "README.md"


def _root_attrs(**over) -> dict:
    attrs = {
        "format_version": FORMAT_VERSION,
        "fingerprint": {"backbone": "x", "codec": "bf16", "taps": [0, 1]},
        "versions": {"python": "3.11"},
        "created": "2026-01-01T00:00:00+00:00",
        "complete": False,
        "codec": "bf16",
        "logical_dtype": "bfloat16",
        "hidden_size": 8,
        "taps": ["embeddings", "layer_1"],
        "splits": ["train", "validation"],
        "task": {"name": "sst2", "task_type": "classification", "metric": "accuracy",
                 "label_names": ["negative", "positive"], "num_labels": 2},
        "backbone": {"name": "tiny", "family": "encoder", "model_type": "bert", "num_layers": 2,
                     "hidden_size": 8, "num_parameters": 1000, "pad_token_id": 0},
        "max_length": 16,
        "layout_complete": True,
    }
    attrs.update(over)
    return {k: v for k, v in attrs.items() if v is not ...}


def _split_attrs(**over) -> dict:
    attrs = {"num_examples": 10, "num_tokens": 100, "shard_tokens": 32, "num_shards": 4, "num_truncated": 1}
    attrs.update(over)
    return {k: v for k, v in attrs.items() if v is not ...}


# -- the README ------------------------------------------------------------------------------------

def test_readme_cache_tree_is_generated_from_the_schema():
    text = README.read_text()
    section = text[text.index("## The cache"):text.index("\n## ", text.index("## The cache") + 1)]
    assert schema.README_START in section and schema.README_END in section, "markers belong in '## The cache'"
    block = section[section.index(schema.README_START) + len(schema.README_START):section.index(schema.README_END)]
    assert block.strip() == schema.readme_block(), (
        "README.md's cache tree is stale: run `python -m pipeline.cache.schema --readme README.md`")
    assert schema.replace_readme_block(text) == text


def test_module_prints_the_tree_and_every_field_has_help(capsys):
    assert schema.main([]) == 0
    assert capsys.readouterr().out.strip() == schema.readme_tree()
    assert schema.main(["--fields"]) == 0
    out = capsys.readouterr().out
    for cls in (StoreManifest, schema.TaskInfo, schema.BackboneInfo, SplitManifest):
        for f in schema.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            assert f"  {f.name}: " in out
    tree = schema.readme_tree()
    for key in StoreManifest.keys() + SplitManifest.keys():
        assert key in tree
    for node in schema.ARRAYS:
        assert node.path.rstrip("/").rsplit("/", 1)[-1] in tree


# -- round trip and refusals -----------------------------------------------------------------------

def test_round_trip():
    for attrs in (_root_attrs(), _root_attrs(layout_complete=..., label_words={"words": ["a"], "token_ids": [5]}),
                  _root_attrs(label_targets={"rows": 3, "words": ["a", "b"]}, decoder_taps=["embeddings", "layer_1"])):
        m = StoreManifest.from_attrs(attrs)
        assert m.to_attrs() == attrs and list(m.to_attrs()) == [k for k in StoreManifest.keys() if k in attrs]
        assert StoreManifest.from_attrs(m.to_attrs()) == m
    s = SplitManifest.from_attrs(_split_attrs(decoder_unit_rows=64))
    assert s.to_attrs() == _split_attrs(decoder_unit_rows=64)
    assert SplitManifest.from_attrs(_split_attrs(num_tokens=0, num_examples=0, num_truncated=0, num_shards=1)).num_shards == 1


@pytest.mark.parametrize("attrs, needle", [
    (_root_attrs(extra_key=1), "unknown attribute(s) extra_key"),
    (_root_attrs(codec=...), "missing attribute(s) codec"),
    (_root_attrs(task={**_root_attrs()["task"], "colour": "red"}), "task: unknown attribute(s) colour"),
    (_root_attrs(backbone={k: v for k, v in _root_attrs()["backbone"].items() if k != "num_layers"}),
     "backbone: missing attribute(s) num_layers"),
    (_root_attrs(hidden_size="8"), "hidden_size is '8'"),
    (_root_attrs(complete=1), "complete is 1"),
    (_root_attrs(hidden_size=True), "hidden_size is True"),
    (_root_attrs(taps="embeddings"), "taps"),
    (_root_attrs(format_version=2), "cache format 2"),
    (_root_attrs(codec="fp8"), "codec 'fp8'"),
    (_root_attrs(logical_dtype="float32"), "logical_dtype"),
    (_root_attrs(hidden_size=1 << 40), "hidden_size"),
    (_root_attrs(taps=["embeddings", "layer_9"]), "within 0..2"),
    (_root_attrs(taps=["layer_1", "embeddings"]), "ascending"),
    (_root_attrs(taps=["../../etc"]), "layer_<i>"),
    (_root_attrs(splits=["train", "../x"]), "splits"),
    (_root_attrs(decoder_taps=["embeddings"]), "together"),
    (_root_attrs(label_targets={"rows": 10**9}, decoder_taps=["embeddings"]), "label_targets.rows"),
    (_root_attrs(created="yesterday"), "ISO-8601"),
    ([1, 2], "not an object"),
])
def test_root_manifest_refusals(attrs, needle):
    with pytest.raises(CacheError) as e:
        StoreManifest.from_attrs(attrs, where="cache X")
    assert needle in str(e.value)
    assert "re-extract" in str(e.value)


@pytest.mark.parametrize("attrs, needle", [
    (_split_attrs(num_examples=-1), "num_examples is -1"),
    (_split_attrs(num_tokens=-5), "num_tokens is -5"),
    (_split_attrs(num_shards=10**12), "num_shards is 1000000000000"),
    (_split_attrs(num_shards=3), "make 4"),
    (_split_attrs(shard_tokens=0), "shard_tokens is 0"),
    (_split_attrs(num_tokens=1 << 60, num_shards=(1 << 60) // 32), "num_tokens"),
    (_split_attrs(num_examples=101), "num_examples is 101"),
    (_split_attrs(num_truncated=11), "num_truncated is 11"),
    (_split_attrs(num_tokens=100.0), "expected int"),
    (_split_attrs(num_truncated=...), "missing attribute(s) num_truncated"),
    (_split_attrs(bogus=[]), "unknown attribute(s) bogus"),
    (_split_attrs(decoder_unit_rows=0), "decoder_unit_rows is 0"),
])
def test_split_manifest_refusals(attrs, needle):
    with pytest.raises(CacheError) as e:
        SplitManifest.from_attrs(attrs, where="cache X: split train")
    assert needle in str(e.value) and "re-extract" in str(e.value)


def test_split_checks_against_the_root():
    root = StoreManifest.from_attrs(_root_attrs())
    with pytest.raises(CacheError, match="over"):
        SplitManifest.from_attrs(_split_attrs(num_tokens=1 << 30, shard_tokens=1 << 30, num_shards=1)).check_against(root, "x")
    with pytest.raises(CacheError, match="decoder_unit_rows"):
        SplitManifest.from_attrs(_split_attrs(decoder_unit_rows=8)).check_against(root, "x")


def test_writing_a_bad_manifest_is_refused_before_the_store_is_touched(tmp_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    plan = _plan("train", [3, 4], shard_tokens=4)
    with pytest.raises(CacheError, match="unknown attribute"):
        create_store(str(out), fingerprint={}, meta={**_meta(), "surprise": 1}, plans=[plan], taps=[0, 1],
                     codec="bf16", hidden_size=8, versions={})
    assert (out / "keep.txt").exists()


# -- stores on disk --------------------------------------------------------------------------------

def _plan(name: str, lengths: list[int], shard_tokens: int) -> SplitPlan:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n, t = len(lengths), int(offsets[-1])
    return SplitPlan(name=name, offsets=offsets, input_ids=np.arange(t, dtype=np.int32),
                     labels=np.arange(n, dtype=np.int64) % 2, source_rows=np.arange(n, dtype=np.int64),
                     shard_tokens=shard_tokens, num_truncated=1)


def _meta(**over) -> dict:
    a = _root_attrs()
    return {"task": a["task"], "backbone": a["backbone"], "max_length": 16, **over}


def _zarr_attrs(path: Path) -> dict:
    return json.loads(path.read_text())["attributes"]


@pytest.mark.parametrize("codec, decoder", [("bf16", False), ("int8", True)])
def test_create_store_writes_exactly_the_manifest_keys(tmp_path, codec, decoder):
    out = tmp_path / "c.zarr"
    plans = [_plan("train", [3, 5, 2, 7, 1], shard_tokens=8), _plan("validation", [4], shard_tokens=8)]
    meta = _meta()
    if decoder:
        meta.update(label_targets={"rows": 3, "words": ["a", "b"]}, decoder_taps=["embeddings", "layer_1"])
    create_store(str(out), fingerprint={"codec": codec}, meta=meta, plans=plans, taps=[0, 2], codec=codec,
                 hidden_size=8, versions={"python": "3"},
                 decoder={"taps": [0, 1], "rows": 3} if decoder else None)
    root = _zarr_attrs(out / "zarr.json")
    want = StoreManifest.required_keys() + ["layout_complete"] + (["label_targets", "decoder_taps"] if decoder else [])
    assert sorted(root) == sorted(want)
    cache = ActivationCache.open(str(out))
    assert cache.attrs == root and cache.layout_complete and not cache.complete
    assert cache.taps == [0, 2] and cache.decoder_taps == ([0, 1] if decoder else [])
    for p in plans:
        split = _zarr_attrs(out / p.name / "zarr.json")
        assert sorted(split) == sorted(SplitManifest.required_keys() + (["decoder_unit_rows"] if decoder else []))
        v = cache.split(p.name)
        assert (v.num_examples, v.num_tokens, v.num_shards, v.num_truncated) == (
            p.num_examples, p.num_tokens, p.num_shards, 1)
        np.testing.assert_array_equal(v.offsets, p.offsets)
        if decoder:
            assert v.decoder_unit_rows == v.decoder_array(0).shape[1]


@pytest.mark.parametrize("family, label_words, extra_root, extra_split", [
    ("bert", None, [], []),
    ("gpt2", None, ["label_words"], []),
    ("t5", "auto", ["label_targets", "decoder_taps"], ["decoder_unit_rows"]),
])
def test_extracted_store_has_exactly_the_manifest_keys(tmp_path, tiny_backbones, family, label_words, extra_root,
                                                       extra_split):
    out = tmp_path / "c.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones[family], dataset="sst2", out=str(out), max_examples=8,
                              splits=["validation"], shard_tokens=64, progress=False, label_words=label_words))
    root = _zarr_attrs(out / "zarr.json")
    assert sorted(root) == sorted(StoreManifest.required_keys() + ["layout_complete"] + extra_root)
    assert list(root) == [k for k in StoreManifest.keys() if k in root]  # the order on disk is the schema's
    assert root["complete"] is True and root["layout_complete"] is True
    split = _zarr_attrs(out / "validation" / "zarr.json")
    assert sorted(split) == sorted(SplitManifest.required_keys() + extra_split)
    assert ActivationCache.open(str(out)).attrs == root


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "c.zarr"
    create_store(str(out), fingerprint={}, meta=_meta(), plans=[_plan("train", [3, 5, 2, 7, 1], shard_tokens=8)],
                 taps=[0, 1], codec="bf16", hidden_size=8, versions={})
    return out


def _tampered(small_store: Path, tmp_path: Path, rel: str, **changes) -> Path:
    import shutil

    copy = tmp_path / "t.zarr"
    shutil.copytree(small_store, copy)
    meta = json.loads((copy / rel).read_text())
    meta["attributes"].update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del meta["attributes"][k]
    (copy / rel).write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("rel, changes, needle", [
    ("zarr.json", {"sneaky": True}, "unknown attribute(s) sneaky"),
    ("zarr.json", {"hidden_size": 1 << 30}, "hidden_size"),
    ("zarr.json", {"format_version": 99}, "cache format 99"),
    ("train/zarr.json", {"num_shards": 1 << 50}, "num_shards"),
    ("train/zarr.json", {"shard_tokens": 1 << 34, "num_shards": 1}, "over"),
    ("train/zarr.json", {"num_examples": ...}, "missing attribute(s) num_examples"),
])
def test_tampered_store_is_refused_on_open(small_store, tmp_path, rel, changes, needle):
    copy = _tampered(small_store, tmp_path, rel, **changes)
    with pytest.raises(CacheError) as e:
        ActivationCache.open(str(copy)).split("train")
    assert needle in str(e.value) and str(copy) in str(e.value) and "re-extract" in str(e.value)


def test_array_shape_disagreeing_with_the_manifest_is_refused(small_store, tmp_path):
    import zarr

    copy = _tampered(small_store, tmp_path, "zarr.json")
    zarr.open_group(str(copy), mode="r+")["train"].create_array("offsets", data=np.arange(3, dtype=np.int64),
                                                                overwrite=True)
    with pytest.raises(CacheError, match=r"train/offsets has shape \(3,\), the split's manifest says \(6,\)"):
        ActivationCache.open(str(copy)).split("train").offsets


def test_extract_refuses_an_unreadable_cache_unless_overwrite(tmp_path, tiny_backbones):
    out = tmp_path / "c.zarr"
    cfg = dict(backbone=tiny_backbones["bert"], dataset="sst2", out=str(out), max_examples=8, splits=["validation"],
               shard_tokens=64, progress=False)
    run_extract(ExtractConfig(**cfg))
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="cache format 99.*--overwrite"):
        run_extract(ExtractConfig(**cfg))
    res = run_extract(ExtractConfig(**cfg, overwrite=True))
    assert res["complete"] and not res["resumed"]
    assert ActivationCache.open(str(out)).manifest.format_version == FORMAT_VERSION
