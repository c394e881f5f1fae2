"""Search on real computations: fused variants == separate runs, killed sweeps resume, Dask workers share
one study, the report, and clear errors for bad space files."""

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
import yaml

from pipeline.cli import main as lst_main
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.search.fused import train_many
from pipeline.search.space import KNOBS, SpaceError, load_space
from pipeline.search.sweep import SweepConfig, open_study, run_sweep
from pipeline.errors import TrainError
from pipeline.train.trainer import TrainConfig, train

SPACE = {"r": [8, 16], "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "weight_decay": [0.0, 0.01],
         "dropout": 0.0, "epochs": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("caches") / "sweep-minilm.zarr"
    run_extract(ExtractConfig(backbone="minilm", dataset="sst2", out=str(out), max_examples=48, codec="fp32",
                              shard_tokens=256, progress=False))
    return str(out)


@pytest.mark.integration
def test_fused_variants_equal_separate_runs(tmp_path, cache):
    common = dict(cache=cache, epochs=2, batch_size=8, seed=3, progress=False)
    variants = [  # three of one shape, one of another shape (dropout on)
        dict(side={"dropout": 0.0}, lr=1e-3, weight_decay=0.01, warmup_ratio=0.06),
        dict(side={"dropout": 0.0}, lr=3e-3, weight_decay=0.0, warmup_ratio=0.3),
        dict(side={"dropout": 0.0, "init": "magnitude"}, lr=2e-3, weight_decay=0.1, warmup_ratio=0.0),
        dict(side={"dropout": 0.1, "r": 16, "layers": [2, 4]}, lr=2e-3, weight_decay=0.01, grad_clip=0.5,
             recompute=True),  # blocks rerun in the backward: the same numbers as the plain reference
    ]
    cfgs = [TrainConfig(out=str(tmp_path / f"fused{i}"), **common, **v) for i, v in enumerate(variants)]
    seen: list[tuple[int, int]] = []

    def on_epoch(i, row):  # prune variant 1 after its first epoch: the others must go on unchanged
        seen.append((i, row["epoch"]))
        return i == 1 and row["epoch"] == 1

    fused = train_many(cfgs, on_epoch=on_epoch)
    assert [f["fused_variants"] for f in fused] == [4, 4, 4, 4]
    assert sorted(seen) == [(0, 1), (0, 2), (1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert fused[1]["pruned"] and fused[1]["epochs_run"] == 1 and fused[0]["epochs_run"] == 2
    for i, (cfg, f) in enumerate(zip(cfgs, fused)):
        ref = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / f"sep{i}"), "recompute": False}))
        n = len(f["first_losses"])
        assert n == (6 if i == 1 else 12)
        np.testing.assert_allclose(f["first_losses"], ref["first_losses"][:n], atol=1e-5, rtol=0, err_msg=f"variant {i}")
        if i == 1:  # pruned after epoch 1: that epoch matches the reference's first
            ref_row = json.loads((tmp_path / "sep1" / "metrics.jsonl").read_text().splitlines()[0])
            got_row = json.loads((tmp_path / "fused1" / "metrics.jsonl").read_text().splitlines()[0])
            assert got_row["dev_score"] == ref_row["dev_score"]
            continue
        assert f["dev_score"] == ref["dev_score"], i
        assert f["final"]["dev_loss"] == pytest.approx(ref["final"]["dev_loss"], abs=1e-5)
        assert f["trainable_params"] == ref["trainable_params"]
        assert set(ref) <= set(f), set(ref) - set(f)
        for name in ("config.yaml", "side.safetensors", "metrics.jsonl", "summary.json"):
            assert (tmp_path / f"fused{i}" / name).exists()
    assert fused[3]["first_losses"] == train(TrainConfig(**{**cfgs[3].to_dict(), "out": str(tmp_path / "again")}))[
        "first_losses"]  # the solo path reproduces train() exactly, dropout stream included


def test_variants_on_threads_equal_variants_in_turn(tmp_path, cache):
    """Variant threads each draw dropout from their own generator (tap, hidden and attention dropout,
    a block rerun in the backward): the numbers equal the variants trained in turn, and train()."""
    common = dict(cache=cache, epochs=1, batch_size=8, seed=3, progress=False)
    variants = [
        dict(side={"dropout": 0.1}, lr=1e-3),
        dict(side={"dropout": 0.1, "attention_dropout": 0.2}, lr=3e-3, recompute="blocks"),
        dict(side={"dropout": 0.2, "r": 16}, lr=2e-3, grad_clip=0.5),
    ]
    before = torch.get_num_threads()
    threaded = train_many([TrainConfig(out=str(tmp_path / f"t{i}"), **common, **v) for i, v in enumerate(variants)],
                          variant_threads=2)
    assert torch.get_num_threads() == before
    in_turn = train_many([TrainConfig(out=str(tmp_path / f"s{i}"), **common, **v) for i, v in enumerate(variants)],
                         variant_threads=1)
    assert [s["variant_threads"] for s in threaded] == [2, 2, 2] and in_turn[0]["variant_threads"] == 1
    for i, (a, b) in enumerate(zip(threaded, in_turn)):
        assert a["first_losses"] == b["first_losses"], i
        assert a["final"]["dev_loss"] == b["final"]["dev_loss"] and a["dev_score"] == b["dev_score"], i
    solo = train(TrainConfig(out=str(tmp_path / "solo1"), **common, **variants[1]))
    assert solo["first_losses"] == threaded[1]["first_losses"]
    with pytest.raises(TrainError, match="variant_threads"):
        train_many([TrainConfig(out=str(tmp_path / "bad"), **common)], variant_threads=-1)


@pytest.mark.integration
def test_sweep_bench_times_the_real_commands_in_fresh_processes(tmp_path, cache):
    from pipeline.bench.sweep import run_sweep_bench

    r = run_sweep_bench(cache=cache, variants=2, workdir=str(tmp_path / "bench"), threads=1, progress=False)
    assert r["fresh_processes"] and r["variants"] == 2 and r["torch_threads"] == 1
    assert r["commands"]["fused"].startswith("lst sweep ") and "--parallel 2" in r["commands"]["fused"]
    assert len(list((tmp_path / "bench" / "fused-k2" / "trials").glob("*/summary.json"))) == 2
    assert len(list((tmp_path / "bench" / "separate-k2").glob("*/summary.json"))) == 2
    assert r["max_dev_diff_fused_vs_separate_same_seed"] == 0.0  # same trials, same numbers
    assert r["fused_s"] > r["fused_train_s"] > 0 and r["separate_s"] > r["separate_train_s"] > 0 and r["live_s"] > 0
    assert r["fused_over_separate"] == pytest.approx(r["fused_s"] / r["separate_s"], abs=1e-3)
    assert r["speedup_limit"] > 1 and set(r["goals"]) >= {"fused_over_separate<=0.8", "fused_speedup_over_live>=8"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _summaries(out: Path) -> dict[int, int]:
    return {int(p.parent.name): p.stat().st_mtime_ns for p in (out / "trials").glob("*/summary.json")}


@pytest.mark.integration
def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path, cache, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", cache, "--space", str(space), "--out", str(out), "--trials", "6", "--parallel", "2",
            "--sampler", "random", "--pruner", "asha", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not _summaries(out) and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _summaries(out)
    assert 1 <= len(before) < 6, "the kill should land after a trial finished, before the sweep ended"

    assert lst_main(args) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["n_trials"] == 6 and s["trials_target"] == 6
    assert s["finished_before"] + s["new_trials"] == 6 and s["finished_before"] >= len(before)
    after = _summaries(out)
    for n, mtime in before.items():  # finished trials were neither retrained nor rewritten
        assert after[n] == mtime, f"trial {n} was recomputed"
    study = open_study(out, create=False)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 6 and all(t.number in after for t in done)
    assert (out / "sweep.json").exists() and json.loads((out / "sweep.json").read_text())["n_trials"] == 6
    # a finished sweep re-run does nothing
    assert lst_main(args) == 0
    s2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s2["new_trials"] == 0 and s2["n_trials"] == 6 and _summaries(out) == after


@pytest.fixture(scope="module")
def dask_sweep(tmp_path_factory, cache) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dask") / "sweep"
    s = run_sweep(SweepConfig(cache=cache, space=SPACE, out=str(out), trials=4, parallel=1, workers=2,
                              sampler="tpe", progress=False))
    return out, s


@pytest.mark.integration
def test_two_dask_workers_fill_one_study(dask_sweep):
    out, s = dask_sweep
    assert s["workers"] == 2 and len(s["per_worker"]) == 2
    assert sum(w["trials"] for w in s["per_worker"]) == 4
    assert len({w["worker"] for w in s["per_worker"]}) == 2
    study = open_study(out, create=False)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 1
    assert sorted(_summaries(out)) == [0, 1, 2, 3]
    assert list(out.glob("*.journal")) == [out / "study.journal"]
    assert s["best_trial"] in range(4) and s["best_params"]


@pytest.mark.integration
def test_existing_cluster_via_scheduler_address_continues_the_study(dask_sweep, tmp_path):
    import shutil

    from distributed import LocalCluster

    out = tmp_path / "sweep"
    shutil.copytree(dask_sweep[0], out)
    before = _summaries(out)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        s = run_sweep(SweepConfig(cache=dask_sweep[1]["cache"], space=SPACE, out=str(out), trials=5, parallel=1,
                                  scheduler=cluster.scheduler_address, sampler="tpe", progress=False))
    assert s["n_trials"] == 5 and s["finished_before"] == 4 and s["new_trials"] == 1 and s["workers"] == 1
    after = _summaries(out)
    assert sorted(after) == [0, 1, 2, 3, 4] and all(after[n] == before[n] for n in before)


@pytest.mark.integration
def test_report_writes_leaderboard_plots_and_dvc_files(dask_sweep, capsys):
    out, s = dask_sweep
    assert lst_main(["report", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for f in ("leaderboard.md", "leaderboard.json", "score_vs_params.png", "score_vs_memory.png",
              "learning_curves.png", "metrics.json", "plots/leaderboard.csv", "plots/learning_curves.csv"):
        assert (out / f).exists() and f in r["files"], f
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    board = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert [b["rank"] for b in board] == [1, 2, 3, 4]
    scores = [b["dev_score"] for b in board]
    assert scores == sorted(scores, reverse=True) and scores[0] == s["best_dev_score"]
    assert all(b["trainable_params"] > 0 and b["side_mem_mb"] > 0 for b in board)
    assert {"r", "lr", "weight_decay"} <= set(board[0]["config"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_dev_score"] == s["best_dev_score"] and m["n_trials"] == 4
    assert (out / "plots" / "leaderboard.csv").read_text().startswith("rank,trial,state,dev_score")
    lc = (out / "plots" / "learning_curves.csv").read_text().splitlines()
    assert lc[0] == "trial,rank,epoch,dev_score,dev_loss,train_loss" and len(lc) == 1 + 4 * 2
    assert "| rank | trial |" in (out / "leaderboard.md").read_text()


@pytest.mark.parametrize("space,match", [
    ({"rank": [4, 8]}, "unknown knob.*'rank'.*known knobs: r, layers"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "lr: low .* must be below high"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "lr must be > 0"),
    ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"gate": {"low": 1, "high": 2}}, "gate is categorical"),
    ({"r": [4, "x"]}, "r: 'x' is not an integer"),
    ({"r": []}, "r: empty list"),
    ({"lr": {"low": 1e-4, "hi": 1e-2}}, r"a range is \{low"),
    ({"gate": ["learnable", "sideways"]}, "gate: 'sideways' is not one of"),
    ({"layers": [[1, 2], [3, 3]]}, "layers.*increasing"),
    ([1, 2], "a space is a mapping of knobs"),
])
def test_bad_space_files_give_clear_errors(tmp_path, space, match):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    with pytest.raises(SpaceError, match=match):
        load_space(p)


@pytest.mark.integration
def test_space_parsing_and_errors_against_the_cache(tmp_path, cache, capsys):
    p = tmp_path / "space.yaml"
    p.write_text("r: [4, 8]\nlayers: [all, [2, 4, 6], '1,3']\nlr: {low: 1e-4, high: 1e-2, log: true}\n"
                 "batch_size: {low: 8, high: 32, step: 8}\nepochs: 2\n")
    sp = load_space(p)  # YAML reads 1e-4 as a string: it is a number here
    assert sp.knobs["lr"].kind == "float" and sp.knobs["lr"].low == 1e-4
    assert sp.knobs["layers"].values == ["all", "2,4,6", "1,3"] and sp.knobs["epochs"].kind == "fixed"
    assert sp.knobs["batch_size"].grid() == [8, 16, 24, 32]
    assert sp.train_fields({"layers": "2,4,6", "r": 4, "lr": 1e-3})["side"] == {"layers": [2, 4, 6], "r": 4}
    assert "layers" not in load_space({"layers": [1, 2, 3]}).searched  # a flat list is one layer set
    assert set(KNOBS) >= {"r", "layers", "gate", "block", "init", "pooling", "lr", "weight_decay", "warmup_ratio",
                          "epochs", "dropout", "batch_size"}
    with pytest.raises(TrainError, match="grid sampler needs a list"):
        run_sweep(SweepConfig(cache=cache, space=str(p), out=str(tmp_path / "g"), sampler="grid", progress=False))
    with pytest.raises(TrainError, match="layers=7.*1..6"):
        run_sweep(SweepConfig(cache=cache, space={"layers": [[7]], "epochs": 1}, out=str(tmp_path / "l"),
                              progress=False))
    with pytest.raises(TrainError, match="r=5 cannot be built"):
        run_sweep(SweepConfig(cache=cache, space={"r": [5, 8]}, out=str(tmp_path / "r"), progress=False))
    # the CLI prints the error as one line, no traceback, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("rr: [1]\n")
    assert lst_main(["sweep", "--cache", cache, "--space", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "lst sweep: error:" in err and "known knobs" in err and "Traceback" not in err
    # a different sweep in the same directory is refused
    run_sweep(SweepConfig(cache=cache, space={**SPACE, "epochs": 1}, out=str(tmp_path / "s"), trials=1,
                          progress=False))
    with pytest.raises(TrainError, match="holds a different sweep"):
        run_sweep(SweepConfig(cache=cache, space=SPACE, out=str(tmp_path / "s"), trials=1, progress=False))


@pytest.mark.integration
def test_grid_sweep_runs_the_whole_grid_once(tmp_path, cache, capsys):
    """Optuna's grid sampler stops the study from after_trial when the grid is used up; outside
    study.optimize that raised from tell. Every grid point runs exactly once."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": [1e-3, 3e-3], "weight_decay": [0.0, 0.01], "epochs": 1, "batch_size": 16}))
    args = ["sweep", "--cache", cache, "--space", str(space), "--out", str(tmp_path / "grid"), "--trials", "10",
            "--parallel", "2", "--sampler", "grid", "--no-progress", "--json"]
    assert lst_main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["trials_target"] == 4 and res["n_complete"] == 4
    runs = [yaml.safe_load(p.read_text())["train"] for p in (tmp_path / "grid" / "trials").glob("*/config.yaml")]
    assert sorted((r["lr"], r["weight_decay"]) for r in runs) == [(1e-3, 0.0), (1e-3, 0.01), (3e-3, 0.0), (3e-3, 0.01)]


@pytest.mark.integration
def test_resumed_grid_sweep_runs_the_remaining_points_not_repeats(tmp_path, cache, capsys):
    """A grid sweep resumed (after a kill, or with more --trials) must map the grid ids its first run
    recorded to the same points: the grid sampler's seed shuffles the grid, so it may not shift with
    the resume or the worker (it did, and a resumed grid re-ran one point and skipped another)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": [1e-3, 3e-3], "weight_decay": [0.0, 0.01], "epochs": 1, "batch_size": 16}))
    base = ["sweep", "--cache", cache, "--space", str(space), "--out", str(tmp_path / "grid"),
            "--sampler", "grid", "--seed", "5", "--no-progress", "--json"]
    assert lst_main([*base, "--trials", "1"]) == 0
    assert lst_main([*base, "--trials", "2"]) == 0
    assert lst_main([*base, "--trials", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_complete"] == 4
    runs = [yaml.safe_load(p.read_text())["train"] for p in (tmp_path / "grid" / "trials").glob("*/config.yaml")]
    assert sorted((r["lr"], r["weight_decay"]) for r in runs) == [(1e-3, 0.0), (1e-3, 0.01), (3e-3, 0.0), (3e-3, 0.01)]


def test_grid_sampler_maps_ids_the_same_in_every_worker_and_resume():
    from pipeline.search.space import load_space
    from pipeline.search.sweep import _sampler

    space = load_space({"lr": [1e-3, 3e-3, 1e-2], "r": [4, 8, 16], "epochs": 1})
    cfg = SweepConfig(cache="unused", out="unused", space={}, sampler="grid", seed=7)
    grids = {tuple(_sampler(cfg, space, w, offset=o)._all_grids) for w in (0, 1, 3) for o in (0, 2, 9)}
    assert len(grids) == 1


def test_sweep_bench_separate_sample_spreads_over_k_and_keeps_trial_zero(capsys):
    from pipeline.bench.sweep import separate_sample

    assert separate_sample(16, 0) == list(range(16)) and separate_sample(4, 8) == [0, 1, 2, 3]
    got = separate_sample(64, 8)
    assert got == [0, 8, 16, 24, 32, 40, 48, 56]
    assert separate_sample(16, 3) == [0, 5, 11] and separate_sample(5, 1) == [0]
    with pytest.raises(ValueError, match="separate_runs"):
        separate_sample(4, -1)
    assert lst_main(["bench", "sweep", "--separate-runs", "-2"]) == 2
    assert "--separate-runs -2" in capsys.readouterr().err


def test_side_memory_probe_runs_on_the_models_device():
    """The fused sweep's per-variant memory probe built its batch on the CPU, so on a GPU every fused trial
    failed ('mat1 is on cpu', seen on an H200). A model on another device (meta stands in for CUDA here)
    now gets its probe batch there, and the CPU number is unchanged."""
    from transformers import BertConfig

    from pipeline.search.fused import side_train_memory_mb
    from pipeline.side.config import SideConfig
    from pipeline.side.model import LadderSideNetwork

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)
    model = LadderSideNetwork(SideConfig(r=4, dropout=0.1, num_labels=2), cfg)
    on_cpu = side_train_memory_mb(model, 8, 16, 32)
    assert on_cpu > side_train_memory_mb(model.to("meta"), 8, 16, 32) > 0  # meta: parameters only, no error


def test_sweep_trials_keep_their_activations_unless_told_to_recompute(tmp_path):
    """`lst sweep` trials default to --recompute none (a fused sweep steps few variants at once);
    the flag, or a sweep train option, still chooses, and the CLI passes it through."""
    from pipeline.cli import build_parser
    from pipeline.cli.options import given
    from pipeline.cli.search import TRIAL_OPTIONS
    from pipeline.search.sweep import SWEEP_RECOMPUTE, _trial_config

    space = load_space({"lr": [1e-3]})
    base = dict(cache="c.zarr", space={"lr": [1e-3]}, out=str(tmp_path / "s"))
    assert SWEEP_RECOMPUTE == "none"
    assert _trial_config(SweepConfig(**base), space, {"lr": 1e-3}, 0).recompute == "none"
    assert _trial_config(SweepConfig(**base, train={"recompute": "ffn"}), space, {"lr": 1e-3}, 0).recompute == "ffn"
    for argv, want in (([], {}), (["--recompute", "blocks"], {"recompute": "blocks"})):
        a = build_parser().parse_args(["sweep", "--cache", "c", "--space", "s.yaml", "--out", "o", *argv])
        assert given(a, TrainConfig, TRIAL_OPTIONS) == want
