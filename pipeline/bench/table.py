"""`lst bench table`: the LST paper's comparison (Table 1 style) on real GLUE tasks in one run.

For each task: `lst extract` once (a subprocess; ``--max-examples`` caps every split, which only
caps training sets as long as it is >= the dev sizes: SST-2 872, MRPC 408, CoLA 1043, STS-B 1500),
`lst fisher` on the cache (skipped when the cache already holds Fisher importance), one baseline
process (imports only), then every method as a fresh `lst train` process through the peak-memory
harness of `lst bench memory` (``run_measured``, ``train_command``, its ``METHODS`` table). LST runs use
their defaults with Fisher initialisation (``--init fisher``); every method uses the paper's learning
rate (``METHOD_LR``) unless ``train_args`` overrides it.

Scores are the paper's: SST-2 accuracy, CoLA Matthews correlation, MRPC the mean of F1 and accuracy,
STS-B the mean of Pearson and Spearman, all x100, at the best dev epoch. Memory on CPU is each
process's whole-process peak RSS, absolute and above the task's baseline process; the table reports
the largest over the tasks. Writes ``<results>/table-<backbone>-<device>[-<tag>].{md,json,png}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pipeline.bench.memory import (CHILD_ENV, METHODS, MemoryBenchConfig, _lst, baseline_for, extract_cache,
                                   measure_baseline, resolve_bench_device, run_measured, train_command)
from pipeline.bench.resume import finished_row, save_row

TABLE_METHODS = ("full", "lora", "adapter", "bitfit", "linear-probe", "live", "cached", "cached-recompute")
LABELS = {"full": "Full fine-tuning", "lora": "LoRA (r 32, q/v)", "adapter": "Adapter (dim 64)", "bitfit": "BitFit",
          "linear-probe": "Linear probe (cached last layer)", "live": "LST, live backbone",
          "cached": "LST, cached (this project)", "cached-recompute": "LST, cached, --recompute",
          "live-dropout": "LST, live backbone with its dropout on"}
SHORT = {"full": "Full FT", "lora": "LoRA", "adapter": "Adapter", "bitfit": "BitFit", "linear-probe": "Linear probe",
         "live": "LST live", "cached": "LST cached", "cached-recompute": "LST cached, recompute",
         "live-dropout": "LST live, dropout"}
# label positions in the plot
OFFSETS = {"lora": (5, -12), "adapter": (-48, -12), "cached": (-20, 8), "cached-recompute": (-50, -16),
           "live": (8, -4)}
TASK_LABELS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "stsb": "STS-B", "qnli": "QNLI", "rte": "RTE",
               "mnli": "MNLI", "qqp": "QQP"}
LST_METHODS = ("live", "cached", "cached-recompute", "live-dropout")
CACHED = ("cached", "cached-recompute", "linear-probe")  # read the cache: compared with the methods that do not
# The official LST GLUE scripts' schedule (seq2seq/scripts/env.sh, every method): 20 epochs on the small
# tasks, 10 on the large ones.
PAPER_EPOCHS = "10,cola=20,mrpc=20,stsb=20,rte=20"


def parse_epochs(spec: int | str) -> dict[str, int]:
    """An epoch schedule: ``N`` (every task), ``task=N`` items after an optional default, or ``paper``
    (the official LST schedule, ``PAPER_EPOCHS``); the ``"*"`` key is the default.

    Per-task epochs exist because one count cannot serve a table that mixes 3,668 MRPC pairs with
    20,000 SST-2 sentences: the paper trains the small tasks twice as many epochs as the large ones.
    """
    text = str(spec).strip()
    if text == "paper":
        text = PAPER_EPOCHS
    out: dict[str, int] = {}
    for item in (x.strip() for x in text.split(",")):
        key, _, val = item.rpartition("=")
        try:
            n = int(val)
        except ValueError:
            n = 0
        if n < 1 or not item or (key == "" and "=" in item):
            raise ValueError(f"epochs {spec!r}: give a positive number of epochs, task=N items after an optional "
                             f"default (e.g. 10,cola=20,mrpc=20) or 'paper' ({PAPER_EPOCHS})")
        out[key.strip() or "*"] = n
    if "*" not in out:
        out["*"] = 1
    return out


def epochs_for(cfg: "TableBenchConfig", task: str, method: str) -> int:
    """Epochs of one method on one task: ``lst_epochs`` for the LST rows when given, else ``epochs``."""
    spec = cfg.lst_epochs if method in LST_METHODS and cfg.lst_epochs is not None else cfg.epochs
    sched = parse_epochs(spec)
    return sched.get(task, sched["*"])


def describe_epochs(cfg: dict) -> str:
    """The schedule in words for the table's header (old JSON has a plain int)."""
    def one(spec) -> str:
        sched = parse_epochs(spec)
        rest = ", ".join(f"{TASK_LABELS.get(t, t)} {n}" for t, n in sched.items()
                         if t != "*" and t in cfg.get("tasks", (t,)))
        return f"{sched['*']} epoch(s)" + (f" ({rest})" if rest else "")

    text = one(cfg["epochs"])
    if cfg.get("lst_epochs") is not None:
        text += f"; LST rows {one(cfg['lst_epochs'])}"
    return text


@dataclass
class TableBenchConfig:
    tasks: tuple[str, ...] = ("sst2", "cola", "mrpc", "stsb")
    backbone: str = "minilm"
    methods: tuple[str, ...] = TABLE_METHODS
    max_train: int | None = None  # `lst extract --max-examples` (caps every split)
    epochs: int | str = 1  # N, "task=N,..." or "paper" (``parse_epochs``)
    lst_epochs: int | str | None = None  # the LST rows' own schedule (default: ``epochs``)
    batch_size: int = 100
    max_length: int = 128
    max_steps: int | None = None  # quick checks only
    fisher_samples: int | None = None  # `lst fisher --samples` (default: its own, the paper's 1024)
    dropout_draws: int = 0  # `lst extract --dropout-draws N` (the cached LST rows read one draw per epoch)
    device: str = "auto"
    workdir: str | None = None  # caches, runs and logs (default: a temp dir, kept: the runs are the evidence)
    results_dir: str = "benchmarks/results"
    tag: str | None = None  # appended to the output file names
    train_args: list[str] = field(default_factory=list)  # extra `lst train` arguments for every method
    lst_init: str = "fisher"  # `lst train --init` of the LST rows (the paper's table: Fisher)
    progress: bool = True


def paper_score(task: str, row: dict) -> float:
    """The paper's dev metric from a metrics.jsonl row (x100)."""
    if "dev_pearson" in row:
        v = (row["dev_pearson"] + row["dev_spearman"]) / 2
    elif "dev_f1" in row:
        v = (row["dev_f1"] + row["dev_accuracy"]) / 2
    elif "dev_matthews" in row:
        v = row["dev_matthews"]
    else:
        v = row.get("dev_accuracy", row["dev_score"])
    return 100 * float(v)


def best_row(run: Path, task: str) -> dict | None:
    """The epoch with the best paper score (first of equals), as training ranks epochs now (the mean of
    the task's metrics). Runs from before MRPC was ranked by (F1 + accuracy) / 2 kept the F1-best
    epoch's weights; every epoch's metrics are in their metrics.jsonl, so their row is re-selected."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return max(rows, key=lambda r: paper_score(task, r)) if rows else None


def _scored(task: str, row: dict | None) -> dict:
    return {"score": round(paper_score(task, row), 2) if row else None,
            "dev": {k: v for k, v in (row or {}).items() if k.startswith("dev_")}}


def _log(cfg: TableBenchConfig, msg: str) -> None:
    if cfg.progress:
        print(f"[bench table {time.strftime('%H:%M:%S')}] {msg}", file=__import__("sys").stderr, flush=True)


def ensure_fisher(cfg: TableBenchConfig, url: str, log: Path, device: str) -> float | None:
    """`lst fisher` on the cache unless it already holds importance; seconds spent (None: reused)."""
    from pipeline.cache import initpack

    if initpack.read_importance(url) is not None:
        return None
    args = ["fisher", "--cache", url, "--json", "--no-progress", "--device", device]
    if cfg.fisher_samples:
        args += ["--samples", str(cfg.fisher_samples)]
    t0 = time.perf_counter()
    with open(log, "w") as err:
        res = subprocess.run(_lst(*args), stdout=subprocess.PIPE, stderr=err, text=True,
                             env={**os.environ, **CHILD_ENV})
    if res.returncode:
        raise RuntimeError(f"lst fisher failed (exit {res.returncode}): {' '.join(args)}; see {log}")
    return round(time.perf_counter() - t0, 3)


def run_task(cfg: TableBenchConfig, task: str, work: Path, device: str) -> dict:
    from pipeline.cache.store import ActivationCache

    tw = work / task
    tw.mkdir(parents=True, exist_ok=True)
    mcfg = MemoryBenchConfig(backbone=cfg.backbone, dataset=task, max_examples=cfg.max_train, batch_size=cfg.batch_size,
                             max_length=cfg.max_length, max_steps=cfg.max_steps, device=device,
                             train_args=list(cfg.train_args), dropout_draws=cfg.dropout_draws, progress=False)
    _log(cfg, f"{task}: extract")
    t0 = time.perf_counter()
    url = extract_cache(mcfg, tw)  # an identical cache already there is reused (resumed: nothing to do)
    extract_s = round(time.perf_counter() - t0, 3)
    _log(cfg, f"{task}: fisher")
    fisher_s = ensure_fisher(cfg, url, tw / "fisher.log", device)
    cache = ActivationCache.open(url)
    splits = {s: cache.split(s).num_examples for s in cache.splits}
    base_mb = measure_baseline(url)
    stage_two_mb = measure_baseline(url, stage_two=True)  # what the cached rows import: no transformers
    out: dict = {"task": task, "metric": cache.attrs["task"]["metric"], "cache": url, "examples": splits,
                 "extract_s": extract_s, "fisher_s": fisher_s, "baseline_mb": round(base_mb, 1),
                 "stage_two_baseline_mb": round(stage_two_mb, 1), "methods": {}}
    own = tw / cfg.tag if cfg.tag else tw  # tagged tables (ablations) share the caches, not the runs
    for m in cfg.methods:
        run = own / "runs" / m
        # the schedule may differ per task and method, so each command gets its own count
        cmd = train_command(m, replace(mcfg, epochs=epochs_for(cfg, task, m)), url, run, device)
        if m in LST_METHODS:
            cmd += ["--init", cfg.lst_init]
        done = finished_row(own / f"{m}.result.json", cmd)
        if done is not None:  # a rerun of an interrupted table: this method's process already finished
            row = best_row(run, task)
            out["methods"][m] = {**done, **(_scored(task, row) if row else {})}
            _log(cfg, f"{task}: {m} reused from {own / f'{m}.result.json'}")
            continue
        _log(cfg, f"{task}: {m}")
        own.mkdir(parents=True, exist_ok=True)
        got = run_measured(cmd, stderr_to=str(own / f"{m}.log"))
        s = got["result"]
        host = got["polled_peak_mb"] if device == "cuda" else max(got["polled_peak_mb"], s["peak_mem_mb"])
        d = {"command": " ".join(["lst", *cmd[3:]]), **_scored(task, best_row(run, task)),
             "abs_mb": round(host, 1),
             "above_baseline_mb": round(host - baseline_for(m, base_mb, stage_two_mb), 1),
             "trainable_params": s["trainable_params"], "trainable_pct": s["trainable_pct"],
             "backbone_params": s["backbone_params"], "epoch_s": s["epoch_s"], "wall_s": got["wall_s"],
             "epochs_run": s.get("epochs_run", 1), "steps": s["steps"], "examples_per_s": s["examples_per_s"]}
        if device == "cuda":
            d["cuda_peak_mb"] = s["peak_mem_mb"]
        out["methods"][m] = d
        save_row(own / f"{m}.result.json", cmd, d)
        _log(cfg, f"{task}: {m} score {d['score']} peak {d['abs_mb']} MB ({d['above_baseline_mb']} above baseline), "
                  f"{d['wall_s']} s")
    return out


def aggregate(cfg: TableBenchConfig, tasks: dict[str, dict], device: str) -> dict[str, dict]:
    rows = {}
    for m in cfg.methods:
        per = [t["methods"][m] for t in tasks.values()]
        scores = {k: t["methods"][m]["score"] for k, t in tasks.items()}
        ok = [v for v in scores.values() if v is not None]
        rows[m] = {
            "label": LABELS.get(m, m),
            "args": " ".join(METHODS[m]) + (f" --init {cfg.lst_init}" if m in LST_METHODS else ""),
            "trainable_params": max(p["trainable_params"] for p in per),
            "trainable_pct": round(max(p["trainable_pct"] for p in per), 3),
            "peak_abs_mb": max(p["abs_mb"] for p in per),
            "peak_above_baseline_mb": max(p["above_baseline_mb"] for p in per),
            # a summary's epoch_s is the mean epoch: times the epochs run, it is the run's training time
            "train_epoch_s": round(sum((p["epoch_s"] or 0) * (p.get("epochs_run") or 1) for p in per), 1),
            "wall_s": round(sum(p["wall_s"] for p in per), 1),
            "scores": scores,
            "average": round(sum(ok) / len(ok), 2) if len(ok) == len(scores) and ok else None,
        }
        if device == "cuda":
            rows[m]["cuda_peak_mb"] = max(p["cuda_peak_mb"] for p in per)
    return rows


def fmt(v: float | None, n: int = 1) -> str:
    """A table cell: ``v`` to ``n`` decimals, or "-" where a run gave no number."""
    return "-" if v is None else f"{v:.{n}f}"


def render_markdown(res: dict) -> str:
    tasks = res["tasks_order"]
    cfg = res["config"]
    lines = [f"# LST comparison: {res['backbone']} on {', '.join(TASK_LABELS.get(t, t) for t in tasks)} ({res['device']})",
             "",
             f"Each method is a fresh `lst train` process on the same cache, batch size {cfg['batch_size']}, "
             f"{describe_epochs(cfg)}, max length {cfg['max_length']}, the paper's learning rates "
             "(3e-4 full FT / LoRA / Adapter / BitFit, 3e-3 LST and the linear probe); LST: defaults with "
             f"`--init {cfg.get('lst_init', 'fisher')}`"
             + (f", extra `lst train` flags `{' '.join(cfg['train_args'])}`" if cfg.get("train_args") else "")
             + (f"; caches with {cfg['dropout_draws']} train-mode dropout draws of the train split (`lst extract "
                f"--dropout-draws {cfg['dropout_draws']}`), one read per epoch in turn" if cfg.get("dropout_draws") else "")
             + (" (`--recompute`: the same run with each side block recomputed in the backward, so the same "
                "scores at less memory)" if "cached-recompute" in res["methods"] else "") + ".",
             "Training examples per task: " + ", ".join(
                 f"{TASK_LABELS.get(t, t)} {res['tasks'][t]['examples'].get('train')}" for t in tasks)
             + "; dev: " + ", ".join(f"{TASK_LABELS.get(t, t)} {res['tasks'][t]['examples'].get('validation')}"
                                       for t in tasks) + ".",
             "Scores (x100): SST-2 accuracy, CoLA MCC, MRPC mean(F1, acc), STS-B mean(Pearson, Spearman), at the "
             "best dev epoch. Peak memory: whole-process peak RSS (VmHWM) of the `lst train` process, largest over "
             "the tasks, absolute and above a baseline process that only imports what training imports"
             + (" ; CUDA: max_memory_allocated" if res["device"] == "cuda" else "") + ". Train time: "
             "the training epochs' seconds summed over tasks (process wall time, with loading and eval, in brackets).",
             "",
             "| Method | Params % | Peak MB (abs) | Peak MB (above baseline) | Train s (wall s) | "
             + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|"]

    f = fmt
    for m, r in res["methods"].items():
        lines.append(f"| {r['label']} | {r['trainable_pct']:.3f} | {f(r['peak_abs_mb'], 0)} | "
                     f"{f(r['peak_above_baseline_mb'], 0)} | {f(r['train_epoch_s'], 0)} ({f(r['wall_s'], 0)}) | "
                     + " | ".join(f(r["scores"][t]) for t in tasks) + f" | {f(r['average'])} |")
    lines += ["", "Baseline process peak RSS: " + ", ".join(
        f"{TASK_LABELS.get(t, t)} {res['tasks'][t]['baseline_mb']:.0f} MB" for t in tasks) + ".",
        f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, r in res["methods"].items():
        if r["average"] is None:
            continue
        x = r.get("cuda_peak_mb") if res["device"] == "cuda" else r["peak_above_baseline_mb"]
        ax.scatter([x], [r["average"]], s=60, color="tab:red" if m.startswith("cached") else "tab:blue")
        ax.annotate(SHORT.get(m, m), (x, r["average"]), textcoords="offset points",
                    xytext=OFFSETS.get(m, (5, 5)), fontsize=8)
    ax.set_xlabel("peak memory, MB " + ("(CUDA max allocated)" if res["device"] == "cuda"
                                        else "(process peak RSS above the import baseline)"))
    ax.set_ylabel("average dev score (x100)")
    ax.set_title(f"{res['backbone']} on {', '.join(TASK_LABELS.get(t, t) for t in res['tasks_order'])} "
                 f"({res['device']}, {describe_epochs(res['config'])})")
    ax.margins(x=0.12, y=0.1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_table_bench(cfg: TableBenchConfig, command: str = "") -> dict:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    device = resolve_bench_device(cfg.device)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="lst-bench-table-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks = {}
    for t in cfg.tasks:
        tasks[t] = run_task(cfg, t, work, device)
    res = {"benchmark": "table", "backbone": cfg.backbone, "device": device, "tasks_order": list(cfg.tasks),
           "config": asdict(cfg), "command": command, "workdir": str(work),
           "measure": "cuda max_memory_allocated" if device == "cuda"
           else "whole-process peak RSS (VmHWM), absolute and above the post-import baseline process",
           "total_s": None, "methods": aggregate(cfg, tasks, device), "tasks": tasks}
    res["total_s"] = round(time.perf_counter() - t0, 1)
    scored = {m: r for m, r in res["methods"].items() if r["average"] is not None}
    if "cached" in scored:
        others = {m: r for m, r in scored.items() if m not in CACHED}
        res["cached_lowest_peak_except_probe"] = all(
            scored["cached"]["peak_above_baseline_mb"] < r["peak_above_baseline_mb"] for r in others.values())
        for m in ("full", "lora"):
            if m in scored:
                res[f"cached_minus_{m}_avg"] = round(scored["cached"]["average"] - scored[m]["average"], 2)
    stem = f"table-{Path(cfg.backbone).name}-{device}" + (f"-{cfg.tag}" if cfg.tag else "")
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    res["outputs"] = {k: str(out / f"{stem}.{k}") for k in ("md", "json", "png")}
    (out / f"{stem}.md").write_text(render_markdown(res))
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    plot(res, out / f"{stem}.png")
    return res
