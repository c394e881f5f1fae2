"""Stage two on real computations: cache/live parity, learning on real SST-2, resume, refusals, predict."""

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

from pipeline.cache.store import ActivationCache, CacheError
from pipeline.cli import main as lst_main
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.errors import TrainError, UserError
from pipeline.metrics import majority_baseline
from pipeline.train.trainer import TrainConfig, train

# every test here trains from a real SST-2 slice (and two run `lst` in a subprocess / SIGKILL it)
pytestmark = pytest.mark.integration


def _cache(tmp_path_factory, name, backbone="minilm", n=48, codec="fp32", **kw) -> str:
    out = tmp_path_factory.mktemp("caches") / f"{name}.zarr"
    run_extract(ExtractConfig(backbone=backbone, dataset="sst2", out=str(out), max_examples=n, codec=codec,
                              shard_tokens=kw.pop("shard_tokens", 256), progress=False, **kw))
    return str(out)


@pytest.fixture(scope="module")
def minilm_fp32(tmp_path_factory) -> str:
    return _cache(tmp_path_factory, "minilm-fp32")


@pytest.mark.parametrize("family", ["minilm", "bert", "t5", "gpt2", "llama"])
def test_cache_and_live_give_the_same_first_losses(tmp_path, tmp_path_factory, tiny_backbones, minilm_fp32, family):
    cache = minilm_fp32 if family == "minilm" else _cache(tmp_path_factory, family, tiny_backbones[family], n=32)
    side = {"dropout": 0.0, "r": 8 if family == "minilm" else 2}  # tiny models: hidden 32
    common = dict(cache=cache, side=side, max_steps=6, epochs=2, batch_size=8, progress=False,
                  lr=1e-3, seed=3)
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    live = train(TrainConfig(out=str(tmp_path / "live"), live=True, **common))
    assert len(cached["first_losses"]) == 6
    np.testing.assert_allclose(cached["first_losses"], live["first_losses"], atol=1e-4, rtol=0)
    assert live["live"] and not cached["live"]
    # the reader's own threads' CPU an epoch, in the summary and each epoch's row (test_reader checks it counts)
    assert cached["reader_cpu_s"] >= 0 and cached["final"]["reader_cpu_s"] >= 0


@pytest.mark.integration
def test_training_from_cache_beats_majority_on_real_sst2(tmp_path, tmp_path_factory):
    cache = _cache(tmp_path_factory, "sst2-1k", n=1000, codec="bf16", shard_tokens=4096)
    s = train(TrainConfig(cache=cache, out=str(tmp_path / "run"), epochs=3, batch_size=32, lr=3e-3, progress=False))
    c = ActivationCache.open(cache)
    majority = majority_baseline("accuracy", c.split("train").labels, c.split("validation").labels)
    assert s["dev_score"] > majority + 0.15, (s["dev_score"], majority)
    assert 0 < s["trainable_pct"] < 5 and s["stall_fraction"] is not None
    for f in ("config.yaml", "side.safetensors", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "run" / f).exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_killed_run_resumes_to_the_same_metrics(tmp_path, minilm_fp32):
    args = ["train", "--cache", minilm_fp32, "--epochs", "4", "--batch-size", "4", "--no-progress", "--json"]
    assert lst_main([*args, "--out", str(tmp_path / "ref")]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", *args, "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    info = tmp_path / "killed" / "checkpoint" / "info.json"
    deadline = time.time() + 180
    while time.time() < deadline and not info.exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    epochs_done = json.loads(info.read_text())["epoch"]
    assert 1 <= epochs_done < 4, "the kill should land after an epoch, before the end"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dev_score"] == ref["dev_score"]
    ref_rows = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_s", "stall_fraction", "reader_cpu_s")} for r in rows]
    assert strip(got_rows) == strip(ref_rows)


def test_the_same_command_again_keeps_a_finished_run_however_its_path_is_spelled(tmp_path, minilm_fp32, monkeypatch):
    """Re-running a finished `lst train` leaves its summary as it was (it was rewritten with no epoch times),
    and the run is its directory: `runs/r1/`, `./runs/r1` or an absolute path all name it (a different
    spelling was refused as "a different run", and the advice, --overwrite, threw the run away)."""
    run = tmp_path / "runs" / "r1"
    cfg = dict(cache=minilm_fp32, epochs=2, batch_size=8, progress=False)
    first = train(TrainConfig(out=str(run), **cfg))
    saved = (run / "summary.json").read_text()
    monkeypatch.chdir(tmp_path)
    for spelling in (str(run) + "/", "runs/r1", "./runs/r1"):
        assert train(TrainConfig(out=spelling, **cfg)) == json.loads(saved)
        assert (run / "summary.json").read_text() == saved
    with pytest.raises(TrainError, match="differs in epochs"):  # a different run is still refused
        train(TrainConfig(out="runs/r1/", **{**cfg, "epochs": 3}))
    (run / "summary.json").unlink()  # killed after its last epoch, before its summary: resumed to the end
    assert train(TrainConfig(out="./runs/r1/", **cfg))["dev_score"] == first["dev_score"]


def test_refuses_a_different_cache_and_missing_layers(tmp_path, tmp_path_factory, minilm_fp32):
    run = str(tmp_path / "run")
    train(TrainConfig(cache=minilm_fp32, out=run, epochs=2, max_steps=2, batch_size=8, progress=False))
    (tmp_path / "run" / "summary.json").unlink()
    other = _cache(tmp_path_factory, "other", n=40)
    with pytest.raises(CacheError, match="max_examples"):
        train(TrainConfig(cache=other, out=run, epochs=2, max_steps=2, batch_size=8, progress=False))
    partial = _cache(tmp_path_factory, "partial", n=16, layers="0,1,2")
    with pytest.raises(TrainError, match=r"taps \[3\]"):
        train(TrainConfig(cache=partial, out=str(tmp_path / "p"), side={"layers": [1, 3]}, progress=False))
    with pytest.raises(TrainError, match="1..6"):
        train(TrainConfig(cache=minilm_fp32, out=str(tmp_path / "q"), side={"layers": [7]}, progress=False))


def test_train_json_line_and_predict(tmp_path, minilm_fp32, capsys):
    out = str(tmp_path / "run")
    assert lst_main(["train", "--cache", minilm_fp32, "--out", out, "--epochs", "1", "--batch-size", "8",
                     "--r", "16", "--layers", "1,2,3,5", "--init", "magnitude", "--no-progress", "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("task", "metric", "dev_score", "trainable_params", "trainable_pct", "peak_mem_mb", "epoch_s",
              "examples_per_s", "stall_fraction"):
        assert k in s
    assert s["task"] == "sst2" and s["metric"] == "accuracy"
    assert 0 < s["reader_peak_mb"] <= 512  # the reader's own accounting, within the default budget
    # the default --read-ahead (32MB), within what the budget leaves; this split is one window an epoch,
    # so there is never a next window to read ahead
    assert s["read_ahead_mb"] in (0, 32) and s["read_ahead_frames_per_epoch"] == 0
    assert s["page_cache_frames_per_epoch"] == 0
    assert lst_main(["predict", "--run", out, "--text", "a wonderful , moving film", "--json"]) == 0
    p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"][0]
    assert p["label"] in ("negative", "positive", 0, 1) and abs(sum(p["probabilities"]) - 1) < 1e-5


def test_side_init_reads_the_pack_lazily_and_equals_the_eager_state(minilm_fp32):
    """Stage two opens the verified init pack lazily (a 7B state is 13.5 GB): same side network as
    slicing the whole loaded state, and tensors the slicing does not use are never read."""
    import torch

    from pipeline.cache import initpack
    from pipeline.side.init import initialise_side
    from pipeline.train.trainer import build_side

    cache = ActivationCache.open(minilm_fp32)
    cache.require_complete()
    side = {"init": "magnitude", "layers": [2, 4], "r": 8}
    lazy, report = build_side(cache, side, seed=0)
    eager, _ = build_side(cache, {**side, "init": "random"}, seed=0)
    initialise_side(eager, "magnitude", initpack.read_weights(minilm_fp32))  # whole state, hashed
    for (k, a), (_, b) in zip(lazy.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert report["init"] == "magnitude"

    pack = initpack.read_weights(minilm_fp32, verified=True)
    assert isinstance(pack, initpack.LazyTensors) and "encoder.layer.0.attention.self.query.weight" in pack
    got = []
    get = pack._file.get_tensor
    pack._file = type("Spy", (), {"get_tensor": lambda self, k: got.append(k) or get(k)})()
    initialise_side(build_side(cache, {**side, "init": "random"}, seed=0)[0], "magnitude", pack)
    # the index walks the blocks up to the last side layer (official slicing), one block at a time;
    # blocks above it, the pooler and the other embeddings are never read
    read_blocks = {int(k.split(".")[2]) for k in got if k.startswith("encoder.layer.")}
    assert read_blocks == {0, 1, 2, 3}, read_blocks
    assert not any(k.startswith(("pooler.", "embeddings.position", "embeddings.token_type")) for k in got), got


def test_read_tensor_reads_only_the_rows_asked_for(minilm_fp32):
    """`--head lm` needs the label words' rows of the LM head, not the whole head (113 MB on SmolLM2)."""
    import torch

    from pipeline.cache import initpack

    key = "embeddings.word_embeddings.weight"
    whole = initpack.read_tensor(minilm_fp32, key)
    rows = [7, 3, 2000]
    assert torch.equal(initpack.read_tensor(minilm_fp32, key, rows=rows), whole[rows])


def test_live_dropout_draws_backbone_dropout_reproducibly(tmp_path, minilm_fp32):
    """--live-dropout (the paper's live backbone in train mode) changes the taps from the cache's
    eval-mode ones, and is still a pure function of the seed."""
    common = dict(cache=minilm_fp32, epochs=1, max_steps=3, batch_size=8, live=True, progress=False)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common))
    a = train(TrainConfig(out=str(tmp_path / "a"), live_dropout=True, **common))
    b = train(TrainConfig(out=str(tmp_path / "b"), live_dropout=True, **common))
    assert a["first_losses"] == b["first_losses"]
    assert a["first_losses"] != plain["first_losses"]
    with pytest.raises(TrainError, match="add --live"):
        TrainConfig(cache=minilm_fp32, out=str(tmp_path / "c"), live_dropout=True)

    # dropout on for training steps (grad enabled), off for evaluation (the loop evaluates without grad)
    import torch

    from pipeline.train.trainer import LiveTaps, planned_batches

    cache = ActivationCache.open(minilm_fp32)
    live = LiveTaps(cache, [0, 3], torch.device("cpu"), dropout=True)
    batch = next(iter(planned_batches(cache, TrainConfig(cache=minilm_fp32, out="unused", batch_size=4),
                                      data_seed=0).iter_epoch(0)))
    with torch.no_grad():
        assert torch.equal(live(batch)[3], live(batch)[3])
    assert not torch.equal(live(batch)[3], live(batch)[3])


def _is_ratio_of_rounded(value: float, num: float, den: float, eps: float = 6e-4) -> None:
    """``value`` (rounded to 3 decimals) is num / den of the unrounded seconds behind ``num`` and ``den``,
    each reported within ``eps`` of its true value."""
    assert (num - eps) / (den + eps) - 1e-3 <= value <= (num + eps) / (den - eps) + 1e-3, (value, num, den)


@pytest.mark.parametrize("interleave", [False, True])
def test_bench_train_compares_minima_of_alternate_cached_epochs_and_floors(tmp_path, minilm_fp32, interleave):
    from pipeline.bench.train import TrainBenchConfig, run_train_bench

    # the interleaved runs also time the floor inside each cached process after each epoch
    # (``--in-process-floor``), the others step by step (``--step-floor``)
    res = run_train_bench(TrainBenchConfig(cache=minilm_fp32, batch_size=8, repeats=2, workdir=str(tmp_path),
                                           progress=False, cached_epochs=3, interleave=interleave,
                                           in_process_floor=interleave, step_floor=not interleave))
    # each cached run trains three epochs (its metrics.jsonl holds them all); the floor, in its own fresh
    # process, mirrors them: a cold pass on epoch 0's batches, then steady ones on epoch 1's and 2's.
    # Every steady epoch of every run is a sample, and so is every steady pass of every floor
    assert len(res["cached_epoch_s_samples"]) == 2 and len(res["floor_s_samples"]) == 4
    assert res["cached_epoch_s_min"] == min(res["cached_epoch_s_samples"])
    assert res["floor_s"] == min(res["floor_s_samples"]) > 0
    assert res["cached_epochs"] == 3 and len(res["cached_warm_epoch_s_samples"]) == 4
    assert res["cached_warm_epoch_s_min"] == min(res["cached_warm_epoch_s_samples"])
    assert len((tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()) == 3
    assert res["floor_fresh_process"] and len(res["floor_cold_s_samples"]) == 2 and min(res["floor_cold_s_samples"]) > 0
    # steady against steady, first against first, and the pre-session-28 ratio (first against steady)
    assert res["cached_over_floor"] == pytest.approx(res["cached_warm_epoch_s_min"] / res["floor_s"], rel=0.02)
    assert res["cached_over_floor_cold"] == pytest.approx(res["cached_epoch_s_min"] / res["floor_cold_s"], rel=0.02)
    assert res["cached_first_over_floor_steady"] == pytest.approx(res["cached_epoch_s_min"] / res["floor_s"], rel=0.02)
    assert res["floor_cold_s"] == min(res["floor_cold_s_samples"])
    assert [x >= 1 for x in res["cached_warm_over_own_steps_samples"]] == [True] * 4
    # cached_over_floor split into the reader's wait and the steps' own time against the floor
    steps = [e * (1 - s) for e, s in zip(res["cached_warm_epoch_s_samples"], res["cached_warm_stall_fraction_samples"])]
    assert res["cached_warm_steps_s_samples"] == pytest.approx(steps, abs=2e-3)
    assert res["cached_steps_over_floor"] == pytest.approx(min(steps) / res["floor_s"], rel=0.02)
    assert res["cached_steps_over_floor"] <= res["cached_over_floor"] + 1e-3
    # the reader streaming epoch 1 alone in each floor's process, against its wait inside the steady epochs
    stalls = [e * s for e, s in zip(res["cached_warm_epoch_s_samples"], res["cached_warm_stall_fraction_samples"])]
    assert res["cached_warm_stall_s_samples"] == pytest.approx(stalls, abs=2e-3)
    assert len(res["reader_alone_s_samples"]) == 2 and min(res["reader_alone_s_samples"]) > 0
    assert res["reader_alone_s"] == min(res["reader_alone_s_samples"])
    # ratios of seconds reported to the millisecond: on this tiny run a rounded 18 ms moves them by ~3%
    _is_ratio_of_rounded(res["reader_alone_over_floor"], res["reader_alone_s"], res["floor_s"])
    _is_ratio_of_rounded(res["cached_warm_stall_over_reader_alone"], min(stalls), res["reader_alone_s"])
    assert set(res["goals_met"]) >= {"cached_over_floor<=1.1", "cached_over_floor_cold<=1.1",
                                     "cached_over_floor_paired<=1.1"}
    # each steady epoch is set against the floor's pass of the same epoch, and their median reported;
    # with ``interleave`` the two processes took epochs in turn (``test_gate`` checks the turns)
    assert res["interleaved"] == interleave and len(res["cached_over_floor_pair_samples"]) == 4
    assert res["cached_over_floor_paired"] == pytest.approx(np.median(res["cached_over_floor_pair_samples"]), abs=2e-3)
    # the cached runs' reader-thread CPU, set against the floor
    assert len(res["cached_reader_cpu_s_samples"]) == 2 and all(x >= 0 for x in res["cached_reader_cpu_s_samples"])
    assert res["reader_cpu_over_floor"] == pytest.approx(min(res["cached_reader_cpu_s_samples"]) / res["floor_s"], abs=2e-3)
    assert res["floor_batches"] == "all" and res["cached_dev_score"] is not None
    # both arms ran as `lst train` processes: two cached, one live, each with its own peak
    assert res["fresh_processes"] and [len(res["processes"][a]) for a in ("cached", "live")] == [2, 1]
    assert all(p["peak_mb"] > 0 and p["wall_s"] > 0 for a in res["processes"].values() for p in a)
    assert (tmp_path / "live" / "summary.json").exists() and (tmp_path / "cached" / "summary.json").exists()
    assert res["in_process_floor"] == interleave
    if interleave:  # each cached process's steady epochs against its own passes of the same batches
        steady, pairs = res["in_process_floor_s_samples"], res["cached_over_floor_in_process_pair_samples"]
        assert len(steady) == 4 and len(pairs) == 4 and len(res["in_process_floor_cold_s_samples"]) == 2
        assert res["in_process_floor_s"] == min(steady) > 0
        _is_ratio_of_rounded(res["cached_over_floor_in_process"], res["cached_warm_epoch_s_min"], res["in_process_floor_s"])
        assert res["cached_over_floor_in_process_paired"] == pytest.approx(np.median(pairs), abs=2e-3)
        assert "cached_over_floor_in_process<=1.1" in res["goals_met"]
        assert all(0 < p["peak_mb_before_floor"] <= p["peak_mb"] + 1 for p in res["processes"]["cached"])
    else:
        assert "cached_over_floor_in_process" not in res
    assert res["step_floor"] != interleave
    if not interleave:  # each steady epoch against its twin's held steps, taken between its own
        pairs, floors = res["cached_over_floor_stepwise_pair_samples"], res["step_floor_s_samples"]
        assert len(pairs) == 4 and len(floors) == 4 and min(floors) > 0
        assert res["cached_over_floor_stepwise"] == pytest.approx(np.median(pairs), abs=2e-3)
        warm = res["cached_warm_epoch_s_samples"]
        for p, w, f in zip(pairs, warm, floors):
            _is_ratio_of_rounded(p, w, f)
        runs = res["cached_over_floor_stepwise_runs"]
        _is_ratio_of_rounded(runs[0], sum(warm[:2]), sum(floors[:2]), eps=1.2e-3)
        _is_ratio_of_rounded(runs[1], sum(warm[2:]), sum(floors[2:]), eps=1.2e-3)
        assert res["cached_steps_over_floor_stepwise"] > 0
        assert {"cached_over_floor_stepwise<=1.1", "cached_over_floor_stepwise_runs<=1.1"} <= set(res["goals_met"])
        assert all(0 < p["peak_mb_before_floor"] <= p["peak_mb"] + 1 for p in res["processes"]["cached"])
    else:
        assert "cached_over_floor_stepwise" not in res
    with pytest.raises(UserError, match="give one of them"):
        TrainBenchConfig(in_process_floor=True, step_floor=True)


def test_the_in_process_floor_leaves_the_run_as_it_was(tmp_path, minilm_fp32, monkeypatch):
    """`lst train --floor-file` (the bench's): after each epoch a fresh network steps that epoch's batches
    held in memory, in the run's process. The run itself trains bit for bit as without it, and the floor's
    first pass takes the run's own first steps (the same losses)."""
    import pipeline.train.loop as loop
    from pipeline.train.floor import read_floor_file

    cfg = TrainConfig(cache=minilm_fp32, out=str(tmp_path / "plain"), epochs=3, batch_size=8, progress=False, seed=5)
    plain = train(cfg)
    losses: dict[int, list[float]] = {}
    real = loop.VariantRunner.train_step

    def spy(self, *a, **k):
        got = real(self, *a, **k)
        losses.setdefault(id(self), []).append(got)
        return got

    monkeypatch.setattr(loop.VariantRunner, "train_step", spy)
    floor_file = tmp_path / "floor.jsonl"
    with_floor = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "floored")}), floor_file=str(floor_file))
    timed = ("epoch_s", "stall_fraction", "reader_cpu_s")
    rows_of = lambda run: [{k: v for k, v in json.loads(x).items() if k not in timed}  # noqa: E731
                           for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows_of("floored") == rows_of("plain") and len(rows_of("plain")) == 3  # losses, scores, lr
    assert with_floor["first_losses"] == plain["first_losses"] and with_floor["dev_score"] == plain["dev_score"]
    run_losses, floor_losses = losses.values()  # the run's runner stepped first
    steps = plain["steps"] // 3
    assert len(run_losses) == 3 * steps and len(floor_losses) == 3 * steps
    assert floor_losses[:steps] == run_losses[:steps]  # a fresh network on epoch 0's batches: the same steps
    rows = read_floor_file(floor_file)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["floor_s"] > 0 for r in rows)
    assert rows[0]["peak_mb_before"] > 0 and all("peak_mb_before" not in r for r in rows[1:])
    with pytest.raises(TrainError, match="--floor-file"):
        train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "live"), "live": True}), floor_file=str(floor_file))


def test_the_step_floor_alternates_with_the_runs_steps_and_leaves_the_run_as_it_was(tmp_path, minilm_fp32,
                                                                                     monkeypatch):
    """`lst train --floor-file F --floor-steps` (the bench's ``--step-floor``): from the second epoch on, a
    twin network steps the epoch's held batches alternately with the run's steps, and the loop leaves the
    twin's time out of the run's epoch. The run trains bit for bit as without it."""
    import time as time_mod

    import pipeline.train.floor as floor_mod
    import pipeline.train.loop as loop
    from pipeline.train.floor import read_floor_file

    cfg = TrainConfig(cache=minilm_fp32, out=str(tmp_path / "plain"), epochs=3, batch_size=8, progress=False, seed=5)
    plain = train(cfg)
    order: list[int] = []
    real = loop.VariantRunner.train_step

    def spy(self, *a, **k):
        order.append(id(self))
        return real(self, *a, **k)

    monkeypatch.setattr(loop.VariantRunner, "train_step", spy)
    floor_file = tmp_path / "floor.jsonl"
    got = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "floored")}), floor_file=str(floor_file),
                floor_steps=True)
    timed = ("epoch_s", "stall_fraction", "reader_cpu_s")
    rows_of = lambda run: [{k: v for k, v in json.loads(x).items() if k not in timed}  # noqa: E731
                           for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows_of("floored") == rows_of("plain") and got["dev_score"] == plain["dev_score"]
    steps = plain["steps"] // 3
    run_id = order[0]
    assert order[:steps] == [run_id] * steps  # the first epoch is the run's alone
    twin = order[steps]
    assert twin != run_id and order[steps:steps + 2] == [twin, twin]  # the twin's untimed warm-up steps
    # then the twin steps each pair of batches around the run's first: run 0, twin 0, twin 1, run 1, run 2, ...
    # so each arm's step follows the other's step on the same batch half the time (a step right after one
    # of the same shapes finds its buffers sized in the CPU buffer cache)
    epoch = []
    for i in range(steps):
        epoch += [run_id] + ([twin] * min(2, steps - i) if i % 2 == 0 else [])
    assert order[steps + 2:] == epoch * 2
    rows = read_floor_file(floor_file)
    assert [r["epoch"] for r in rows] == [2, 3] and all(r["steps"] == steps and r["floor_s"] > 0 for r in rows)
    assert rows[0]["peak_mb_before"] > 0 and "peak_mb_before" not in rows[1]
    with pytest.raises(TrainError, match="--floor-file"):
        train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "alone")}), floor_steps=True)

    # the loop leaves each step's hook out of the epoch's time: a twin step 0.4 s long leaves it shorter
    monkeypatch.setattr(loop.VariantRunner, "train_step", real)
    slow_step = floor_mod.StepFloor.after_step

    def slow(self, epoch, i):
        time_mod.sleep(0.4)
        slow_step(self, epoch, i)

    monkeypatch.setattr(floor_mod.StepFloor, "after_step", slow)
    train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "slow"), "epochs": 2}),
          floor_file=str(tmp_path / "slow.jsonl"), floor_steps=True)
    second = json.loads((tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()[1])
    assert second["epoch_s"] < 0.4 * steps and 0 <= second["stall_fraction"] < 1


@pytest.mark.parametrize("recompute", ["ffn", "none"])
def test_the_bench_floor_takes_the_runs_own_steps_recompute_included(tmp_path, minilm_fp32, monkeypatch, recompute):
    """The reader-free floor times the steps the run takes: its first pass, a fresh network on epoch 0's
    batches, gives `lst train`'s losses bit for bit, on a network built with the run's ``recompute``
    (until session 29 the floor left out the default ffn recompute and timed a cheaper step)."""
    from dataclasses import replace

    import pipeline.train.loop as loop
    from pipeline.bench.train import floor_passes
    from pipeline.side.blocks.base import SideBlock

    cfg = TrainConfig(cache=minilm_fp32, out=str(tmp_path / "run"), epochs=2, batch_size=8, progress=False,
                      seed=3, recompute=recompute)
    ran = train(cfg)
    losses, models = [], []
    real = loop.VariantRunner.train_step

    def spy(self, *a, **k):
        models.append(self.variant.model)
        losses.append(real(self, *a, **k))
        return losses[-1]

    monkeypatch.setattr(loop.VariantRunner, "train_step", spy)
    got = floor_passes(ActivationCache.open(minilm_fp32), replace(cfg, out=str(tmp_path / "floor")))
    assert got["floor_s"] > 0 and got["floor_cold_s"] > 0 and got["reader_alone_s"] > 0
    assert got["floor_steady_s"] == [got["floor_s"]]  # a two-epoch run has one steady pass
    assert losses[:len(ran["first_losses"])] == ran["first_losses"]
    blocks = [m for m in models[0].modules() if isinstance(m, SideBlock)]
    assert blocks and all(b.recompute_ffn == (recompute == "ffn") for b in blocks)


def test_cpu_buffer_cache_changes_no_loss_or_score(tmp_path, minilm_fp32):
    """`lst train` with the bounded CPU buffer cache (the default) and without it: the same numbers."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    got = {}
    for cap in ("0", "1MB"):
        cmd = [sys.executable, "-m", "pipeline.cli", "train", "--cache", minilm_fp32, "--out", str(tmp_path / cap),
               "--epochs", "2", "--batch-size", "8", "--no-progress", "--json"]
        res = subprocess.run(cmd, env={**env, "LST_CPU_CACHE": cap}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        got[cap] = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["0"]["first_losses"] == got["1MB"]["first_losses"]
    assert got["0"]["dev_score"] == got["1MB"]["dev_score"]
    assert "cpu_cache_peak_mb" not in got["0"]
    s = got["1MB"]  # the cache keeps at most its cap, or what the live buffers fell below their peak
    assert s["cpu_cache_cap_mb"] == 1.0 and 0 < s["cpu_cache_peak_mb"] <= max(1.0, s["cpu_cache_peak_live_mb"]) + 0.1
    assert 0 < got["1MB"]["cpu_cache_hit_rate"] <= 1


def test_mkl_buffers_are_trimmed_between_steps_and_freed_before_eval_with_the_same_losses(tmp_path, minilm_fp32,
                                                                                         monkeypatch):
    """The loop trims MKL's buffer cache after each step (here at cap 0: the first step's buffers go,
    later steps' only past what one step needs) and frees it before each evaluation, and the run's
    numbers are those of a run that never frees them."""
    import pipeline.train.loop as loop
    from pipeline.alloc import mkl_buffers

    real = mkl_buffers.find(0)
    frees, made = [], []

    def find(cap):
        if real is None:  # torch without MKL: count the frees against a stand-in
            m = mkl_buffers.MklBuffers(held=lambda: 1, free=lambda: frees.append(1), cap=0)
        else:
            m = mkl_buffers.MklBuffers(held=real.held, free=lambda: (frees.append(1), real.free()), cap=0)
        made.append(m)
        return m

    common = dict(cache=minilm_fp32, max_steps=5, epochs=1, batch_size=8, progress=False, seed=2)
    monkeypatch.setattr(loop.mkl_buffers, "find", lambda cap: None)
    kept = train(TrainConfig(out=str(tmp_path / "kept"), **common))
    monkeypatch.setattr(loop.mkl_buffers, "find", find)
    trimmed = train(TrainConfig(out=str(tmp_path / "trimmed"), **common))
    assert trimmed["steps"] == 5 and len(made) == 1
    assert 2 <= len(frees) <= 6  # the first step's trim and the release before the evaluation, at least
    assert made[0].need > 0  # learned from the step after the first free
    assert trimmed["first_losses"] == kept["first_losses"]
    assert trimmed["dev_score"] == kept["dev_score"]


def test_cached_dropout_draws_are_read_one_per_epoch_and_off_is_the_plain_cache(tmp_path, tmp_path_factory,
                                                                                 minilm_fp32):
    """A cache with dropout draws trains epoch e on draw e mod N + 1 (metrics.jsonl names it), and
    with --dropout-draws off gives exactly the run of the same cache without draws."""
    drawn = _cache(tmp_path_factory, "minilm-draws", dropout_draws=2)
    common = dict(epochs=3, max_steps=9, batch_size=16, progress=False, side={"dropout": 0.0})
    plain = train(TrainConfig(cache=minilm_fp32, out=str(tmp_path / "plain"), **common))
    off = train(TrainConfig(cache=drawn, out=str(tmp_path / "off"), dropout_draws="off", **common))
    on = train(TrainConfig(cache=drawn, out=str(tmp_path / "on"), **common))
    assert off["first_losses"] == plain["first_losses"] and off["dropout_draws"] == 0
    assert on["dropout_draws"] == 2 and on["first_losses"] != plain["first_losses"]
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tap_values"] for r in rows] == ["train.dropout1", "train.dropout2", "train.dropout1"]
    assert on["dev_score"] > 0 and rows[-1]["step"] == 9
