"""`lst sweep` and `lst report`."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.train.errors import TrainError

SWEEP_EPILOG = """\
space.yaml: one knob per line, each a list of choices, a range, or a fixed value:
  r: [4, 8, 16]
  layers: [all, [2, 4, 6]]
  gate: [learnable, sum]
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  weight_decay: [0.0, 0.01]
  epochs: 3
  batch_size: 32
knobs: r, layers, gate, block, init, pooling, dropout, attention_dropout, lr, weight_decay, warmup_ratio, epochs, batch_size, seed

Re-running the same command resumes: finished trials are kept, trials a kill interrupted are retried.
Examples:
  lst sweep --cache data/cache/sst2-minilm.zarr --space space.yaml --out runs/sweep-r --trials 20 --parallel 4
  lst sweep ... --workers 2                       # a local Dask cluster of 2 processes
  lst sweep ... --scheduler tcp://host:8786       # an existing Dask cluster (shared disk for --out)
  lst report runs/sweep-r
"""


def _sweep(a: argparse.Namespace) -> int:
    from pipeline.search.sweep import SweepConfig, run_sweep

    train = {}
    if a.max_steps is not None:
        train["max_steps"] = a.max_steps
    if a.device:
        train["device"] = a.device
    cfg = SweepConfig(cache=a.cache, space=a.space, out=a.out, trials=a.trials, sampler=a.sampler, pruner=a.pruner,
                      parallel=a.parallel, workers=a.workers or 0, scheduler=a.scheduler, seed=a.seed, fuse=a.fuse,
                      train=train, progress=not a.no_progress)
    s = run_sweep(cfg)
    if a.json:
        print(json.dumps(s, default=str))
    else:
        print(f"{s['out']}: {s['n_trials']}/{s['trials_target']} trials finished ({s['n_complete']} complete, "
              f"{s['n_pruned']} pruned, {s['n_failed']} failed; {s['new_trials']} this run) in {s['wall_s']} s")
        print(f"best: trial {s['best_trial']} dev {s['metric']} {s['best_dev_score']} params {s['best_params']}")
        print(f"report: lst report {s['out']}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from pipeline.search.report import write_report

    r = write_report(a.run_dir, top=a.top, out_dir=a.out)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k != "leaderboard_md_text"}, default=str))
    else:
        print(r["leaderboard_md_text"])
        print("wrote " + ", ".join(r["files"]), file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "sweep", help="search side-network hyper-parameters from one cache (Optuna; fused variants; Dask)",
        description="Run an Optuna study over side-network variants, all trained from one activation cache. "
                    "Trials are trained --parallel at a time on ONE read of each batch (fused); results go to "
                    "OUT/study.journal, OUT/trials/<n>/ and OUT/sweep.json.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cache", required=True, help="activation cache written by `lst extract` (path or URL)")
    p.add_argument("--space", required=True, help="space.yaml: the knobs to search (see below)")
    p.add_argument("--out", required=True, help="sweep directory, e.g. runs/sweep-NAME")
    p.add_argument("--trials", type=int, default=20, help="trials in the study when done (default 20; grid: at most the grid size)")
    p.add_argument("--sampler", choices=["grid", "random", "tpe"], default="tpe", help="Optuna sampler (default tpe), seeded by --seed")
    p.add_argument("--pruner", choices=["none", "asha"], default="none",
                   help="asha: successive halving on the dev score after each epoch (default none)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="ask K trials at once and train them fused on one read of the cache (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, metavar="N", help="start a local Dask cluster of N worker processes (1 thread each)")
    g.add_argument("--scheduler", metavar="tcp://host:port", help="use an existing Dask cluster; --out must be on a disk all workers share")
    p.add_argument("--seed", type=int, default=0, help="sampler seed, batch order and (unless searched) init seed (default 0)")
    p.add_argument("--fuse", choices=["auto", "vmap", "loop"], default="auto",
                   help="how same-shape variants share a batch: vmap (stacked, torch.func), loop (in turn), "
                        "auto (vmap on CUDA, loop on CPU; default)")
    p.add_argument("--max-steps", type=int, help="cap every trial at N optimisation steps (quick sweeps)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    p.set_defaults(func=_sweep)

    r = sub.add_parser(
        "report", help="leaderboard, plots and DVC metrics/plots files of a sweep",
        description="Write RUN_DIR/leaderboard.md and .json, score_vs_params.png, score_vs_memory.png, "
                    "learning_curves.png (top 5), metrics.json (for `dvc metrics show`) and "
                    "plots/leaderboard.csv, plots/learning_curves.csv (for `dvc plots show`).",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a sweep directory written by `lst sweep`")
    r.add_argument("--top", type=int, default=5, help="trials drawn in learning_curves.png (default 5)")
    r.add_argument("--out", help="write the report files here instead of into RUN_DIR (the DVC stage uses reports/)")
    r.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    r.set_defaults(func=_report)


__all__ = ["register", "TrainError"]
