"""Output directories: lst writes into, and clears, only what it wrote (session 41's audit found
``--overwrite`` emptying the current directory and files lst never wrote)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as lst_main
from pipeline.errors import ExtractError, TrainError, UserError
from pipeline.extract.config import ExtractConfig
from pipeline.outdirs import check_out_dir
from pipeline.train.config import TrainConfig
from pipeline.train.rundir import RunDir


def _prepare(path: Path, overwrite: bool = False) -> bool:
    return RunDir(path).prepare(TrainConfig(cache="c.zarr", out=str(path), overwrite=overwrite), {}, resumable=True)


def _keepsake(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = d / "precious.txt"
    f.write_text("mine")
    return f


def test_the_current_directory_its_parents_home_root_and_files_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for bad, what in ((".", "current directory"), ("..", "parent"), (str(tmp_path), "parent"),
                      ("~", "home directory"), ("/", "parent|root")):
        with pytest.raises(UserError, match=what):
            check_out_dir(Path(bad).expanduser() if bad == "~" else bad)
    (work / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_out_dir("f.txt")
    check_out_dir("runs/new")  # a new directory, or one below the current one, is fine
    check_out_dir(work / "sub")


def test_overwrite_never_clears_a_directory_that_is_not_a_run(tmp_path, monkeypatch):
    keep = _keepsake(tmp_path / "notes")
    for overwrite in (False, True):
        with pytest.raises(TrainError, match="not a run directory"):
            _prepare(tmp_path / "notes", overwrite)
        assert keep.read_text() == "mine"
    monkeypatch.chdir(tmp_path / "notes")
    with pytest.raises(UserError, match="current directory"):
        _prepare(Path("."), overwrite=True)
    assert keep.read_text() == "mine"
    assert not _prepare(tmp_path / "fresh") and not _prepare(tmp_path / "empty_dir_made" / "x")


def test_overwrite_clears_a_run_but_not_files_a_run_never_writes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoint").mkdir()
    keep = _keepsake(run)
    with pytest.raises(TrainError, match="files no run writes.*precious.txt"):
        _prepare(run, overwrite=True)
    assert keep.exists() and (run / "config.yaml").exists()
    keep.unlink()
    assert not _prepare(run, overwrite=True) and not run.exists()  # its own files only: cleared


def test_lst_extract_refuses_the_current_directory_before_any_work(tmp_path, monkeypatch, capsys):
    keep = _keepsake(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    assert lst_main(["extract", "--out", ".", "--overwrite", "--no-progress"]) == 2
    assert "current directory" in capsys.readouterr().err and keep.read_text() == "mine"


def test_extract_options_out_of_range_are_refused():
    for bad in (dict(workers=-1), dict(shard_tokens=0), dict(max_length=-1), dict(batch_tokens=0),
                dict(max_examples=0), dict(fisher_samples=-1), dict(dropout_draws=-2), dict(dev_fraction=1.5)):
        with pytest.raises(ExtractError, match=next(iter(bad))):
            ExtractConfig(**bad)
    ExtractConfig(workers=0, max_examples=1, fisher_samples=0)


def test_patience_zero_is_refused():
    with pytest.raises(TrainError, match="patience=0"):
        TrainConfig(cache="c", out="o", patience=0)


def test_a_sweep_starts_only_in_a_new_or_empty_directory_or_its_own(tmp_path):
    from pipeline.search.sweep import _check_out

    keep = _keepsake(tmp_path / "mine")
    with pytest.raises(TrainError, match="holds no sweep"):
        _check_out(tmp_path / "mine")
    assert keep.exists()
    (tmp_path / "mine" / "study.journal").write_text("")
    _check_out(tmp_path / "mine")  # a sweep of its own resumes
    _check_out(tmp_path / "new")
    _keepsake(tmp_path / "staged").with_name("space.yaml").write_text("r: [8]\n")
    with pytest.raises(TrainError, match="holds no sweep"):  # the space file is its own, the keepsake is not
        _check_out(tmp_path / "staged", tmp_path / "staged" / "space.yaml")
    (tmp_path / "staged" / "precious.txt").unlink()
    _check_out(tmp_path / "staged", tmp_path / "staged" / "space.yaml")  # as the DVC stage writes it
