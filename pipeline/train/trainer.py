"""Stage two: train one LST side network from the cache (or, with ``live``, from the live backbone).

``train(cfg)`` builds the side network for the cache's backbone and task, then runs the one
training loop (``pipeline.train.loop``) with a single runner; the run directory
(``pipeline.train.rundir``) holds config.yaml, metrics.jsonl, side.safetensors, summary.json and
the resume point. Re-running the same command after a kill resumes from it.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from pipeline.backbones.seq2seq import LabelTargets
from pipeline.cache import initpack
from pipeline.cache.draws import draws_of
from pipeline.cache.store import ActivationCache
from pipeline.devices import resolve_device, spare_core
from pipeline.errors import TrainError
from pipeline.side.blocks import SideBlock
from pipeline.side.config import SideConfig
from pipeline.side.init import initialise_side
from pipeline.side.model import LadderSideNetwork
from pipeline.side.seq2seq import T5LabelScorer
from pipeline.side.t5 import initialise_t5_side
from pipeline.train.config import TrainConfig, parse_read_ahead, parse_shuffle_window
from pipeline.train.floor import Floor, RunFloor, StepFloor
from pipeline.train.gate import epoch_gate as open_gate
from pipeline.train.loop import TapMap, Variant, VariantRunner, cached_taps, run_loop, summary
from pipeline.train.reader import Batch, CacheReader
from pipeline.train.rundir import RunDir
from pipeline.sizes import parse_size

__all__ = ["TrainConfig", "train", "build_side", "side_network", "LiveTaps", "make_readers", "label_meta",
           "reader_peak_mb", "reader_summary", "build_floor"]

SIDE_KEYS = {f.name for f in dataclasses.fields(SideConfig)}


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
        rows = initpack.read_tensor(cache.url, "lm_head.weight", cache.storage_options, rows=words["token_ids"])
    except KeyError as e:
        raise TrainError(str(e)) from None
    model.set_label_head(rows)


def build_side(cache: ActivationCache, side: dict, seed: int) -> tuple[SideModel, dict]:
    """Side network shaped for the cache's backbone and task, initialised from the init pack.

    The pack is read lazily, only the blocks the side network is sliced from, and not hashed
    again: stage two's entry points verify it first (``ActivationCache.require_complete``)."""
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
        state = initpack.read_weights(cache.url, cache.storage_options, verified=True)
        importance = initpack.read_importance(cache.url, cache.storage_options) if config.init == "fisher" else None
        if config.init == "fisher" and importance is None:
            raise TrainError(f"init=fisher needs Fisher importance in {cache.url}/init; run `lst fisher --cache {cache.url}` first")
        if seq2seq:
            report = initialise_t5_side(model.side, config.init, state, importance)
        else:
            report = initialise_side(model, config.init, state, importance)
    return model, report


def side_network(cache: ActivationCache, cfg: TrainConfig, device: torch.device) -> tuple[SideModel, dict]:
    """``build_side`` of a run's config, on its device, with its ``recompute``: the one network a run's
    steps train, for every entry point that trains or times them (`lst train`, fused sweeps, the
    bench's reader-free floor, which timed steps without the default ffn recompute until session 29)."""
    model, report = build_side(cache, cfg.side, cfg.seed)
    model.to(device)
    set_recompute(model, cfg.recompute)
    return model, report


def set_recompute(model: SideModel, mode: str) -> None:
    """``TrainConfig.recompute`` on a side network (a training setting, not part of its config):
    'ffn' marks every side block's feed-forward sublayer, 'blocks' the network's whole blocks."""
    if mode == "blocks":
        if not hasattr(model, "recompute"):
            raise TrainError("--recompute blocks is for encoder and decoder-only side networks; the T5 side "
                             "encoder-decoder recomputes its feed-forward sublayers only: use --recompute ffn")
        model.recompute = True
    elif mode == "ffn":
        for m in model.modules():
            if isinstance(m, SideBlock):
                m.recompute_ffn = True


class LiveTaps:
    """The paper's setting: taps from the live frozen backbone for each batch (no cache reads).

    Called on a batch it returns the batch's tap map, as ``loop.cached_taps`` does for a cache batch."""

    def __init__(self, cache: ActivationCache, taps: list[int], device: torch.device,
                 decoder_taps: list[int] | None = None, dropout: bool = False):
        from pipeline.backbones import load_backbone, resolve_backbone, weights_sha256

        fp = cache.fingerprint
        path = resolve_backbone(fp["backbone"])
        if weights_sha256(path) != fp["weights_sha256"]:
            raise TrainError(f"backbone {fp['backbone']!r} at {path} is not the one cache {cache.url} was built from")
        self.backbone = load_backbone(str(path), device=str(device))
        self.dropout = dropout
        self.taps = taps
        self.decoder_taps = list(decoder_taps or [])
        self.targets = LabelTargets.from_dict(cache.label_targets) if self.decoder_taps else None
        self.precision = fp.get("precision", "fp32")

    def __call__(self, b: Batch) -> TapMap:
        from pipeline.backbones import forward_taps
        from pipeline.backbones.seq2seq import forward_label_taps

        if self.dropout:  # the paper's live backbone: frozen, in train mode for training steps (its
            # dropout draws per step) and in eval mode for evaluation, which the loop runs without grad
            self.backbone.model.train(torch.is_grad_enabled())
        with torch.no_grad():
            if self.targets is not None:
                enc, dec = forward_label_taps(self.backbone, b.input_ids, b.attention_mask, self.taps,
                                              self.decoder_taps, self.targets)
                out: TapMap = {t: x.float() for t, x in zip(self.taps, enc)}
                out.update({("dec", t): x.float() for t, x in zip(self.decoder_taps, dec)})
                return out
            enc = forward_taps(self.backbone, b.input_ids, b.attention_mask, self.taps, token_type_ids=b.token_type_ids)
        return {t: x.float() for t, x in zip(self.taps, enc)}


def label_meta(model: SideModel, cache: ActivationCache) -> dict:
    """What a run directory needs to rebuild a label-scoring side network for ``lst predict``."""
    if isinstance(model, T5LabelScorer):
        return {"label_targets": model.targets.to_dict()}
    if model.config.head == "lm":
        return {"label_words": cache.attrs.get("label_words")}
    return {}


def build_floor(cache: ActivationCache, cfg: TrainConfig, device: torch.device) -> Floor:
    """The reader-free floor of a run (``pipeline.train.floor``): a fresh side network built as the run
    builds its own, its runner over the run's step count, and a reader of the run's batches."""
    model, _ = side_network(cache, cfg, device)
    model.train()
    taps = model.required_taps()
    reader, _ = make_readers(cache, cfg, taps, [], device, data_seed=cfg.seed,
                             packed=getattr(model, "accepts_packed_taps", False))
    torch.manual_seed(cfg.seed + 1)  # the dropout stream, as the run seeds its own
    variant = Variant(0, cfg, model, RunDir(cfg.out), {}, torch.get_rng_state())
    return Floor(VariantRunner(variant, total_steps(cfg, reader.num_batches(0))), reader, cached_taps(taps, []))


def train(cfg: TrainConfig, epoch_gate: str | None = None, floor_file: str | None = None,
          floor_steps: bool = False) -> dict:
    """Train (or resume) one run of ``cfg.method``; returns the summary dict (also summary.json).
    ``epoch_gate``: a directory whose pipes hand out each epoch's start (``gate.EpochGate``; the bench's).
    ``floor_file``: after each epoch, time the reader-free floor of its batches in this process and
    append it there (``floor.RunFloor``; the bench's); with ``floor_steps``, its held steps between the
    run's own steps instead, from the second epoch on (``floor.StepFloor``)."""
    if floor_file and (cfg.live or cfg.method != "lst"):
        raise TrainError("--floor-file times the reader-free floor of a cached LST run; drop it with --live "
                         f"or --method {cfg.method}")
    if floor_steps and not floor_file:
        raise TrainError("--floor-steps times the floor step by step into --floor-file; give --floor-file too")
    cache = ActivationCache.open(cfg.cache, storage_options=None)
    cache.require_complete()
    run = RunDir(cfg.out)
    resuming = run.prepare(cfg, cache.fingerprint, resumable=True)
    done = run.finished_summary() if resuming else None
    if done is not None:  # the same command again: the finished run and its summary stay as they are
        if cfg.progress:
            print(f"lst train: {cfg.out} already finished; its summary is kept (--overwrite trains it again)",
                  file=sys.stderr)
        return done
    device = resolve_device(cfg.device)
    task = cache.attrs["task"]
    torch.manual_seed(cfg.seed)
    if cfg.method not in ("lst", "lst-live"):  # the baselines: full-ft, lora, adapter, bitfit, linear-probe
        from pipeline.train.finetune import build_method

        model, runner_cls, weights_file, described = build_method(cache, cfg, device)
        init_report: dict = {}
    else:
        model, init_report = side_network(cache, cfg, device)
        runner_cls, weights_file = VariantRunner, "side.safetensors"
        described = {"side": model.config.to_dict(), "init_report": init_report, **label_meta(model, cache)}
    taps, dec_taps = model.required_taps(), model.required_decoder_taps()
    source = LiveTaps(cache, taps, device, dec_taps, cfg.live_dropout) if cfg.live else cached_taps(taps, dec_taps)
    train_reader, eval_reader = make_readers(cache, cfg, taps, dec_taps, device, data_seed=cfg.seed,
                                             load_acts=not cfg.live and bool(taps),
                                             packed=getattr(model, "accepts_packed_taps", False))
    total = total_steps(cfg, train_reader.num_batches(0))
    torch.manual_seed(cfg.seed + 1)  # the dropout stream, independent of the init draw
    variant = Variant(index=0, cfg=cfg, model=model, run=run, init_report=init_report, rng=torch.get_rng_state(),
                      weights_file=weights_file)
    runner = runner_cls(variant, total)
    if resuming:
        runner.load_resume_point()
    else:
        run.start({"train": cfg.to_dict(), **described, "cache_fingerprint": cache.fingerprint, "task": task,
                   "backbone": cache.attrs.get("backbone")})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build = lambda: build_floor(cache, cfg, device)  # noqa: E731
    steps = StepFloor(build, floor_file) if floor_file and floor_steps else None
    floor = RunFloor(build, floor_file) if floor_file and not floor_steps else None
    with open_gate(epoch_gate) as gate:
        def before_epoch(epoch: int) -> None:  # the bench's turn first, then the step floor's decode
            if gate is not None:
                gate(epoch)
            if steps is not None:
                steps.before_epoch(epoch)

        run_loop([runner], train_reader, eval_reader, source, epochs=cfg.epochs, metric=task["metric"],
                 max_steps=cfg.max_steps, resumable=True, progress=cfg.progress, before_epoch=before_epoch,
                 after_epoch=steps.after_epoch if steps else floor,
                 after_step=steps.after_step if steps else None)
    s = summary(variant, task, int(cache.attrs["backbone"]["num_parameters"]), device, cfg.live)
    s.update(reader_summary(train_reader, eval_reader, variant.epochs_here))
    run.write_summary(s)
    return s


def reader_summary(train_reader: CacheReader, eval_reader: CacheReader, epochs: int) -> dict:
    """The readers' part of a run's ``summary.json`` (a fused sweep's variants share it): their peak, the
    training reader's read-ahead buffer (``--read-ahead``, within what its budget left over), the
    frames an epoch of the ``epochs`` it streamed here decoded from it and those it left to the page
    cache, and its dropout draws."""
    return {"reader_peak_mb": reader_peak_mb(train_reader, eval_reader),
            "read_ahead_mb": round(train_reader.read_ahead / (1 << 20), 1),
            "read_ahead_frames_per_epoch": round(train_reader.stats.read_ahead_frames / epochs) if epochs else 0,
            # frames of the windows read ahead that were left to the page cache (read there by the decode)
            "page_cache_frames_per_epoch": round(train_reader.stats.page_cache_frames / epochs) if epochs else 0,
            "dropout_draws": train_reader.dropout_draws}


def reader_peak_mb(*readers: CacheReader) -> float:
    """The readers' own byte accounting at its peak (their budget's share of ``peak_mem_mb``; the rest
    is the model and its step). The readers never run at once, so the larger peak is the one held."""
    return round(max(r.peak_bytes for r in readers) / (1 << 20), 1)


def parse_reader_memory(size: str | int) -> int:
    try:
        return parse_size(size)
    except ValueError as e:
        raise TrainError(f"--reader-memory {size!r}: {e}") from None


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = steps_per_epoch * cfg.epochs
    return total if cfg.max_steps is None else min(cfg.max_steps, total)


def planned_batches(cache: ActivationCache, cfg: TrainConfig, *, data_seed: int,
                    device: torch.device | None = None) -> CacheReader:
    """The training batches `lst train` plans for ``cfg``, as ids and masks only (no tap decoded).

    Plans do not depend on the taps read, so this is the stream every method trains on: the
    benchmarks run their backbone forwards and FLOP counts on it."""
    reader, _ = make_readers(cache, cfg, [], [], device or torch.device("cpu"), data_seed=data_seed, load_acts=False)
    return reader


def decode_ahead(setting: bool | None, device: torch.device, torch_threads: int | None = None,
                 cores: int | None = None) -> bool:
    """Whether the reader decodes the next window beside the side step (``CacheReader._batches``):
    ``setting`` where given; otherwise where the decode has a core to itself (``spare_core``)."""
    if setting is not None:
        return bool(setting)
    return spare_core(device, torch_threads, cores)


def make_readers(cache: ActivationCache, cfg: TrainConfig, taps: list[int], dec_taps: list[int],
                 device: torch.device, *, data_seed: int, load_acts: bool = True,
                 packed: bool = False) -> tuple[CacheReader, CacheReader]:
    """The shuffled train stream and the ordered eval stream, in the same batch size. Each may use the
    whole memory budget: they never run at once (evaluation runs between epochs, and a reader releases
    every buffer when its epoch ends). ``packed``: every consumer takes ``PackedTap`` (the real rows, no padding)."""
    budget = parse_reader_memory(cfg.reader_memory)
    kw = dict(batch_size=cfg.batch_size, batch_tokens=cfg.batch_tokens, seed=data_seed, workers=cfg.reader_workers,
              inline=cfg.reader_inline, decode_ahead=decode_ahead(cfg.reader_decode_ahead, device),
              window_shards=cfg.window_shards, device=device, load_acts=load_acts, decoder_taps=dec_taps,
              packed=packed, window_cap=parse_shuffle_window(cfg.shuffle_window),
              read_ahead=parse_read_ahead(cfg.read_ahead))
    draws = draws_of(cache.splits, cfg.train_split) if cfg.dropout_draws == "auto" and load_acts else []
    train_reader = CacheReader(cache, cfg.train_split, taps, shuffle=True, **kw, memory_budget=budget,
                               by_length=cfg.batch_order == "by-length", value_splits=draws or None)
    # evaluation in the training batch size, so it holds no more than training does: on SmolLM2's int8
    # cache (11 taps, then scaled to fp32 as gathered) the 256-example eval batches used before held 195 MB
    # each and made evaluation, not training, the run's peak (944 MB against ~650 MB while training)
    eval_reader = CacheReader(cache, cfg.eval_split, taps, shuffle=False, **kw, memory_budget=budget)
    return train_reader, eval_reader
