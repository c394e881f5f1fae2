"""`lst report RUN_DIR`: leaderboard, plots and DVC-readable files of a sweep.

Reads ``RUN_DIR/trials/<n>/{summary.json, metrics.jsonl, config.yaml}`` and, where present, the
study journal (trial states and searched values). Writes into RUN_DIR:

* ``leaderboard.md`` / ``leaderboard.json``: rank, trial, state, config, dev score, trainable
  params, memory, time (complete trials ranked first, then pruned ones by their last score)
* ``score_vs_params.png``, ``score_vs_memory.png``, ``learning_curves.png`` (top N), matplotlib Agg
* ``metrics.json`` (``dvc metrics show``) and ``plots/leaderboard.csv``,
  ``plots/learning_curves.csv`` (``dvc plots show``)

Memory: ``side_mem_mb`` is the variant's own training memory (parameters, gradients, AdamW
moments and saved activations at the sweep's batch size and the cache's max length), which
differs between variants; ``peak_mem_mb`` is the peak RSS of the process that trained it, shared
by every variant fused in that process, so it is listed but not plotted.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import TrainError, UserError

__all__ = ["collect_trials", "write_report"]

_CONFIG_KEYS = ("r", "layers", "decoder_layers", "gate", "block", "init", "pooling", "head", "dropout", "lr",
                "weight_decay", "warmup_ratio", "epochs", "batch_size", "seed")


def _states(run: Path) -> dict[int, dict]:
    if not (run / "study.journal").exists():
        return {}
    from pipeline.search.sweep import open_study

    study = open_study(run, create=False)
    return {t.number: {"state": t.state.name, "params": t.params, "config": t.user_attrs.get("config"),
                       "stale": bool(t.user_attrs.get("stale")), "error": t.user_attrs.get("error")}
            for t in study.get_trials(deepcopy=False)}


def _compact_config(cfg_yaml: dict, attr_config: dict | None) -> dict:
    """The knobs the space set (from the study), else every knob from the run's config.yaml."""
    if attr_config:
        out = {k: v for k, v in attr_config.items() if k != "side"}
        out.update(attr_config.get("side", {}))
    else:
        train, side = cfg_yaml.get("train", {}), cfg_yaml.get("side", {})
        out = {k: side.get(k, train.get(k)) for k in _CONFIG_KEYS if side.get(k, train.get(k)) is not None}
    for k in ("layers", "decoder_layers"):
        if isinstance(out.get(k), list):
            out[k] = ",".join(map(str, out[k]))
    return {k: out[k] for k in _CONFIG_KEYS if k in out}


def _trial_files(d: Path) -> tuple[dict, list[dict], dict]:
    """A trial directory's summary, per-epoch history and config.yaml; ValueError names the file that
    is damaged (edited by hand, or cut short by a full disk)."""
    def read(name: str, parse, empty):
        path = d / name
        if not path.exists():
            return empty
        try:
            got = parse(path.read_text())
        except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__})") from None
        if not isinstance(got, type(empty)):
            raise ValueError(f"{path} is damaged (holds a {type(got).__name__})")
        return got

    s = read("summary.json", json.loads, {})
    hist = read("metrics.jsonl", lambda t: [json.loads(x) for x in t.splitlines() if x.strip()], [])
    if any(not isinstance(h, dict) or "epoch" not in h or "dev_score" not in h for h in hist):
        raise ValueError(f"{d / 'metrics.jsonl'} is damaged (a line without epoch and dev_score)")
    return s, hist, read("config.yaml", lambda t: yaml.safe_load(t) or {}, {})


def collect_trials(run_dir: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """One record per trial with a summary: state, config, scores, size, memory, time, history. A trial
    whose files are damaged is left out, and why goes to ``skipped``: one bad trial must not hide the rest."""
    run = Path(run_dir)
    if not (run / "trials").is_dir():
        raise TrainError(f"{run} is not a sweep directory (no trials/); run `lst sweep --out {run}` first")
    states = _states(run)
    out = []
    for d in sorted((p for p in (run / "trials").iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        n = int(d.name)
        st = states.get(n, {})
        if st.get("stale") or not (d / "summary.json").exists():
            continue
        try:
            s, hist, cfg_yaml = _trial_files(d)
        except ValueError as e:
            if skipped is not None:
                skipped.append(f"trial {n} left out: {e}")
            continue
        state = st.get("state") or ("PRUNED" if s.get("pruned") else "COMPLETE")
        out.append({
            "trial": n, "state": state, "config": _compact_config(cfg_yaml, st.get("config")),
            "dev_score": s.get("dev_score"), "last_dev_score": hist[-1]["dev_score"] if hist else None,
            "best_epoch": s.get("best_epoch"), "epochs_run": s.get("epochs_run"),
            "trainable_params": s.get("trainable_params"), "trainable_pct": s.get("trainable_pct"),
            "side_mem_mb": s.get("side_mem_mb"), "peak_mem_mb": s.get("peak_mem_mb"),
            "train_s": s.get("train_s", (s.get("epoch_s") or 0) * (s.get("epochs_run") or 0)),
            "amortised_s": s.get("amortised_s"), "fused_variants": s.get("fused_variants", 1),
            "metric": s.get("metric"), "history": hist, "run": str(d),
        })
    return out


def _rank(rows: list[dict]) -> list[dict]:
    def key(r):
        score = r["dev_score"] if r["dev_score"] is not None else -math.inf
        return (0 if r["state"] == "COMPLETE" else 1, -score, r["trial"])

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def _markdown(rows: list[dict], metric: str, run: Path) -> str:
    lines = [f"# Leaderboard: {run.name}", "",
             f"dev {metric}; side_mem_mb = the variant's own training memory; time = wall time of its fused group", "",
             "| rank | trial | state | dev score | trainable params | side mem MB | peak RSS MB | time s | config |",
             "|---:|---:|:---|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        cfg = ", ".join(f"{k}={_fmt(v)}" for k, v in r["config"].items())
        lines.append(f"| {r['rank']} | {r['trial']} | {r['state'].lower()} | {_fmt(r['dev_score'])} | "
                     f"{r['trainable_params']:,} | {_fmt(r['side_mem_mb'])} | {_fmt(r['peak_mem_mb'])} | "
                     f"{_fmt(r['train_s'], 3)} | {cfg} |")
    return "\n".join(lines) + "\n"


def _plots(rows: list[dict], run: Path, metric: str, top: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    have = [r for r in rows if r["dev_score"] is not None]
    for fname, key, xlabel in (("score_vs_params.png", "trainable_params", "trainable parameters"),
                               ("score_vs_memory.png", "side_mem_mb", "side-network training memory (MB)")):
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
        for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
            pts = [r for r in have if r["state"] == state and r.get(key) is not None]
            if pts:
                ax.scatter([r[key] for r in pts], [r["dev_score"] for r in pts], marker=marker, c=color,
                           label=state.lower(), alpha=0.85)
                for r in pts:
                    ax.annotate(str(r["trial"]), (r[key], r["dev_score"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        if have and all((r.get(key) or 0) > 0 for r in have) and max(r[key] for r in have) > 10 * min(r[key] for r in have):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"dev {metric} (best epoch)")
        ax.set_title(f"{run.name}: dev {metric} vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        if have:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run / fname)
        plt.close(fig)
        files.append(fname)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for r in rows[:top]:
        ep = [h["epoch"] for h in r["history"]]
        a1.plot(ep, [h["dev_score"] for h in r["history"]], marker="o", label=f"#{r['rank']} trial {r['trial']}")
        a2.plot(ep, [h["train_loss"] for h in r["history"]], marker="o", label=f"trial {r['trial']}")
    a1.set_xlabel("epoch")
    a1.set_ylabel(f"dev {metric}")
    a2.set_xlabel("epoch")
    a2.set_ylabel("train loss")
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if rows:
            a.legend(fontsize=7)
    fig.suptitle(f"{run.name}: learning curves of the top {min(top, len(rows))}")
    fig.tight_layout()
    fig.savefig(run / "learning_curves.png")
    plt.close(fig)
    files.append("learning_curves.png")
    return files


def write_report(run_dir: str | Path, top: int = 5, out_dir: str | Path | None = None) -> dict:
    """Leaderboard, plots and DVC files of a sweep, into ``out_dir`` (default: the sweep dir itself;
    the DVC pipeline writes them to reports/ so they are not inside the sweep stage's output)."""
    if top < 1:
        raise UserError(f"--top {top}: draw at least 1 trial's learning curve")
    run = Path(run_dir)
    skipped: list[str] = []
    rows = _rank(collect_trials(run, skipped))
    if not rows:
        raise TrainError(f"{run} has no finished trials yet (no readable trials/<n>/summary.json)"
                         + (f"; {'; '.join(skipped)}" if skipped else ""))
    dest = Path(out_dir) if out_dir else run
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--out {dest} is a file; give a directory for the report files, e.g. --out reports/")
    dest.mkdir(parents=True, exist_ok=True)
    metric = rows[0]["metric"] or "score"
    files = []
    md = _markdown(rows, metric, run)
    (dest / "leaderboard.md").write_text(md)
    board = [{k: r[k] for k in ("rank", "trial", "state", "config", "dev_score", "best_epoch", "epochs_run",
                                "trainable_params", "trainable_pct", "side_mem_mb", "peak_mem_mb", "train_s",
                                "amortised_s", "fused_variants", "run")} for r in rows]
    (dest / "leaderboard.json").write_text(json.dumps({"metric": metric, "trials": board}, indent=2))
    files += ["leaderboard.md", "leaderboard.json"]
    files += _plots(rows, dest, metric, top)
    best = rows[0]
    metrics = {"best_dev_score": best["dev_score"], "best_trial": best["trial"], "metric": metric,
               "best_trainable_params": best["trainable_params"], "best_side_mem_mb": best["side_mem_mb"],
               "n_trials": len(rows), "n_complete": sum(r["state"] == "COMPLETE" for r in rows),
               "n_pruned": sum(r["state"] == "PRUNED" for r in rows)}
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=2))
    files.append("metrics.json")
    (dest / "plots").mkdir(exist_ok=True)
    with open(dest / "plots" / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "state", "dev_score", "trainable_params", "side_mem_mb", "peak_mem_mb", "train_s",
                    *_CONFIG_KEYS])
        for r in rows:
            w.writerow([r["rank"], r["trial"], r["state"].lower(), r["dev_score"], r["trainable_params"],
                        r["side_mem_mb"], r["peak_mem_mb"], r["train_s"], *[r["config"].get(k, "") for k in _CONFIG_KEYS]])
    with open(dest / "plots" / "learning_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "rank", "epoch", "dev_score", "dev_loss", "train_loss"])
        for r in rows:
            for h in r["history"]:
                w.writerow([r["trial"], r["rank"], h["epoch"], h["dev_score"], h.get("dev_loss"), h.get("train_loss")])
    files += ["plots/leaderboard.csv", "plots/learning_curves.csv"]
    return {"run_dir": str(run), "out_dir": str(dest), "metric": metric, "files": files, "best": {k: best[k] for k in (
        "trial", "dev_score", "config", "trainable_params", "side_mem_mb")}, **{k: v for k, v in metrics.items()
                                                                                if k.startswith("n_")},
            "leaderboard": board[:10], "skipped": skipped, "leaderboard_md_text": md}
