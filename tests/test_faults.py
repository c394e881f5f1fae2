"""Faults, a few of each (the full counts live in `lst bench faults`): damaged stores are refused,
checkpoints are never half-loaded, bad labels and configs get clean errors, kills resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import initpack
from pipeline.cache.inspect import verify_cache
from pipeline.cache.store import ActivationCache
from pipeline.errors import CacheError, DatasetError, LstError, TrainError
from tests.conftest import assert_same_store

ROOT = Path(__file__).resolve().parents[1]


# -- unit: checkpoints ---------------------------------------------------------------------------------

def _tiny_opt():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt, sched


def test_checkpoint_kill_between_files_keeps_the_old_point(tmp_path, monkeypatch):
    from pipeline.train import checkpoint as ckpt

    model, opt, sched = _tiny_opt()
    ckpt.save_resume_point(tmp_path, model, opt, sched, {"epoch": 1})
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    calls = {"n": 0}
    real = ckpt._atomic

    def dying(path, write):  # the "kill" lands after the model file, before optimizer/info
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ckpt, "_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_resume_point(tmp_path, model, opt, sched, {"epoch": 2})
    monkeypatch.setattr(ckpt, "_atomic", real)
    fresh, opt2, sched2 = _tiny_opt()
    meta = ckpt.load_resume_point(tmp_path, fresh, opt2, sched2)
    assert meta["epoch"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, old[k])
    ckpt.save_resume_point(tmp_path, model, opt, sched, {"epoch": 2})  # stray files are cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["info.json", "model.3.safetensors", "optimizer.3.safetensors"]


def test_checkpoint_enospc_and_damage_are_clean_errors(tmp_path, monkeypatch):
    from pipeline.train import checkpoint as ckpt

    model, opt, sched = _tiny_opt()
    monkeypatch.setenv("LST_FAULT_ENOSPC", "checkpoint-write:1")
    with pytest.raises(TrainError, match="disk full"):
        ckpt.save_resume_point(tmp_path, model, opt, sched, {"epoch": 1})
    monkeypatch.delenv("LST_FAULT_ENOSPC")
    ckpt.save_resume_point(tmp_path, model, opt, sched, {"epoch": 1})
    info = json.loads((tmp_path / "info.json").read_text())
    (tmp_path / info["files"]["optimizer"]).write_bytes(b"\x00" * 10)
    with pytest.raises(TrainError, match="unreadable"):
        ckpt.load_resume_point(tmp_path, *_tiny_opt())
    # a tampered info.json may not point outside the checkpoint directory
    outside = tmp_path.parent / "elsewhere.safetensors"
    outside.write_bytes((tmp_path / info["files"]["model"]).read_bytes())
    for bad in ("../elsewhere.safetensors", str(outside), "info.json"):
        (tmp_path / "info.json").write_text(json.dumps({**info, "files": {**info["files"], "model": bad}}))
        with pytest.raises(TrainError, match="not a .safetensors file of this directory"):
            ckpt.load_resume_point(tmp_path, *_tiny_opt())


def test_training_options_are_range_checked():
    from pipeline.train.config import TrainConfig

    for bad, match in (({"batch_size": 0}, "batch_size"), ({"lr": -0.1}, "lr"), ({"epochs": "three"}, "epochs")):
        with pytest.raises(TrainError, match=match):
            TrainConfig.from_dict({"cache": "c", "out": "o", **bad})


# -- unit: labels ----------------------------------------------------------------------------------------

def test_unparseable_and_unseen_labels_are_clean_errors():
    import pandas as pd

    from pipeline.data.labels import RawLabels, convert_labels

    def raw(vals):
        return RawLabels(pd.Series(vals), np.arange(len(vals)), "f.jsonl")

    with pytest.raises(DatasetError, match="unparseable"):
        convert_labels({"train": raw([[0], [1], 0])}, "label", None, None)
    with pytest.raises(DatasetError, match="never seen in the train split"):
        convert_labels({"train": raw([0, 1, 0]), "validation": raw([0, 7])}, "label", None, None)


# -- stores (a small real extraction shared by the tests below) ----------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_backbones):
    from pipeline.extract.runner import ExtractConfig, run_extract

    out = tmp_path_factory.mktemp("faults") / "c.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones["bert"], dataset="sst2", out=str(out), max_examples=12,
                              shard_tokens=64, batch_tokens=256, progress=False))
    return out


def _damaged(store: Path, tmp_path: Path, rel: str, how: str) -> ActivationCache:
    dst = tmp_path / "d.zarr"
    shutil.copytree(store, dst)
    p = dst / rel
    if how == "delete":
        p.unlink()
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    return ActivationCache.open(str(dst))


@pytest.mark.integration
@pytest.mark.parametrize("rel,how,name", [
    ("train/acts/layer_1/c/0/0", "flip", "layer_1"),
    ("train/acts/embeddings/c/1/0", "delete", "embeddings"),
    ("train/offsets/c/0", "flip", "offsets"),
    ("validation/labels/c/0", "delete", "labels"),
    ("init/weights.safetensors", "truncate", "weights.safetensors"),
    ("init/config.json", "flip", "config.json"),
])
def test_damage_is_named_by_verify_and_refused(store, tmp_path, rel, how, name):
    cache = _damaged(store, tmp_path, rel, how)
    rep = verify_cache(cache)
    assert not rep.ok
    assert name in json.dumps(rep.to_dict())
    if "acts" in rel and how == "flip":
        return  # caught by the crc32c on read (the training run stops with a ChecksumError)
    with pytest.raises(CacheError):
        cache.require_complete()


@pytest.mark.integration
def test_absurd_offsets_are_refused_before_use(store, tmp_path):
    import zarr

    dst = tmp_path / "m.zarr"
    shutil.copytree(store, dst)
    arr = zarr.open_array(str(dst / "train" / "offsets"), mode="r+")
    o = arr[:]
    o[2], o[3] = o[3], o[2]  # decreasing
    arr[:] = o
    with pytest.raises(CacheError, match="offsets"):
        ActivationCache.open(str(dst)).split("train").offsets


# -- subprocesses: kills, ENOSPC, locks, predict -----------------------------------------------------------

# subprocesses compute with one thread, as this process does (conftest): BLAS kernels may block
# differently with 2 threads on a busy box, and the resumed stores are compared bit for bit
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _lst(args, env=None, **kw):
    e = {**os.environ, **ONE_THREAD, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=300, **kw)


def _extract_args(backbone, out):
    return ["extract", "--backbone", backbone, "--dataset", "sst2", "--max-examples", 12, "--shard-tokens", 64,
            "--batch-tokens", 256, "--out", out, "--no-progress"]


@pytest.mark.integration
def test_kill_between_data_and_done_flag_then_resume(store, tmp_path, tiny_backbones):
    out = tmp_path / "k.zarr"
    env = {**os.environ, **ONE_THREAD, "LST_FAULT_TRACE": "1", "LST_FAULT_SLEEP_BEFORE_DONE": "2"}
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, _extract_args(tiny_backbones["bert"], out))],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    for line in p.stderr:
        if line.startswith("lst-fault: before-done"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    v = ActivationCache.open(str(out)).split("train")
    assert not v.done()[0]  # data written, flag not: the shard is redone
    r = _lst(_extract_args(tiny_backbones["bert"], out))
    assert r.returncode == 0, r.stderr
    assert_same_store(str(store), str(out))


@pytest.mark.integration
def test_enospc_during_extraction_is_clean_and_resumable(store, tmp_path, tiny_backbones):
    out = tmp_path / "e.zarr"
    r = _lst(_extract_args(tiny_backbones["bert"], out), env={"LST_FAULT_ENOSPC": "shard-write:5"})
    assert r.returncode == 2 and "disk full" in r.stderr and "Traceback" not in r.stderr
    rep = verify_cache(ActivationCache.open(str(out)))
    assert not rep.corrupt and rep.missing  # no done flag for the shard cut short
    r = _lst(_extract_args(tiny_backbones["bert"], out))
    assert r.returncode == 0, r.stderr
    assert_same_store(str(store), str(out))


@pytest.mark.integration
def test_damaged_store_refused_by_train_with_exit_2(store, tmp_path):
    dst = tmp_path / "d.zarr"
    shutil.copytree(store, dst)
    (dst / "train" / "acts" / "layer_2" / "c" / "0" / "0").unlink()
    r = _lst(["train", "--cache", dst, "--out", tmp_path / "run", "--epochs", 1, "--no-progress"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "marked done" in r.stderr


@pytest.mark.integration
def test_corrupt_side_safetensors_to_predict(store, tmp_path):
    run = tmp_path / "run"
    r = _lst(["train", "--cache", store, "--out", run, "--epochs", 1, "--batch-size", 8, "--no-progress"])
    assert r.returncode == 0, r.stderr
    (run / "side.safetensors").write_bytes(b"\xff" * 64)
    r = _lst(["predict", "--run", run, "--text", "a fine film"])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "side.safetensors" in r.stderr


@pytest.mark.integration
def test_initpack_checksum_is_checked(store, tmp_path):
    dst = tmp_path / "i.zarr"
    shutil.copytree(store, dst)
    assert initpack.verify_init_pack(str(dst)) == []
    p = dst / "init" / "config.json"
    p.write_text(p.read_text().replace("32", "33", 1))
    with pytest.raises(LstError, match="sha256"):
        initpack.read_config(str(dst))
