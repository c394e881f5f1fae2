"""Bad input to `lst train --config`, `predict`, `sweep`, `report` and `params` is one clear stderr line and exit
status 2, never a traceback, and the message says what is wrong and how to fix it (audit fixes). The unit tests
use hand-made run and sweep directories; the integration ones a small real cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

SPACE = "r: [8, 16]\nepochs: 1\nbatch_size: 16\n"


def _lst(argv: list[str], capsys) -> tuple[int, str, str]:
    """``lst ARGV`` in-process: exit status, stdout, stderr."""
    try:
        rc = main([str(x) for x in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _error(argv: list[str], capsys, *needles: str) -> str:
    """Run a command that must fail cleanly; returns its one error line after checking each needle is in it."""
    rc, out, err = _lst(argv, capsys)
    assert "Traceback" not in err + out, err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"lst {argv[0]}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- lst train --config ----------------------------------------------------------------------------

@pytest.mark.parametrize("content,needles", [
    ("foo: [unclosed\n", ("is not valid YAML", "line 2")),
    ("side: 5\n", ("side: expected a mapping", "got int 5")),
    ("train: [1, 2]\n", ("train: expected a mapping",)),
    ("- r\n- 8\n", ("expected a mapping",)),
])
def test_train_config_file_errors(tmp_path, capsys, content, needles):
    p = tmp_path / "cfg.yaml"
    p.write_text(content)
    _error(["train", "--config", p, "--cache", tmp_path / "c.zarr", "--out", tmp_path / "r"], capsys,
           f"--config {p}", *needles)


def test_train_config_that_is_a_directory_or_missing(tmp_path, capsys):
    _error(["train", "--config", tmp_path], capsys, f"--config {tmp_path} is a directory", "YAML file")
    _error(["train", "--config", tmp_path / "no.yaml"], capsys, "does not exist")


def test_train_config_of_a_run_keeps_its_side_section(tmp_path):
    """A run's own config.yaml (train: and side: sections) still loads as a --config."""
    from pipeline.cli.train import config_file

    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 3, "side": {"r": 4}}, "side": {"gate": "sum"}}))
    assert config_file(str(p)) == {"epochs": 3, "side": {"r": 4, "gate": "sum"}}
    p.write_text("epochs: 2\n")
    assert config_file(str(p)) == {"epochs": 2, "side": {}}


# -- lst predict -----------------------------------------------------------------------------------

def _fake_run(root: Path, method: str = "lst", pair: bool = False) -> Path:
    """A finished run as far as predict's checks read it (inputs are refused before any weight loads)."""
    run = root / f"run-{method}-{'pair' if pair else 'single'}"
    run.mkdir()
    columns = {"text": "sentence1", "text_pair": "sentence2", "label": "score"} if pair else \
        {"text": "sentence", "text_pair": None, "label": "label"}
    (run / "config.yaml").write_text(yaml.safe_dump({
        "train": {"method": method}, "side": {},
        "cache_fingerprint": {"backbone": "minilm", "weights_sha256": "x", "max_length": 16, "columns": columns},
        "task": {"name": "stsb" if pair else "sst2", "task_type": "regression" if pair else "classification"}}))
    (run / {"lst": "side", "bitfit": "model", "linear-probe": "probe"}[method]).with_suffix(".safetensors").touch()
    return run


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    return {"single": _fake_run(tmp_path), "pair": _fake_run(tmp_path, pair=True)}


@pytest.mark.parametrize("method", ["linear-probe", "bitfit"])
def test_predict_refuses_runs_without_a_side_network(tmp_path, capsys, method):
    run = _fake_run(tmp_path, method)
    _error(["predict", "--run", run, "--text", "hi"], capsys, f"--method {method} run",
           "LST side-network runs only")


def test_predict_device_cuda_without_cuda_is_one_line(runs, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _error(["predict", "--run", runs["single"], "--text", "hi", "--device", "cuda"], capsys,
           "--device cuda", "no CUDA device", "--device cpu")


def test_predict_empty_text_and_pair_mismatches(runs, capsys):
    _error(["predict", "--run", runs["single"], "--text", ""], capsys, "--text is empty")
    _error(["predict", "--run", runs["single"], "--text", "  "], capsys, "--text is empty")
    _error(["predict", "--run", runs["pair"], "--text", "a man", "--text-pair", ""], capsys, "--text-pair is empty")
    _error(["predict", "--run", runs["pair"], "--text", "a man plays"], capsys,
           "task stsb takes sentence pairs", "--text-pair")
    _error(["predict", "--run", runs["single"], "--text", "good", "--text-pair", "bad"], capsys,
           "task sst2 takes one text", "drop --text-pair")
    _error(["predict", "--run", runs["single"]], capsys, "give exactly one of --text")


@pytest.mark.parametrize("name,content,run,needles", [
    ("e2.csv", 'text\n"good"\n""\n', "single", ("column 'text' is empty in data row(s) 2", "fill or drop")),
    ("e3.csv", 'text,text_pair\n"a","b"\n"c",""\n', "pair", ("column 'text_pair' is empty in data row(s) 2",)),
    ("empty.txt", "", "single", ("holds no texts",)),
    ("blank.txt", "\n  \n", "single", ("holds no texts",)),
    ("empty.csv", "", "single", ("holds no texts",)),
    ("header.csv", "text\n", "single", ("holds no texts",)),
    ("cols.csv", "foo,bar\n1,2\n", "single", ("has columns foo, bar", "'text' (+ 'text_pair')",
                                              "'sentence1' (+ 'sentence2')", "'sentence'")),
    ("t.csv", "text\nhi\n", "pair", ("takes sentence pairs", "text + text_pair, or sentence1 + sentence2")),
    ("s12.csv", "sentence1,sentence2\na,b\n", "single", ("takes one text", "no pair column")),
    ("x.xlsx", "whatever", "single", ("use .txt, .csv",)),
])
def test_predict_input_file_errors(runs, tmp_path, capsys, name, content, run, needles):
    p = tmp_path / name
    p.write_text(content)
    _error(["predict", "--run", runs[run], "--input", p], capsys, *needles)


def test_predict_input_that_is_a_directory(runs, tmp_path, capsys):
    _error(["predict", "--run", runs["single"], "--input", tmp_path], capsys, "is a directory", "give a file")
    _error(["predict", "--run", runs["single"], "--input", tmp_path / "x.csv", "--text-pair", "b"], capsys,
           "--text-pair goes with --text")


def test_predict_reads_the_two_column_layouts(tmp_path):
    from pipeline.train.predict import read_inputs

    for header in ("sentence1,sentence2", "text,text_pair"):
        p = tmp_path / "in.csv"
        p.write_text(f"{header}\na man plays,a man sings\nx,y\n")
        assert read_inputs(p) == (["a man plays", "x"], ["a man sings", "y"])
    p.write_text("premise,hypothesis\na,b\n")  # a dataset's own pair columns, as its run records them
    assert read_inputs(p, ("premise", "hypothesis")) == (["a"], ["b"])
    p.write_text("sentence\nok\n")
    assert read_inputs(p, ("sentence", None)) == (["ok"], None)


# -- lst sweep / lst report --------------------------------------------------------------------------

@pytest.fixture
def space(tmp_path) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return p


@pytest.mark.parametrize("flags,needles", [
    (["--reader-memory", "abc"], ("--reader-memory 'abc'", "512MB")),
    (["--max-steps", "0"], ("max_steps=0", ">= 1")),
])
def test_sweep_checks_the_shared_training_flags_before_any_trial(tmp_path, capsys, space, flags, needles):
    out = tmp_path / "sw"
    _error(["sweep", "--cache", tmp_path / "c.zarr", "--space", space, "--out", out, "--trials", "2", *flags],
           capsys, *needles)
    assert not out.exists()  # refused before anything was written


def test_sweep_space_file_errors(tmp_path, capsys):
    _error(["sweep", "--cache", "c.zarr", "--space", tmp_path, "--out", tmp_path / "sw"], capsys,
           "space file", "is a directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("r: [8, 16\n")
    _error(["sweep", "--cache", "c.zarr", "--space", bad, "--out", tmp_path / "sw"], capsys, "is not valid YAML")


def test_sweep_without_a_complete_trial_fails_with_the_first_reason(tmp_path, capsys, monkeypatch):
    import pipeline.search.sweep as sweep

    summary = {"out": "sw", "n_trials": 2, "trials_target": 2, "n_complete": 0, "n_pruned": 0, "n_failed": 2,
               "new_trials": 2, "wall_s": 1.0, "first_error": "trial 0: TrainError: boom\nsecond line"}
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg: summary)
    line = _error(["sweep", "--cache", "c.zarr", "--space", "s.yaml", "--out", "sw"], capsys,
                  "no trial of sw completed", "first failure: trial 0: TrainError: boom")
    assert "second line" not in line


def _fake_sweep(root: Path, summaries: dict[int, str]) -> Path:
    """A sweep directory as report reads it: trials/<n>/summary.json (and metrics.jsonl), no journal."""
    for n, text in summaries.items():
        d = root / "trials" / str(n)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(text)
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "dev_score": 0.5, "train_loss": 0.7}) + "\n")
    return root


GOOD = json.dumps({"dev_score": 0.5, "metric": "accuracy", "trainable_params": 1000, "side_mem_mb": 1.0,
                   "epochs_run": 1})


def test_report_argument_errors(tmp_path, capsys):
    sw = _fake_sweep(tmp_path / "sw", {0: GOOD})
    for top in ("0", "-1"):
        _error(["report", sw, "--top", top], capsys, f"--top {top}", "at least 1")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _error(["report", sw, "--out", afile], capsys, f"--out {afile} is a file", "directory")
    _error(["report", afile], capsys, "is not a sweep directory")
    assert afile.read_text() == "x"


def test_report_leaves_out_a_damaged_trial_with_a_warning(tmp_path, capsys):
    sw = _fake_sweep(tmp_path / "sw", {0: "garbage", 1: GOOD})
    rc, out, err = _lst(["report", sw, "--json"], capsys)
    assert rc == 0 and "Traceback" not in err
    assert "lst report: warning: trial 0 left out" in err and "summary.json is damaged" in err
    assert [t["trial"] for t in json.loads(out.strip().splitlines()[-1])["leaderboard"]] == [1]
    _error(["report", _fake_sweep(tmp_path / "sw2", {0: "garbage"})], capsys, "no finished trials",
           "trial 0 left out")


@pytest.mark.parametrize("journal", ["garbage\n", '{"a": 1}\n'])
def test_damaged_study_journal_is_one_line(tmp_path, capsys, journal):
    from pipeline.errors import TrainError
    from pipeline.search.sweep import open_study

    sw = _fake_sweep(tmp_path / "sw", {0: GOOD})
    (sw / "study.journal").write_text(journal)
    _error(["report", sw], capsys, "study.journal is damaged", "restore it")
    with pytest.raises(TrainError, match="study.journal is damaged"):
        open_study(sw)  # what a resumed sweep opens
    assert (sw / "study.journal").read_text() == journal  # nothing lost


# -- lst params ------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,size", [("minilm", "-1"), ("minilm", "0"), ("t5-base", "0")])
def test_params_refuses_non_positive_vocab_sizes(capsys, config, size):
    _error(["params", "--backbone-config", config, "--vocab-size", size], capsys, f"--vocab-size {size}",
           "positive")


def test_params_names_every_built_in_and_its_default(capsys):
    from pipeline.backbones.registry import KNOWN_BACKBONES

    line = _error(["params", "--backbone-config", "no-such-model"], capsys, "mpnet")
    assert all(name in line for name in KNOWN_BACKBONES)
    rc, out, _ = _lst(["params", "--help"], capsys)
    assert rc == 0 and "(default t5-base)" in " ".join(out.split())


def test_params_num_labels_one_is_a_regression_head(capsys):
    rc, out, err = _lst(["params", "--backbone-config", "bert-base", "--num-labels", "1", "--json"], capsys)
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert "regression head" in r["side_model"] and r["components"]["head"] == 769  # 768 weights + bias
    _error(["params", "--backbone-config", "bert-base", "--num-labels", "0"], capsys, "--num-labels 0",
           "1 for a regression head")


# -- wording ---------------------------------------------------------------------------------------

def test_dataset_column_errors_name_the_cli_flag(tmp_path):
    from pipeline.data import load_dataset
    from pipeline.errors import DatasetError

    p = tmp_path / "c.csv"
    p.write_text("review,stars\ngood,1\nbad,0\n")
    with pytest.raises(DatasetError, match="--text-column NAME"):
        load_dataset(str(p))
    with pytest.raises(DatasetError, match="--label-column NAME"):
        load_dataset(str(p), text_column="review")


def test_fingerprint_differences_name_both_sides():
    from pipeline.cache.fingerprint import RUN_VS_GIVEN_CACHE, diff_fingerprints

    assert diff_fingerprints({"max_examples": 300}, {"max_examples": 20}) == [
        "max_examples: store has 300, requested 20"]
    assert diff_fingerprints({"max_examples": 300}, {"max_examples": 20}, RUN_VS_GIVEN_CACHE) == [
        "max_examples: the run's cache has 300, the given --cache has 20"]


# -- on a real cache ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, str]:
    from pipeline.extract.runner import ExtractConfig, run_extract

    root = tmp_path_factory.mktemp("caches")
    out = {}
    for task in ("sst2", "stsb"):
        out[task] = str(root / f"{task}.zarr")
        run_extract(ExtractConfig(backbone="minilm", dataset=task, out=out[task], max_examples=32, codec="fp32",
                                  progress=False))
    return out


@pytest.mark.integration
def test_sweep_where_every_trial_fails_exits_non_zero(tmp_path, capsys, monkeypatch, caches, space):
    import pipeline.search.fused as fused
    from pipeline.errors import TrainError

    def boom(*a, **k):
        raise TrainError("the batch is too large for this trial")

    monkeypatch.setattr(fused, "train_many", boom)
    out = tmp_path / "sw"
    _error(["sweep", "--cache", caches["sst2"], "--space", space, "--out", out, "--trials", "2", "--no-progress"],
           capsys, "no trial of", "first failure: trial 0", "the batch is too large")
    assert (out / "sweep.json").exists() and (out / "study.journal").exists()  # the study is kept


@pytest.mark.integration
def test_sweep_out_file_and_damaged_resume(tmp_path, capsys, caches, space):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _error(["sweep", "--cache", caches["sst2"], "--space", space, "--out", afile], capsys, "is a file")
    out = tmp_path / "sw"
    argv = ["sweep", "--cache", caches["sst2"], "--space", space, "--out", out, "--trials", "1", "--no-progress"]
    assert _lst(argv, capsys)[0] == 0
    journal = (out / "study.journal").read_text()
    (out / "study.journal").write_text("garbage\n")
    _error([*argv[:-2], "2"], capsys, "study.journal is damaged", "another --out")
    (out / "study.journal").write_text(journal)
    (out / "sweep_config.json").write_text("{")
    _error([*argv[:-2], "2"], capsys, "sweep_config.json is damaged")


@pytest.mark.integration
def test_predict_on_real_runs(tmp_path, capsys, caches):
    common = ["--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--no-progress"]
    pair_run, probe_run = tmp_path / "pair", tmp_path / "probe"
    assert _lst(["train", "--cache", caches["stsb"], "--out", pair_run, *common], capsys)[0] == 0
    assert _lst(["train", "--cache", caches["sst2"], "--out", probe_run, "--method", "linear-probe", *common],
                capsys)[0] == 0
    _error(["predict", "--run", probe_run, "--text", "hi"], capsys, "--method linear-probe run")
    _error(["predict", "--run", pair_run, "--text", "a man plays"], capsys, "--text-pair")
    p = tmp_path / "pairs.csv"
    p.write_text("sentence1,sentence2\na man plays a guitar,a man plays music\na cat sleeps,the stock fell\n")
    rc, out, err = _lst(["predict", "--run", pair_run, "--input", p, "--json"], capsys)
    assert rc == 0, err
    preds = json.loads(out.strip().splitlines()[-1])["predictions"]
    assert [x["text"] for x in preds] == ["a man plays a guitar", "a cat sleeps"]
    assert all(isinstance(x["score"], float) for x in preds)
