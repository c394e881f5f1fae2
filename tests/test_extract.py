"""Stage one on real computations: stored taps vs a direct forward, codecs, resume after SIGKILL,
corruption detection, stale-cache refusal, Dask workers, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbones import forward_taps, load_backbone
from pipeline.cache.store import ActivationCache, CacheError, tap_name
from pipeline.cli import main as lst_main
from pipeline.extract.runner import ExtractConfig, ExtractError, run_extract
from tests.conftest import assert_same_store

N = 24  # SST-2 examples per split: real text, small enough for 2 cores


def _extract(out, backbone="minilm", **kw) -> dict:
    cfg = ExtractConfig(backbone=backbone, dataset="sst2", out=str(out), max_examples=N, progress=False,
                        shard_tokens=kw.pop("shard_tokens", 128), **kw)
    return run_extract(cfg)


def _direct_taps(backbone, ids: np.ndarray) -> list[torch.Tensor]:
    x = torch.from_numpy(ids.astype(np.int64))[None]
    with torch.inference_mode():
        return [t[0] for t in forward_taps(backbone, x, torch.ones_like(x))]


@pytest.mark.parametrize("family", ["minilm", "bert", "t5", "gpt2", "llama"])
@pytest.mark.integration
def test_fp32_taps_equal_direct_forward_exactly(tmp_path, tiny_backbones, family):
    """batch_tokens=1 puts each example in its own unpadded batch: the same computation as a direct forward."""
    name = "minilm" if family == "minilm" else tiny_backbones[family]
    out = tmp_path / "c.zarr"
    _extract(out, backbone=name, codec="fp32", batch_tokens=1, splits=["validation"])
    cache = ActivationCache.open(str(out))
    assert cache.complete
    backbone = load_backbone(name)
    v = cache.split("validation")
    assert cache.taps == list(range(backbone.num_layers + 1))
    for i in range(0, v.num_examples, 5):
        ids = v.input_ids[v.offsets[i]:v.offsets[i + 1]]
        for tap, ref in enumerate(_direct_taps(backbone, ids)):
            assert torch.equal(v.read_example(tap, i), ref), (family, i, tap)


@pytest.mark.integration
def test_batched_padded_extraction_matches_direct_forward(tmp_path):
    out = tmp_path / "c.zarr"
    _extract(out, codec="fp32", batch_tokens=4096, splits=["validation"])
    v = ActivationCache.open(str(out)).split("validation")
    backbone = load_backbone("minilm")
    for i in range(v.num_examples):
        ids = v.input_ids[v.offsets[i]:v.offsets[i + 1]]
        for tap, ref in enumerate(_direct_taps(backbone, ids)):
            torch.testing.assert_close(v.read_example(tap, i), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.integration
def test_bf16_and_int8_codecs_within_their_bounds(tmp_path):
    backbone = load_backbone("minilm")
    stores = {}
    for codec in ("bf16", "int8"):
        stores[codec] = tmp_path / f"{codec}.zarr"
        _extract(stores[codec], codec=codec, batch_tokens=1, splits=["validation"])
    bf, i8 = (ActivationCache.open(str(stores[c])).split("validation") for c in ("bf16", "int8"))
    assert ActivationCache.open(str(stores["bf16"])).root["validation/acts/layer_3"].dtype == np.uint16
    for i in range(0, bf.num_examples, 3):
        ids = bf.input_ids[bf.offsets[i]:bf.offsets[i + 1]]
        for tap, ref in enumerate(_direct_taps(backbone, ids)):
            # bf16: exactly the bf16 rounding of the fp32 forward
            assert torch.equal(bf.read_example(tap, i), ref.to(torch.bfloat16).float())
            # int8: symmetric per-token quantisation, error <= max|x_row| / 254
            err = (i8.read_example(tap, i) - ref).abs()
            bound = ref.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5) + 1e-7
            assert (err <= bound).all()


@pytest.mark.integration
def test_layers_subset_and_only_real_tokens(tmp_path):
    out = tmp_path / "c.zarr"
    res = _extract(out, layers="0,2,5", splits=["validation"])
    cache = ActivationCache.open(str(out))
    assert cache.taps == [0, 2, 5] and res["taps"] == [0, 2, 5]
    v = cache.split("validation")
    # no padding rows: token rows == sum of per-example token counts == len(input_ids)
    assert v.tap_array(2).shape == (int(v.offsets[-1]), 384) == (len(v.input_ids), 384)
    assert (np.diff(v.offsets) > 0).all() and (np.diff(np.diff(v.offsets)) >= 0).all()  # sorted by length
    assert sorted(v.source_rows.tolist()) == list(range(N))
    assert set(v.labels.tolist()) <= {0, 1}


@pytest.mark.integration
def test_truncation_is_counted(tmp_path):
    res = _extract(tmp_path / "c.zarr", max_length=8, splits=["validation"])
    assert res["splits"]["validation"]["truncated"] > 0
    v = ActivationCache.open(str(tmp_path / "c.zarr")).split("validation")
    assert np.diff(v.offsets).max() == 8


@pytest.mark.integration
def test_fingerprint_mismatch_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "c.zarr"
    _extract(out, splits=["validation"])
    with pytest.raises(CacheError, match="max_length: store has 128, requested 64"):
        _extract(out, splits=["validation"], max_length=64)
    with pytest.raises(CacheError, match="codec"):
        _extract(out, splits=["validation"], codec="int8")
    again = _extract(out, splits=["validation"])  # same request: resume, nothing left to do
    assert again["resumed"] and again["shards_computed"] == 0
    res = _extract(out, splits=["validation"], max_length=64, overwrite=True)
    assert not res["resumed"] and ActivationCache.open(str(out)).fingerprint["max_length"] == 64


@pytest.mark.integration
def test_verify_names_a_flipped_byte(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    _extract(out, splits=["validation"])
    assert lst_main(["verify", str(out), "--json", "--no-progress"]) == 0
    shard_file = out / "validation" / "acts" / "layer_3" / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert lst_main(["verify", str(out), "--json", "--no-progress"]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not rep["ok"]
    assert [(c["split"], c["shard"], c["array"]) for c in rep["corrupt"]] == [("validation", 1, "acts/layer_3")]


@pytest.mark.integration
def test_verify_reports_missing_shards(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    _extract(out, splits=["validation"])
    cache = ActivationCache.open(str(out), mode="r+")
    cache.split("validation").group["done"][2] = False
    assert lst_main(["verify", str(out), "--json", "--no-progress"]) == 1
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["shard"] for m in rep["missing"]] == [2]


@pytest.mark.integration
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    """A real `lst extract` process is SIGKILLed midway; re-running the command finishes the same store."""
    args = ["--dataset", "sst2", "--max-examples", "400", "--splits", "train", "--shard-tokens", "256",
            "--batch-tokens", "512", "--codec", "bf16", "--no-progress", "--json"]
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    assert lst_main(["extract", *args, "--out", str(ref)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = np.zeros(0)
    while time.time() < deadline:
        try:
            done = ActivationCache.open(str(killed)).split("train").done()
        except Exception:  # store not created yet
            done = np.zeros(0)
        if done.size and done.sum() >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = ActivationCache.open(str(killed)).split("train").done()
    assert 0 < done.sum() < done.size, "the kill should land midway"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed"] and summary["complete"]
    assert summary["shards_computed"] == int(done.size - done.sum())
    assert_same_store(str(ref), str(killed))


@pytest.mark.integration
def test_dask_local_cluster_two_workers_identical(tmp_path):
    single, dask = tmp_path / "single.zarr", tmp_path / "dask.zarr"
    _extract(single, splits=["validation"], shard_tokens=256)
    res = _extract(dask, splits=["validation"], shard_tokens=256, workers=2)
    assert res["complete"] and res["shards_computed"] > 2
    assert_same_store(str(single), str(dask))


@pytest.mark.integration
def test_lock_refuses_a_second_writer(tmp_path):
    from filelock import FileLock

    out = tmp_path / "c.zarr"
    with FileLock(str(out) + ".lock"):
        with pytest.raises(ExtractError, match="being written by another extraction"):
            _extract(out, splits=["validation"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--backbone", "no-such-model"], "minilm"),
        (["--dataset", "/nonexistent/file.csv"], "file.csv"),
        pytest.param(["--layers", "0,9"], "0..6", marks=pytest.mark.integration),  # reads SST-2 first
        (["--dataset", "{csv}", "--text-column", "nope"], "columns"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, needle):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello there,pos\nnot good,neg\nfine film,pos\n")
    argv = [a.replace("{csv}", str(csv)) for a in argv]
    out = tmp_path / "c.zarr"
    code = lst_main(["extract", *argv, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.integration
def test_foreign_directory_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert lst_main(["extract", "--max-examples", "8", "--out", str(out), "--no-progress"]) == 2
    assert "not an lst activation cache" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_custom_csv_string_labels_and_inspect(tmp_path, capsys):
    csv = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i} {'great' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(30)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "c.zarr"
    assert lst_main(["extract", "--dataset", str(csv), "--out", str(out), "--no-progress", "--codec", "int8"]) == 0
    capsys.readouterr()
    assert lst_main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["task"]["label_names"] == ["neg", "pos"]
    assert info["complete"] and set(info["splits"]) == {"train", "validation"}
    assert info["splits"]["validation"]["examples"] == 3  # 10% carved from 30
    assert info["compression_vs_fp16"] > 1.5
    cache = ActivationCache.open(str(out))
    assert cache.fingerprint["dev_carve"]["seed"] == 0
    assert (out / "init" / "weights.safetensors").exists() and (out / "init" / "tokenizer").is_dir()


@pytest.mark.integration
def test_init_pack_lets_stage_two_rebuild_config_and_weights(tmp_path):
    from pipeline.cache import initpack

    out = tmp_path / "c.zarr"
    _extract(out, splits=["validation"])
    cfg = initpack.read_config(str(out))
    weights = initpack.read_weights(str(out))
    backbone = load_backbone("minilm")
    assert cfg.num_hidden_layers == 6 and cfg.hidden_size == 384
    ref = backbone.model.state_dict()
    key = next(k for k in ref if k.endswith("layer.2.attention.self.query.weight"))
    assert torch.equal(weights[key], ref[key])


@pytest.mark.integration
def test_pair_task_keeps_segment_ids(tmp_path):
    """MRPC sentence pairs: BERT's segment ids change every tap, so they are stored and used."""
    out = tmp_path / "mrpc.zarr"
    run_extract(ExtractConfig(dataset="mrpc", out=str(out), max_examples=6, splits=["validation"], codec="fp32",
                              batch_tokens=1, progress=False))
    v = ActivationCache.open(str(out)).split("validation")
    assert v.token_type_ids is not None and v.token_type_ids.max() == 1
    backbone = load_backbone("minilm")
    from pipeline.data import load_dataset

    split = load_dataset("mrpc", splits=["validation"], max_examples=6).splits["validation"]
    for i in range(v.num_examples):
        src = int(np.flatnonzero(split.source_rows == v.source_rows[i])[0])
        enc = backbone.tokenizer(split.texts[src], split.text_pairs[src], return_tensors="pt")
        with torch.inference_mode():
            ref = forward_taps(backbone, enc["input_ids"], enc["attention_mask"], token_type_ids=enc["token_type_ids"])
        for tap in (1, 6):
            assert torch.equal(v.read_example(tap, i), ref[tap][0])


@pytest.mark.parametrize("codec", ["bf16", "int8"])
@pytest.mark.integration
def test_direct_shard_decoder_equals_zarr_and_checks_crc(tmp_path, codec):
    """The stage-two fast path decodes shard files itself; it must agree with Zarr and verify checksums."""
    from pipeline.cache.fastread import ChecksumError, DirectArray

    out = tmp_path / "c.zarr"
    _extract(out, codec=codec, splits=["validation"], shard_tokens=256)
    v = ActivationCache.open(str(out)).split("validation")
    assert DirectArray.for_array(v.tap_array(1)) is not None
    for a, b in [(0, v.num_tokens), (3, 300), (255, 257), (v.num_tokens - 5, v.num_tokens)]:
        vals, scale = v.read_rows_raw(1, a, b)
        np.testing.assert_array_equal(vals, v.tap_array(1)[a:b])
        if codec == "int8":
            np.testing.assert_array_equal(scale, v.scale_array(1)[a:b])
    f = out / "validation" / "acts" / "layer_1" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    fresh = ActivationCache.open(str(out)).split("validation")
    with pytest.raises(ChecksumError, match="checksum"):
        fresh.read_rows_raw(1, 0, 10)


@pytest.mark.integration
def test_out_of_memory_batch_is_retried_smaller(tmp_path, monkeypatch):
    """A batch that does not fit is split in half and retried; values match an unconstrained run."""
    import pipeline.extract.worker as worker

    ref = tmp_path / "ref.zarr"
    _extract(ref, codec="fp32", splits=["validation"])
    real = worker.forward_taps
    sizes = []

    def small_memory(backbone, ids, mask, taps, token_type_ids=None):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(backbone, ids, mask, taps, token_type_ids=token_type_ids)

    monkeypatch.setattr(worker, "forward_taps", small_memory)
    out = tmp_path / "oom.zarr"
    _extract(out, codec="fp32", splits=["validation"])
    assert max(sizes) > 2 and any(s <= 2 for s in sizes)
    a, b = ActivationCache.open(str(ref)).split("validation"), ActivationCache.open(str(out)).split("validation")
    for tap in (0, 6):
        torch.testing.assert_close(b.read_rows(tap, 0, b.num_tokens), a.read_rows(tap, 0, a.num_tokens),
                                   rtol=1e-5, atol=2e-5)


@pytest.mark.integration
def test_full_disk_keeps_finished_shards_and_resumes(tmp_path, monkeypatch, capsys):
    import errno

    from pipeline.cache.store import SplitView

    out = tmp_path / "c.zarr"
    real = SplitView.write_shard
    calls = {"n": 0}

    def full_disk(self, shard, values, decoder=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, shard, values, decoder)

    monkeypatch.setattr(SplitView, "write_shard", full_disk)
    code = lst_main(["extract", "--max-examples", str(N), "--splits", "validation", "--shard-tokens", "128",
                     "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and "re-run the same command to resume" in err
    done = ActivationCache.open(str(out)).split("validation").done()
    assert done[:2].all() and not done[2]  # shards written before the failure are kept, the failed one is not
    monkeypatch.setattr(SplitView, "write_shard", real)
    res = _extract(out, splits=["validation"])
    assert res["resumed"] and res["complete"] and res["shards_computed"] == int(done.size - done.sum())


@pytest.mark.integration
def test_uncompressed_taps_read_the_same_values_through_the_direct_path(tmp_path):
    """--compression none stores tap chunks as level-0 Blosc frames: every value reads back equal to the
    lz4 store's, the reader's direct shard path still takes them, and a resume asking for the other
    packing is refused (the stored bytes differ)."""
    from pipeline.cache.fastread import DirectArray

    packed, plain = tmp_path / "lz4.zarr", tmp_path / "none.zarr"
    _extract(packed, splits=["validation"])
    _extract(plain, splits=["validation"], compression="none")
    a, b = ActivationCache.open(str(packed)), ActivationCache.open(str(plain))
    assert "compression" not in a.fingerprint and b.fingerprint["compression"] == "none"
    for tap in a.taps:
        x, y = a.split("validation").tap_array(tap), b.split("validation").tap_array(tap)
        np.testing.assert_array_equal(x[:], y[:])
        blosc = y.metadata.codecs[0].codecs[1]
        assert blosc.clevel == 0 and DirectArray.for_array(y) is not None
        d = DirectArray.for_array(y)
        out = np.empty((y.shape[0] - 3, y.shape[1]), dtype=d.dtype)
        d.read_into(3, y.shape[0], out)
        np.testing.assert_array_equal(out, x[3:])
    assert sum(f.stat().st_size for f in plain.rglob("*") if f.is_file()) > \
        sum(f.stat().st_size for f in packed.rglob("*") if f.is_file())
    with pytest.raises(CacheError, match="compression"):
        _extract(packed, splits=["validation"], compression="none")
    from pipeline.cache.inspect import inspect_cache

    assert inspect_cache(b)["compression"] == "none" and inspect_cache(a)["compression"] == "lz4"
