"""`lst bench llm`: a decoder-only LLM backbone (SmolLM2-135M by default) on real data, every method in one harness.

Every step is the real command a user runs, started as a fresh subprocess: `lst extract` (prompted inputs,
a tap subset, int8), `lst inspect --json` (storage), then one `lst train` per method, each measured with
``pipeline.bench.memory.run_measured`` (whole-process peak RSS, wall time):

* ``zero-shot``  no training: the frozen LM head scores the label words at the last prompt token of the
                 cached last tap (after the backbone's final norm, read from the init pack);
* ``probe``      a linear probe on the last cached tap at the last prompt token: `lst train --method
                 linear-probe` where that method exists, else a logistic regression (scikit-learn) fitted in
                 a child process of this module on the same features;
* ``probe-sklearn`` that logistic regression (C chosen by cross-validation on train) as its own row;
* ``lst-task``   cached LST, a new linear head on the side state at the last token (``--head task``);
* ``lst-lm``     cached LST scoring the label words with the frozen LM head (``--head lm``);
* ``lst-live``   live LST (``--method lst-live``): the same side network, taps computed by the backbone;
* ``lora``       ``lst train --method lora`` (peft), when this `lst train` has it;
* ``full-ft``    ``lst train --method full-ft`` (optionally capped with ``--full-max-steps``).

Methods this `lst train` does not offer are reported as ``skipped`` with the reason. A ``storage`` section
extracts a few hundred validation examples with bf16 and int8, all taps and the subset, and reports stored
bytes per token from `lst inspect --json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.bench.memory import CHILD_ENV, measure_baseline, run_measured
from pipeline.bench.resume import finished_row, save_row

DEFAULT_PROMPT = "Review: {text}\\nSentiment:"
DEFAULT_TAPS = "0,3,6,9,12,15,18,21,24,27,30"
ALL_METHODS = ("zero-shot", "probe", "probe-sklearn", "lst-task", "lst-lm", "lst-live", "lora", "full-ft")


@dataclass
class LlmBenchConfig:
    backbone: str = "smollm2"
    dataset: str = "sst2"
    examples: int = 5000  # training examples (validation is kept whole when it is smaller)
    prompt_template: str = DEFAULT_PROMPT
    label_words: str = "negative,positive"
    taps: str = DEFAULT_TAPS
    codec: str = "int8"
    max_length: int = 128
    cache: str | None = None  # reuse this cache instead of extracting
    workdir: str = "data/bench-llm"
    methods: tuple[str, ...] = ALL_METHODS
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    r: int = 8
    gate: str | None = None
    side_args: list[str] = field(default_factory=list)  # extra `lst train` flags for the LST methods
    live_epochs: int = 1
    live_max_steps: int | None = None
    lora_epochs: int = 1
    lora_lr: float = 5e-4
    lora_max_steps: int | None = None
    full_epochs: int = 1
    full_lr: float = 3e-5
    full_max_steps: int | None = None
    storage_examples: int = 200  # validation examples extracted per storage variant (0: skip)
    device: str = "cpu"
    progress: bool = True


def _lst(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _self(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.bench.llm", *args]


def _shown(cmd: list[str]) -> str:
    """The command as a user types it (`lst ...`)."""
    import shlex

    args = cmd[3:] if cmd[1:3] == ["-m", "pipeline.cli"] else cmd[1:]
    head = "lst" if cmd[1:3] == ["-m", "pipeline.cli"] else "python"
    return " ".join([head, *(shlex.quote(a) for a in args)])


def _run_json(cmd: list[str], progress: bool) -> dict:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True,
                         env={**os.environ, **CHILD_ENV})
    if res.returncode:
        raise RuntimeError(f"failed (exit {res.returncode}): {_shown(cmd)}\n{(res.stderr or '')[-3000:]}")
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else json.loads(res.stdout)


def train_methods() -> set[str]:
    """The --method choices of this `lst train` (read from its --help, no torch import)."""
    out = subprocess.run(_lst("train", "--help"), capture_output=True, text=True, env={**os.environ, **CHILD_ENV}).stdout
    i = out.find("--method {")
    return set(out[i + len("--method {"):out.find("}", i)].split(",")) if i >= 0 else set()


def extract_command(cfg: LlmBenchConfig, out: str, taps: str, codec: str, examples: int | None,
                    splits: str | None = None) -> list[str]:
    args = ["extract", "--backbone", cfg.backbone, "--dataset", cfg.dataset, "--out", out,
            "--layers", taps, "--codec", codec, "--max-length", str(cfg.max_length), "--json"]
    if cfg.prompt_template:
        args += ["--prompt-template", cfg.prompt_template]
    if cfg.label_words:
        args += ["--label-words", cfg.label_words]
    if examples:
        args += ["--examples", str(examples)]
    if splits:
        args += ["--splits", splits]
    if not cfg.progress:
        args.append("--no-progress")
    return _lst(*args)


def storage_table(cfg: LlmBenchConfig, work: Path, num_layers: int) -> list[dict]:
    """Stored bytes per token (all taps together) for bf16/int8 x all taps/the subset, from `lst inspect --json`."""
    rows = []
    for taps_name, taps in (("all", "all"), ("subset", cfg.taps)):
        for codec in ("bf16", "int8"):
            url = str(work / f"storage-{codec}-{taps_name}.zarr")
            cmd = extract_command(cfg, url, taps, codec, cfg.storage_examples, "validation")
            _run_json(cmd, cfg.progress)
            info = _run_json(_lst("inspect", url, "--json"), False)
            tokens = sum(s["tokens"] for s in info["splits"].values())
            n_taps = len(info["taps"])
            rows.append({
                "taps": taps_name, "num_taps": n_taps, "codec": codec, "tokens": tokens,
                "stored_bytes": info["stored_bytes"],
                "bytes_per_token": round(info["stored_bytes"] / tokens, 1),
                "bytes_per_token_per_tap": round(info["stored_bytes"] / tokens / n_taps, 1),
                "bytes_per_value": info["bytes_per_value"], "command": _shown(cmd),
            })
    return rows


def train_command(cfg: LlmBenchConfig, cache: str, out: Path, method: str) -> list[str]:
    side = ["--r", str(cfg.r), "--layers", side_layers(cfg.taps), "--pooling", "last"]
    if cfg.gate:
        side += ["--gate", cfg.gate]
    common = ["--cache", cache, "--out", str(out), "--batch-size", str(cfg.batch_size), "--device", cfg.device,
              "--overwrite", "--no-progress", "--json"]
    if method == "lst-task":
        return _lst("train", *common, "--method", "lst", "--head", "task", "--epochs", str(cfg.epochs),
                    "--lr", str(cfg.lr), *side, *cfg.side_args)
    if method == "lst-lm":
        return _lst("train", *common, "--method", "lst", "--head", "lm", "--epochs", str(cfg.epochs),
                    "--lr", str(cfg.lr), *side, *cfg.side_args)
    if method == "lst-live":
        steps = ["--max-steps", str(cfg.live_max_steps)] if cfg.live_max_steps else []
        return _lst("train", *common, "--method", "lst-live", "--head", "lm", "--epochs", str(cfg.live_epochs),
                    "--lr", str(cfg.lr), *steps, *side, *cfg.side_args)
    if method == "probe":
        return _lst("train", *common, "--method", "linear-probe", "--epochs", str(cfg.epochs), "--pooling", "last")
    if method == "lora":
        steps = ["--max-steps", str(cfg.lora_max_steps)] if cfg.lora_max_steps else []
        return _lst("train", *common, "--method", "lora", "--epochs", str(cfg.lora_epochs), "--lr", str(cfg.lora_lr),
                    "--pooling", "last", *steps)
    if method == "full-ft":
        steps = ["--max-steps", str(cfg.full_max_steps)] if cfg.full_max_steps else []
        return _lst("train", *common, "--method", "full-ft", "--epochs", str(cfg.full_epochs), "--lr", str(cfg.full_lr),
                    "--pooling", "last", *steps)
    raise ValueError(method)


def side_layers(taps: str) -> str:
    """The side network's kept blocks (1-based) = the cached block taps (tap 0 is the embeddings)."""
    if taps == "all":
        return "all"
    return ",".join(t for t in taps.split(",") if t.strip() and int(t) > 0)


# -- child: probe and zero-shot from the cache (no backbone) ---------------------------------------
def _last_token_features(cache, split: str, tap: int):
    import numpy as np

    v = cache.split(split)
    off = v.offsets
    x = v.read_rows(tap, 0, v.num_tokens).float().numpy()
    return x[off[1:] - 1], np.asarray(v.labels)


def child_probe(cache_url: str, train_split: str = "train", eval_split: str = "validation") -> dict:
    """Zero-shot label-word scoring and a logistic-regression probe on the last cached tap, last token."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.cache import initpack
    from pipeline.cache.store import ActivationCache
    from pipeline.memory import peak_rss_bytes
    from pipeline.metrics import compute_metrics

    t0 = time.perf_counter()
    cache = ActivationCache.open(cache_url)
    metric = cache.attrs["task"]["metric"]  # the task's own dev metric, as `lst train` reports it
    tap = max(cache.taps)
    xtr, ytr = _last_token_features(cache, train_split, tap)
    xev, yev = _last_token_features(cache, eval_split, tap)
    out: dict = {"tap": tap, "train_examples": len(ytr), "eval_examples": len(yev)}
    config = initpack.read_config(cache.url)
    words = cache.attrs.get("label_words")
    if words and tap == config.num_hidden_layers:
        w = initpack.read_weights(cache.url)
        norm = next(w[k] for k in ("norm.weight", "model.norm.weight") if k in w)
        eps = float(getattr(config, "rms_norm_eps", 1e-5))
        h = torch.from_numpy(xev)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm
        logits = h @ w["lm_head.weight"][list(words["token_ids"])].T
        out["zero_shot_dev_score"] = compute_metrics(metric, logits.numpy(), yev)["score"]
        out["label_words"] = words["words"]
    t1 = time.perf_counter()
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=3, max_iter=3000))
    clf.fit(xtr, ytr)
    lr = clf[-1]
    out.update({
        "dev_score": compute_metrics(metric, clf.predict_proba(xev), yev)["score"],
        "C": float(lr.C_[0]),
        "trainable_params": int(lr.coef_.size + lr.intercept_.size),
        "train_s": round(time.perf_counter() - t1, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "peak_mem_mb": peak_rss_bytes() / 2**20,
    })
    return out


# -- the harness -----------------------------------------------------------------------------------
def _num_params(cache_url: str) -> int:
    from pipeline.cache.store import ActivationCache

    return int(ActivationCache.open(cache_url).attrs["backbone"]["num_parameters"])


def run_llm_bench(cfg: LlmBenchConfig) -> dict:
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"benchmark": "llm", "config": asdict(cfg), "device": cfg.device}
    t0 = time.perf_counter()
    cache = cfg.cache
    if cache is None:
        cache = str(work / f"{Path(cfg.dataset).stem}-{Path(cfg.backbone).name}-{cfg.codec}.zarr")
        cmd = extract_command(cfg, cache, cfg.taps, cfg.codec, cfg.examples)
        got = run_measured(cmd, stderr_to=None if cfg.progress else str(work / "extract.log"))
        res["extract"] = {"command": _shown(cmd), "wall_s": got["wall_s"], "peak_mb": round(got["polled_peak_mb"], 1),
                          "tokens_per_s": got["result"].get("tokens_per_s"), "splits": got["result"].get("splits")}
    res["cache"] = cache
    info = _run_json(_lst("inspect", cache, "--json"), False)
    res["cache_info"] = {"taps": info["taps"], "codec": info["codec"], "stored_bytes": info["stored_bytes"],
                         "splits": {k: {"examples": v["examples"], "tokens": v["tokens"], "truncated": v["truncated"]}
                                    for k, v in info["splits"].items()},
                         "fingerprint_prompt_template": info["fingerprint"].get("prompt_template"),
                         "dev_metric": (info.get("task") or {}).get("metric", "accuracy")}
    total = _num_params(cache)
    res["backbone_params"] = total
    # the memory harness's yardstick: a process that imports what training imports and opens the cache
    base_mb = measure_baseline(cache)
    res["baseline_mb"] = round(base_mb, 1)
    if cfg.storage_examples:
        res["storage"] = storage_table(cfg, work, len(info["taps"]))
    available = train_methods()
    rows: dict[str, dict] = {}
    if "zero-shot" in cfg.methods or ("probe" in cfg.methods and "linear-probe" not in available) \
            or "probe-sklearn" in cfg.methods:
        cmd = _self("probe", "--cache", cache)
        got = run_measured(cmd)
        r = got["result"]
        if "zero_shot_dev_score" in r and "zero-shot" in cfg.methods:
            rows["zero-shot"] = {"command": _shown(cmd), "dev_score": r["zero_shot_dev_score"], "trainable_params": 0,
                                 "note": f"no training: frozen LM head on the final-normed tap {r['tap']}, last token, "
                                         f"words {r['label_words']}"}
        sk = {"command": _shown(cmd), "dev_score": r["dev_score"], "trainable_params": r["trainable_params"],
              "train_s": r["train_s"], "wall_s": got["wall_s"],
              "peak_mb": round(max(got["polled_peak_mb"], r["peak_mem_mb"]), 1),
              "note": f"logistic regression (scikit-learn, standardised, C={r['C']} by 3-fold CV on train) on tap "
                      f"{r['tap']} at the last token"}
        if "probe" in cfg.methods and "linear-probe" not in available:
            rows["probe"] = {**sk, "note": sk["note"] + "; `lst train --method linear-probe` not available"}
        elif "probe-sklearn" in cfg.methods or "probe" in cfg.methods:
            rows["probe-sklearn"] = sk
    for m in cfg.methods:
        if m in ("zero-shot", "probe-sklearn") or m in rows:
            continue
        need = {"lst-task": "lst", "lst-lm": "lst", "lst-live": "lst-live", "probe": "linear-probe",
                "lora": "lora", "full-ft": "full-ft"}[m]
        if need not in available:
            rows[m] = {"skipped": f"`lst train --method {need}` does not exist in this checkout "
                                  f"(available: {', '.join(sorted(available))})"}
            continue
        cmd = train_command(cfg, cache, work / "runs" / m, m)
        saved = work / "runs" / f"{m}.result.json"  # resumed per method (pipeline.bench.resume)
        done = finished_row(saved, cmd)
        if done is not None:
            rows[m] = done
            continue
        try:
            got = run_measured(cmd, stderr_to=str(work / f"{m}.log"))
        except RuntimeError as e:
            rows[m] = {"command": _shown(cmd), "failed": str(e)[-1500:]}
            continue
        s = got["result"]
        rows[m] = {"command": _shown(cmd), "dev_score": s.get("dev_score"), "trainable_params": s.get("trainable_params"),
                   "trainable_pct": s.get("trainable_pct"), "epochs": s.get("epochs_run"), "steps": s.get("steps"),
                   "best_epoch": s.get("best_epoch"), "epoch_s": s.get("epoch_s"), "wall_s": got["wall_s"],
                   "peak_mb": round(max(got["polled_peak_mb"], s.get("peak_mem_mb") or 0), 1),
                   "first_loss": (s.get("first_losses") or [None])[0],
                   "final_train_loss": (s.get("final") or {}).get("train_loss")}
        save_row(saved, cmd, rows[m])
    for r in rows.values():
        if r.get("peak_mb") is not None:
            r["above_baseline_mb"] = round(r["peak_mb"] - base_mb, 1)
        if r.get("trainable_params") is not None and r.get("trainable_pct") is None:
            r["trainable_pct"] = round(100 * r["trainable_params"] / total, 4)
    res["methods"] = rows
    res["goals"] = goals(rows)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    return res


def goals(rows: dict) -> dict:
    def score(m):
        return rows.get(m, {}).get("dev_score")

    def peak(m):
        return rows.get(m, {}).get("above_baseline_mb")

    best = max((score(m) for m in ("lst-task", "lst-lm") if score(m) is not None), default=None)
    g: dict = {}
    if best is not None and score("probe") is not None:
        g["cached_lst_minus_probe>=0.02"] = {"value": round(best - score("probe"), 4), "met": best - score("probe") >= 0.02}
    if best is not None and score("lora") is not None:
        g["lora_minus_cached_lst<=0.015"] = {"value": round(score("lora") - best, 4), "met": score("lora") - best <= 0.015}
    if peak("lora"):  # above the post-import baseline, as `lst bench memory` (absolute peaks beside them)
        for m, lim in (("lst-task", 0.10), ("lst-lm", 0.10), ("lst-live", 0.50)):
            if peak(m) is not None:
                g[f"{m}_peak_over_lora<={lim}"] = {"value": round(peak(m) / peak("lora"), 4),
                                                   "met": peak(m) / peak("lora") <= lim,
                                                   "absolute": round(rows[m]["peak_mb"] / rows["lora"]["peak_mb"], 4)}
    return g


def to_markdown(res: dict, command: str) -> str:
    lines = [f"# {res['config']['backbone']} on {res['config']['dataset']} ({res['device']})", "",
             f"Made with: `{command}`", "",
             f"Cache: {res['cache_info']['splits']}, taps {res['cache_info']['taps']}, codec {res['cache_info']['codec']}, "
             f"prompt {res['cache_info']['fingerprint_prompt_template']!r}. Backbone parameters: {res['backbone_params']:,}. "
             f"Peaks: whole-process RSS; the goals use them above a {res.get('baseline_mb')} MB post-import baseline.",
             f"Dev score: the task's metric ({res['cache_info'].get('dev_metric', 'accuracy')}), every row.",
             "", "| method | dev score | trainable params | share % | peak RSS MB | above baseline MB | train wall s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        if "skipped" in r or "failed" in r:
            lines.append(f"| {m} | - | - | - | - | - | - | {r.get('skipped') or 'failed: see JSON'} |")
            continue
        sc = r.get("dev_score")
        lines.append(f"| {m} | {sc:.4f} | {r.get('trainable_params') or 0:,} | {r.get('trainable_pct') or 0:.3f} | "
                     f"{r.get('peak_mb') or '-'} | {r.get('above_baseline_mb', '-')} | {r.get('wall_s') or '-'} | "
                     f"{r.get('note', '')} |" if sc is not None else f"| {m} | - | | | | | | |")
    if res.get("storage"):
        lines += ["", "| taps | codec | bytes/token (all taps) | bytes/token/tap |", "|---|---|---|---|"]
        for s in res["storage"]:
            lines.append(f"| {s['taps']} ({s['num_taps']}) | {s['codec']} | {s['bytes_per_token']} | "
                         f"{s['bytes_per_token_per_tap']} |")
    if res.get("goals"):
        lines += ["", "| goal | value | met |", "|---|---|---|"]
        lines += [f"| {k} | {v['value']} | {v['met']} |" for k, v in res["goals"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Child modes (run as subprocesses so their memory is measured on its own)."""
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.llm")
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("probe")
    q.add_argument("--cache", required=True)
    a = p.parse_args(argv)
    if a.mode == "probe":
        print(json.dumps(child_probe(a.cache)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
