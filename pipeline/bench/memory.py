"""`lst bench memory`: peak memory of the training commands users run, each in a fresh process.

Every method is its own `lst train` command (``python -m pipeline.cli train ... --json``) started
as a subprocess on the same cache, batch size and epochs: cached LST (``--method lst``), live LST
(``--method lst-live``) and full fine-tuning (``--method full-ft``). Two more processes give the
yardsticks: a *baseline* that imports what a training process imports (torch, transformers, the
backbone's modeling module, pipeline) and does nothing, and a *bare backbone forward* that loads the
backbone and runs it (no grad) over the same training batches. Cached LST processes never import
transformers, so they are measured above a *stage-two baseline* that imports what they import
(``STAGE_TWO_METHODS``; ``stage_two_baseline_mb``): the full baseline would flatter them by its
transformers import.

CPU: the measure is each process's whole-process peak RSS (VmHWM, polled from /proc/<pid>/status
while it runs and reported by the process itself at its end), absolute (``*_abs_mb``) and above
the baseline; ratios use the peaks above baseline. CUDA: ``torch.cuda.max_memory_allocated`` (the
paper's measure; ratios use it) plus the host peaks.

Another method is one more entry of ``METHODS``: a name and the `lst train` arguments that select it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# method name -> the `lst train` arguments that select it
METHODS: dict[str, list[str]] = {
    "full": ["--method", "full-ft"],
    "live": ["--method", "lst-live"],
    "cached": ["--method", "lst"],
    "cached-recompute": ["--method", "lst", "--recompute"],  # bare --recompute: whole blocks
    "cached-keep": ["--method", "lst", "--recompute", "none"],  # every activation kept: the fastest
    "live-dropout": ["--method", "lst-live", "--live-dropout"],  # the paper's live backbone, dropout on
    "lora": ["--method", "lora"],
    "adapter": ["--method", "adapter"],
    "bitfit": ["--method", "bitfit"],
    "linear-probe": ["--method", "linear-probe"],
}
# what `lst bench memory` runs unless --methods says otherwise
DEFAULT_METHODS = ("full", "live", "cached", "cached-recompute")
GOALS = {"cached_over_full": 0.15, "live_over_full": 0.40, "cached_recompute_over_full": 0.15}
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class MemoryBenchConfig:
    backbone: str = "minilm"
    dataset: str = "sst2"
    max_examples: int | None = 20000  # training examples extracted (all splits are capped at this)
    batch_size: int = 100
    max_length: int = 128
    epochs: int = 1
    max_steps: int | None = None  # quick checks only: the benchmark itself runs full epochs
    cache: str | None = None
    reader_memory: str | None = None  # passed to `lst train --reader-memory` when given
    device: str = "auto"
    workdir: str | None = None
    label_words: str | None = None  # T5: cache label-word targets (full-FT: T5's LM loss on them)
    dropout_draws: int = 0  # `lst extract --dropout-draws N`: train-mode passes the cached LST rows read in turn
    methods: tuple[str, ...] = DEFAULT_METHODS
    train_args: list[str] = field(default_factory=list)  # extra `lst train` arguments for every method
    progress: bool = True


# -- processes ------------------------------------------------------------------------------------
STATUS_KEYS = ("VmHWM", "RssAnon", "RssFile")


def _status(pid: int) -> dict[str, int]:
    """Bytes of ``STATUS_KEYS`` from ``/proc/<pid>/status`` (empty once the process is gone)."""
    got: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in STATUS_KEYS:
                    got[key] = int(line.split()[1]) * 1024
    except OSError:
        return {}
    return got


def run_measured(cmd: list[str], interval: float = 0.05, stderr_to: str | None = None) -> dict:
    """Run ``cmd``; returns its last stdout JSON line, its polled peak RSS and its wall time.

    Also the polled peaks of its private (``RssAnon``) and file-backed (``RssFile``: shared-library
    code paged in as ops first run) resident bytes, so a whole-process peak can be split into what
    the process allocated and what it mapped; the kernel keeps no high-water mark of either, so
    these are samples every ``interval`` seconds (the whole-process ``VmHWM`` is exact)."""
    env = {**os.environ, **CHILD_ENV}
    err = open(stderr_to, "w") if stderr_to else subprocess.PIPE
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    peak = dict.fromkeys(STATUS_KEYS, 0)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak[k], v)
            done.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out, errtext = proc.communicate()
    finally:
        done.set()
        th.join()
        if stderr_to:
            err.close()
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = errtext[-3000:] if errtext else Path(stderr_to).read_text()[-3000:] if stderr_to else ""
        raise RuntimeError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"command printed no JSON: {' '.join(cmd)}\n{out[-2000:]}")
    return {"result": json.loads(lines[-1]), "polled_peak_mb": peak["VmHWM"] / 2**20,
            "polled_anon_peak_mb": peak["RssAnon"] / 2**20, "polled_file_peak_mb": peak["RssFile"] / 2**20,
            "wall_s": round(wall, 3)}


def _lst(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _self(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.bench.memory", *args]


def reader_memory_supported() -> bool:
    """Whether this `lst train` has ``--reader-memory`` (asks its --help: no torch import)."""
    res = subprocess.run(_lst("train", "--help"), capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    return "--reader-memory" in res.stdout


def resolve_bench_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- the child modes: baseline and bare forward ---------------------------------------------------
def _import_like_training(cache_url: str):
    """What a training process imports: torch, transformers with the backbone's modeling module, pipeline
    (its stage-two modules; the argparse-only CLI layer is left out, as bench may not import it)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModel

    import pipeline.train.finetune  # noqa: F401
    import pipeline.train.trainer  # noqa: F401
    from pipeline.cache import initpack
    from pipeline.cache.store import ActivationCache

    cache = ActivationCache.open(cache_url)
    config = initpack.read_hf_config(cache.url)
    try:
        AutoModel._model_mapping[type(config)]  # imports transformers.models.<type>.modeling_<type>
    except KeyError:
        pass
    return cache


def _import_like_cached_training(cache_url: str):
    """What a cached LST process imports: torch and pipeline's stage two, no ``transformers`` (it
    reads the init pack's config as a plain object; packs older than that still import it)."""
    import torch  # noqa: F401

    import pipeline.train.trainer  # noqa: F401
    from pipeline.cache import initpack
    from pipeline.cache.store import ActivationCache

    cache = ActivationCache.open(cache_url)
    initpack.read_config(cache.url)
    return cache


# the methods whose `lst train` never imports transformers: measured above the stage-two baseline
STAGE_TWO_METHODS = ("cached", "cached-recompute", "linear-probe")


def baseline_for(method: str, base_mb: float, stage_two_mb: float) -> float:
    """The baseline ``method``'s peak is measured above: the one of what its process imports."""
    return stage_two_mb if method in STAGE_TWO_METHODS else base_mb


def child_baseline(cache_url: str, stage_two: bool = False) -> dict:
    from pipeline.memory import peak_rss_bytes

    (_import_like_cached_training if stage_two else _import_like_training)(cache_url)
    return {"mode": "baseline-stage-two" if stage_two else "baseline", "peak_rss_mb": peak_rss_bytes() / 2**20}


def measure_baseline(cache_url: str, stage_two: bool = False) -> float:
    """Peak RSS (MB) of a fresh process that imports what training imports and opens the cache: the
    yardstick every whole-process peak is reported above. ``stage_two``: what a cached LST process
    imports (no transformers), the yardstick of ``STAGE_TWO_METHODS``."""
    got = run_measured(_self("baseline-stage-two" if stage_two else "baseline", "--cache", cache_url))
    return max(got["polled_peak_mb"], got["result"]["peak_rss_mb"])


def child_forward(cache_url: str, batch_size: int, epochs: int, max_steps: int | None, device: str,
                  split: str = "train", seed: int = 0) -> dict:
    """Load the backbone and run it (no grad) over the training batches `lst train` sees."""
    cache = _import_like_training(cache_url)
    import torch

    from pipeline.backbones import load_backbone, resolve_backbone
    from pipeline.memory import peak_rss_bytes
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import planned_batches

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bb = load_backbone(str(resolve_backbone(cache.fingerprint["backbone"])), device=device)
    # the batches `lst train` plans (its defaults: shuffle window, batch order), ids only
    cfg = TrainConfig(cache=cache_url, out="unused", batch_size=batch_size, seed=seed, train_split=split)
    reader = planned_batches(cache, cfg, data_seed=seed, device=dev)
    stack = bb.tap_stack()
    steps = tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for epoch in range(epochs):
            for b in reader.iter_epoch(epoch):
                kw = {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
                if b.token_type_ids is not None and bb.family == "encoder":
                    kw["token_type_ids"] = b.token_type_ids
                if bb.family == "decoder":
                    kw["use_cache"] = False
                stack(**kw)
                steps += 1
                tokens += int(b.attention_mask.sum())
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
    out = {"mode": "forward", "steps": steps, "tokens": tokens, "s": round(time.perf_counter() - t0, 3),
           "peak_rss_mb": peak_rss_bytes() / 2**20}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


# -- the harness ----------------------------------------------------------------------------------
def extract_cache(cfg: MemoryBenchConfig, work: Path) -> str:
    """`lst extract` (a subprocess, like every step here) into the work dir; an identical cache there is reused."""
    url = str(work / "cache.zarr")
    args = ["extract", "--backbone", cfg.backbone, "--dataset", cfg.dataset, "--out", url,
            "--max-length", str(cfg.max_length), "--overwrite", "--json"]
    if cfg.max_examples:
        args += ["--max-examples", str(cfg.max_examples)]
    if cfg.label_words:
        args += ["--label-words", cfg.label_words]
    if cfg.dropout_draws:
        args += ["--dropout-draws", str(cfg.dropout_draws)]
    if not cfg.progress:
        args.append("--no-progress")
    err = None if cfg.progress else subprocess.DEVNULL
    res = subprocess.run(_lst(*args), stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **CHILD_ENV})
    if res.returncode:
        raise RuntimeError(f"lst extract failed (exit {res.returncode}): {' '.join(args)}")
    return url


def train_command(method: str, cfg: MemoryBenchConfig, cache_url: str, out: Path, device: str) -> list[str]:
    args = ["train", "--cache", cache_url, "--out", str(out), *METHODS[method], "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--device", device, "--overwrite", "--no-progress", "--json"]
    if cfg.max_steps is not None:
        args += ["--max-steps", str(cfg.max_steps)]
    if cfg.reader_memory:
        args += ["--reader-memory", cfg.reader_memory]
    return _lst(*args, *cfg.train_args)


def _train_tokens(cache_url: str, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(training tokens, examples) every method sees: a whole split per epoch, or the first max_steps batches."""
    from pipeline.cache.store import ActivationCache

    cache = ActivationCache.open(cache_url)
    v = cache.split("train")
    if max_steps is None:
        return v.num_tokens * epochs, v.num_examples * epochs
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import planned_batches

    cfg = TrainConfig(cache=cache_url, out="unused", batch_size=batch_size)
    reader = planned_batches(cache, cfg, data_seed=0)
    tokens = examples = steps = 0
    for epoch in range(epochs):
        for b in reader.iter_epoch(epoch):
            tokens += int(b.attention_mask.sum())
            examples += len(b.index)
            steps += 1
            if steps >= max_steps:
                return tokens, examples
    return tokens, examples


def _r(x: float | None, n: int = 1) -> float | None:
    return None if x is None else round(float(x), n)


def run_memory_bench(cache_url: str | None = None, batch_size: int = 100, steps: int | None = None,
                     device: str = "auto", side: dict | None = None, cfg: MemoryBenchConfig | None = None) -> dict:
    """Run every method of ``cfg.methods`` as a fresh `lst train` process and compare their peaks.

    ``steps`` caps each run at that many optimisation steps (tests; the benchmark runs whole epochs);
    ``side`` holds side-network flags (e.g. ``{"attention_dropout": 0}``) passed to the LST methods.
    """
    cfg = cfg or MemoryBenchConfig(cache=cache_url, batch_size=batch_size, max_steps=steps, device=device)
    if cache_url is not None:
        cfg.cache = cache_url
    device = resolve_bench_device(cfg.device)
    if cfg.reader_memory and not reader_memory_supported():
        raise RuntimeError("--reader-memory: this `lst train` has no --reader-memory flag yet")
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="lst-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        url = cfg.cache or extract_cache(cfg, work)
        extract_s = None if cfg.cache else round(time.perf_counter() - t0, 3)
        from pipeline.cache.store import ActivationCache

        cache = ActivationCache.open(url)
        side_args = [a for k, v in (side or {}).items() for a in (f"--{k.replace('_', '-')}", str(v))]
        base_mb = measure_baseline(url)
        stage_two_mb = measure_baseline(url, stage_two=True)
        fw = run_measured(_self("forward", "--cache", url, "--batch-size", str(cfg.batch_size), "--epochs",
                                str(cfg.epochs), "--device", device,
                                *(["--max-steps", str(cfg.max_steps)] if cfg.max_steps is not None else [])))
        forward_abs = max(fw["polled_peak_mb"], fw["result"]["peak_rss_mb"])
        tokens, examples = _train_tokens(url, cfg.batch_size, cfg.epochs, cfg.max_steps)
        details: dict[str, dict] = {}
        # the T5 side encoder-decoder (label-target caches) has no --recompute yet
        methods = [m for m in cfg.methods if not (m == "cached-recompute" and cache.label_targets)]
        for m in methods:
            cmd = train_command(m, cfg, url, work / "runs" / m, device)
            if m != "full":
                cmd += side_args
            got = run_measured(cmd, stderr_to=str(work / f"{m}.log"))
            s = got["result"]
            host = got["polled_peak_mb"] if device == "cuda" else max(got["polled_peak_mb"], s["peak_mem_mb"])
            own = baseline_for(m, base_mb, stage_two_mb)
            d = {"command": " ".join(["lst", *cmd[3:]]), "abs_mb": _r(host), "baseline_mb": _r(own),
                 "above_baseline_mb": _r(host - own),
                 "dev_score": s.get("dev_score"), "epoch_s": s.get("epoch_s"), "wall_s": got["wall_s"],
                 "steps": s.get("steps"), "trainable_params": s.get("trainable_params"),
                 "trainable_pct": s.get("trainable_pct"), "stall_fraction": s.get("stall_fraction"),
                 "examples_per_s": s.get("examples_per_s"), "tokens": tokens, "examples": examples}
            if device == "cuda":
                d["cuda_peak_mb"] = s["peak_mem_mb"]  # the summary's max_memory_allocated
            d["peak_mb"] = d["cuda_peak_mb"] if device == "cuda" else max(0.0, host - own)
            details[m] = d
        res = summarise(cfg, device, url, cache, base_mb, forward_abs, fw, details, extract_s, tokens, examples)
        return {**res, "stage_two_baseline_mb": _r(stage_two_mb)}
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def key_name(method: str) -> str:
    """The JSON key stem of a method ('cached-recompute' -> 'cached_recompute')."""
    return method.replace("-", "_")


def summarise(cfg, device, url, cache, base_mb, forward_abs, fw, details, extract_s, tokens, examples) -> dict:
    cuda = device == "cuda"
    res: dict = {
        "benchmark": "memory", "device": device,
        "measure": "cuda max_memory_allocated (ratios); host peak RSS reported as *_abs_mb" if cuda
        else "whole-process peak RSS (VmHWM); ratios use the peaks above the post-import baseline",
        "backbone": cache.fingerprint.get("backbone"), "dataset": cache.attrs["task"]["name"], "cache": url,
        "train_examples": examples, "train_tokens": tokens, "batch_size": cfg.batch_size,
        "max_length": cache.attrs.get("max_length"), "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "reader_memory": cfg.reader_memory or "default", "extract_s": extract_s,
        "baseline_mb": _r(base_mb), "forward_abs_mb": _r(forward_abs), "forward_s": fw["result"]["s"],
    }
    if cuda:
        res["forward_cuda_mb"] = _r(fw["result"].get("cuda_peak_mb"))
    for m, d in details.items():
        n = key_name(m)
        res[f"{n}_abs_mb"] = d["abs_mb"]
        res[f"{n}_above_baseline_mb"] = d["above_baseline_mb"]
        if cuda:
            res[f"{n}_cuda_mb"] = _r(d["cuda_peak_mb"])
        res[f"{n}_dev_score"] = d["dev_score"]
        res[f"{n}_epoch_s"] = d["epoch_s"]
    goals = {}
    if "full" in details and details["full"]["peak_mb"] > 0:
        full = details["full"]["peak_mb"]
        for m in details:
            if m != "full":
                res[f"{key_name(m)}_over_full"] = round(details[m]["peak_mb"] / full, 4)
        # kept names of the previous version of this benchmark (now: the measure behind the ratios)
        res["full_ft_mb"] = _r(full)
        for m, k in (("live", "live_lst_mb"), ("cached", "cached_lst_mb")):
            if m in details:
                res[k] = _r(details[m]["peak_mb"])
        for k, limit in GOALS.items():
            if k in res:
                goals[f"{k}<={limit}"] = {"value": res[k], "met": bool(res[k] <= limit)}
    if "cached" in details and cuda and res.get("forward_cuda_mb") is not None:
        goals["cached_cuda_mb<forward_cuda_mb"] = {"value": [res["cached_cuda_mb"], res["forward_cuda_mb"]],
                                                   "met": bool(res["cached_cuda_mb"] < res["forward_cuda_mb"])}
    elif "cached" in details:
        goals["cached_abs_mb<forward_abs_mb"] = {"value": [res["cached_abs_mb"], res["forward_abs_mb"]],
                                                 "met": bool(details["cached"]["abs_mb"] < forward_abs)}
    res["goals"] = goals
    res["goals_met"] = {k: v["met"] for k, v in goals.items()}
    res["details"] = details
    return res


def _main() -> None:
    p = argparse.ArgumentParser(description="child processes of `lst bench memory`")
    p.add_argument("mode", choices=["baseline", "baseline-stage-two", "forward"])
    p.add_argument("--cache", required=True)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.mode in ("baseline", "baseline-stage-two"):
        out = child_baseline(a.cache, stage_two=a.mode == "baseline-stage-two")
    else:
        out = child_forward(a.cache, a.batch_size, a.epochs, a.max_steps, a.device)
    print(json.dumps(out))


if __name__ == "__main__":
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    _main()
