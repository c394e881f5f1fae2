"""`lst bench table-merge`: one comparison table composed from `lst bench table` runs made apart.

On a 2-core CPU a converged row takes hours (full fine-tuning, three epochs over four tasks: ~20
minutes of training per epoch), so a table worth reading is made of runs from different sessions:
other schedules, learning rates, seeds, a task rerun. Copying their numbers into a README by hand
is how tables drift from their evidence. Here a small YAML spec names, per row, a method and the
committed ``table-*.json`` files it comes from; every number in the merged table, plot and JSON is
read from those files. A task found in several files of a row (seeds) shows their mean and count.

Spec (``benchmarks/tables/*.yaml``)::

    title: MiniLM on GLUE, schedules long enough to converge
    backbone: minilm
    device: cpu
    tag: converged              # -> table-<backbone>-<device>-<tag>.{md,json,png}
    tasks: [sst2, cola, mrpc, stsb]
    notes: free text printed under the table
    rows:
      - label: Full fine-tuning, 3 epochs
        method: full            # the method's key in the files' "methods"
        files: [table-minilm-cpu-full-epochs3.json, table-minilm-cpu-full-seed1-epochs3.json]
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.bench.table import CACHED, SHORT, TASK_LABELS, fmt
from pipeline.errors import UserError


@dataclass(frozen=True)
class MergeRow:
    label: str
    method: str
    files: tuple[str, ...]
    short: str | None = None  # its label in the plot (default: the method's short name)
    offset: tuple[int, int] = (5, 4)  # where that label sits from its point, in points


@dataclass(frozen=True)
class MergeSpec:
    title: str
    backbone: str
    device: str
    tag: str
    tasks: tuple[str, ...]
    rows: tuple[MergeRow, ...]
    notes: str = ""
    source: str = ""  # the spec file, for the record


def _need(d: dict, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in d:
        raise UserError(f"{where}: missing '{key}'; see `lst bench table-merge --help` for the spec's keys")
    v = d[key]
    if not isinstance(v, kind) or not v:
        what = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{where}: '{key}' must be a non-empty {what}, not {v!r}")
    return v


def _files(v: list | str, where: str) -> list[str]:
    """A row's files: a list, or one name (or several, comma-separated) as a string."""
    names = [x.strip() for x in v.split(",")] if isinstance(v, str) else v
    if not all(isinstance(x, str) and x for x in names):
        raise UserError(f"{where}: 'files' must name table JSON files, not {v!r}")
    return names


def _offset(v: Any, where: str) -> tuple[int, int]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)):
        raise UserError(f"{where}: 'offset' must be two numbers [dx, dy] (points), not {v!r}")
    return int(v[0]), int(v[1])


def load_spec(path: str | Path) -> MergeSpec:
    """The spec at ``path``, checked: every problem is a ``UserError`` naming the key to fix."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"table spec {p} not found: give a YAML file such as benchmarks/tables/minilm-converged.yaml")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"table spec {p} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise UserError(f"table spec {p}: expected a mapping with title, backbone, device, tag, tasks and rows")
    rows = []
    for i, r in enumerate(_need(d, "rows", str(p), list)):
        where = f"{p}: rows[{i}]"
        if not isinstance(r, dict):
            raise UserError(f"{where}: expected a mapping with label, method and files, not {r!r}")
        rows.append(MergeRow(label=_need(r, "label", where), method=_need(r, "method", where),
                             files=tuple(_files(_need(r, "files", where, (list, str)), where)), short=r.get("short"),
                             offset=_offset(r.get("offset", (5, 4)), where)))
    return MergeSpec(title=_need(d, "title", str(p)), backbone=_need(d, "backbone", str(p)),
                     device=_need(d, "device", str(p)), tag=_need(d, "tag", str(p)),
                     tasks=tuple(_need(d, "tasks", str(p), list)), rows=tuple(rows), notes=str(d.get("notes", "")),
                     source=str(path))


def _seed(table: dict) -> int:
    """The seed a table's runs used (``--seed`` in its extra train args; `lst train`'s default 0)."""
    args = list(table.get("config", {}).get("train_args") or [])
    return int(args[args.index("--seed") + 1]) if "--seed" in args[:-1] else 0


def _read(results_dir: Path, name: str, cache: dict[str, dict]) -> dict:
    if name not in cache:
        f = results_dir / name
        if not f.is_file():
            raise UserError(f"{f} not found: a row names a table file that is not in {results_dir} "
                            "(give --results-dir, or fix the row's files)")
        try:
            cache[name] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{f} is not a table JSON: {e}") from None
    return cache[name]


def merge_row(row: MergeRow, tasks: tuple[str, ...], results_dir: Path, cache: dict[str, dict]) -> dict:
    """One row of the merged table: per task the mean over the row's files that ran it."""
    runs: dict[str, list[dict]] = {t: [] for t in tasks}
    for name in row.files:
        table = _read(results_dir, name, cache)
        if row.method not in table.get("methods", {}):
            raise UserError(f"{name} has no method '{row.method}' (it has {', '.join(table.get('methods', {}))})")
        for t, got in table.get("tasks", {}).items():
            m = got.get("methods", {}).get(row.method)
            if t in runs and m is not None:
                runs[t].append({"file": name, "seed": _seed(table), "score": m["score"],
                                "epochs": m.get("epochs_run"), "above_baseline_mb": m["above_baseline_mb"],
                                "abs_mb": m["abs_mb"], "trainable_pct": m["trainable_pct"],
                                "train_s": round((m.get("epoch_s") or 0) * (m.get("epochs_run") or 1), 1)})
    every = [r for rs in runs.values() for r in rs]
    if not every:
        raise UserError(f"row '{row.label}': none of {', '.join(row.files)} ran {row.method} on "
                        f"{', '.join(tasks)}")
    scores = {t: (round(statistics.fmean(r["score"] for r in rs), 2) if rs and all(r["score"] is not None for r in rs)
                  else None) for t, rs in runs.items()}
    return {
        "label": row.label, "method": row.method, "short": row.short or SHORT.get(row.method, row.method),
        "offset": list(row.offset),
        "files": list(row.files),
        "trainable_pct": max(r["trainable_pct"] for r in every),
        "peak_above_baseline_mb": max(r["above_baseline_mb"] for r in every),
        "peak_abs_mb": max(r["abs_mb"] for r in every),
        # one seed's training time: the mean over a task's seeds, summed over the tasks
        "train_s": round(sum(statistics.fmean(r["train_s"] for r in rs) for rs in runs.values() if rs), 1),
        "epochs": sorted({r["epochs"] for r in every if r["epochs"] is not None}),
        "scores": scores, "seeds": {t: sorted({r["seed"] for r in rs}) for t, rs in runs.items()},
        "average": (round(statistics.fmean(scores.values()), 2)
                    if all(v is not None for v in scores.values()) else None),
        "runs": runs,
    }


def comparisons(rows: list[dict]) -> dict[str, dict]:
    """Each cached-LST row against the first full fine-tuning and LoRA rows: the issue's questions."""
    ref = {m: next((r for r in rows if r["method"] == m and r["average"] is not None), None) for m in ("full", "lora")}
    others = [r for r in rows if r["method"] not in CACHED and r["average"] is not None]
    out = {}
    for r in rows:
        if r["method"] != "cached" or r["average"] is None:
            continue
        c: dict[str, Any] = {"lowest_peak_except_probe": all(r["peak_above_baseline_mb"] < o["peak_above_baseline_mb"]
                                                             for o in others)}
        for m, o in ref.items():
            if o is not None:
                c[f"minus_{m}_avg"] = round(r["average"] - o["average"], 2)
        out[r["label"]] = c
    return out


def render_markdown(res: dict) -> str:
    tasks = res["tasks_order"]

    f = fmt

    def cell(r: dict, t: str) -> str:
        n = len(r["runs"][t])
        return f(r["scores"][t]) + (f" ({n})" if n > 1 else "")

    lines = [f"# {res['title']}", "",
             f"Merged by `{res['command']}` from the committed `lst bench table` files each row names (below); "
             "no number is typed by hand. Scores x100 at the best dev epoch (SST-2 accuracy, CoLA MCC, MRPC "
             "mean(F1, acc), STS-B mean(Pearson, Spearman)); a cell with (n) is the mean of n seeds. Peak: the "
             "largest whole-process peak RSS above the post-import baseline over the row's runs, as each run "
             "measured it. Train s: training epochs' seconds summed over the tasks (one seed).", "",
             "| Method | Epochs | Params % | Peak MB above baseline | Train s | "
             + " | ".join(TASK_LABELS.get(t, t) for t in tasks) + " | Avg |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {'/'.join(str(e) for e in r['epochs']) or '-'} | {r['trainable_pct']:.3f} | "
                     f"{f(r['peak_above_baseline_mb'], 0)} | {f(r['train_s'], 0)} | "
                     + " | ".join(cell(r, t) for t in tasks) + f" | {f(r['average'])} |")
    if res["comparisons"]:
        lines += [""] + [f"- {label}: " + ", ".join(
            (f"{k.replace('minus_', '').replace('_avg', '')} average {v:+.2f}" if k.startswith("minus_")
             else f"lowest peak of every method except the linear probe: {'yes' if v else 'no'}")
            for k, v in c.items()) for label, c in res["comparisons"].items()]
    if res.get("notes"):
        lines += ["", res["notes"].strip()]
    lines += ["", "Sources:"] + [f"- {r['label']}: " + ", ".join(f"`{x}`" for x in r["files"]) for r in res["rows"]]
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- merged-table:start -->", "<!-- merged-table:end -->"


def readme_block(md: str) -> str:
    """The part of a merged table's markdown a README carries: the table and the comparisons."""
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    notes = [ln for ln in lines if ln.startswith("- ") and " average " in ln]
    return "\n".join(table + ([""] + notes if notes else []))


def update_readme(readme: str | Path, md: str) -> bool:
    """Put ``readme_block(md)`` between the README's merged-table markers; whether it changed."""
    p = Path(readme)
    text = p.read_text()
    if README_START not in text or README_END not in text:
        raise UserError(f"{p} has no {README_START} ... {README_END} markers: add them where the table goes")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{readme_block(md)}\n{README_END}{tail}"
    if new != text:
        p.write_text(new)
    return new != text


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in res["rows"]:
        if r["average"] is None:
            continue
        x = r["peak_above_baseline_mb"]
        ax.scatter([x], [r["average"]], s=60, color="tab:red" if r["method"] in CACHED else "tab:blue")
        ax.annotate(r["short"], (x, r["average"]), textcoords="offset points", xytext=tuple(r["offset"]), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("peak memory, MB (process peak RSS above the import baseline, log scale)")
    ax.set_ylabel("average dev score (x100)")
    ax.set_title(res["title"], fontsize=10)
    ax.margins(x=0.15, y=0.12)
    lo, hi = ax.get_xlim()
    ax.set_xticks([t for t in (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000) if lo <= t <= hi])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_table_merge(spec_path: str | Path, results_dir: str | Path, command: str = "",
                    write: bool = True, readme: str | Path | None = None) -> dict:
    spec = load_spec(spec_path)
    rdir = Path(results_dir)
    cache: dict[str, dict] = {}
    rows = [merge_row(r, spec.tasks, rdir, cache) for r in spec.rows]
    res: dict[str, Any] = {"benchmark": "table-merge", "title": spec.title, "backbone": spec.backbone,
                           "device": spec.device, "tasks_order": list(spec.tasks), "spec": spec.source,
                           "command": command, "notes": spec.notes, "rows": rows,
                           "comparisons": comparisons(rows)}
    stem = f"table-{spec.backbone}-{spec.device}-{spec.tag}"
    res["outputs"] = {k: str(rdir / f"{stem}.{k}") for k in ("md", "json", "png")}
    md = render_markdown(res)
    if write:
        (rdir / f"{stem}.md").write_text(md)
        (rdir / f"{stem}.json").write_text(json.dumps(res, indent=2))
        plot(res, rdir / f"{stem}.png")
    if readme is not None:
        res["readme_updated"] = update_readme(readme, md)
    return res


__all__ = ["MergeRow", "MergeSpec", "load_spec", "merge_row", "comparisons", "render_markdown", "readme_block",
           "update_readme", "run_table_merge"]
