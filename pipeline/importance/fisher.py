"""Fisher importance for the paper's default side initialisation, computed in stage one.

LST's default init (``fisher-v2`` in the official scripts) prunes the backbone's blocks to the
side width, keeping the rows of largest *Fisher importance*: squared gradients of the task loss,
summed over labelled samples (official ``calculate_the_importance_label``: 1,024 training
samples, one per backward pass, ``param.grad ** 2`` accumulated).  The official code has a task
loss because T5 is a seq2seq LM; an encoder (or a decoder read through a pooled token) has no
task head, so one is fitted first:

1. **Probe.**  A linear head on the pooled *cached* last tap (pooling = the side network's
   family default: CLS for BERT-likes, mean for the T5 encoder, last token for decoders) over the
   whole cached train split: multinomial logistic regression (L-BFGS, L2) for classification,
   ridge regression for regression, on standardised features, folded back to raw features; the
   L2 strength is picked on a held-out fifth of the train split.  Seconds; its dev score on the
   cached validation split is reported.
2. **Gradients.**  The live backbone (checked against the cache's weights sha256) runs on N
   seeded training examples -- their token ids and segment ids come from the cache, so nothing is
   re-tokenised -- up to the probe's tap, then pooling and the probe; the task loss is
   back-propagated and ``grad ** 2`` summed for every backbone parameter.
   A T5 cache with label targets (``lst extract --label-words``) needs no probe: T5's own LM loss
   on the gold label word (teacher-forced, token mean, as ``T5ForConditionalGeneration(labels=)``
   computes it) is the task loss, as in the official code, and it reaches the decoder too.
3. **Write.**  ``init/importance.safetensors`` with exactly the init pack's keys (the backbone's
   ``state_dict()`` names; tied weights each get the shared parameter's importance, buffers and
   parameters the probe's loss does not reach -- T5's decoder and LM head, BERT's pooler -- get
   zeros).

``batch_size`` is examples per backward pass.  1 (the default) is the official estimator: a sum of
per-example squared gradients.  Larger batches are faster but square the gradient of the batch's
summed loss, which adds cross terms between examples: a coarser estimate, not the same number.
"""

from __future__ import annotations

from pipeline.errors import FisherError

import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.cache.store import ActivationCache, SplitView, tap_name
from pipeline.cache import initpack
from pipeline.importance.config import DEFAULT_SAMPLES
from pipeline.sizes import parse_size

__all__ = [
    "FisherError",
    "LinearProbe",
    "pooled_features",
    "fit_probe",
    "check_backbone",
    "fisher_importance",
    "compute_fisher",
    "maybe_compute_fisher",
]



# -- probe -----------------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """logits = pooled @ weight.T + bias, on raw (unstandardised) pooled features of ``tap``."""

    weight: Tensor  # [C, d] (regression: C = 1)
    bias: Tensor  # [C]
    task_type: str
    tap: int
    pooling: str

    def __call__(self, pooled: Tensor) -> Tensor:
        return F.linear(pooled, self.weight.to(pooled), self.bias.to(pooled))

    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        if self.task_type == "classification":
            return F.cross_entropy(logits, labels.long(), reduction=reduction)
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction=reduction)


def _pool_np(rows: np.ndarray, lengths: np.ndarray, pooling: str) -> np.ndarray:
    """Pool concatenated token rows [sum(lengths), d] per example (right-padding-free)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if pooling == "cls":
        return rows[starts]
    if pooling == "last":
        return rows[starts + lengths - 1]
    if pooling == "mean":
        return np.add.reduceat(rows.astype(np.float64), starts, axis=0) / lengths[:, None]
    raise FisherError(f"unknown pooling {pooling!r}; use 'cls', 'mean' or 'last'")


def pooled_features(split: SplitView, tap: int, pooling: str, chunk_tokens: int = 1 << 18) -> np.ndarray:
    """[N, d] float32 pooled features of every example of ``split`` from the cached ``tap``,
    read in contiguous chunks of whole examples (examples are stored back to back)."""
    off = split.offsets
    n = len(off) - 1
    out = np.empty((n, split.cache.hidden_size), dtype=np.float32)
    i = 0
    while i < n:
        j = int(np.searchsorted(off, off[i] + chunk_tokens, side="right")) - 1
        j = min(max(j, i + 1), n)
        rows = split.read_rows(tap, int(off[i]), int(off[j])).float().numpy()
        out[i:j] = _pool_np(rows, np.diff(off[i : j + 1]), pooling)
        i = j
    return out


def fit_probe(x: np.ndarray, y: np.ndarray, task_type: str, num_labels: int, *, l2: float = 1e-2,
              max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """(weight [C, d], bias [C]) of a linear probe on raw features ``x``.

    Fitted on standardised features (so one L2 strength suits any backbone's scale), then folded
    back: W_raw = W / sigma, b_raw = b - W_raw @ mu.  Classification: multinomial logistic
    regression, mean cross-entropy + l2/2 ||W||^2, full-batch L-BFGS (deterministic on CPU).
    Regression: ridge in closed form with the same l2 (per example).
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    mu = xt.mean(0)
    sigma = xt.std(0, unbiased=False).clamp_min(1e-6)
    z = (xt - mu) / sigma
    n, d = z.shape
    if task_type == "classification":
        yt = torch.as_tensor(y).long()
        w = torch.zeros(num_labels, d, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(F.linear(z, w, b), yt) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w, b = w.detach(), b.detach()
    elif task_type == "regression":
        yt = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        ym = yt.mean()
        a = z.T @ z / n + l2 * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.solve(a, z.T @ (yt - ym) / n).reshape(1, d)
        b = ym.reshape(1)
    else:
        raise FisherError(f"task type {task_type!r} has no probe; expected 'classification' or 'regression'")
    w_raw = w / sigma
    b_raw = b - w_raw @ mu
    return w_raw.float(), b_raw.float()


# -- backbone check ----------------------------------------------------------------------------------
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def select_l2(x: np.ndarray, y: np.ndarray, task_type: str, num_labels: int, *,
              grid: tuple[float, ...] = L2_GRID, holdout: float = 0.2, seed: int = 0) -> tuple[float, dict]:
    """The probe's L2 strength: the grid value with the lowest task loss (cross-entropy or MSE)
    on a seeded held-out 20% of the train split; returns it and the held-out loss per value.
    A probe that memorises a small train split has near-zero loss on it, and its Fisher
    gradients then come from a few boundary examples."""
    n = len(y)
    n_hold = int(round(holdout * n))
    if n_hold < 2 or n - n_hold < 2:
        return grid[len(grid) // 2], {}
    perm = np.random.default_rng(seed).permutation(n)
    hold, fit = perm[:n_hold], perm[n_hold:]
    losses = {}
    for l2 in grid:
        w, b = fit_probe(x[fit], y[fit], task_type, num_labels, l2=l2)
        probe = LinearProbe(w, b, task_type, 0, "cls")
        out = probe(torch.from_numpy(x[hold]))
        losses[l2] = float(probe.loss(out, torch.as_tensor(y[hold])))
    return min(grid, key=lambda l2: losses[l2]), losses


def check_backbone(cache: ActivationCache, backbone: str | None = None) -> Path:
    """The local dir of the backbone ``cache`` was built from (``backbone`` overrides the name in
    its fingerprint, e.g. after a move); refuses a backbone whose weights hash differs."""
    from pipeline.backbones import BackboneError, resolve_backbone, weights_sha256

    fp = cache.fingerprint
    name = backbone or fp.get("backbone")
    if not name:
        raise FisherError(f"cache {cache.url} records no backbone in its fingerprint; pass --backbone")
    try:
        path = resolve_backbone(name)
        got = weights_sha256(path)
    except BackboneError as e:
        raise FisherError(
            f"cannot find the backbone of cache {cache.url} ({e}); pass the directory it was built from with --backbone"
        ) from None
    want = fp.get("weights_sha256")
    if got != want:
        raise FisherError(
            f"backbone {str(name)!r} at {path} is not the one cache {cache.url} was built from "
            f"(weights sha256 {got[:12]}..., cache fingerprint {str(want)[:12]}...): Fisher gradients from other "
            "weights would rank the wrong rows; pass the original backbone with --backbone, or re-extract the cache "
            "with this one"
        )
    return path


def _init_pack_keys(url: str, storage_options: dict | None) -> list[str]:
    """Tensor names in init/weights.safetensors, read from its header only (no weights loaded)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = f"{root}/{initpack.INIT_DIR}/weights.safetensors"
    if not fs.exists(path):
        raise FisherError(f"cache {url} has no init pack ({path}); re-run the same `lst extract` command to write it")
    with fs.open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


# -- gradients -----------------------------------------------------------------------------------------
def _batches(split: SplitView, indices: np.ndarray, batch_size: int, pad_id: int):
    """(input_ids, attention_mask, token_type_ids | None, labels) batches of the given examples,
    length-sorted so padding is small; ids and segment ids are the cache's own."""
    off, ids, tt, labels = split.offsets, split.input_ids, split.token_type_ids, split.labels
    lengths = off[indices + 1] - off[indices]
    order = indices[np.argsort(lengths, kind="stable")]
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        lens = [int(off[i + 1] - off[i]) for i in chunk]
        L = max(lens)
        x = torch.full((len(chunk), L), int(pad_id), dtype=torch.long)
        m = torch.zeros((len(chunk), L), dtype=torch.long)
        t = torch.zeros((len(chunk), L), dtype=torch.long) if tt is not None else None
        for r, (i, n) in enumerate(zip(chunk, lens)):
            a = int(off[i])
            x[r, :n] = torch.from_numpy(ids[a : a + n].astype(np.int64))
            m[r, :n] = 1
            if t is not None:
                t[r, :n] = torch.from_numpy(tt[a : a + n].astype(np.int64))
        yield x, m, t, torch.as_tensor(labels[chunk])


def _input_embedding(backbone: Any) -> torch.nn.Embedding | None:
    """The token-embedding table the tapped stack looks ids up in (T5: the encoder's, tied to
    ``shared``), or None if it is not a plain ``nn.Embedding``."""
    stack = backbone.tap_stack()
    get = getattr(stack, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb if isinstance(emb, torch.nn.Embedding) else None


class ProbeLoss:
    """Task loss through the backbone up to the probe's tap, then pooling and the probe."""

    sparse_embedding = True  # only the input lookup reaches the embedding table

    def __init__(self, probe: LinearProbe) -> None:
        self.probe = probe

    def __call__(self, backbone: Any, x: Tensor, m: Tensor, t: Tensor | None, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        from pipeline.backbones import forward_taps
        from pipeline.side.pooling import pool

        (h,) = forward_taps(backbone, x, m, [self.probe.tap], token_type_ids=t)
        logits = self.probe(pool(h.float(), m, self.probe.pooling))
        return self.probe.loss(logits, y, reduction="sum"), [x]  # batch 1: the per-example loss


class LabelWordLoss:
    """T5's LM loss on the gold label word (teacher forcing): the official Fisher loss for T5."""

    # the tied table is also the LM head, whose gradient is dense: no row-scatter shortcut
    sparse_embedding = False

    def __init__(self, targets: Any) -> None:
        self.targets = targets

    def __call__(self, backbone: Any, x: Tensor, m: Tensor, t: Tensor | None, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        dec_in, labels = self.targets.teacher_forcing(y.to(x.device), int(backbone.config.pad_token_id or 0))
        out = backbone.model(input_ids=x, attention_mask=m, decoder_input_ids=dec_in, labels=labels, use_cache=False)
        return out.loss * len(y), [x, dec_in]


def _scatter_embedding_grads(acc: Tensor, captured: list[Tensor], ids_per_call: list[Tensor], device) -> None:
    """Add squared embedding-row gradients: rows of ids looked up in the batch, summed per row
    over every lookup (a row's gradient is the sum of its output gradients)."""
    calls = [(c, ids) for c, ids in zip(captured, ids_per_call) if c.grad is not None]
    if not calls:
        return
    ids = torch.cat([i.reshape(-1) for _, i in calls])
    grads = torch.cat([c.grad.reshape(-1, c.shape[-1]).float() for c, _ in calls])
    rows, inv = torch.unique(ids, return_inverse=True)
    g = torch.zeros(len(rows), grads.shape[-1], dtype=torch.float32, device=device)
    g.index_add_(0, inv, grads)
    acc.index_add_(0, rows, g.square())


def fisher_importance(backbone: Any, split: SplitView, indices: np.ndarray, probe: Any, *,
                      batch_size: int = 1, pad_id: int = 0, progress: bool = False) -> tuple[dict[str, Tensor], dict]:
    """Summed squared gradients of the probe's task loss through the live ``backbone`` over the
    ``indices`` examples of ``split``; keyed by ``backbone.model.state_dict()`` names.

    The token-embedding table (often half of a small model's parameters) is not given a dense
    gradient: the gradient of its *output* is captured and scattered into the rows of the ids
    in the batch, which is the same number (rows of absent ids have zero gradient) for a
    fraction of the time.
    """
    from tqdm.auto import tqdm

    loss_fn = ProbeLoss(probe) if isinstance(probe, LinearProbe) else probe
    model = backbone.model
    device = next(model.parameters()).device
    params = list(model.parameters())  # tied weights appear once
    was = [p.requires_grad for p in params]
    acc = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params}
    emb = _input_embedding(backbone) if loss_fn.sparse_embedding else None
    captured: list[Tensor] = []

    def grab(_mod, _args, out: Tensor) -> Tensor:
        out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    dense = [p for p in params if emb is None or p is not emb.weight]
    loss_sum, n_done = 0.0, 0
    model.eval()  # deterministic: no dropout in the gradients of the frozen model
    handle = emb.register_forward_hook(grab) if emb is not None else None
    try:
        for p in dense:
            p.requires_grad_(True)
        with tqdm(total=len(indices), desc="fisher", unit="ex", file=sys.stderr, disable=not progress) as bar:
            for x, m, t, y in _batches(split, indices, batch_size, pad_id):
                x, m, y = x.to(device), m.to(device), y.to(device)
                t = t.to(device) if t is not None else None
                captured.clear()
                loss, ids_per_call = loss_fn(backbone, x, m, t, y)
                model.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    got = [p for p in dense if p.grad is not None]
                    grads = [p.grad.float() for p in got]
                    torch._foreach_addcmul_([acc[id(p)] for p in got], grads, grads)
                    if emb is not None:
                        _scatter_embedding_grads(acc[id(emb.weight)], captured, ids_per_call, device)
                loss_sum += float(loss.detach())
                n_done += len(y)
                bar.update(len(y))
    finally:
        if handle is not None:
            handle.remove()
        captured.clear()
        model.zero_grad(set_to_none=True)
        for p, w in zip(params, was):
            p.requires_grad_(w)
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        a = acc.get(id(v)) if isinstance(v, torch.nn.Parameter) else None
        out[k] = (a.detach().cpu().clone() if a is not None
                  else torch.zeros(v.shape, dtype=torch.float32)).contiguous()
    return out, {"examples": n_done, "mean_loss": loss_sum / max(n_done, 1)}


# -- entry points ----------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    from pipeline.devices import resolve_device

    return resolve_device(name)


def compute_fisher(cache_url: str, n_samples: int = DEFAULT_SAMPLES, seed: int = 0, batch_size: int = 1, *,
                   backbone: str | None = None, device: str = "auto", train_split: str = "train",
                   eval_split: str = "validation", pooling: str | None = None, probe_l2: float | None = None,
                   storage_options: dict | None = None, progress: bool = False,
                   reader_memory: str | int = "512MB") -> dict:
    """Fit the probe, accumulate Fisher importance over ``n_samples`` seeded training examples and
    write it into the cache's init pack; returns a JSON-ready summary. ``reader_memory`` bounds the
    cached rows held at once while pooling features (stored values plus their fp32 widening)."""
    from pipeline.backbones import load_backbone
    from pipeline.side.families import family_for
    from pipeline.metrics import compute_metrics

    t0 = time.perf_counter()
    if n_samples < 1:
        raise FisherError(f"--samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise FisherError(f"--batch-size must be >= 1, got {batch_size}")
    try:
        budget = parse_size(reader_memory)
    except ValueError as e:
        raise FisherError(f"--reader-memory {reader_memory!r}: {e}") from None
    cache = ActivationCache.open(cache_url, storage_options=storage_options)
    cache.require_complete()
    chunk_tokens = max(1, budget // (cache.hidden_size * (np.dtype(cache.spec.storage_dtype).itemsize + 4)))
    path = check_backbone(cache, backbone)
    task = cache.attrs["task"]
    task_type = task["task_type"]
    num_labels = int(task["num_labels"]) if task_type == "classification" else 1
    bcfg = initpack.read_config(cache.url, storage_options)
    if pooling is None:
        try:
            pooling = family_for(bcfg).default_pooling
        except ValueError:
            pooling = "cls"
    n_layers = int(cache.attrs["backbone"]["num_layers"])
    tap = max(cache.taps)
    train = cache.split(train_split)

    # 1. the task loss: T5's LM loss on label words, or a probe on the cached tap
    t_probe = time.perf_counter()
    label_targets = cache.label_targets
    l2_scores: dict = {}
    train_metrics: dict | None = None
    dev_metrics: dict[str, float] | None = None
    x_dev = None
    if label_targets:
        from pipeline.backbones.seq2seq import LabelTargets

        loss_fn: Any = LabelWordLoss(LabelTargets.from_dict(label_targets))
        probe_l2 = None
    else:
        x_train = pooled_features(train, tap, pooling, chunk_tokens)
        y_train = train.labels
        if probe_l2 is None:
            probe_l2, l2_scores = select_l2(x_train, y_train, task_type, num_labels, seed=seed)
        w, b = fit_probe(x_train, y_train, task_type, num_labels, l2=probe_l2)
        probe = LinearProbe(w, b, task_type, tap, pooling)
        loss_fn = probe
        train_metrics = compute_metrics(task["metric"], probe(torch.from_numpy(x_train)).numpy(), y_train)
        if eval_split in cache.splits:
            dev = cache.split(eval_split)
            x_dev = pooled_features(dev, tap, pooling, chunk_tokens)
            dev_metrics = compute_metrics(task["metric"], probe(torch.from_numpy(x_dev)).numpy(), dev.labels)
    probe_s = time.perf_counter() - t_probe

    # 2. gradients through the live backbone
    rng = np.random.default_rng(seed)
    n = min(int(n_samples), train.num_examples)
    indices = np.sort(rng.choice(train.num_examples, size=n, replace=False)).astype(np.int64)
    dev_ = _device(device)
    bb = load_backbone(str(path), device=str(dev_))
    pad_id = cache.attrs["backbone"].get("pad_token_id") or 0
    t_grad = time.perf_counter()
    importance, stats = fisher_importance(bb, train, indices, loss_fn, batch_size=batch_size, pad_id=pad_id,
                                          progress=progress)
    grad_s = time.perf_counter() - t_grad

    # 3. write with the init pack's keys
    pack_keys = _init_pack_keys(cache.url, storage_options)
    missing = sorted(set(pack_keys) - set(importance))
    if missing:
        raise FisherError(
            f"the live backbone lacks init-pack keys {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"is {path} the model cache {cache.url} was built from?"
        )
    importance = {k: importance[k] for k in pack_keys}
    zero = sorted(k for k, v in importance.items() if not torch.any(v != 0))
    probe_dev_acc = dev_metrics.get("accuracy") if dev_metrics else None
    meta = {
        "samples": n,
        "seed": seed,
        "batch_size": batch_size,
        "probe_tap": tap,
        "pooling": pooling,
        "probe_l2": probe_l2,
        "probe_dev_acc": probe_dev_acc,
        "probe_dev_score": dev_metrics["score"] if dev_metrics else None,
        "loss": "label_word_lm" if label_targets else "cross_entropy" if task_type == "classification" else "mse",
        "backbone": cache.fingerprint.get("backbone"),
        "weights_sha256": cache.fingerprint.get("weights_sha256"),
    }
    initpack.write_importance(cache.url, importance, meta, storage_options)
    notes = []
    if tap < n_layers and not label_targets:
        notes.append(f"the cache's highest tap is {tap_name(tap)} (< block {n_layers}): blocks above it get zero "
                     "importance; extract with --layers all for a probe on the last block")
    return {
        "store": cache.url,
        "backbone": meta["backbone"],
        "backbone_path": str(path),
        "task": task["name"],
        "samples": n,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(dev_),
        "probe": None if label_targets else {
            "tap": tap, "pooling": pooling, "loss": meta["loss"], "l2": probe_l2,
            "l2_heldout_loss": {str(k): v for k, v in l2_scores.items()},
            "train_examples": int(len(train.labels)), "train_score": train_metrics["score"] if train_metrics else None,
            "dev_split": eval_split if dev_metrics else None,
            "dev_examples": int(len(x_dev)) if dev_metrics else 0,
            "dev_metric": task["metric"], "dev_score": dev_metrics["score"] if dev_metrics else None,
            "dev_acc": probe_dev_acc,
        },
        "mean_loss": stats["mean_loss"],
        "keys": len(importance),
        "zero_keys": len(zero),
        "importance_sum": float(sum(float(v.double().sum()) for v in importance.values())),
        "probe_s": round(probe_s, 3),
        "grad_s": round(grad_s, 3),
        "total_s": round(time.perf_counter() - t0, 3),
        "notes": notes,
    }


def maybe_compute_fisher(cfg: Any) -> dict | None:
    """Hook for ``lst extract --fisher-samples N``: after extraction, compute Fisher importance
    into ``cfg.out`` when ``cfg.fisher_samples`` > 0 (None otherwise).  Reads ``out``, ``seed``,
    ``device``, ``storage_options``, ``progress`` and, when present, ``fisher_batch_size``."""
    n = int(getattr(cfg, "fisher_samples", 0) or 0)
    if n <= 0:
        return None
    return compute_fisher(
        cfg.out, n_samples=n, seed=int(getattr(cfg, "seed", 0) or 0),
        batch_size=int(getattr(cfg, "fisher_batch_size", 1) or 1), device=getattr(cfg, "device", "auto"),
        storage_options=getattr(cfg, "storage_options", None), progress=bool(getattr(cfg, "progress", False)),
    )
