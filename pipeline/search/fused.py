"""Fused training: read and decode each batch once, train K side-network variants on it.

``train_many(configs)`` takes ordinary ``TrainConfig`` objects (one per variant, each with its own
``out``) and returns one ``train()``-style summary per config, in order. Configs that share the
batch order (same cache, splits, ``batch_size``, ``batch_tokens``, ``epochs``, ``max_steps``,
device and reader settings) form a *group*: one train reader and one eval reader serve the whole
group within one memory budget, loading the union of the taps its variants need, and the group
runs through the one training loop (``pipeline.train.loop.run_loop``) with one runner per variant.

Equivalence: the batch order of a group is ``CacheReader(seed=data_seed)``. When a variant's
``seed`` equals ``data_seed`` (the default when all variants of a group share a seed), its result
equals ``train()`` of the same config: same init (``build_side(seed)``), same batches, same
optimiser, the same dropout stream (each runner swaps its own RNG state in), same evaluation.

Variant threads: on CPU the variants of each batch step on ``variant_threads`` threads at once
(default: one per intra-op thread torch would use), each thread running its ops on one intra-op
thread and drawing dropout masks from its variant's own generator (``side.blocks.dropout``), so the
numbers equal the variants trained in turn. A side network's ops are small (width 48 on MiniLM), so
two intra-op threads on one variant leave much of the second core idle, where two variants at once
keep both busy: on the 2-core box the epoch of 16 fused variants took 0.65 of the 16 separate runs'
epochs with this, against ~1.0 in turn; as whole commands (``lst sweep`` against 16 ``lst train``
processes, ``lst bench sweep``), 0.34. Separate runs cannot share a core this way; a fused group can.

The earlier ``torch.func`` stacked runner (``fuse='vmap'``) was removed: on this project's CPU
box a vmapped step of 16 variants took 8.6 s against 5.5 s for 16 plain steps, and no GPU run
ever showed it winning. ``fuse`` stays accepted for old scripts and space files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.store import ActivationCache
from pipeline.devices import resolve_device
from pipeline.errors import TrainError
from pipeline.side.model import LadderSideNetwork
from pipeline.train.config import TrainConfig
from pipeline.train.loop import (OnEpoch, Variant, VariantRunner, cached_taps, cuda_rng_state, run_loop, summary,
                                 variant_pool)
from pipeline.train.rundir import RunDir
from pipeline.train.trainer import label_meta, make_readers, reader_summary, side_network, total_steps

__all__ = ["train_many", "train_group", "group_key", "side_train_memory_mb", "OnEpoch", "FUSE_MODES", "resolve_fuse",
           "resolve_variant_threads"]

_GROUP_FIELDS = ("cache", "train_split", "eval_split", "batch_size", "batch_tokens", "epochs", "max_steps",
                 "device", "window_shards", "reader_memory", "shuffle_window", "batch_order")
FUSE_MODES = ("auto", "loop", "vmap")


def group_key(cfg: TrainConfig) -> tuple:
    """Configs with equal keys can share one batch stream (and so one read of the cache)."""
    return tuple(getattr(cfg, f) for f in _GROUP_FIELDS)


def resolve_fuse(fuse: str, device: torch.device | None = None) -> str:
    """Every mode now runs the variants in turn on each shared batch ('loop')."""
    if fuse not in FUSE_MODES:
        raise TrainError(f"fuse={fuse!r}: use one of {', '.join(FUSE_MODES)}")
    if fuse == "vmap":
        print("note: fuse=vmap (torch.func stacking) was removed as slower than looping; running variants in turn",
              file=sys.stderr)
    return "loop"


def resolve_variant_threads(threads: int | None, variants: int, device: torch.device) -> int:
    """Threads that train different variants at once. Default (None or 0): on CPU, one per intra-op
    thread torch would use (each variant then runs its ops on one), at most one per variant; on
    CUDA 1 (kernels from several threads would only queue on one stream)."""
    if threads is not None and threads < 0:
        raise TrainError(f"variant_threads={threads}: use 0 (auto) or a positive count")
    if device.type != "cpu":
        return 1
    if not threads:
        threads = torch.get_num_threads()
    return max(1, min(int(threads), variants))


def stack_key(model: LadderSideNetwork) -> str:
    """Variants with equal keys have identical shapes (they could share packed kernels)."""
    d = model.config.to_dict()
    d.pop("init")  # init only changes values
    return json.dumps(d, sort_keys=True)


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
    dev = next(model.parameters()).device  # the probe batch goes where the model is (CUDA in a GPU sweep)
    inputs: dict[str, Any] = {"taps": [torch.zeros(B, length, hidden, device=dev) for _ in model.required_taps()],
                              "attention_mask": torch.ones(B, length, dtype=torch.long, device=dev)}
    if model.required_decoder_taps():
        rows = model.targets.rows
        inputs["dec_taps"] = [torch.zeros(B, rows, hidden, device=dev) for _ in model.required_decoder_taps()]
    labels = torch.zeros(B, dtype=torch.float32 if model.config.task_type == "regression" else torch.long, device=dev)
    was = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.training_loss(labels=labels, **inputs)
    del loss
    model.train(was)
    acts = sum(seen.values()) / B * batch_size
    return round((4 * n_params + acts) / 2**20, 2)


def _check_group(cfgs: list[TrainConfig]) -> None:
    if len({group_key(c) for c in cfgs}) != 1:
        raise TrainError("train_group needs configs with the same cache, splits, batch size, epochs and max_steps; "
                         "use train_many to group them")
    for c in cfgs:
        if c.live:
            raise TrainError("fused training reads the cache; live=True runs one variant at a time (use train())")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise TrainError("every fused variant needs its own out directory")


def train_group(cfgs: list[TrainConfig], data_seed: int | None = None, on_epoch: OnEpoch | None = None,
                progress: bool = False, indices: list[int] | None = None, fuse: str = "auto",
                variant_threads: int | None = None) -> list[dict]:
    """Train configs that share one batch stream, fused; returns their summaries in order.

    ``variant_threads`` (``resolve_variant_threads``): with more than one, each batch's variants
    step on that many threads at once, each thread's ops on one intra-op thread, every variant with
    its own dropout generator; the numbers are the same as in turn."""
    _check_group(cfgs)
    mode = resolve_fuse(fuse)
    indices = list(range(len(cfgs))) if indices is None else indices
    g = cfgs[0]
    cache = ActivationCache.open(g.cache, storage_options=None)
    cache.require_complete()
    if data_seed is None:
        seeds = {c.seed for c in cfgs}
        data_seed = seeds.pop() if len(seeds) == 1 else min(c.seed for c in cfgs)
    device = resolve_device(g.device)
    task = cache.attrs["task"]
    fp = cache.fingerprint

    variants: list[Variant] = []
    for i, c in zip(indices, cfgs):
        run = RunDir(c.out)
        run.prepare(c, fp, resumable=False)
        model, report = side_network(cache, c, device)
        torch.manual_seed(c.seed + 1)  # train()'s dropout stream
        variants.append(Variant(index=i, cfg=c, model=model, run=run, init_report=report, rng=torch.get_rng_state(),
                                cuda_rng=cuda_rng_state(device)))
        run.start({"train": c.to_dict(), "side": model.config.to_dict(), "init_report": report,
                   "cache_fingerprint": fp, "task": task, "backbone": cache.attrs.get("backbone"),
                   "fused": {"data_seed": data_seed, "variants": len(cfgs)}, **label_meta(model, cache)})

    taps = sorted({t for v in variants for t in v.model.required_taps()})
    dec_taps = sorted({t for v in variants for t in v.model.required_decoder_taps()})
    train_reader, eval_reader = make_readers(
        cache, g, taps, dec_taps, device, data_seed=data_seed,
        packed=all(getattr(v.model, "accepts_packed_taps", False) for v in variants))
    total = total_steps(g, train_reader.num_batches(0))
    runners = [VariantRunner(v, total) for v in variants]
    length = int(fp.get("max_length", 128))
    hidden = int(cache.attrs.get("hidden_size") or variants[0].model.dims.hidden)
    batch = g.batch_size or max(1, (g.batch_tokens or length) // length)
    mem_of: dict[str, float] = {}
    for v in variants:
        key = stack_key(v.model)
        if key not in mem_of:
            mem_of[key] = side_train_memory_mb(v.model, batch, length, hidden)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # K variants share each batch: widen its taps once, not once per variant and tap
    widen = next(variants[0].model.parameters()).dtype if len(variants) > 1 and train_reader.packed else None
    threads = resolve_variant_threads(variant_threads, len(variants), device)
    pool = variant_pool(threads, runners)
    intra_op = torch.get_num_threads()
    if pool is not None:
        torch.set_num_threads(1)  # each variant thread runs its own ops; the threads are the parallelism
    try:
        run_loop(runners, train_reader, eval_reader, cached_taps(taps, dec_taps, widen), epochs=g.epochs,
                 metric=task["metric"], max_steps=g.max_steps, on_epoch=on_epoch, progress=progress, pool=pool)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(intra_op)

    backbone_params = int(cache.attrs["backbone"]["num_parameters"])
    # one reader for all variants, through as many epochs as the longest-running variant
    shared_reader = reader_summary(train_reader, eval_reader, max((v.epochs_here for v in variants), default=0))
    out = []
    for v in variants:
        s = summary(v, task, backbone_params, device, live=False)
        s.update({"pruned": v.pruned, "fused_variants": len(variants), "data_seed": data_seed,
                  "train_s": round(v.train_s, 3), "amortised_s": round(v.train_s / len(variants), 3),
                  "side_mem_mb": mem_of[stack_key(v.model)], "fuse": mode, "stack_size": 1,
                  "variant_threads": threads if pool is not None else 1,
                  **shared_reader})
        v.run.write_summary(s)
        out.append(s)
    return out


def train_many(cfgs: list[TrainConfig], data_seed: int | None = None, on_epoch: OnEpoch | None = None,
               progress: bool = False, fuse: str = "auto", variant_threads: int | None = None) -> list[dict]:
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
                          indices=idx, fuse=fuse, variant_threads=variant_threads)
        for i, s in zip(idx, res):
            out[i] = s
    return out  # type: ignore[return-value]
