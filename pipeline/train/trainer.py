"""Stage two: train one LST side network from the cache (or, with ``live``, from the live backbone).

A run directory holds ``config.yaml`` (fully resolved), ``side.safetensors`` (best dev score),
``metrics.jsonl`` (one line per epoch), ``summary.json`` and ``checkpoint/`` (the resume point,
rewritten after every epoch). Re-running the same command after a kill resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from pipeline.backbones.seq2seq import LabelTargets
from pipeline.cache.fingerprint import diff_fingerprints
from pipeline.cache.store import ActivationCache, CacheError
from pipeline.extract import initpack
from pipeline.extract.runner import resolve_device
from pipeline.memory import peak_rss_bytes
from pipeline.side.config import SideConfig
from pipeline.side.init import initialise_side
from pipeline.side.model import LadderSideNetwork
from pipeline.side.seq2seq import T5LabelScorer
from pipeline.side.t5 import initialise_t5_side
from pipeline.train import checkpoint as ckpt
from pipeline.train.errors import TrainError
from pipeline.train.metrics import compute_metrics
from pipeline.train.reader import Batch, CacheReader

SIDE_KEYS = {f.name for f in dataclasses.fields(SideConfig)}


@dataclass
class TrainConfig:
    cache: str = "data/cache/sst2-minilm.zarr"
    out: str = "runs/default"
    side: dict[str, Any] = field(default_factory=dict)  # SideConfig fields
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    epochs: int = 10
    batch_size: int = 100
    batch_tokens: int | None = None
    grad_clip: float = 1.0
    seed: int = 0
    patience: int | None = None  # early stopping: epochs without dev improvement
    max_steps: int | None = None  # cap on optimisation steps (quick runs, parity tests)
    train_split: str = "train"
    eval_split: str = "validation"
    live: bool = False
    device: str = "auto"
    reader_workers: int = 2
    window_shards: int = 4
    overwrite: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training config keys {unknown}; known: {', '.join(sorted(names))}")
        return cls(**d)


# Keys that may differ between a run and its resume without changing its results.
_RESUME_FREE = {"progress", "overwrite", "reader_workers", "device", "cache"}  # a moved cache is checked by fingerprint


SideModel = LadderSideNetwork | T5LabelScorer


def side_defaults(cache: ActivationCache, side: dict) -> dict:
    """Task-dependent defaults: task type, class count, and head='lm' on a T5 label-target cache
    (the paper's setting; head='task' still trains an encoder-only classifier on its encoder taps)."""
    task = cache.attrs["task"]
    side = dict(side)
    side.setdefault("task_type", task["task_type"])
    side.setdefault("num_labels", task["num_labels"] if task["task_type"] == "classification" else 1)
    if cache.label_targets:
        side.setdefault("head", "lm")
    return side


def _build_t5_scorer(cache: ActivationCache, side: dict, bcfg) -> T5LabelScorer:
    try:
        model = T5LabelScorer(SideConfig(**side), bcfg, LabelTargets.from_dict(cache.label_targets))
    except ValueError as e:
        raise TrainError(str(e)) from None
    model.set_lm_head(initpack.read_tensor(cache.url, "lm_head.weight", cache.storage_options))
    return model


def _install_label_head(model: LadderSideNetwork, cache: ActivationCache) -> None:
    words = cache.attrs.get("label_words")
    if not words:
        raise TrainError(f"head='lm' scores label words, but cache {cache.url} records none; re-extract with "
                         "--label-words auto (or one word per class)")
    try:
        weight = initpack.read_tensor(cache.url, "lm_head.weight", cache.storage_options)
    except KeyError as e:
        raise TrainError(str(e)) from None
    model.set_label_head(weight[torch.as_tensor(words["token_ids"], dtype=torch.long)])


def build_side(cache: ActivationCache, side: dict, seed: int) -> tuple[SideModel, dict]:
    """Side network shaped for the cache's backbone and task, initialised from the init pack."""
    side = side_defaults(cache, side)
    unknown = sorted(set(side) - SIDE_KEYS)
    if unknown:
        raise TrainError(f"unknown side-network options {unknown}; known: {', '.join(sorted(SIDE_KEYS))}")
    bcfg = initpack.read_config(cache.url, cache.storage_options)
    seq2seq = bool(cache.label_targets) and side.get("head") == "lm"
    try:
        config = SideConfig(**side) if seq2seq else SideConfig(**side).resolved(bcfg)
    except ValueError as e:
        raise TrainError(str(e)) from None
    torch.manual_seed(seed)
    if seq2seq:
        model = _build_t5_scorer(cache, side, bcfg)
    else:
        try:
            model = LadderSideNetwork(config, bcfg)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if config.head == "lm":
            _install_label_head(model, cache)
    missing = [t for t in model.required_taps() if t not in cache.taps]
    if missing:
        raise TrainError(
            f"side layers need taps {missing} but cache {cache.url} holds taps {cache.taps}; "
            "choose --layers among those, or re-extract with --layers all"
        )
    report = {"init": "random"}
    if config.init != "random":
        state = initpack.read_weights(cache.url, cache.storage_options)
        importance = initpack.read_importance(cache.url, cache.storage_options) if config.init == "fisher" else None
        if config.init == "fisher" and importance is None:
            raise TrainError(f"init=fisher needs Fisher importance in {cache.url}/init; run `lst fisher --cache {cache.url}` first")
        if seq2seq:
            report = initialise_t5_side(model.side, config.init, state, importance)
        else:
            report = initialise_side(model, config.init, state, importance)
    return model, report


class LiveTaps:
    """The paper's setting: taps from the live frozen backbone for each batch (no cache reads).

    Called on a batch it returns the side network's forward arguments, as ``Batch.side_inputs``."""

    def __init__(self, cache: ActivationCache, taps: list[int], device: torch.device,
                 decoder_taps: list[int] | None = None):
        from pipeline.backbones import load_backbone, resolve_backbone, weights_sha256

        fp = cache.fingerprint
        path = resolve_backbone(fp["backbone"])
        if weights_sha256(path) != fp["weights_sha256"]:
            raise TrainError(f"backbone {fp['backbone']!r} at {path} is not the one cache {cache.url} was built from")
        self.backbone = load_backbone(str(path), device=str(device))
        self.taps = taps
        self.decoder_taps = list(decoder_taps or [])
        self.targets = LabelTargets.from_dict(cache.label_targets) if self.decoder_taps else None
        self.precision = fp.get("precision", "fp32")

    def __call__(self, b: Batch) -> dict:
        from pipeline.backbones import forward_taps
        from pipeline.backbones.seq2seq import forward_label_taps

        with torch.no_grad():
            if self.targets is not None:
                enc, dec = forward_label_taps(self.backbone, b.input_ids, b.attention_mask, self.taps,
                                              self.decoder_taps, self.targets)
                return {"taps": [t.float() for t in enc], "attention_mask": b.attention_mask,
                        "dec_taps": [t.float() for t in dec]}
            out = forward_taps(self.backbone, b.input_ids, b.attention_mask, self.taps, token_type_ids=b.token_type_ids)
        return {"taps": [t.float() for t in out], "attention_mask": b.attention_mask}


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


def label_meta(model: SideModel, cache: ActivationCache) -> dict:
    """What a run directory needs to rebuild a label-scoring side network for ``lst predict``."""
    if isinstance(model, T5LabelScorer):
        return {"label_targets": model.targets.to_dict()}
    if model.config.head == "lm":
        return {"label_words": cache.attrs.get("label_words")}
    return {}


def side_inputs(b: Batch, live: LiveTaps | None) -> dict:
    return live(b) if live is not None else b.side_inputs()


def evaluate(model: SideModel, reader: CacheReader, metric: str, live: LiveTaps | None = None) -> dict:
    model.eval()
    outs, gold = [], []
    with torch.no_grad():
        for b in reader.iter_epoch(0):
            outs.append(model(**side_inputs(b, live)).float().cpu())
            gold.append(b.labels.cpu())
    model.train()
    logits = torch.cat(outs).numpy()
    labels = torch.cat(gold).numpy()
    loss = model.loss(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return {**compute_metrics(metric, logits, labels), "loss": loss}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel: a side network has many small tensors, so one fused update
    instead of a dozen ops per tensor is a visible share of a cached step."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay, fused=True)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _check_resume(run: Path, cfg: TrainConfig, cache: ActivationCache) -> bool:
    """True when ``run`` holds a resumable run of exactly this config on this cache."""
    info = run / "checkpoint" / "info.json"
    if not info.exists():
        return False
    saved = yaml.safe_load((run / "config.yaml").read_text())
    diffs = [k for k in cfg.to_dict() if k not in _RESUME_FREE and saved["train"].get(k) != cfg.to_dict()[k]]
    if diffs:
        raise TrainError(
            f"{run} holds a different run (differs in {', '.join(diffs)}); use another --out or --overwrite"
        )
    fdiff = diff_fingerprints(saved["cache_fingerprint"], cache.fingerprint)
    if fdiff:
        raise CacheError(
            f"cache {cache.url} is not the cache run {run} was trained on:\n  " + "\n  ".join(fdiff)
        )
    return True


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) one run; returns the summary dict (also written to summary.json)."""
    cache = ActivationCache.open(cfg.cache, storage_options=None)
    cache.require_complete()
    run = Path(cfg.out)
    if cfg.overwrite and run.exists():
        shutil.rmtree(run)
    resuming = run.exists() and _check_resume(run, cfg, cache)
    if run.exists() and not resuming and any(run.iterdir()):
        if (run / "summary.json").exists() and not (run / "checkpoint").exists():
            raise TrainError(f"{run} holds a finished run; use another --out or --overwrite")
    device = resolve_device(cfg.device)
    model, init_report = build_side(cache, cfg.side, cfg.seed)
    model.to(device)
    task = cache.attrs["task"]
    taps, dec_taps = model.required_taps(), model.required_decoder_taps()
    live = LiveTaps(cache, taps, device, dec_taps) if cfg.live else None
    reader_kw = dict(batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, seed=cfg.seed,
                     workers=cfg.reader_workers, window_shards=cfg.window_shards, device=device,
                     load_acts=live is None, decoder_taps=dec_taps)
    train_reader = CacheReader(cache, cfg.train_split, taps, shuffle=True, **reader_kw)
    eval_reader = CacheReader(cache, cfg.eval_split, taps, shuffle=False,
                              **{**reader_kw, "batch_size": max(cfg.batch_size, 256)})
    steps_per_epoch = train_reader.num_batches(0)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, int(cfg.warmup_ratio * total)))
    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "best_epoch": None, "bad_epochs": 0,
             "history": [], "step_losses": []}
    if resuming:
        state.update({k: v for k, v in ckpt.load_resume_point(run / "checkpoint", model, optimizer, scheduler).items()
                      if k in state})
        # a kill between the metrics line and the checkpoint must not leave a duplicate epoch
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["history"]))
    else:
        run.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + 1)  # dropout stream, independent of the init draw
        resolved = {"train": cfg.to_dict(), "side": model.config.to_dict(), "init_report": init_report,
                    "cache_fingerprint": cache.fingerprint, "task": task,
                    "backbone": cache.attrs.get("backbone"), **label_meta(model, cache)}
        (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (run / "metrics.jsonl").write_text("")
    trainable = model.trainable_parameters()
    backbone_params = int(cache.attrs["backbone"]["num_parameters"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch_times, example_counts = [], []
    stall_wait = stall_total = 0.0
    stopped_early = False
    model.train()
    for epoch in range(state["epoch"], cfg.epochs):
        if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
            break
        t0 = time.perf_counter()
        w0, tot0 = train_reader.stats.wait_s, train_reader.stats.total_s
        losses, seen = [], 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                   disable=not cfg.progress, dynamic_ncols=True, leave=False)
        for b in train_reader.iter_epoch(epoch):
            loss = model.training_loss(labels=b.labels, **side_inputs(b, live))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            lv = float(loss.detach())
            losses.append(lv)
            if len(state["step_losses"]) < 200:
                state["step_losses"].append(lv)
            seen += len(b.index)
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}")
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                break
        bar.close()
        epoch_s = time.perf_counter() - t0
        stall_wait += train_reader.stats.wait_s - w0
        stall_total += train_reader.stats.total_s - tot0
        ev = evaluate(model, eval_reader, task["metric"], live)
        epoch_times.append(epoch_s)
        example_counts.append(seen)
        improved = ev["score"] > state["best_score"]
        if improved:
            state.update(best_score=ev["score"], best_epoch=epoch + 1, bad_epochs=0)
            ckpt.save_model(model, run / "side.safetensors", {"epoch": epoch + 1, "dev_score": ev["score"]})
        else:
            state["bad_epochs"] += 1
        row = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None,
               "dev_loss": ev["loss"], "dev_score": ev["score"],
               **{f"dev_{k}": v for k, v in ev.items() if k not in ("score", "loss")},
               "lr": scheduler.get_last_lr()[0], "epoch_s": round(epoch_s, 3),
               "stall_fraction": round((train_reader.stats.wait_s - w0) / max(1e-9, train_reader.stats.total_s - tot0), 4)}
        state["history"].append(row)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {epoch + 1}: train_loss={row['train_loss']:.4f} dev_{task['metric']}={ev['score']:.4f}",
              file=sys.stderr) if cfg.progress else None
        state["epoch"] = epoch + 1
        ckpt.save_resume_point(run / "checkpoint", model, optimizer, scheduler,
                               {k: state[k] for k in ("epoch", "step", "best_score", "best_epoch", "bad_epochs",
                                                      "history", "step_losses")})
        if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
            stopped_early = True
            break
    summary = {
        "run": str(run),
        "task": task["name"],
        "metric": task["metric"],
        "dev_score": state["best_score"] if state["best_score"] > -math.inf else None,
        "best_epoch": state["best_epoch"],
        "final": state["history"][-1] if state["history"] else None,
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "stopped_early": stopped_early,
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / backbone_params, 4),
        "backbone_params": backbone_params,
        "peak_mem_mb": round(_peak_mem_mb(device), 1),
        "epoch_s": round(float(np.mean(epoch_times)), 3) if epoch_times else None,
        "examples_per_s": round(sum(example_counts) / sum(epoch_times), 1) if epoch_times else None,
        "stall_fraction": round(stall_wait / stall_total, 4) if stall_total else None,
        "live": cfg.live,
        "device": str(device),
        "first_losses": state["step_losses"][:20],
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
