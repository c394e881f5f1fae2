"""Fused training: read and decode each batch once, train K side-network variants on it.

``train_many(configs)`` takes ordinary ``TrainConfig`` objects (one per variant, each with its own
``out``) and returns one ``train()``-style summary per config, in order. Configs that share the
batch order (same cache, splits, ``batch_size``, ``batch_tokens``, ``epochs`` and ``max_steps``)
form a *group*: one ``CacheReader`` serves the whole group, loading the union of the taps its
variants need, and every variant takes the taps it needs from each decoded batch.

Inside a group, variants whose side networks have the same shape (identical resolved
``SideConfig``; they may differ in lr, weight decay, warm-up, grad clip, seed and init) form a
*stack*. A stack's K networks live as stacked leaf tensors ``[K, ...]`` (``torch.func.
stack_module_state``); one ``vmap(functional_call(...))`` runs all K forwards as batched matmuls
over the shared (unbatched) taps, the K losses are summed for one backward (the gradients stay
independent), and a vectorised AdamW + per-variant grad-norm clipping updates all K at once with
per-variant learning rates (the same linear warm-up/decay as ``train()``) and weight decays.
Variants that differ in shape (r, layers, gate, block, pooling, dropout) run in turn on the
same decoded batch. A stack of one is a plain module with torch's own AdamW, LambdaLR and
``clip_grad_norm_``: exactly ``train()``'s step.

Why dropout splits stacks: attention-probability dropout is a Python float handed to
``scaled_dot_product_attention`` inside the side blocks, so one vmapped call cannot give each
variant its own rate.

Equivalence: the batch order of a group is ``CacheReader(seed=data_seed)``. When a variant's
``seed`` equals ``data_seed`` (the default when all variants of a group share a seed), its
result equals ``train()`` of the same config: same init (``build_side(seed)``), same batches,
same optimiser arithmetic, same evaluation. With dropout 0 that holds for stacked variants up to
float rounding of batched matmuls; solo variants also reproduce train()'s dropout stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from pipeline.cache.store import ActivationCache
from pipeline.side.model import LadderSideNetwork
from pipeline.train import checkpoint as ckpt
from pipeline.train.errors import TrainError
from pipeline.train.metrics import compute_metrics
from pipeline.train.reader import CacheReader
from pipeline.train.trainer import (
    TrainConfig,
    _lr_lambda,
    _peak_mem_mb,
    build_side,
    label_meta,
    resolve_device,
)

try:  # train()'s optimiser (fused AdamW kernel); older trainers built torch.optim.AdamW inline
    from pipeline.train.trainer import make_optimizer as _make_optimizer
except ImportError:  # pragma: no cover
    def _make_optimizer(model, lr, weight_decay):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

__all__ = ["train_many", "group_key", "stack_key", "side_train_memory_mb", "OnEpoch"]

# on_epoch(config_index, row) -> True to stop that variant now (pruned)
OnEpoch = Callable[[int, dict], bool]

_BETAS = (0.9, 0.999)
_EPS = 1e-8
_GROUP_FIELDS = ("cache", "train_split", "eval_split", "batch_size", "batch_tokens", "epochs", "max_steps",
                 "device", "window_shards")


def _vmap_attention():
    """SDPA backend for vmapped stacks: on CPU the fused flash kernel has no batching rule (vmap
    would loop over variants and its backward zero-fills a full-size gradient per variant), while
    the math decomposition batches; CUDA's kernels batch, so they are left alone."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return contextlib.nullcontext() if torch.cuda.is_available() else sdpa_kernel(SDPBackend.MATH)


def group_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys can share one batch stream (and so one read of the cache)."""
    return tuple(getattr(cfg, f) for f in _GROUP_FIELDS)


def stack_key(model: LadderSideNetwork) -> str:
    """Variants with equal keys have identical shapes and code paths, so they can be vmapped."""
    d = model.config.to_dict()
    d.pop("init")  # init only changes values
    return json.dumps(d, sort_keys=True)


# -- per-variant bookkeeping -------------------------------------------------------------------------

@dataclass
class _Member:
    index: int  # position in the caller's config list
    cfg: TrainConfig
    model: LadderSideNetwork
    init_report: dict
    run: Path
    rng: torch.Tensor  # torch RNG state of this variant's dropout stream (solo runners)
    best_score: float = -math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)
    active: bool = True
    pruned: bool = False
    stopped_early: bool = False
    side_mem_mb: float | None = None
    stack_size: int = 1  # variants vmapped together with this one (1: plain module)
    seen: int = 0
    train_s: float = 0.0


class _SoloRunner:
    """One variant as a plain module: exactly train()'s step (its AdamW, LambdaLR, clip_grad_norm_)."""

    def __init__(self, m: _Member, total: int):
        self.members = [m]
        self.taps = m.model.required_taps()
        self.dec_taps = m.model.required_decoder_taps()
        self.opt = _make_optimizer(m.model, m.cfg.lr, m.cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(total, int(m.cfg.warmup_ratio * total)))

    def train_step(self, taps: dict[int, torch.Tensor], b) -> list[float]:
        m = self.members[0]
        if not m.active:
            return []
        model = m.model
        torch.set_rng_state(m.rng)
        loss = model.training_loss(labels=b.labels, **self._inputs(taps, b))
        m.rng = torch.get_rng_state()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if m.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), m.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return [float(loss.detach())]

    def _inputs(self, taps: dict, b) -> dict:
        out = {"taps": [taps[t] for t in self.taps], "attention_mask": b.attention_mask}
        if self.dec_taps:
            out["dec_taps"] = [taps[("dec", t)] for t in self.dec_taps]
        return out

    def eval_logits(self, taps: dict, b) -> list[torch.Tensor]:
        m = self.members[0]
        return [m.model(**self._inputs(taps, b)).float().cpu()] if m.active else []

    def set_mode(self, train: bool) -> None:
        self.members[0].model.train(train)

    def lr(self, k: int) -> float:
        return self.sched.get_last_lr()[0]

    def sync(self, k: int) -> LadderSideNetwork:
        return self.members[k].model

    def drop(self, k: int) -> None:
        self.members[k].active = False

    @property
    def active(self) -> bool:
        return self.members[0].active


class _StackRunner:
    """K same-shape variants as stacked tensors; forward/backward under vmap, vectorised AdamW."""

    def __init__(self, members: list[_Member], total: int, device: torch.device):
        self.members = members
        models = [m.model for m in members]
        self.taps = models[0].required_taps()
        self.names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        params, buffers = stack_module_state(models)
        self.params = {n: params[n].detach().clone().requires_grad_(True) for n in self.names}
        self.frozen = {n: v.detach() for n, v in params.items() if n not in self.params}
        self.buffers = {n: v.detach() for n, v in buffers.items()}
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.step_count = 0
        self.base_lr = [m.cfg.lr for m in members]
        self.wd = [m.cfg.weight_decay for m in members]
        self.clip = [m.cfg.grad_clip or 0.0 for m in members]
        self.lams = [_lr_lambda(total, int(m.cfg.warmup_ratio * total)) for m in members]
        self.device = device
        # one dropout stream for the stack (vmap randomness='different': each variant its own draws)
        self.rng = members[0].rng
        # Ladders whose input is a tap (shared by every variant) run outside vmap as ONE GEMM over
        # the concatenated weights [K*d_side, d]; the template gets Identity there and receives
        # the precomputed [K, B, L, d_side] ladder outputs. Tap 0's ladder stays inside when
        # dropout > 0 (its input is dropped out per variant first).
        cfg = models[0].config
        self.shared = [t for t in self.taps if str(t) in models[0].ladders and (t != 0 or cfg.dropout == 0)]
        base = copy.deepcopy(models[0]).to("meta")
        for t in self.shared:
            base.ladders[str(t)] = torch.nn.Identity()
        self.base = base
        self.inner = {n for n in self.names if not any(n.startswith(f"ladders.{t}.") for t in self.shared)}
        tap_dims = [0 if t in self.shared else None for t in self.taps]

        def fwd(p, bu, taps, mask):
            return functional_call(base, (p, bu), (taps, mask))

        def fwd_loss(p, bu, taps, mask, labels):
            logits = functional_call(base, (p, bu), (taps, mask))
            return base.loss(logits, labels), logits

        self._fwd = vmap(fwd, in_dims=(0, 0, tap_dims, None), randomness="different")
        self._fwd_loss = vmap(fwd_loss, in_dims=(0, 0, tap_dims, None, None), randomness="different")

    def _inputs(self, taps: dict[int, torch.Tensor]) -> tuple[dict, dict, list[torch.Tensor]]:
        """(inner params, buffers, per-tap inputs): shared ladders computed here as one GEMM each."""
        K = len(self.members)
        xs = []
        for t in self.taps:
            x = taps[t]
            if t in self.shared:
                w, b = self.params[f"ladders.{t}.weight"], self.params[f"ladders.{t}.bias"]
                B, L, d = x.shape
                y = torch.addmm(b.reshape(-1), x.reshape(B * L, d).to(w.dtype), w.reshape(-1, d).t())
                x = y.view(B, L, K, -1).permute(2, 0, 1, 3)
            xs.append(x)
        p = {n: v for n, v in self.params.items() if n in self.inner}
        p.update({n: v for n, v in self.frozen.items() if not any(n.startswith(f"ladders.{t}.") for t in self.shared)})
        return p, self.buffers, xs

    @property
    def active(self) -> bool:
        return bool(self.members)

    def train_step(self, taps: dict[int, torch.Tensor], b) -> list[float]:
        if not self.members:
            return []
        torch.set_rng_state(self.rng)
        p, bu, xs = self._inputs(taps)
        with _vmap_attention():
            losses, _ = self._fwd_loss(p, bu, xs, b.attention_mask, b.labels)
        self.rng = torch.get_rng_state()
        losses.sum().backward()
        self._adamw()
        return [float(x) for x in losses.detach()]

    @torch.no_grad()
    def _adamw(self) -> None:
        """torch's single-tensor AdamW, vectorised over the stack with per-variant lr/wd, after
        clip_grad_norm_ per variant (the norm over that variant's gradients only)."""
        K = len(self.members)
        grads = {n: p.grad for n, p in self.params.items()}
        clip = torch.tensor(self.clip, dtype=torch.float32, device=self.device)
        if bool((clip > 0).any()):
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), 2, dim=1) for g in grads.values()])
            total = torch.linalg.vector_norm(norms, 2, dim=0)
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            coef = torch.where(clip > 0, coef, torch.ones_like(coef))
            for g in grads.values():
                g.mul_(coef.view(K, *([1] * (g.dim() - 1))))
        s = self.step_count
        self.step_count += 1
        t = self.step_count
        beta1, beta2 = _BETAS
        lr = np.array([base * lam(s) for base, lam in zip(self.base_lr, self.lams)], dtype=np.float64)
        wd = np.array(self.wd, dtype=np.float64)
        bc1 = 1 - beta1 ** t
        bc2_sqrt = (1 - beta2 ** t) ** 0.5
        decay = torch.from_numpy(1 - lr * wd).float().to(self.device)
        neg_step = torch.from_numpy(-(lr / bc1)).float().to(self.device)
        for n, p in self.params.items():
            g = grads[n]
            shape = (K, *([1] * (p.dim() - 1)))
            p.mul_(decay.view(shape))
            m, v = self.exp_avg[n], self.exp_avg_sq[n]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(_EPS)
            p.add_((neg_step.view(shape) * m) / denom)
            p.grad = None

    def lr(self, k: int) -> float:
        return self.base_lr[k] * self.lams[k](self.step_count)

    @torch.no_grad()
    def eval_logits(self, taps: dict[int, torch.Tensor], b) -> list[torch.Tensor]:
        if not self.members:
            return []
        p, bu, xs = self._inputs(taps)
        with _vmap_attention():
            out = self._fwd(p, bu, xs, b.attention_mask).float().cpu()
        return list(out.unbind(0))

    def set_mode(self, train: bool) -> None:
        self.base.train(train)

    @torch.no_grad()
    def sync(self, k: int) -> LadderSideNetwork:
        """Copy variant k's current values back into its own module (for saving)."""
        model = self.members[k].model
        for n, t in {**self.params, **self.frozen}.items():
            model.get_parameter(n).copy_(t[k])
        for n, t in self.buffers.items():
            model.get_buffer(n).copy_(t[k])
        return model

    def drop(self, k: int) -> None:
        """Stop training member k: keep the others' values and optimiser state, shrink the stack."""
        self.sync(k)
        self.members[k].active = False
        keep = [i for i in range(len(self.members)) if i != k]
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.params = {n: p.detach().index_select(0, idx).requires_grad_(True) for n, p in self.params.items()}
        self.frozen = {n: v.index_select(0, idx) for n, v in self.frozen.items()}
        self.buffers = {n: v.index_select(0, idx) for n, v in self.buffers.items()}
        self.exp_avg = {n: v.index_select(0, idx) for n, v in self.exp_avg.items()}
        self.exp_avg_sq = {n: v.index_select(0, idx) for n, v in self.exp_avg_sq.items()}
        for attr in ("members", "base_lr", "wd", "clip", "lams"):
            setattr(self, attr, [getattr(self, attr)[i] for i in keep])


# -- memory of one variant ---------------------------------------------------------------------------

def side_train_memory_mb(model: LadderSideNetwork, batch_size: int, length: int, hidden: int) -> float:
    """Training memory of one side network at a padded batch [batch_size, length]: parameters,
    gradients, AdamW's two moments, and the activations autograd saves (measured with
    saved_tensors_hooks on a 2-example batch of that length, scaled to batch_size; every saved
    activation is per example). The per-variant number a shared fused process cannot give."""
    params = {p.data_ptr() for p in model.parameters()}
    n_params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.data_ptr() not in params and t.device.type != "meta":
            try:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except RuntimeError:
                pass
        return t

    B = 2
    inputs: dict[str, Any] = {"taps": [torch.zeros(B, length, hidden) for _ in model.required_taps()],
                              "attention_mask": torch.ones(B, length, dtype=torch.long)}
    if model.required_decoder_taps():
        rows = model.targets.rows
        inputs["dec_taps"] = [torch.zeros(B, rows, hidden) for _ in model.required_decoder_taps()]
    labels = torch.zeros(B, dtype=torch.float32 if model.config.task_type == "regression" else torch.long)
    was = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.training_loss(labels=labels, **inputs)
    del loss
    model.train(was)
    acts = sum(seen.values()) / B * batch_size
    return round((4 * n_params + acts) / 2**20, 2)


# -- the fused loop ----------------------------------------------------------------------------------

def _prepare_run(cfg: TrainConfig) -> Path:
    run = Path(cfg.out)
    if cfg.overwrite and run.exists():
        shutil.rmtree(run)
    if run.exists() and any(run.iterdir()):
        raise TrainError(f"{run} is not empty; fused runs do not resume: use another out dir or overwrite=True")
    run.mkdir(parents=True, exist_ok=True)
    return run


def _check_group(cfgs: list[TrainConfig]) -> None:
    keys = {group_key(c) for c in cfgs}
    if len(keys) != 1:
        raise TrainError("train_group needs configs with the same cache, splits, batch size, epochs and max_steps; "
                         "use train_many to group them")
    for c in cfgs:
        if c.live:
            raise TrainError("fused training reads the cache; live=True runs one variant at a time (use train())")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise TrainError("every fused variant needs its own out directory")


FUSE_MODES = ("auto", "vmap", "loop")


def resolve_fuse(fuse: str, device: torch.device) -> str:
    """'auto': vmap stacks on CUDA; on CPU run variants in turn ('loop'). Measured on the 2-core
    CPU box (MiniLM r=8, batch 100, 1 thread): a vmapped step of 16 stacked variants took 8.6 s
    against 5.5 s for 16 plain steps - on CPU the per-op overhead vmap removes is small next to
    the work, while stacking pushes every activation out of cache, turns the CPU flash-attention
    kernel (no batching rule) into the slower math path, and bmm is slower than looped mm."""
    if fuse not in FUSE_MODES:
        raise TrainError(f"fuse={fuse!r}: use one of {', '.join(FUSE_MODES)}")
    if fuse == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return fuse


def train_group(cfgs: list[TrainConfig], data_seed: int | None = None, on_epoch: OnEpoch | None = None,
                progress: bool = False, indices: list[int] | None = None, fuse: str = "auto") -> list[dict]:
    """Train configs that share one batch stream, fused; returns their summaries in order."""
    _check_group(cfgs)
    indices = list(range(len(cfgs))) if indices is None else indices
    g = cfgs[0]
    cache = ActivationCache.open(g.cache, storage_options=None)
    cache.require_complete()
    if data_seed is None:
        seeds = {c.seed for c in cfgs}
        data_seed = seeds.pop() if len(seeds) == 1 else min(c.seed for c in cfgs)
    device = resolve_device(g.device)
    mode = resolve_fuse(fuse, device)
    task = cache.attrs["task"]
    fp = cache.fingerprint
    backbone_params = int(cache.attrs["backbone"]["num_parameters"])

    members: list[_Member] = []
    for i, c in zip(indices, cfgs):
        run = _prepare_run(c)
        model, report = build_side(cache, c.side, c.seed)
        model.to(device)
        torch.manual_seed(c.seed + 1)  # train()'s dropout stream
        members.append(_Member(index=i, cfg=c, model=model, init_report=report, run=run, rng=torch.get_rng_state()))
        resolved = {"train": c.to_dict(), "side": model.config.to_dict(), "init_report": report,
                    "cache_fingerprint": fp, "task": task, "backbone": cache.attrs.get("backbone"),
                    "fused": {"data_seed": data_seed, "variants": len(cfgs)}, **label_meta(model, cache)}
        (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (run / "metrics.jsonl").write_text("")

    taps = sorted({t for m in members for t in m.model.required_taps()})
    dec_taps = sorted({t for m in members for t in m.model.required_decoder_taps()})
    reader_kw = dict(batch_size=g.batch_size, batch_tokens=g.batch_tokens, seed=data_seed, workers=g.reader_workers,
                     window_shards=g.window_shards, device=device, decoder_taps=dec_taps)
    train_reader = CacheReader(cache, g.train_split, taps, shuffle=True, **reader_kw)
    eval_reader = CacheReader(cache, g.eval_split, taps, shuffle=False,
                              **{**reader_kw, "batch_size": max(g.batch_size or 0, 256)})
    steps_per_epoch = train_reader.num_batches(0)
    total = steps_per_epoch * g.epochs if g.max_steps is None else min(g.max_steps, steps_per_epoch * g.epochs)

    # stacks of same-shape variants; a stack of one runs as a plain module
    stacks: dict[str, list[_Member]] = {}
    for m in members:
        stackable = mode == "vmap" and isinstance(m.model, LadderSideNetwork)
        stacks.setdefault(stack_key(m.model) if stackable else str(m.index), []).append(m)
    runners: list[Any] = []
    length = int(fp.get("max_length", 128))
    hidden = int(cache.attrs.get("hidden_size") or members[0].model.dims.hidden)
    mem_of: dict[str, float] = {}
    for group in stacks.values():
        shape = stack_key(group[0].model)
        if shape not in mem_of:
            mem_of[shape] = side_train_memory_mb(group[0].model, g.batch_size or max(1, (g.batch_tokens or length) // length),
                                                 length, hidden)
        mem = mem_of[shape]
        for m in group:
            m.side_mem_mb, m.stack_size = mem, len(group)
        runners.append(_SoloRunner(group[0], total) if len(group) == 1 else _StackRunner(group, total, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def live_runners():
        return [r for r in runners if r.active]

    for r in runners:
        r.set_mode(True)
    step = 0
    for epoch in range(g.epochs):
        if not live_runners() or (g.max_steps is not None and step >= g.max_steps):
            break
        t0 = time.perf_counter()
        w0, tot0 = train_reader.stats.wait_s, train_reader.stats.total_s
        for m in members:
            m.epoch_losses = []
        bar = tqdm(total=steps_per_epoch, desc=f"fused x{sum(len(r.members) for r in live_runners())} "
                   f"epoch {epoch + 1}/{g.epochs}", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                   leave=False)
        seen = 0
        for b in train_reader.iter_epoch(epoch):
            tap_map = _tap_map(taps, dec_taps, b)
            for r in live_runners():
                for m, lv in zip(list(r.members), r.train_step(tap_map, b)):
                    m.epoch_losses.append(lv)
                    if len(m.step_losses) < 200:
                        m.step_losses.append(lv)
                    m.step += 1
            step += 1
            seen += len(b.index)
            bar.update(1)
            if g.max_steps is not None and step >= g.max_steps:
                break
        bar.close()
        epoch_s = time.perf_counter() - t0
        stall = round((train_reader.stats.wait_s - w0) / max(1e-9, train_reader.stats.total_s - tot0), 4)
        evals = _evaluate(live_runners(), eval_reader, taps, task["metric"])
        for r in live_runners():
            for k, m in reversed(list(enumerate(r.members))):
                ev = evals[id(m)]
                m.seen += seen
                m.train_s += epoch_s
                if ev["score"] > m.best_score:
                    m.best_score, m.best_epoch, m.bad_epochs = ev["score"], epoch + 1, 0
                    ckpt.save_model(r.sync(k), m.run / "side.safetensors", {"epoch": epoch + 1, "dev_score": ev["score"]})
                else:
                    m.bad_epochs += 1
                row = {"epoch": epoch + 1, "step": m.step,
                       "train_loss": float(np.mean(m.epoch_losses)) if m.epoch_losses else None,
                       "dev_loss": ev["loss"], "dev_score": ev["score"],
                       **{f"dev_{k2}": v for k2, v in ev.items() if k2 not in ("score", "loss")},
                       "lr": r.lr(k), "epoch_s": round(epoch_s, 3), "stall_fraction": stall}
                m.history.append(row)
                with open(m.run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                stop = False
                if on_epoch is not None and on_epoch(m.index, row):
                    m.pruned = stop = True
                elif m.cfg.patience is not None and m.bad_epochs >= m.cfg.patience:
                    m.stopped_early = stop = True
                if stop:
                    r.drop(k)
        if progress:
            best = max((m.history[-1]["dev_score"] for m in members if m.history), default=float("nan"))
            print(f"fused epoch {epoch + 1}: {len(members)} variants, {epoch_s:.1f} s, best dev {best:.4f}",
                  file=sys.stderr)

    peak = round(_peak_mem_mb(device), 1)
    out = []
    for m in members:
        trainable = m.model.trainable_parameters()
        s = {
            "run": str(m.run), "task": task["name"], "metric": task["metric"],
            "dev_score": m.best_score if m.best_score > -math.inf else None, "best_epoch": m.best_epoch,
            "final": m.history[-1] if m.history else None, "epochs_run": len(m.history), "steps": m.step,
            "stopped_early": m.stopped_early, "trainable_params": trainable,
            "trainable_pct": round(100 * trainable / backbone_params, 4), "backbone_params": backbone_params,
            "peak_mem_mb": peak,
            "epoch_s": round(m.train_s / len(m.history), 3) if m.history else None,
            "examples_per_s": round(m.seen / m.train_s, 1) if m.train_s else None,
            "stall_fraction": m.history[-1]["stall_fraction"] if m.history else None,
            "live": False, "device": str(device), "first_losses": m.step_losses[:20],
            # fused extras
            "pruned": m.pruned, "fused_variants": len(members), "data_seed": data_seed,
            "train_s": round(m.train_s, 3), "amortised_s": round(m.train_s / len(members), 3),
            "side_mem_mb": m.side_mem_mb, "fuse": mode,
            "stack_size": m.stack_size,
        }
        (m.run / "summary.json").write_text(json.dumps(s, indent=2))
        out.append(s)
    return out


def _tap_map(taps: list[int], dec_taps: list[int], b) -> dict:
    """Encoder taps by index, decoder taps (T5 label targets) by ('dec', index)."""
    out: dict = dict(zip(taps, b.taps))
    out.update({("dec", t): x for t, x in zip(dec_taps, b.dec_taps or [])})
    return out


@torch.no_grad()
def _evaluate(runners: list, reader: CacheReader, taps: list[int], metric: str) -> dict[int, dict]:
    """Dev metrics of every live variant from one pass over the eval split (train()'s evaluate)."""
    for r in runners:
        r.set_mode(False)
    members = [m for r in runners for m in r.members]
    outs: dict[int, list] = {id(m): [] for m in members}
    gold = []
    for b in reader.iter_epoch(0):
        tap_map = _tap_map(taps, reader.decoder_taps, b)
        for r in runners:
            for m, lg in zip(r.members, r.eval_logits(tap_map, b)):
                outs[id(m)].append(lg)
        gold.append(b.labels.cpu())
    for r in runners:
        r.set_mode(True)
    labels = torch.cat(gold).numpy()
    res = {}
    for m in members:
        logits = torch.cat(outs[id(m)]).numpy()
        loss = m.model.loss(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        res[id(m)] = {**compute_metrics(metric, logits, labels), "loss": loss}
    return res


def train_many(cfgs: list[TrainConfig], data_seed: int | None = None, on_epoch: OnEpoch | None = None,
               progress: bool = False, fuse: str = "auto") -> list[dict]:
    """Train every config, fusing those that can share a batch stream; summaries in input order.

    ``data_seed`` fixes the batch order of every group (default: the group's common seed, or its
    smallest seed when the variants' seeds differ; each variant's own seed still draws its init and
    dropout). ``on_epoch(i, row)`` sees config i's metrics row after each epoch; returning True
    stops that variant (pruning)."""
    if not cfgs:
        return []
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(group_key(c), []).append(i)
    out: list[dict | None] = [None] * len(cfgs)
    for idx in groups.values():
        res = train_group([cfgs[i] for i in idx], data_seed=data_seed, on_epoch=on_epoch, progress=progress,
                          indices=idx, fuse=fuse)
        for i, s in zip(idx, res):
            out[i] = s
    return out  # type: ignore[return-value]


def with_fields(cfg: TrainConfig, **kw) -> TrainConfig:
    return dataclasses.replace(cfg, **kw)
