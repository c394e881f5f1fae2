"""Damaged stores, bad store URLs and failed extractions: one clear line, never a traceback.

`lst train`/`lst inspect` refuse a damaged store with one stderr line and exit status 2 naming
what is wrong and to re-extract; `lst verify` reports it as FAILED (exit 1). Tests that need a
real extraction (a tiny random BERT over SST-2 under $LST_DATA_DIR) are marked integration.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import ChecksumError

ROOT = Path(__file__).resolve().parents[1]
SHARD = "train/acts/layer_1/c/0/0"  # one tap's first shard file


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process: its exit status, stdout and stderr."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _lst(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lst ARGS` in a subprocess, as a user runs it (one compute thread, as conftest sets here)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=300)


def _one_line_error(rc: int, err: str, command: str, *needles: str) -> None:
    """Exit status 2, no traceback, the error on one line of stderr holding every needle."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"lst {command}: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


# -- no store needed ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_unknown_protocol_is_one_line(capsys, command):
    rc, _, err = _run([command, "bogus://x", *(["--no-progress"] if command == "verify" else [])], capsys)
    _one_line_error(rc, err, command, "bogus://x", "unknown storage protocol 'bogus'")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_uninstalled_filesystem_is_one_line(capsys):
    rc, _, err = _run(["inspect", "s3://b/x.zarr"], capsys)
    _one_line_error(rc, err, "inspect", "s3://b/x.zarr", "not installed", "pip install s3fs")


def test_extract_into_unknown_protocol_is_one_line(capsys):
    """Refused before the backbone or dataset loads (was ``ValueError: Protocol not known``)."""
    rc, _, err = _run(["extract", "--backbone", "minilm", "--dataset", "sst2", "--out", "bogus://x.zarr",
                       "--no-progress"], capsys)
    _one_line_error(rc, err, "extract", "unknown storage protocol")


@pytest.mark.parametrize("content", ["file", "rundir"])
def test_inspect_a_directory_that_is_not_a_cache(tmp_path, capsys, content):
    """Not advice to extract into it (extract refuses a non-empty directory that is not a cache)."""
    d = tmp_path / "somewhere"
    d.mkdir()
    if content == "file":
        (d / "notes.txt").write_text("hi\n")
    else:  # what a training run directory holds
        (d / "config.yaml").write_text("lr: 0.001\n")
        (d / "metrics.jsonl").write_text("")
    for command in ("inspect", "verify"):
        rc, _, err = _run([command, d, *(["--no-progress"] if command == "verify" else [])], capsys)
        _one_line_error(rc, err, command, str(d), "not an lst activation cache", "new directory")
        assert f"--out {d}" not in err


def test_an_empty_or_missing_path_still_points_at_extract(tmp_path, capsys):
    for p in (tmp_path / "missing.zarr", tmp_path):
        rc, _, err = _run(["inspect", p], capsys)
        _one_line_error(rc, err, "inspect", f"run `lst extract ... --out {p}` first")


# -- damaged copies of a real (tiny) store ----------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_backbones) -> Path:
    from pipeline.extract.runner import ExtractConfig, run_extract

    out = tmp_path_factory.mktemp("damage") / "c.zarr"
    run_extract(ExtractConfig(backbone=tiny_backbones["bert"], dataset="sst2", out=str(out), max_examples=12,
                              shard_tokens=64, batch_tokens=256, progress=False))
    return out


def _damage(store: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``store`` damaged ``how`` (as the audit did with cp -r, truncate, echo and rm)."""
    dst = tmp_path / "d.zarr"
    shutil.copytree(store, dst)
    if how == "truncate-shard":
        f = dst / SHARD
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty-shard":
        (dst / SHARD).write_bytes(b"")
    elif how == "garbage-root":
        (dst / "zarr.json").write_text("{garbage\n")
    elif how == "empty-root":
        (dst / "zarr.json").write_bytes(b"")
    elif how == "no-split":
        shutil.rmtree(dst / "validation")
    elif how == "no-tap-metadata":
        (dst / "train/acts/layer_2/zarr.json").unlink()
    else:
        raise AssertionError(how)
    return dst


SHARD_DAMAGE = {"truncate-shard": "shard index checksum mismatch", "empty-shard": "too short to hold its shard index"}
# what `lst train` and `lst verify` say: an empty file is refused before any read (Zarr reads it as zeros)
TRAIN_SAYS = {**SHARD_DAMAGE, "empty-shard": "is marked done but its file"}
VERIFY_SAYS = {"truncate-shard": "checksum", "empty-shard": "is empty"}
METADATA_DAMAGE = {
    "garbage-root": "root zarr.json does not read",
    "empty-root": "root zarr.json does not read",
    "no-split": "split validation is missing",
    "no-tap-metadata": "train/acts/layer_2 is missing",
}


@pytest.mark.integration
@pytest.mark.parametrize("how", list(SHARD_DAMAGE))
def test_cut_shard_reads_name_the_file(store, tmp_path, how):
    """Was ``OverflowError`` (a garbage index offset, in ``block_nbytes``) and ``OSError: [Errno 22]`` (a
    negative offset, in ``_shard_index``) where a shard file is cut short."""
    import numpy as np

    from pipeline.cache.fastread import DirectArray
    from pipeline.cache.store import ActivationCache

    arr = ActivationCache.open(str(_damage(store, tmp_path, how))).split("train").tap_array(1)
    d = DirectArray.for_array(arr)
    assert d is not None
    assert d.block_nbytes() == d.chunk_nbytes  # no header to read: the safe upper bound, the read reports it
    for read in (lambda: d.read(0, 8), lambda: d.read_into(0, 8, np.empty((8, *d.row_shape), d.dtype))):
        with pytest.raises(ChecksumError, match=f"{SHARD}: .*{SHARD_DAMAGE[how]}.*store is damaged.*--overwrite"):
            read()


@pytest.mark.integration
@pytest.mark.parametrize("how", list(SHARD_DAMAGE))
def test_train_on_a_cut_shard_is_one_line(store, tmp_path, how):
    d = _damage(store, tmp_path, how)
    r = _lst(["train", "--cache", d, "--out", tmp_path / "run", "--epochs", 1, "--max-steps", 2, "--no-progress"])
    _one_line_error(r.returncode, r.stderr, "train", SHARD, TRAIN_SAYS[how], "damaged", "--overwrite")


@pytest.mark.integration
@pytest.mark.parametrize("how", [*SHARD_DAMAGE, *METADATA_DAMAGE])
def test_verify_reports_damage_as_failed(store, tmp_path, capsys, how):
    d = _damage(store, tmp_path, how)
    rc, out, err = _run(["verify", d, "--no-progress"], capsys)
    assert rc == 1, err
    assert f"{d}: FAILED" in out
    if how in SHARD_DAMAGE:
        assert "corrupt: train shard 0 acts/layer_1 " in out and VERIFY_SAYS[how] in out
    else:
        assert f"problem: {'cache ' if how != 'no-split' else ''}" in out and METADATA_DAMAGE[how] in out


@pytest.mark.integration
@pytest.mark.parametrize("how", list(METADATA_DAMAGE))
def test_inspect_refuses_damaged_metadata_in_one_line(store, tmp_path, capsys, how):
    d = _damage(store, tmp_path, how)
    rc, _, err = _run(["inspect", d], capsys)
    _one_line_error(rc, err, "inspect", METADATA_DAMAGE[how], "damaged", "--overwrite")


@pytest.mark.integration
@pytest.mark.parametrize("how", list(METADATA_DAMAGE))
def test_train_refuses_damaged_metadata_in_one_line(store, tmp_path, how):
    d = _damage(store, tmp_path, how)
    r = _lst(["train", "--cache", d, "--out", tmp_path / "run", "--epochs", 1, "--max-steps", 2, "--no-progress"])
    _one_line_error(r.returncode, r.stderr, "train", METADATA_DAMAGE[how], "damaged")


@pytest.mark.integration
def test_a_cache_missing_its_root_metadata_is_damaged_not_foreign(store, tmp_path, capsys):
    d = tmp_path / "d.zarr"
    shutil.copytree(store, d)
    (d / "zarr.json").unlink()
    rc, _, err = _run(["inspect", d], capsys)
    _one_line_error(rc, err, "inspect", "root zarr.json is missing", "damaged")
    rc, out, _ = _run(["verify", d, "--no-progress"], capsys)
    assert rc == 1 and "FAILED" in out and "root zarr.json is missing" in out


# -- failed extractions --------------------------------------------------------------------------------

def _extract_args(backbone: str, out) -> list:
    return ["extract", "--backbone", backbone, "--dataset", "sst2", "--max-examples", 12, "--shard-tokens", 64,
            "--batch-tokens", 256, "--out", out, "--no-progress"]


@pytest.mark.integration
def test_unreachable_scheduler_is_one_line(tiny_backbones, tmp_path):
    """Was an ``OSError: Timed out trying to connect`` traceback (``lst sweep`` already said it cleanly)."""
    r = _lst([*_extract_args(tiny_backbones["bert"], tmp_path / "c.zarr"), "--scheduler", "tcp://127.0.0.1:1"],
             env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"})
    _one_line_error(r.returncode, r.stderr, "extract", "cannot reach the Dask scheduler at tcp://127.0.0.1:1")
    assert not (tmp_path / "c.zarr").exists()  # found before the store was created


@pytest.mark.integration
def test_a_refused_out_leaves_no_lock_file(tiny_backbones, tmp_path, capsys):
    out = tmp_path / "y1.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("not a cache\n")
    rc, _, err = _run(_extract_args(tiny_backbones["bert"], out), capsys)
    _one_line_error(rc, err, "extract", "not an lst activation cache")
    assert not Path(f"{out}.lock").exists()
    assert (out / "notes.txt").exists()


@pytest.mark.integration
def test_a_lock_file_that_was_there_stays(tiny_backbones, tmp_path, capsys):
    """Only the lock file this process created is removed, and only where no store came of the run."""
    out = tmp_path / "y2.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("not a cache\n")
    lock = Path(f"{out}.lock")
    lock.write_text("")
    rc, _, _ = _run(_extract_args(tiny_backbones["bert"], out), capsys)
    assert rc == 2 and lock.exists()
