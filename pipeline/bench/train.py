"""`lst bench train`: the same side network trained from the cache (two epochs) and with the live backbone (one).

Both arms are the command a user runs, each in a fresh process: `lst train --cache C --epochs 2`
and `--live --epochs 1` (`cached_epoch_s`/`live_epoch_s` are those runs' own epoch times, so
start-up and evaluation stay out of the ratio; each run's wall time and whole-process peak RSS are
reported beside them under ``processes``). The floor is the reader-free ceiling no command runs; it
runs in a fresh process of its own, set up as `lst train` is.

The ceiling on what a cache can save is FLOP-based: per token, (backbone forward + side training)
/ (side training), counted with ``FlopCounterMode`` on a real batch. The goal is to reach 80% of it,
which needs reading/decoding hidden and the small side matmuls kept efficient.

``floor_s`` is what a cached epoch would take if reading were free: the same side steps (the
loop's own ``VariantRunner``) on the same batches, all decoded up front and held in memory
(``floor_batches`` > 0 times an even sample instead and scales it: cheaper, but by-length batches
differ in size, so a sample of 20 missed the full floor by up to 7% in session 7's runs).

Like for like. The cached arm is an `lst train` of ``cached_epochs`` epochs (default 4), and the
floor, in a fresh process of its own, mirrors it: a fresh side network steps through epoch 0's batches
(``floor_cold_s``, the first pass) and then through each later epoch's (the steady passes). Each
steady pass is a sample of ``floor_s``, each later cached epoch one of the cached run's steady
epoch, and ``cached_over_floor`` compares their minima: both steady, on the same batches; the reader's
own cost is what is left. ``cached_over_floor_cold`` compares the two first epochs, both of which pay
a fresh process's first steps (the CPU buffer cache and MKL growing to the step's shapes: ~180 k more
page faults and 0.3-0.6 s on cached MiniLM SST-2, session 28). Until session 27 the bench set a
one-epoch cached run against the floor's steady pass, which charged those first steps to the reader;
that ratio is still reported, as ``cached_first_over_floor_steady``.
On a shared VM whose speed drifts by tens of percent within minutes, ``repeats`` > 1 times the
cached runs and the floors alternately that many times and compares their minima (every sample is
reported). More steady epochs a process make those minima less of a draw: on this project's VM a
cached process's steps ran 0.78 to 1.45 times those of the floor process after it, on the same
batches and evenly over the epoch, and one process's epochs moved by up to 30% (session 37). With
one steady sample a process (two-epoch runs, sessions 28-36), the ratio read from the same five
runs' data spread from 0.92 to 1.18; with three a process, from 1.04 to 1.12.
``cached_over_floor_paired`` (session 39) is the median over steady epochs of each against the
floor's pass of the same epoch, from the same pair of processes. With ``interleave`` (``--interleave``)
each cached run and its floor run at once, taking epochs in turn (``train.gate``: each process waits
at its next epoch's start, outside that epoch's timer, while the other runs one), so each steady
cached epoch runs between two of the floor's passes; the order alternates between repeats. Why it
was tried: a fixed workload timed before and after each pass in one process ran 1.06-1.08 s in one
minute and 1.5-1.6 s in another (session 39). Why it is not the default: in its one
``--repeats 3`` run the pairs still spread 0.89-1.32 (median 1.152, minima 1.038), no tighter than
processes run one after the other, and each process then idles ~10 s between epochs, which a
real run never does and which, on a VM where memory left untouched for seconds is slower to touch
again, may cost the arms unequally.
With ``in_process_floor`` (``--in-process-floor``, session 41) each cached `lst train` also times the
floor of each epoch's batches in its own process, right after that epoch and its evaluation
(``lst train --floor-file``, ``train.floor``): ``cached_over_floor_in_process`` sets the fastest
steady cached epoch against the fastest of those passes, ``..._paired`` each steady epoch against
its own epoch's pass. Why it was tried: in a probe inside one process an epoch streamed by the
reader ran 0.99-1.01 of the same batches held, while processes a minute apart differed by up to ~20%.
Why it is opt-in: in its two ``--repeats 3`` runs (session 41) it read 1.018 and 1.200, the pairs
1.01-1.48 on a quiet machine, no tighter than between processes; the drift is the machine's from one
pass to the next, and the cached process then holds an epoch's batches (its peak ~2 GB).
With ``step_floor`` (``--step-floor``, session 42) the floor runs inside each cached `lst train` step by
step instead (``lst train --floor-steps``, ``train.floor.StepFloor``): from the second epoch on, a twin
network steps that epoch's batches, decoded before the epoch and held, alternately with the run's own
steps, and the run's epoch leaves the twin's steps out. ``cached_over_floor_stepwise`` is the median
over steady epochs of each against its twin's steps; ``..._runs`` each run's steady epochs together.
Both arms are timed within the same ~100 ms, so the machine's drift, which moves a pass by up to ~20%
from one second to the next, falls on both alike. Its cached epochs ran interleaved, so with it the
between-process keys set an interleaved epoch against the floor process. Measured (session 42, three
``--repeats 3`` runs): 1.061, 1.064 and 1.068, every steady epoch 1.046-1.099, the reader's own wait
1.044-1.058 of each; the same runs' between-process ratio 1.284, 1.040 and 1.215. It is opt-in since it
doubles each steady epoch's wall time and the cached process holds an epoch's batches (~2 GB peak).
``cached_warm_over_own_steps_samples`` reads the reader's wait within each steady epoch
(1 / (1 - stall)), free of that drift but blind to any slowing of the steps themselves;
``cached_steps_over_floor`` is the other factor, the steady epoch's time outside that wait against the
floor: the cached process's steps, drift between processes included. ``reader_alone_s`` is the
reader streaming epoch 1 on its own in the floor's process (its cost with nothing between its
windows), against which ``cached_warm_stall_s_samples``, its wait inside the steady epochs, can be read.
``cached_epoch_s`` (set against the one live epoch) is the cached run's first epoch.
``side_flops_per_s`` and ``backbone_flops_per_s`` are the FLOP rates each part really reaches,
against which the FLOP limit can be read.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from pipeline.backbones.seq2seq import LabelTargets
from pipeline.bench.memory import _lst, run_measured
from pipeline.cache.store import ActivationCache
from pipeline.errors import UserError
from pipeline.train.floor import read_floor_file
from pipeline.train.trainer import TrainConfig, build_floor, build_side, make_readers, planned_batches


@dataclass
class TrainBenchConfig:
    backbone: str = "minilm"
    dataset: str = "sst2"
    examples: int = 20000
    cache: str | None = None
    batch_size: int = 100
    workdir: str | None = None
    device: str = "auto"
    progress: bool = True
    label_words: str | None = None  # T5: cache label-word targets and train the side encoder-decoder
    floor_batches: int = 0  # batches the reader-free floor is timed on (0: every batch of the epoch)
    repeats: int = 1  # cached epochs and floors, timed alternately; their minima are compared
    # epochs of each cached `lst train` run (>= 2): the first set against the live epoch and the floor's
    # first pass, each later (steady) one a sample against the floor's steady passes over the same batches
    cached_epochs: int = 4
    # each cached run and its floor alive at once, taking epochs in turn (``train.gate``), so each steady
    # cached epoch runs between two of the floor's passes; False (default): one process after the other
    interleave: bool = False
    # each cached `lst train` also times the floor of each epoch's batches in its own process, right after
    # that epoch and its evaluation (``train.floor``): ``cached_over_floor_in_process``, free of the
    # difference between processes (not of the machine's drift from pass to pass)
    in_process_floor: bool = False
    # each cached `lst train` also steps a twin network on the epoch's held batches between its own steps,
    # from the second epoch on (``train.floor.StepFloor``): ``cached_over_floor_stepwise``, both arms timed
    # within the same ~100 ms, so the machine's drift from second to second falls on both alike
    step_floor: bool = False

    def __post_init__(self) -> None:
        if self.step_floor and self.in_process_floor:
            raise UserError("--step-floor and --in-process-floor both time the floor inside the cached run; "
                            "give one of them")
        if self.cached_epochs < 2:
            raise UserError(f"--cached-epochs {self.cached_epochs}: the bench needs a first epoch and at least "
                            "one steady one to set against the floor; give 2 or more")


def _epoch_records(run_dir: Path) -> list[dict]:
    """The run's per-epoch records (``metrics.jsonl``: epoch time, stall, reader CPU), in order."""
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "epoch_s" in r]


def floor_passes(cache: ActivationCache, cfg: TrainConfig, n_batches: int = 0,
                 before_epoch: Callable[[int], None] | None = None) -> dict:
    """Seconds of ``cfg.epochs`` (at least 2) epochs' side steps with no reader, as a cached run of that many
    epochs takes them: one fresh side network trained through the loop's own runner on epoch 0's
    batches (``floor_cold_s``) and then on each later epoch's (``floor_steady_s``, their minimum
    ``floor_s``). Each epoch's batches (or ``n_batches`` of them spread evenly over it, the time then
    scaled to its step count) are decoded up front and held in memory, one epoch at a time. Before
    epoch 1's are, the reader streams that epoch once on its own, each batch
    dropped as it comes (``reader_alone_s``): its cost with the cores, caches and page cache to itself
    (reading nothing ahead, which with no steps between windows would only wait for the disk).
    ``before_epoch(epoch)`` runs before each epoch's work, as in the loop (the bench's turns)."""
    import time

    from pipeline.devices import resolve_device
    from pipeline.train.floor import held_pass

    cfg = replace(cfg, epochs=max(2, cfg.epochs))  # a cold pass and a steady one at least, on one schedule
    device = resolve_device(cfg.device)
    floor = build_floor(cache, cfg, device)  # as the run builds its network, its recompute included
    passes = []
    alone = None
    for epoch in range(cfg.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        if epoch == 1:  # the reader alone, streaming as `lst train` reads it, nothing else running; with
            # nothing between its windows there is no step to read ahead behind, so it reads as the decode
            alone_reader, _ = make_readers(cache, replace(cfg, read_ahead="0"), floor.reader.taps, [], device,
                                           data_seed=cfg.seed, packed=floor.reader.packed)
            t0 = time.perf_counter()
            for b in alone_reader.iter_epoch(epoch):
                del b
            alone = time.perf_counter() - t0
            del alone_reader
        passes.append(held_pass(floor, epoch, n_batches))
    return {"floor_s": min(passes[1:]), "floor_steady_s": passes[1:], "floor_cold_s": passes[0],
            "reader_alone_s": alone}


def _in_process_floor(cached_runs: list[dict], floor_rows: list[list[dict]], warm: float) -> dict:
    """The cached runs' steady epochs against the floor each timed in its own process right after each
    epoch (``lst train --floor-file``): ``warm``, the fastest steady epoch, over the fastest pass
    (``cached_over_floor_in_process``), and the median of each steady epoch over its own epoch's pass
    (``..._paired``). Neither carries the difference between two processes; both carry the machine's
    drift from one pass to the next (session 41: pairs 1.01-1.48 on a quiet machine)."""
    steady = [r["floor_s"] for rows in floor_rows for r in rows[1:]]
    pairs = [e["epoch_s"] / r["floor_s"] for c, rows in zip(cached_runs, floor_rows)
             for e, r in zip(c["epochs"][1:], rows[1:])]
    return {"in_process_floor_s_samples": [round(f, 3) for f in steady],
            "in_process_floor_cold_s_samples": [round(rows[0]["floor_s"], 3) for rows in floor_rows],
            "in_process_floor_s": round(min(steady), 3),
            "cached_over_floor_in_process": round(warm / min(steady), 3),
            "cached_over_floor_in_process_paired": round(float(np.median(pairs)), 3),
            "cached_over_floor_in_process_pair_samples": [round(x, 3) for x in pairs]}


def _step_floor(cached_runs: list[dict], floor_rows: list[list[dict]]) -> dict:
    """The cached runs' steady epochs against their twins' held steps, taken one after each of the run's
    steps (``lst train --floor-steps``): the median over steady epochs of each epoch (as the run timed it,
    the twin's steps left out) over its twin's steps (``cached_over_floor_stepwise``), each run's steady
    epochs together over its twin's (``..._runs``, the worst of which is what "every run" asks), and the
    run's own spans between the twin's steps over them (``cached_steps_over_floor_stepwise``, the same
    ratio without the loop's epoch-end: a check on the first)."""
    pairs = [e["epoch_s"] / r["floor_s"] for c, rows in zip(cached_runs, floor_rows)
             for e, r in zip(c["epochs"][1:], rows)]
    runs = [sum(e["epoch_s"] for e in c["epochs"][1:1 + len(rows)]) / sum(r["floor_s"] for r in rows)
            for c, rows in zip(cached_runs, floor_rows)]
    floor_s = [r["floor_s"] for rows in floor_rows for r in rows]
    spans = sum(r["cached_steps_s"] for rows in floor_rows for r in rows)
    return {"step_floor_s_samples": [round(f, 3) for f in floor_s],
            "cached_over_floor_stepwise": round(float(np.median(pairs)), 3),
            "cached_over_floor_stepwise_pair_samples": [round(x, 3) for x in pairs],
            "cached_over_floor_stepwise_runs": [round(x, 3) for x in runs],
            "cached_steps_over_floor_stepwise": round(spans / sum(floor_s), 3)}


def floor_in_fresh_process(cache_url: str, config_file: Path, out: Path, n_batches: int = 0,
                           log: Path | None = None, gate: Path | None = None) -> dict:
    """``floor_passes`` in a new process set up as `lst train` sets itself up (mmap threshold, CPU
    buffer cache), as the cached epochs it is compared with run: not in the bench process, whose
    memory holds what its earlier floors and FLOP count left behind. ``gate``: its epochs' turns."""
    got = run_measured([sys.executable, "-m", "pipeline.bench.train", "floor", "--cache", cache_url,
                        "--config", str(config_file), "--out", str(out), "--batches", str(n_batches),
                        *(["--gate", str(gate)] if gate else [])],
                       stderr_to=str(log) if log else None)
    return got["result"]


def in_turns(start_a: Callable[[], dict], gate_a: Path, start_b: Callable[[], dict], gate_b: Path,
             epochs: int, b_first: bool = False) -> tuple[dict, dict]:
    """Run two gated processes (``start_*`` run one each, to its end, and return its result; ``gate_*``
    its ``--epoch-gate`` directory) an epoch at a time in turn: ``a`` is started first and reaches its
    first gate before ``b`` starts (the floor reads the config the cached run writes), then each
    ``epochs`` times gets one epoch while the other waits at its gate, ``b`` first where ``b_first``."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.train.gate import TurnKeeper

    keep_a, keep_b = TurnKeeper(gate_a), TurnKeeper(gate_b)
    with ThreadPoolExecutor(2) as pool:
        try:
            fa = pool.submit(start_a)
            alive_a = lambda: not fa.done()  # noqa: E731
            keep_a.wait(alive_a)
            fb = pool.submit(start_b)
            alive_b = lambda: not fb.done()  # noqa: E731
            keep_b.wait(alive_b)
            order = [(keep_b, alive_b), (keep_a, alive_a)] if b_first else [(keep_a, alive_a), (keep_b, alive_b)]
            for _ in range(epochs):
                for keep, alive in order:
                    keep.turn(alive)
        finally:
            keep_a.close()  # a process still at a gate then runs on to its end
            keep_b.close()
        return fa.result(), fb.result()


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    from tqdm import tqdm

    from pipeline.search.flops import speedup_limit

    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="lst-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    # one step a process (the children's own bars go to their logs under ``work``): a --repeats 3 run on
    # the 20k SST-2 cache is ~10 minutes of fresh processes
    bar = tqdm(total=(cfg.cache is None) + 2 * cfg.repeats + 2, desc="bench train", file=sys.stderr,
               disable=not cfg.progress, dynamic_ncols=True)

    try:
        cache_url = cfg.cache
        quiet = [] if cfg.progress else ["--no-progress"]
        if cache_url is None:
            cache_url = str(work / "cache.zarr")
            words = ["--label-words", cfg.label_words] if cfg.label_words else []
            bar.set_postfix_str(f"extracting {cfg.examples} {cfg.dataset} examples ({work / 'extract.log'})")
            run_measured(_lst("extract", "--backbone", cfg.backbone, "--dataset", cfg.dataset, "--out", cache_url,
                              "--max-examples", str(cfg.examples), "--device", cfg.device, "--overwrite", "--json",
                              *quiet, *words), stderr_to=str(work / "extract.log"))
            bar.update(1)
        cache = ActivationCache.open(cache_url)
        run_args = ["--cache", cache_url, "--batch-size", str(cfg.batch_size), "--device", cfg.device,
                    "--overwrite", "--json", *quiet]
        processes: dict[str, list[dict]] = {"cached": [], "live": []}

        def run(name: str, label: str, *extra: str) -> dict:
            if label:
                bar.set_postfix_str(f"{label} ({work / name}.log)")
            got = run_measured(_lst("train", "--out", str(work / name), *run_args, *extra),
                               stderr_to=str(work / f"{name}.log"))
            processes[name].append({"wall_s": got["wall_s"], "peak_mb": round(got["polled_peak_mb"], 1)})
            bar.update(1)
            return {**got["result"], "epochs": _epoch_records(work / name)}

        in_process = work / "floor_in_process.jsonl"
        in_process_runs: list[list[dict]] = []

        def run_cached(*extra: str) -> dict:
            floor_args = []
            if cfg.in_process_floor or cfg.step_floor:
                in_process.unlink(missing_ok=True)  # the run appends a line an epoch
                floor_args = ["--floor-file", str(in_process), *(["--floor-steps"] if cfg.step_floor else [])]
            got = run("cached", "" if extra else f"cached lst train {len(processes['cached']) + 1}/{cfg.repeats}, "
                                                 f"{cfg.cached_epochs} epochs",
                      "--epochs", str(cfg.cached_epochs), *floor_args, *extra)
            if cfg.in_process_floor or cfg.step_floor:
                in_process_runs.append(read_floor_file(in_process))
                processes["cached"][-1]["peak_mb_before_floor"] = in_process_runs[-1][0]["peak_mb_before"]
            return got

        floor_runs: list[dict] = []
        cached_runs: list[dict] = []

        def floor_run(gate: Path | None = None) -> dict:
            bar.set_postfix_str(f"reader-free floor {len(floor_runs) + 1}/{cfg.repeats} ({work / 'floor.log'})")
            # the floor uses the cached command's own resolved config
            got = floor_in_fresh_process(cache_url, work / "cached" / "config.yaml", work / "floor",
                                         cfg.floor_batches, log=work / "floor.log", gate=gate)
            bar.update(1)
            return got

        for r in range(cfg.repeats):
            if cfg.interleave:
                gates = work / "gates"
                bar.set_postfix_str(f"cached lst train and reader-free floor {r + 1}/{cfg.repeats}, "
                                    f"{cfg.cached_epochs} epochs each in turn ({work / 'cached.log'})")
                got_c, got_f = in_turns(lambda: run_cached("--epoch-gate", str(gates / "cached")), gates / "cached",
                                        lambda: floor_run(gates / "floor"), gates / "floor",
                                        cfg.cached_epochs, b_first=r % 2 == 1)
                cached_runs.append(got_c)
                floor_runs.append(got_f)
            else:
                cached_runs.append(run_cached())
                floor_runs.append(floor_run())
        cached = cached_runs[0]
        run_cfg = TrainConfig.from_dict(yaml.safe_load((work / "cached" / "config.yaml").read_text())["train"])
        first = [c["epochs"][0] for c in cached_runs]
        warm = [e for c in cached_runs for e in c["epochs"][1:]]
        epochs = [e["epoch_s"] for e in first]
        warm_epochs = [e["epoch_s"] for e in warm]
        warm_steps = [e["epoch_s"] * (1 - e["stall_fraction"]) for e in warm]
        floors = [s for f in floor_runs for s in f["floor_steady_s"]]
        reader_cpu = [e.get("reader_cpu_s") for e in first]
        cold = [f["floor_cold_s"] for f in floor_runs]
        alone = [f["reader_alone_s"] for f in floor_runs]
        warm_stall = [e["epoch_s"] * e["stall_fraction"] for e in warm]
        # each steady cached epoch against the floor's pass of the same epoch, from the same pair of processes
        pairs = [e["epoch_s"] / f for c, fl in zip(cached_runs, floor_runs)
                 for e, f in zip(c["epochs"][1:], fl["floor_steady_s"])]
        cached_s, floor = min(epochs), min(floors)
        paired = float(np.median(pairs))
        warm_s, floor_cold = min(warm_epochs), min(cold)
        in_process_keys = (_in_process_floor(cached_runs, in_process_runs, warm_s) if cfg.in_process_floor else
                           _step_floor(cached_runs, in_process_runs) if cfg.step_floor else {})
        live = run("live", "live lst train, 1 epoch", "--live", "--epochs", "1")
        bar.set_postfix_str("counting FLOPs")
        model, _ = build_side(cache, {}, 0)
        batch = next(iter(planned_batches(cache, run_cfg, data_seed=0).iter_epoch(0)))  # a batch the runs above used
        targets = LabelTargets.from_dict(cache.label_targets) if cache.label_targets else None
        limit = speedup_limit(cache.fingerprint["backbone"], [], batch, models=[model], targets=targets)
        bar.update(1)
        cached_first = cached["epochs"][0]["epoch_s"]
        speedup = live["epoch_s"] / cached_first  # first epochs of one run each, as the live arm is timed once
        lim = limit["speedup_limit"]
        tokens = cache.split("train").num_tokens
        side_flops = limit["side_train_flops_per_token"] * tokens
        bb_flops = limit["backbone_forward_flops_per_token"] * tokens
        return {
            "benchmark": "train", "backbone": cfg.backbone, "dataset": cfg.dataset,
            "side": "t5-encoder-decoder (label words)" if targets else "encoder/decoder side network",
            "trainable_params": cached["trainable_params"], "backbone_params": cached["backbone_params"],
            "train_examples": cache.split("train").num_examples, "train_tokens": cache.split("train").num_tokens,
            "device": cached["device"], "torch_threads": torch.get_num_threads(), "batch_size": cfg.batch_size,
            "cached_epochs": cfg.cached_epochs,
            "cached_epoch_s": cached_first, "cached_epoch_s_min": cached_s, "cached_epoch_s_samples": epochs,
            "cached_warm_epoch_s_min": warm_s, "cached_warm_epoch_s_samples": warm_epochs,
            "floor_s_samples": [round(f, 3) for f in floors],
            "repeats": cfg.repeats, "floor_batches": cfg.floor_batches or "all", "live_epoch_s": live["epoch_s"],
            "cached_over_live_speedup": round(speedup, 3), "speedup_limit": round(lim, 3),
            "speedup_over_limit": round(speedup / lim, 4),
            "cached_stall_fraction": cached["epochs"][0]["stall_fraction"],
            "cached_warm_stall_fraction_samples": [e["stall_fraction"] for e in warm],
            # each steady epoch over its own time outside the reader (1 / (1 - stall)): the reader's wait
            # alone, read within one process, so free of the drift between processes that the floor has
            "cached_warm_over_own_steps_samples": [round(1 / (1 - e["stall_fraction"]), 3) for e in warm],
            # the other factor of cached_over_floor: each steady epoch's time outside the reader's wait
            # (epoch x (1 - stall)), the fastest against the floor. Where this alone is above 1.1, no
            # reader could meet the goal: the cached process's steps themselves run slower
            "cached_warm_steps_s_samples": [round(s, 3) for s in warm_steps],
            "cached_steps_over_floor": round(min(warm_steps) / floor, 3),
            # the reader's wait in each steady epoch, against the same epoch streamed by the reader alone in
            # each floor's process: on a machine where memory left untouched for seconds is slower to touch
            # again (this project's VM: the page cache read once an epoch), the wait is well above it
            "cached_warm_stall_s_samples": [round(s, 3) for s in warm_stall],
            "reader_alone_s_samples": [round(a, 3) for a in alone],
            "reader_alone_s": round(min(alone), 3),
            # 1 + this is the reader's factor were it to wait no longer than it takes alone
            "reader_alone_over_floor": round(min(alone) / floor, 3),
            "cached_warm_stall_over_reader_alone": round(min(warm_stall) / min(alone), 3),
            "floor_s": round(floor, 3), "cached_over_floor": round(warm_s / floor, 3),
            # the median over steady epochs of each against the floor's pass of the same epoch (with
            # ``interleave``, run right before or after it): less of a draw than the minima, on a machine
            # whose speed drifts within minutes
            "interleaved": cfg.interleave,
            "cached_over_floor_paired": round(paired, 3),
            "cached_over_floor_pair_samples": [round(x, 3) for x in pairs],
            "in_process_floor": cfg.in_process_floor, "step_floor": cfg.step_floor, **in_process_keys,
            "floor_cold_s": round(floor_cold, 3), "cached_over_floor_cold": round(cached_s / floor_cold, 3),
            # the definition until session 27: a fresh process's first epoch against the floor's steady pass
            "cached_first_over_floor_steady": round(cached_s / floor, 3),
            "floor_cold_s_samples": [round(f, 3) for f in cold],
            # CPU seconds an epoch of the cached runs' reader threads (read, checksum, decode), against the
            # floor: where the step keeps every core busy the epoch pays about this share beside its steps
            "cached_reader_cpu_s_samples": reader_cpu,
            "reader_cpu_over_floor": (round(min(x for x in reader_cpu if x is not None) / floor, 3)
                                      if any(x is not None for x in reader_cpu) and floor > 0 else None),
            "side_flops_per_s": round(side_flops / cached_s),
            # the backbone's share of the live epoch; None where it is lost in the noise (tiny runs)
            "backbone_flops_per_s": (round(bb_flops / (live["epoch_s"] - cached_first))
                                     if live["epoch_s"] - cached_first > 0.05 * live["epoch_s"] else None),
            # after one epoch each, as the live arm runs
            "cached_dev_score": cached["epochs"][0].get("dev_score"), "live_dev_score": live["dev_score"],
            "fresh_processes": True, "floor_fresh_process": True, "processes": processes,
            "flops": limit,
            "goals_met": {"cached_over_live_speedup>=0.8*speedup_limit": speedup >= 0.8 * lim,
                          "cached_over_floor<=1.1": warm_s / floor <= 1.1,
                          "cached_over_floor_paired<=1.1": paired <= 1.1,
                          "cached_over_floor_cold<=1.1": cached_s / floor_cold <= 1.1,
                          **({"cached_over_floor_in_process<=1.1": in_process_keys["cached_over_floor_in_process"] <= 1.1}
                             if cfg.in_process_floor else {}),
                          **({"cached_over_floor_stepwise<=1.1": in_process_keys["cached_over_floor_stepwise"] <= 1.1,
                              "cached_over_floor_stepwise_runs<=1.1":
                                  max(in_process_keys["cached_over_floor_stepwise_runs"]) <= 1.1}
                             if cfg.step_floor else {})},
        }
    finally:
        bar.close()
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _main() -> None:
    """The floor's own process (``floor_in_fresh_process``): prints ``floor_passes`` as one JSON line."""
    import argparse
    import json

    from pipeline.alloc import prepare_process

    p = argparse.ArgumentParser(prog="python -m pipeline.bench.train")
    p.add_argument("mode", choices=["floor"])
    p.add_argument("--cache", required=True)
    p.add_argument("--config", required=True, help="the cached `lst train` run's config.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, default=0)
    p.add_argument("--gate", help="wait for each epoch's turn on this directory's pipes (``train.gate``)")
    a = p.parse_args()
    run_cfg = TrainConfig.from_dict(yaml.safe_load(Path(a.config).read_text())["train"])
    prepare_process(run_cfg.reader_memory, quiet=True)  # as `lst train` starts
    from pipeline.train.gate import epoch_gate

    with epoch_gate(a.gate) as gate:
        got = floor_passes(ActivationCache.open(a.cache), replace(run_cfg, out=a.out), a.batches, gate)
    print(json.dumps(got))


if __name__ == "__main__":
    _main()
