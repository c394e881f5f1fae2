"""`lst sweep` and `lst report`."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli.options import add_options, given
from pipeline.cli.output import add_output_flags
from pipeline.errors import TrainError
from pipeline.search.space import KNOBS
from pipeline.search.sweep import SweepConfig
from pipeline.train.config import TrainConfig

SWEEP_EPILOG = """\
space.yaml: one knob per line, each a list of choices, a range, or a fixed value:
  r: [4, 8, 16]
  layers: [all, [2, 4, 6]]
  gate: [learnable, sum]
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  weight_decay: [0.0, 0.01]
  epochs: 3
  batch_size: 32
knobs: {knobs}

Re-running the same command resumes: finished trials are kept, trials a kill interrupted are retried.
Examples:
  lst sweep --cache data/cache/sst2-minilm.zarr --space space.yaml --out runs/sweep-r --trials 20 --parallel 4
  lst sweep ... --workers 2                       # a local Dask cluster of 2 processes
  lst sweep ... --scheduler tcp://host:8786       # an existing Dask cluster (shared disk for --out)
  lst report runs/sweep-r
"""


# TrainConfig options a sweep sets for every trial (besides the space's knobs)
TRIAL_OPTIONS = ("max_steps", "device", "reader_memory", "recompute")


def _sweep(a: argparse.Namespace) -> int:
    from pipeline.search.sweep import run_sweep

    cfg = SweepConfig(**given(a, SweepConfig), train=given(a, TrainConfig, TRIAL_OPTIONS), progress=not a.no_progress)
    s = run_sweep(cfg)
    if a.json:
        print(json.dumps(s, default=str))
    else:
        print(f"{s['out']}: {s['n_trials']}/{s['trials_target']} trials finished ({s['n_complete']} complete, "
              f"{s['n_pruned']} pruned, {s['n_failed']} failed; {s['new_trials']} this run) in {s['wall_s']} s")
        if s["n_complete"]:
            print(f"best: trial {s['best_trial']} dev {s['metric']} {s['best_dev_score']} params {s['best_params']}")
            print(f"report: lst report {s['out']}")
    if not s["n_complete"]:  # a sweep without one result is a failed command, and says why
        why = (s["first_error"] or "every trial was pruned").splitlines()[0]
        raise TrainError(f"no trial of {s['out']} completed; first failure: {why}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from pipeline.search.report import write_report

    r = write_report(a.run_dir, top=a.top, out_dir=a.out)
    for why in r["skipped"]:
        print(f"lst report: warning: {why}", file=sys.stderr)
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
        epilog=SWEEP_EPILOG.replace("{knobs}", ", ".join(KNOBS)), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, SweepConfig, exclusive={"dask"},
                overrides={n: {"required": True} for n in ("cache", "space", "out")})
    add_options(p, TrainConfig, TRIAL_OPTIONS, title="every trial", overrides={"recompute": {
        "help": "what each trial's side network reruns in the backward instead of keeping: none (default here: "
                "a fused sweep steps only --variant-threads variants at once, so keeping their activations "
                "costs little and saves the rerun, ~8%% of a sweep), ffn (as `lst train`) or blocks; the same "
                "numbers either way"}})
    add_output_flags(p)
    p.set_defaults(func=_sweep)

    r = sub.add_parser(
        "report", help="leaderboard, plots and DVC metrics/plots files of a sweep",
        description="Write RUN_DIR/leaderboard.md and .json, score_vs_params.png, score_vs_memory.png, "
                    "learning_curves.png (top 5), metrics.json (for `dvc metrics show`) and "
                    "plots/leaderboard.csv, plots/learning_curves.csv (for `dvc plots show`).",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="a sweep directory written by `lst sweep`")
    r.add_argument("--top", type=int, default=5, help="trials drawn in learning_curves.png, 1 or more (default 5)")
    r.add_argument("--out", help="write the report files here instead of into RUN_DIR (the DVC stage uses reports/)")
    r.add_argument("--json", action="store_true", help="print one JSON summary as the last stdout line")
    r.set_defaults(func=_report)


