"""`lst bench sweep`: K variants fused on one read vs K separate cached runs vs K live-LST runs.

All in one process, every arm with the same torch intra-op threads (default: torch's own, one
per core; ``threads=1`` gives the single-thread numbers of earlier sessions):

* ``fused_s``: ``train_many`` of the K variants (one architecture, the default r=8 MiniLM side;
  lr, weight decay, seed and dropout vary), one epoch, one read of every batch, the variants of
  each batch on ``variant_threads`` threads at once (each on one intra-op thread);
* ``separate_s``: the same K configs as K ``train()`` runs from the cache, one after another, each
  with all the intra-op threads;
* ``live_x16_s``: one ``train(live=True)`` run (backbone forward every step), times K;
* ``speedup_limit``: per token (backbone forward + side training FLOPs) / side training FLOPs,
  counted on a real batch (``pipeline.search.flops``).

Goals (CPU): ``fused_over_separate <= 0.8`` and ``fused_speedup_over_live >= 8``; and the GPU ones,
``fused_over_separate <= 0.5`` (0.25 at K = 16) and ``fused_speedup_over_live >= 0.8 * speedup_limit``.
With ``--workers W`` the same space is also swept through Dask with 1 and with W worker processes.
The load average before and after is printed, since the timings share the machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path



def variant_configs(cache: str, out: Path, n: int, epochs: int = 1, batch_size: int = 100, fuse_seed: int = 0):
    """n variants of the default side network that differ only in what a stack may differ in."""
    from pipeline.train.trainer import TrainConfig

    lrs = [1e-3, 2e-3, 3e-3, 5e-3]
    wds = [0.0, 0.01]
    dropouts = [0.1, 0.0]
    cfgs = []
    for i in range(n):
        cfgs.append(TrainConfig(
            cache=cache, out=str(out / f"v{i}"), side={"dropout": dropouts[(i // 8) % 2]}, lr=lrs[i % 4],
            weight_decay=wds[(i // 4) % 2], seed=fuse_seed + (i // 16), epochs=epochs, batch_size=batch_size,
            progress=False, overwrite=True))
    return cfgs


def _sweep_time(cache: str, work: Path, workers: int, trials: int, parallel: int, tag: str) -> dict:
    from pipeline.search.sweep import SweepConfig, run_sweep

    space = {"lr": [1e-3, 2e-3, 3e-3, 5e-3], "weight_decay": [0.0, 0.01], "dropout": [0.1, 0.0],
             "epochs": 1, "batch_size": 100}
    t0 = time.perf_counter()
    s = run_sweep(SweepConfig(cache=cache, space=space, out=str(work / f"sweep-{tag}"), trials=trials, sampler="grid",
                              parallel=parallel, workers=workers, progress=False))
    return {"wall_s": round(time.perf_counter() - t0, 3), "trials": s["n_trials"],
            "per_worker": s["per_worker"], "best_dev_score": s["best_dev_score"]}


def run_sweep_bench(cache: str | None = None, variants: int = 16, examples: int = 2000, workers: int = 0,
                    backbone: str = "minilm", fuse: str = "auto", sweep_trials: int = 8, workdir: str | None = None,
                    threads: int | None = None, variant_threads: int = 0, progress: bool = True) -> dict:
    import torch

    from pipeline.cache.store import ActivationCache
    from pipeline.extract.runner import ExtractConfig, run_extract
    from pipeline.search.flops import speedup_limit
    from pipeline.search.fused import resolve_fuse, train_many
    from pipeline.devices import resolve_device
    from pipeline.train.trainer import TrainConfig, planned_batches, train

    if threads:
        torch.set_num_threads(threads)
    load_start = os.getloadavg()
    work = Path(workdir or tempfile.mkdtemp(prefix="lst-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if progress:
            print(f"[bench sweep] {msg}", file=sys.stderr, flush=True)

    try:
        extract_s = None
        if cache is None:
            cache = str(work / "cache.zarr")
            log(f"extracting {examples} SST-2 examples per split with {backbone} into {cache}")
            t0 = time.perf_counter()
            run_extract(ExtractConfig(backbone=backbone, dataset="sst2", out=cache, max_examples=examples,
                                      progress=False, overwrite=True))
            extract_s = round(time.perf_counter() - t0, 3)
        c = ActivationCache.open(cache)
        cfgs = variant_configs(cache, work / "fused", variants)
        device = resolve_device(cfgs[0].device)
        mode = resolve_fuse(fuse, device)

        # warm-up (lazy imports, allocator, thread pools) so neither timed arm pays it
        train(TrainConfig(**{**cfgs[0].to_dict(), "out": str(work / "warmup"), "max_steps": 2}))
        log(f"fused: {variants} variants, one read ({mode})")
        t0 = time.perf_counter()
        fused = train_many(cfgs, data_seed=0, fuse=fuse, variant_threads=variant_threads)
        fused_s = time.perf_counter() - t0

        log(f"separate: {variants} train() runs from the cache")
        sep = []
        t0 = time.perf_counter()
        for cf in variant_configs(cache, work / "separate", variants):
            sep.append(train(cf))
        separate_s = time.perf_counter() - t0

        log("live: one train(live=True) run")
        t0 = time.perf_counter()
        live = train(TrainConfig(**{**cfgs[0].to_dict(), "out": str(work / "live"), "live": True}))
        live_s = time.perf_counter() - t0

        # a batch of the plan the runs above used
        batch = next(iter(planned_batches(c, cfgs[0], data_seed=0).iter_epoch(0)))
        limit = speedup_limit(c.fingerprint["backbone"], [cf.side for cf in cfgs], batch)
        lim = limit["speedup_limit"]
        # a fused variant equals its separate run when its seed is the fused batch-order seed (0)
        same = [abs(f["dev_score"] - s["dev_score"]) for cf, f, s in zip(cfgs, fused, sep) if cf.seed == 0]
        live_x = live_s * variants
        res = {
            "benchmark": "sweep", "backbone": c.fingerprint["backbone"], "device": str(device),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "variant_threads": fused[0].get("variant_threads", 1),
            "train_examples": c.split("train").num_examples, "train_tokens": c.split("train").num_tokens,
            "dev_examples": c.split("validation").num_examples, "extract_s": extract_s,
            "variants": variants, "epochs": 1, "batch_size": cfgs[0].batch_size, "fuse": mode,
            "fused_s": round(fused_s, 3), "separate_s": round(separate_s, 3), "live_s": round(live_s, 3),
            "live_x16_s": round(live_x, 3),
            "fused_over_separate": round(fused_s / separate_s, 4),
            "fused_speedup_over_live": round(live_x / fused_s, 3),
            "speedup_limit": round(lim, 3),
            "fused_speedup_over_limit": round(live_x / fused_s / lim, 4),
            "fused_per_variant_s": round(fused_s / variants, 3), "separate_per_variant_s": round(separate_s / variants, 3),
            "max_dev_diff_fused_vs_separate_same_seed": max(same) if same else None,
            "best_fused_dev_score": max(f["dev_score"] for f in fused), "live_dev_score": live["dev_score"],
            "flops": {k: v for k, v in limit.items() if k != "side_train_flops"},
            "goals": {"fused_over_separate<=0.8": fused_s / separate_s <= 0.8,
                      "fused_speedup_over_live>=8": live_x / fused_s >= 8,
                      "fused_over_separate<=0.5": fused_s / separate_s <= 0.5,
                      "fused_speedup_over_live>=0.8*speedup_limit": live_x / fused_s >= 0.8 * lim},
        }
        if workers and workers > 1:
            log(f"dask sweep: {sweep_trials} trials with 1 worker, then {workers} workers")
            par = max(1, sweep_trials // (2 * workers))  # every worker gets claims
            one = _sweep_time(cache, work, 1, sweep_trials, par, "w1")
            many = _sweep_time(cache, work, workers, sweep_trials, par, f"w{workers}")
            res["dask"] = {"trials": sweep_trials, "parallel": par, "one_worker": one, f"{workers}_workers": many,
                           "speedup": round(one["wall_s"] / many["wall_s"], 3)}
        res["loadavg_start"] = [round(x, 2) for x in load_start]
        res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        return res
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
