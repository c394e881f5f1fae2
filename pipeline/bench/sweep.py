"""`lst bench sweep`: K variants fused by `lst sweep` vs K separate `lst train` runs vs K live runs.

Every arm is the command a user runs, each in a fresh process (wall time from launch to exit, so
each process's start-up counts where a user pays it), all with the same torch intra-op threads
(default: torch's own, one per core; ``threads`` sets ``OMP_NUM_THREADS`` for every process):

* ``fused_s``: ``lst sweep --sampler grid --trials K --parallel K``: K variants of the default
  side network (lr, weight decay, dropout and, past 16, the seed vary), one epoch, trained fused on
  one read of every batch, the variants of each batch on ``--variant-threads`` threads;
* ``separate_s``: the same K trials as K ``lst train --config <trial>/config.yaml`` runs, one after
  another, each with all the intra-op threads. ``separate_runs`` = n < K times n of them, spread evenly
  over the K (trial 0 first, for the equivalence check), and scales their sum by K / n: separate runs
  of one architecture differ only in lr, weight decay, dropout and seed, so their times differ little,
  and at K = 64 on a GPU the 64 processes' start-up alone would take most of a device lease
  (``separate_estimated`` says when this was done);
* ``live_x16_s``: one ``lst train --live`` run of the first trial (backbone forward every step), times K;
* ``speedup_limit``: per token (backbone forward + side training FLOPs) / side training FLOPs,
  counted on a real batch (``pipeline.search.flops``).

``*_train_s`` gives the same comparison inside the processes (the fused loop's epoch against the sum
of the separate runs' epochs, evaluation excluded), so start-up and evaluation can be told apart.
Goals (CPU): ``fused_over_separate <= 0.8`` and ``fused_speedup_over_live >= 8``; and the GPU ones,
``fused_over_separate <= 0.25`` at K = 16 (0.5, an earlier goal, is kept as a key) and ``fused_speedup_over_live >= 0.8 * speedup_limit``.
With ``--workers W`` the same space is also swept through Dask with 1 and with W worker processes.
The load average before and after is printed, since the timings share the machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.bench.memory import _lst, run_measured

LRS = [1e-3, 2e-3, 3e-3, 5e-3]
WEIGHT_DECAYS = [0.0, 0.01]
DROPOUTS = [0.1, 0.0]


def variant_space(k: int, batch_size: int = 100) -> dict:
    """A grid of at least k variants of one architecture (16 per seed)."""
    space: dict = {"lr": LRS, "weight_decay": WEIGHT_DECAYS, "dropout": DROPOUTS, "epochs": 1,
                   "batch_size": batch_size}
    seeds = math.ceil(k / (len(LRS) * len(WEIGHT_DECAYS) * len(DROPOUTS)))
    if seeds > 1:
        space["seed"] = list(range(seeds))
    return space


def separate_sample(k: int, runs: int) -> list[int]:
    """Indices of the separate runs to time: all k when ``runs`` is 0 or at least k, else ``runs`` of
    them spread evenly, the first always included."""
    if runs < 0:
        raise ValueError(f"separate_runs={runs}: use 0 (all) or a positive count")
    if not runs or runs >= k:
        return list(range(k))
    return sorted({round(i * k / runs) for i in range(runs)})


def _sweep(cache: str, space: Path, out: Path, trials: int, parallel: int, *extra: str, log: str | None = None) -> dict:
    cmd = _lst("sweep", "--cache", cache, "--space", str(space), "--out", str(out), "--trials", str(trials),
               "--parallel", str(parallel), "--sampler", "grid", "--seed", "0", "--no-progress", "--json", *extra)
    got = run_measured(cmd, stderr_to=log)
    return {"command": " ".join(["lst", *cmd[3:]]), **got}


def _trials(out: Path) -> list[tuple[int, dict]]:
    """(trial number, summary) of every finished trial of a sweep, by number."""
    rows = []
    for p in (out / "trials").glob("*/summary.json"):
        rows.append((int(p.parent.name), json.loads(p.read_text())))
    return sorted(rows, key=lambda r: r[0])


def run_sweep_bench(cache: str | None = None, variants: int = 16, examples: int = 2000, workers: int = 0,
                    backbone: str = "minilm", fuse: str = "auto", sweep_trials: int = 8, workdir: str | None = None,
                    threads: int | None = None, variant_threads: int = 0, progress: bool = True,
                    separate_runs: int = 0) -> dict:
    import torch

    from pipeline.cache.store import ActivationCache
    from pipeline.search.flops import speedup_limit
    from pipeline.train.trainer import TrainConfig, planned_batches

    load_start = os.getloadavg()
    work = Path(workdir or tempfile.mkdtemp(prefix="lst-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # every child process

    def log(msg: str) -> None:
        if progress:
            print(f"[bench sweep] {msg}", file=sys.stderr, flush=True)

    try:
        extract_s = None
        if cache is None:
            cache = str(work / "cache.zarr")
            log(f"extracting {examples} SST-2 examples per split with {backbone} into {cache}")
            got = run_measured(_lst("extract", "--backbone", backbone, "--dataset", "sst2", "--out", cache,
                                    "--max-examples", str(examples), "--overwrite", "--no-progress", "--json"),
                               stderr_to=str(work / "extract.log"))
            extract_s = got["wall_s"]
        c = ActivationCache.open(cache)
        space = work / f"space-k{variants}.yaml"
        space.write_text(yaml.safe_dump(variant_space(variants)))

        log(f"fused: `lst sweep --trials {variants} --parallel {variants}` in a fresh process")
        sweep_dir = work / f"fused-k{variants}"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        fused = _sweep(cache, space, sweep_dir, variants, variants, "--variant-threads", str(variant_threads),
                       "--fuse", fuse, log=str(work / f"fused-k{variants}.log"))
        trials = _trials(sweep_dir)
        if len(trials) != variants:
            raise RuntimeError(f"the fused sweep finished {len(trials)} of {variants} trials; see {sweep_dir}")

        timed = separate_sample(len(trials), separate_runs)
        log(f"separate: {len(timed)} of the {variants} trials as `lst train` runs, each in a fresh process")
        sep, sep_wall = [], 0.0
        for n, _ in (trials[i] for i in timed):
            got = run_measured(_lst("train", "--config", str(sweep_dir / "trials" / str(n) / "config.yaml"),
                                    "--out", str(work / f"separate-k{variants}" / str(n)), "--overwrite",
                                    "--no-progress", "--json"), stderr_to=str(work / "separate.log"))
            sep.append(got["result"])
            sep_wall += got["wall_s"]

        log("live: one `lst train --live` run of the first trial")
        first = sweep_dir / "trials" / str(trials[0][0]) / "config.yaml"
        live = run_measured(_lst("train", "--config", str(first), "--out", str(work / "live"), "--live",
                                 "--overwrite", "--no-progress", "--json"), stderr_to=str(work / "live.log"))

        configs = [yaml.safe_load((sweep_dir / "trials" / str(n) / "config.yaml").read_text()) for n, _ in trials]
        cfg0 = TrainConfig.from_dict(configs[0]["train"])
        batch = next(iter(planned_batches(c, cfg0, data_seed=0).iter_epoch(0)))
        sides = list({json.dumps(x["side"], sort_keys=True): x["side"] for x in configs}.values())  # distinct sides
        limit = speedup_limit(c.fingerprint["backbone"], sides, batch)
        lim = limit["speedup_limit"]
        # a fused trial equals its separate run when its seed is the sweep's batch-order seed (0)
        same = [abs(trials[i][1]["dev_score"] - s["dev_score"]) for i, s in zip(timed, sep)
                if configs[i]["train"]["seed"] == 0]
        fused_s, live_s = fused["wall_s"], live["wall_s"]
        live_x = live_s * variants
        fused_train = max(f["train_s"] for _, f in trials)  # the shared loop's epochs (each trial records them)
        scale = variants / len(timed)  # 1 unless only a sample of the separate runs was timed
        sep_wall *= scale
        sep_train = sum(s["epoch_s"] * s["epochs_run"] for s in sep) * scale
        res = {
            "benchmark": "sweep", "backbone": c.fingerprint["backbone"], "device": sep[0]["device"],
            "torch_threads": threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "variant_threads": trials[0][1].get("variant_threads", 1),
            "fresh_processes": True,
            "commands": {"fused": fused["command"],
                         "separate": f"lst train --config {sweep_dir}/trials/<n>/config.yaml --out ... (x{variants})",
                         "live": f"lst train --config {first} --live"},
            "train_examples": c.split("train").num_examples, "train_tokens": c.split("train").num_tokens,
            "dev_examples": c.split("validation").num_examples, "extract_s": extract_s,
            "variants": variants, "epochs": 1, "batch_size": cfg0.batch_size,
            "separate_runs": len(timed), "separate_estimated": len(timed) < variants,
            "fused_s": round(fused_s, 3), "separate_s": round(sep_wall, 3), "live_s": round(live_s, 3),
            "live_x16_s": round(live_x, 3),
            "fused_over_separate": round(fused_s / sep_wall, 4),
            "fused_speedup_over_live": round(live_x / fused_s, 3),
            "speedup_limit": round(lim, 3),
            "fused_speedup_over_limit": round(live_x / fused_s / lim, 4),
            "fused_per_variant_s": round(fused_s / variants, 3), "separate_per_variant_s": round(sep_wall / variants, 3),
            "fused_train_s": round(fused_train, 3), "separate_train_s": round(sep_train, 3),
            "fused_over_separate_train_s": round(fused_train / sep_train, 4),
            "live_epoch_s": live["result"].get("epoch_s"),
            "peak_mb": {"fused": fused["polled_peak_mb"], "live": live["polled_peak_mb"],
                        "separate_max": max(s.get("peak_mem_mb") or 0 for s in sep)},
            "max_dev_diff_fused_vs_separate_same_seed": max(same) if same else None,
            "best_fused_dev_score": max(f["dev_score"] for _, f in trials), "live_dev_score": live["result"]["dev_score"],
            "flops": {k: v for k, v in limit.items() if k != "side_train_flops"},
            "goals": {"fused_over_separate<=0.8": fused_s / sep_wall <= 0.8,
                      "fused_speedup_over_live>=8": live_x / fused_s >= 8,
                      "fused_over_separate<=0.5": fused_s / sep_wall <= 0.5,
                      "fused_over_separate<=0.25": fused_s / sep_wall <= 0.25,
                      "fused_speedup_over_live>=0.8*speedup_limit": live_x / fused_s >= 0.8 * lim},
        }
        if workers and workers > 1:
            log(f"dask sweep: {sweep_trials} trials with 1 worker, then {workers} workers")
            par = max(1, sweep_trials // (2 * workers))  # every worker gets claims
            space8 = work / "space-dask.yaml"
            space8.write_text(yaml.safe_dump(variant_space(sweep_trials)))
            runs = {}
            for w in (1, workers):
                d = work / f"dask-w{w}"
                shutil.rmtree(d, ignore_errors=True)
                got = _sweep(cache, space8, d, sweep_trials, par, "--workers", str(w), log=str(work / f"dask-w{w}.log"))
                runs[w] = {"wall_s": got["wall_s"], "trials": got["result"]["n_trials"],
                           "per_worker": got["result"]["per_worker"], "best_dev_score": got["result"]["best_dev_score"]}
            res["dask"] = {"trials": sweep_trials, "parallel": par, "one_worker": runs[1], f"{workers}_workers": runs[workers],
                           "speedup": round(runs[1]["wall_s"] / runs[workers]["wall_s"], 3)}
        res["loadavg_start"] = [round(x, 2) for x in load_start]
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return res
    finally:
        if threads:
            if saved_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved_threads
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
