"""The one training loop of stage two.

``run_loop`` drives a list of :class:`VariantRunner` over one batch stream: ``lst train`` is the
loop with one runner, a fused sweep is the same loop with K runners sharing every decoded batch.
Each epoch: every active variant takes one optimisation step per batch, then every variant is
evaluated on one pass over the dev split, its row goes to its ``metrics.jsonl``, its best weights
to ``side.safetensors`` and, for resumable runs, its resume point to ``checkpoint/``. A variant
leaves the loop when ``on_epoch`` prunes it, its patience runs out, or ``max_steps`` is reached.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import alloc
from pipeline.alloc import mkl_buffers
from pipeline.errors import TrainError
from pipeline.memory import peak_rss_bytes
from pipeline.metrics import compute_metrics
from pipeline.side.blocks.dropout import dropout_stream
from pipeline.train.adamw import FusedAdamW, LinearWarmupDecay
from pipeline.train.config import TrainConfig
from pipeline.train.reader import Batch, CacheReader
from pipeline.train.rundir import RunDir

# tap index -> [B, L, d]; ("dec", tap index) -> [B, D, d] for T5 label targets
TapMap = dict[Any, torch.Tensor]
# batch -> its taps: read from the cache batch, or computed by the live backbone
TapSource = Callable[[Batch], TapMap]
# on_epoch(variant index, metrics row) -> True to stop that variant now (pruning)
OnEpoch = Callable[[int, dict], bool]

STATE_KEYS = ("epoch", "step", "best_score", "best_epoch", "bad_epochs", "history", "step_losses")


def cached_taps(taps: list[int], dec_taps: list[int], widen: torch.dtype | None = None) -> TapSource:
    """The tap map of a cache batch (its taps are in the reader's ``taps`` order). ``widen``: cast
    each tap once per batch (fused variants then share one widened copy instead of each casting it)."""
    def source(b: Batch) -> TapMap:
        got = b.taps or []
        if widen is not None:
            got = [t.to(widen) for t in got]
        out: TapMap = dict(zip(taps, got))
        out.update({("dec", t): x for t, x in zip(dec_taps, b.dec_taps or [])})
        return out
    return source


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state on ``device`` (None off CUDA), to seed a fused variant's own stream."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> FusedAdamW:
    """AdamW with the fused kernel: a side network has many small tensors, so one fused update
    instead of a dozen ops per tensor is a visible share of a cached step. Ours, not torch.optim's,
    which imports torch._dynamo (see ``adamw``)."""
    return FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def peak_mem_mb(device: torch.device) -> float:
    """The paper's measure on CUDA (max allocated); the whole process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20


@contextmanager
def out_of_memory_is_a_user_error(b: Batch):
    """An allocation failure in a step becomes a clear error: finished epochs stay in the resume point."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise TrainError(f"out of memory in a training step (batch of {len(b.index)} examples, "
                         f"{tuple(b.attention_mask.shape)} padded): lower --batch-size or --batch-tokens, "
                         "then re-run the same command to resume from the last finished epoch") from e
    except RuntimeError as e:
        if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e).lower():
            raise
        raise TrainError(f"out of memory in a training step ({e}): lower --batch-size or --batch-tokens, "
                         "then re-run the same command to resume from the last finished epoch") from e


@dataclass
class Variant:
    """One side network being trained: its config, model, run directory and progress."""

    index: int  # position in the caller's config list
    cfg: TrainConfig
    model: Any
    run: RunDir
    init_report: dict
    rng: torch.Tensor  # torch RNG state of this variant's dropout stream
    # CUDA RNG state of the stream, for variants that share one CUDA device (fused): each swaps its own
    # in around its forward, as ``rng`` on CPU. None: the global CUDA stream runs on (one variant, where a
    # live backbone's dropout draws from the same stream between steps)
    cuda_rng: torch.Tensor | None = None
    weights_file: str = "side.safetensors"  # where the best weights go
    epoch: int = 0  # epochs finished
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)
    active: bool = True
    pruned: bool = False
    stopped_early: bool = False
    seen: int = 0  # examples trained on in this process
    train_s: float = 0.0  # seconds of epochs run in this process
    epochs_here: int = 0
    stall_wait: float = 0.0
    stall_total: float = 0.0
    reader_cpu: float = 0.0  # CPU seconds of the reader's own threads over the epochs run here

    def state(self) -> dict:
        return {k: getattr(self, k) for k in STATE_KEYS}

    def restore(self, state: dict) -> None:
        for k in STATE_KEYS:
            if k in state:
                setattr(self, k, state[k])


class VariantRunner:
    """One variant as a plain module with (fused) AdamW, a warm-up/decay schedule and clip_grad_norm_.

    The runner swaps its own RNG state in around each step, so K variants trained on one batch
    stream each see exactly the dropout draws a run of their own would. A step on a thread of its
    own (``own_stream``) leaves torch's global generator alone: it draws from the runner's own
    generator, set to the same state, so its masks are the same."""

    def __init__(self, v: Variant, total_steps: int):
        self.variant = v
        self.stream = torch.Generator()
        self.device = next(v.model.parameters()).device
        self.taps = v.model.required_taps()
        self.dec_taps = v.model.required_decoder_taps()
        self.optimizer = make_optimizer(v.model, v.cfg.lr, v.cfg.weight_decay)
        self.scheduler = LinearWarmupDecay(self.optimizer,
                                           lr_lambda(total_steps, int(v.cfg.warmup_ratio * total_steps)))

    def inputs(self, taps: TapMap, b: Batch) -> dict:
        out = {"taps": [taps[t] for t in self.taps], "attention_mask": b.attention_mask}
        if self.dec_taps:
            out["dec_taps"] = [taps[("dec", t)] for t in self.dec_taps]
        return out

    def train_step(self, taps: TapMap, b: Batch, own_stream: bool = False) -> float:
        v = self.variant
        if own_stream:
            self.stream.set_state(v.rng)
        else:
            torch.set_rng_state(v.rng)
        if v.cuda_rng is not None:
            torch.cuda.set_rng_state(v.cuda_rng, self.device)
        with dropout_stream(self.stream) if own_stream else nullcontext(), out_of_memory_is_a_user_error(b):
            loss = v.model.training_loss(labels=b.labels, **self.inputs(taps, b))
            v.rng = self.stream.get_state() if own_stream else torch.get_rng_state()
            if v.cuda_rng is not None:
                v.cuda_rng = torch.cuda.get_rng_state(self.device)
            loss.backward()
        if v.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(v.model.parameters(), v.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        # free the gradients now, not at the next step: held until then they sit beside the next
        # forward's activations (and any evaluation), a whole parameter-sized copy on top of the peak
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def eval_logits(self, taps: TapMap, b: Batch) -> torch.Tensor:
        return self.variant.model(**self.inputs(taps, b)).float().cpu()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_resume_point(self) -> None:
        v = self.variant
        v.run.save_resume_point(v.model, self.optimizer, self.scheduler, v.state(), v.rng, v.cuda_rng)

    def load_resume_point(self) -> None:
        v = self.variant
        v.restore(v.run.load_resume_point(v.model, self.optimizer, self.scheduler))
        v.rng = torch.get_rng_state()
        if v.cuda_rng is not None:
            v.cuda_rng = torch.cuda.get_rng_state(self.device)
        v.run.rewrite_metrics(v.history)


def _each(pool: ThreadPoolExecutor | None, fn: Callable[[VariantRunner], Any], runners: list[VariantRunner]) -> list:
    """``fn`` of every runner, in order: in turn, or spread over the pool's threads."""
    return [fn(r) for r in runners] if pool is None or len(runners) < 2 else list(pool.map(fn, runners))


def variant_pool(threads: int, runners: list[VariantRunner]) -> ThreadPoolExecutor | None:
    """Threads that step different variants at once (None: one after another). Worth it on CPU,
    where a side network's small ops leave intra-op threads idle: K variants on 2 threads with one
    intra-op thread each beat the same K in turn with 2 intra-op threads (see ``search.fused``)."""
    if threads < 2 or len(runners) < 2:
        return None
    return ThreadPoolExecutor(min(threads, len(runners)), thread_name_prefix="lst-variant")


@torch.no_grad()
def evaluate(runners: list[VariantRunner], reader: CacheReader, source: TapSource, metric: str,
             pool: ThreadPoolExecutor | None = None) -> list[dict]:
    """Dev metrics of every runner's variant from one pass over the eval split.

    The CPU buffer cache first lets go of the training steps' freed buffers (``alloc.released``): it
    keeps up to what a step held at its peak, which the no-grad eval pass never needs, and which sat
    beside the eval reader's window and batches (cached MiniLM SST-2: ~100 MB of cache, and the eval
    pass peaking within 1 MB of training). The next epoch's first steps map them again, and cache
    against the training steps' peak again."""
    with alloc.released():
        return _eval_pass(runners, reader, source, metric, pool)


def _eval_pass(runners: list[VariantRunner], reader: CacheReader, source: TapSource, metric: str,
               pool: ThreadPoolExecutor | None) -> list[dict]:
    for r in runners:
        r.variant.model.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in runners]
    gold = []

    def eval_on(taps: TapMap, b: Batch) -> Callable[[VariantRunner], torch.Tensor]:
        def run(r: VariantRunner) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread
                return r.eval_logits(taps, b)
        return run

    for b in reader.iter_epoch(0):
        taps = source(b)
        for out, got in zip(outs, _each(pool, eval_on(taps, b), runners)):
            out.append(got)
        gold.append(b.labels.cpu())
        del b, taps  # before the next batch is gathered: the reader then reuses its buffers
    for r in runners:
        r.variant.model.train()
    labels = torch.cat(gold).numpy()
    res = []
    for out, r in zip(outs, runners):
        logits = torch.cat(out).numpy()
        loss = r.variant.model.loss(torch.from_numpy(logits), torch.from_numpy(labels)).item()
        res.append({**compute_metrics(metric, logits, labels), "loss": loss})
    return res


def run_loop(runners: list[VariantRunner], train_reader: CacheReader, eval_reader: CacheReader,
             source: TapSource, *, epochs: int, metric: str, max_steps: int | None = None,
             on_epoch: OnEpoch | None = None, resumable: bool = False, progress: bool = False,
             pool: ThreadPoolExecutor | None = None, before_epoch: Callable[[int], None] | None = None,
             after_epoch: Callable[[int], None] | None = None,
             after_step: Callable[[int, int], None] | None = None) -> None:
    """Train every runner's variant on one batch stream until each is done (see module doc).
    With a ``pool`` (``variant_pool``) the variants of each batch step on its threads at once.
    ``before_epoch(epoch)`` runs before each epoch's timer starts (``gate.EpochGate``: the bench's turns),
    ``after_epoch(epoch)`` once the epoch is evaluated and recorded (``floor.RunFloor``: the bench's floor).
    ``after_step(epoch, i)`` after the epoch's i-th step, once its batch is dropped (``floor.StepFloor``: the
    bench's floor step by step); its time is the epoch's pause, left out of ``epoch_s`` and the stall."""
    steps_per_epoch = train_reader.num_batches(0)
    for r in runners:
        r.variant.model.train()
    # MKL's GEMM buffers, freed between steps of what a step does not need again (``mkl_buffers``)
    mkl = (mkl_buffers.find(mkl_buffers.cap_bytes(train_reader.memory_budget))
           if any(r.device.type == "cpu" for r in runners) else None)
    start = min((r.variant.epoch for r in runners), default=0)
    for epoch in range(start, epochs):
        active = [r for r in runners if r.variant.active]
        step = max((r.variant.step for r in active), default=0)
        if not active or (max_steps is not None and step >= max_steps):
            break
        if before_epoch is not None:
            before_epoch(epoch)
        t0 = time.perf_counter()
        w0, tot0, c0 = train_reader.stats.wait_s, train_reader.stats.total_s, train_reader.stats.cpu_s
        for r in active:
            r.variant.epoch_losses = []
        name = f"epoch {epoch + 1}/{epochs}" if len(runners) == 1 else f"fused x{len(active)} epoch {epoch + 1}/{epochs}"
        bar = tqdm(total=steps_per_epoch, desc=name, file=sys.stderr, disable=not progress, dynamic_ncols=True,
                   leave=False)
        seen = real = grid = 0
        paused = 0.0
        for i, b in enumerate(train_reader.iter_epoch(epoch)):
            taps = source(b)
            threaded = pool is not None and len(active) > 1
            step_losses = _each(pool if threaded else None,
                                lambda r: r.train_step(taps, b, own_stream=threaded), active)
            if mkl is not None:
                mkl.trim()  # every variant's step is done: no thread is inside MKL
            for r, lv in zip(active, step_losses):
                v = r.variant
                v.epoch_losses.append(lv)
                if len(v.step_losses) < 200:
                    v.step_losses.append(lv)
                v.step += 1
            step += 1
            seen += len(b.index)
            real += b.num_tokens
            grid += b.attention_mask.numel()
            bar.update(1)
            if len(active) == 1:
                bar.set_postfix(loss=f"{lv:.4f}")
            # before the next batch is gathered (the reader then reuses its buffers), and before the
            # evaluation a --max-steps run goes on to (it held the last batch's taps all through it)
            del b, taps
            if after_step is not None:
                for r in active:  # the step's queued kernels are the epoch's, not the pause's
                    if r.device.type == "cuda":
                        torch.cuda.synchronize(r.device)
                p0 = time.perf_counter()
                after_step(epoch, i)
                paused += time.perf_counter() - p0
            if max_steps is not None and step >= max_steps:
                break
        bar.close()
        epoch_s = time.perf_counter() - t0 - paused
        wait, total = train_reader.stats.wait_s - w0, max(0.0, train_reader.stats.total_s - tot0 - paused)
        reader_cpu = train_reader.stats.cpu_s - c0
        if mkl is not None:
            mkl.release()  # a training step's GEMM buffers would sit beside the eval pass's peak
        evals = evaluate(active, eval_reader, source, metric, pool)
        for r, ev in zip(active, evals):
            v = r.variant
            v.seen += seen
            v.train_s += epoch_s
            v.epochs_here += 1
            v.stall_wait += wait
            v.stall_total += total
            v.reader_cpu += reader_cpu
            if ev["score"] > v.best_score:
                v.best_score, v.best_epoch, v.bad_epochs = ev["score"], epoch + 1, 0
                v.run.save_best(v.model, epoch + 1, ev["score"], v.weights_file)
            else:
                v.bad_epochs += 1
            row = {"epoch": epoch + 1, "step": v.step,
                   "train_loss": float(np.mean(v.epoch_losses)) if v.epoch_losses else None,
                   "dev_loss": ev["loss"], "dev_score": ev["score"],
                   **{f"dev_{k}": x for k, x in ev.items() if k not in ("score", "loss")},
                   "lr": r.lr, "epoch_s": round(epoch_s, 3), "stall_fraction": round(wait / max(1e-9, total), 4),
                   "reader_cpu_s": round(reader_cpu, 3),
                   "padding_share": round(1.0 - real / grid, 4) if grid else None,
                   **({"tap_values": train_reader.values_split(epoch)} if train_reader.dropout_draws else {})}
            v.history.append(row)
            v.run.append_metrics(row)
            v.epoch = epoch + 1
            if resumable:
                r.save_resume_point()
            if on_epoch is not None and on_epoch(v.index, row):
                v.pruned, v.active = True, False
            elif v.cfg.patience is not None and v.bad_epochs >= v.cfg.patience:
                v.stopped_early, v.active = True, False
        if progress:
            if len(runners) == 1:
                row = active[0].variant.history[-1]
                print(f"epoch {epoch + 1}: train_loss={row['train_loss']:.4f} dev_{metric}={row['dev_score']:.4f}",
                      file=sys.stderr)
            else:
                best = max(ev["score"] for ev in evals)
                print(f"fused epoch {epoch + 1}: {len(active)} variants, {epoch_s:.1f} s, best dev {best:.4f}",
                      file=sys.stderr)
        if after_epoch is not None:
            after_epoch(epoch)


def summary(v: Variant, task: dict, backbone_params: int, device: torch.device, live: bool) -> dict:
    """The ``summary.json`` of a finished variant (also what ``train()`` returns)."""
    trainable = v.model.trainable_parameters()
    return {
        "run": str(v.run),
        "task": task["name"],
        "metric": task["metric"],
        "dev_score": v.best_score if v.best_score > -math.inf else None,
        "best_epoch": v.best_epoch,
        "final": v.history[-1] if v.history else None,
        "epochs_run": v.epoch,
        "steps": v.step,
        "stopped_early": v.stopped_early,
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / backbone_params, 4),
        "backbone_params": backbone_params,
        "peak_mem_mb": round(peak_mem_mb(device), 1),
        "epoch_s": round(v.train_s / v.epochs_here, 3) if v.epochs_here else None,
        "examples_per_s": round(v.seen / v.train_s, 1) if v.train_s else None,
        "stall_fraction": round(v.stall_wait / v.stall_total, 4) if v.stall_total else None,
        # CPU seconds an epoch of the reader's own threads (read, checksum, decode; the gather runs in the
        # step's thread and is in the stall): what the epoch pays beside its steps when they fill every core
        "reader_cpu_s": round(v.reader_cpu / v.epochs_here, 3) if v.epochs_here else None,
        "live": live,
        "device": str(device),
        "first_losses": v.step_losses[:20],
        "method": v.cfg.method,
        **cpu_cache_summary(),
    }


def cpu_cache_summary() -> dict:
    """The CPU buffer cache's share of the peak (``pipeline.alloc``): absent where it is not installed."""
    from pipeline.alloc import stats

    s = stats()
    if s is None:
        return {}
    asked = s.hits + s.misses
    return {"cpu_cache_peak_mb": round(s.peak_cached_bytes / 2**20, 1), "cpu_cache_cap_mb": round(s.cap_bytes / 2**20, 1),
            "cpu_cache_hit_rate": round(s.hits / asked, 4) if asked else None,
            # misses served by growing a smaller cached block (only its growth faulted in)
            "cpu_cache_resized_rate": round(s.resized / asked, 4) if asked else None,
            # what the cache may keep beyond its cap: the live buffers' fall below this peak
            "cpu_cache_peak_live_mb": round(s.run_peak_live_bytes / 2**20, 1)}
