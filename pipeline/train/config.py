"""TrainConfig: every option of one stage-two run, each declared once with its help text.

The CLI (``lst train``), the sweep knobs and ``config.yaml`` are all derived from these fields,
so the same concept has the same name everywhere. This module imports no torch, so
``lst train --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import TrainError
from pipeline.ranges import check_ranges
from pipeline.sizes import parse_size


def opt(default: Any = None, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field carrying its help text (and optional CLI hints) in ``metadata``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


DEFAULT_READER_MEMORY = "512MB"
DEFAULT_SHUFFLE_WINDOW = "64MB"
#: frames read ahead (``train.prefetch``): a MiniLM window of 64 MB decoded is ~45 MB of lz4 frames
DEFAULT_READ_AHEAD = "32MB"
BATCH_ORDERS = ("by-length", "random")
RECOMPUTE_MODES = ("none", "ffn", "blocks")
METHODS = ("lst", "lst-live", "full-ft", "lora", "adapter", "bitfit", "linear-probe")
# the paper's learning rates (the linear probe, not in the paper, trains a head only: LST's rate)
METHOD_LR = {"lst": 3e-3, "lst-live": 3e-3, "full-ft": 3e-4, "lora": 3e-4, "adapter": 3e-4, "bitfit": 3e-4,
             "linear-probe": 3e-3}


@dataclass
class TrainConfig:
    cache: str = opt("data/cache/sst2-minilm.zarr", "activation cache written by `lst extract`", show_default=False)
    out: str = opt("runs/default", "run directory, e.g. runs/sst2-r8", show_default=False)
    side: dict[str, Any] = opt(factory=dict, help="side-network options (SideConfig fields)", cli=False)
    method: str = opt("lst", "lst: side network from the cache; lst-live: the same with taps from the live backbone "
                             "(= --live); full-ft: fine-tune the whole backbone the cache was built from, with a "
                             "linear head on its pooled last hidden state (T5 label caches: T5's LM loss); lora: "
                             "the same with LoRA (peft, r 32) on the attention query/value projections; adapter: "
                             "bottleneck adapters (dim 64) after each block's FFN; bitfit: biases only; "
                             "linear-probe: a linear head on the pooled last cached tap (no backbone)",
                      choices=METHODS)
    lr: float | None = opt(None, "AdamW learning rate (default: the paper's, 3e-3 for LST and the linear probe, "
                                 "3e-4 for full-ft, lora, adapter and bitfit)",
                           group="optimisation", knob="float")
    weight_decay: float = opt(0.01, "AdamW weight decay", group="optimisation", knob="float")
    warmup_ratio: float = opt(0.06, "share of steps for linear warm-up, then linear decay", group="optimisation", knob="float")
    epochs: int = opt(10, "training epochs", group="optimisation", knob="int")
    batch_size: int = opt(100, "examples per batch", group="optimisation", knob="int")
    batch_tokens: int | None = opt(None, "also cap batches at this many padded tokens", group="optimisation")
    grad_clip: float = opt(1.0, "clip the gradient norm at this value (0: off)", group="optimisation")
    seed: int = opt(0, "seed of the init, the dropout stream and the batch order", group="optimisation", knob="int")
    patience: int | None = opt(None, "early stopping after N (>= 1) epochs without dev improvement (default: off)",
                                  group="optimisation")
    max_steps: int | None = opt(None, "stop after N optimisation steps (quick runs)", group="optimisation")
    train_split: str = opt("train", "split to train on")
    eval_split: str = opt("validation", "split the dev score is computed on")
    live: bool = opt(False, "compute taps with the live backbone (the paper's setting) instead of reading the cache")
    live_dropout: bool = opt(False, "with --live: the backbone's own dropout stays on while it computes the taps, "
                                    "as in the paper's live LST (a cache holds one deterministic eval-mode pass; "
                                    "this measures what that costs)")
    dropout_draws: str = opt("auto", "auto: when the cache holds dropout draws of the train split (`lst extract "
                                     "--dropout-draws N`), epoch e reads draw e mod N + 1, the noisy taps of a "
                                     "train-mode backbone, as the paper's live LST; off: always the eval-mode taps",
                             choices=("auto", "off"))
    device: str = opt("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    recompute: str = opt("ffn", "what the LST side network reruns in the backward instead of keeping (the same "
                                "dropout draws: the same losses and gradients bit for bit); ffn: each block's "
                                "feed-forward sublayer (on MiniLM the cached peak fell 44 MB and epochs took ~1.1x "
                                "as long); blocks: whole blocks, only each block's input kept (the peak fell a further "
                                "~90 MB, epochs 1.2-1.6x, longer sequences cost more); none: keep everything, the "
                                "fastest. A bare --recompute means blocks. Methods without a side network ignore ffn "
                                "and none", group="optimisation", choices=RECOMPUTE_MODES, metavar="{none,ffn,blocks}")
    reader_memory: str = opt(DEFAULT_READER_MEMORY,
                             "host memory the cache reader may hold: shards in flight, decoded values, the "
                             "shuffle pool and queued batches (e.g. 512MB, 2GB)")
    shuffle_window: str = opt(DEFAULT_SHUFFLE_WINDOW,
                              "stored bytes of cached rows shuffled together into batches (e.g. 64MB; 'shards' "
                              "for whole-shard windows, the batches of the earlier reader, when --reader-memory "
                              "holds four shards); the reader decodes one such window at a time, so this and not "
                              "the budget sets how much of it a run really uses")
    read_ahead: str = opt(DEFAULT_READ_AHEAD,
                          "bytes of the next shuffle window's stored frames read ahead from disk (O_DIRECT) while "
                          "the steps run, out of what --reader-memory leaves beside its windows and batches; the "
                          "window's decode then reads them from memory. Frames already in the page cache are "
                          "left to the decode, which reads them there. 0 turns it off; a file system without "
                          "O_DIRECT reads them at the decode, as with 0")
    batch_order: str = opt("by-length",
                           "by-length: each shuffle window's examples sorted by length (ties in random order), "
                           "cut into batches and the batches shuffled, so a batch is little padding; random: "
                           "batches drawn uniformly from the window (the earlier reader's plan)",
                           choices=BATCH_ORDERS)
    reader_workers: int = opt(2, "threads that read and decode the cache", cli=False)
    reader_inline: bool = opt(True, "gather each batch on the training thread when it is asked for (False: on an "
                                    "assembler thread, which on 2 CPU cores made cached epochs 1.6x as long)",
                              cli=False)
    reader_decode_ahead: bool | None = opt(
        None, "decode the next shuffle window beside the step on the current one's last batch (True), or "
              "while the loop waits for it (False); None: ahead on CUDA or where torch leaves a CPU core free, "
              "while waiting where the side step's threads use every core", cli=False)
    window_shards: int = opt(4, "shards shuffled together (upper bound; the memory budget may shrink it)", cli=False)
    overwrite: bool = opt(False, "replace an existing run directory")
    progress: bool = opt(True, "progress bars on stderr", cli=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "lst-live":
            self.live = True
        if self.live and self.method not in ("lst", "lst-live"):
            raise TrainError(f"--method {self.method} does not read taps from the live backbone; drop --live")
        if self.live_dropout and not self.live:
            raise TrainError("--live-dropout turns on the live backbone's dropout; add --live (or --method lst-live)")
        # config.yaml files of earlier versions hold a bool: True was whole blocks, False nothing
        if isinstance(self.recompute, bool) or self.recompute is None:
            self.recompute = "blocks" if self.recompute else "none"
        if self.recompute not in RECOMPUTE_MODES:
            raise TrainError(f"recompute {self.recompute!r}: use one of {', '.join(RECOMPUTE_MODES)}")
        if self.recompute == "blocks" and self.method not in ("lst", "lst-live"):
            raise TrainError(f"--recompute checkpoints the LST side network's blocks; --method {self.method} has "
                             "none: drop --recompute")
        if self.lr is None:
            self.lr = METHOD_LR[self.method]
        check_values(self)
        parse_shuffle_window(self.shuffle_window)
        parse_read_ahead(self.read_ahead)
        if self.batch_order not in BATCH_ORDERS:
            raise TrainError(f"batch_order {self.batch_order!r}: use one of {', '.join(BATCH_ORDERS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown training config keys {unknown}; known: {', '.join(sorted(names))}")
        return cls(**d)


_RANGES = (("epochs", int, 1, True), ("batch_size", int, 1, True), ("batch_tokens", int, 1, True),
           ("max_steps", int, 1, True), ("patience", int, 1, True), ("seed", int, None, True),
           ("lr", float, 0.0, False), ("weight_decay", float, 0.0, True), ("warmup_ratio", float, 0.0, True),
           ("grad_clip", float, 0.0, True))


def check_values(cfg: "TrainConfig") -> None:
    """Refuse mistyped or impossible numeric options with one line naming the key and the fix
    (a YAML config is not type-checked by argparse)."""
    check_ranges(cfg, _RANGES, TrainError, "training option")
    if getattr(cfg, "warmup_ratio", None) is not None and cfg.warmup_ratio >= 1:
        raise TrainError(f"training option warmup_ratio={cfg.warmup_ratio!r}: must be below 1")


# Keys that may differ between a run and its resume without changing its results.
RESUME_FREE = {"progress", "overwrite", "reader_workers", "reader_inline", "reader_decode_ahead", "device", "cache",
               "recompute", "read_ahead",
               # the run is the directory its config.yaml is in, however its path is spelled (runs/r1/, ./runs/r1,
               # an absolute path) or wherever it was moved
               "out"}


def parse_read_ahead(size: str | int) -> int:
    """Bytes of frames the reader may read ahead (0: none)."""
    if str(size).strip().lower() in ("0", "off", "none"):
        return 0
    try:
        n = parse_size(size)
    except ValueError as e:
        raise TrainError(f"--read-ahead {size!r}: {e}; or 0 to turn it off") from None
    if n < 0:
        raise TrainError(f"--read-ahead {size!r} must be 0 or more")
    return n


def parse_shuffle_window(size: str | int | None) -> int | None:
    """Bytes one shuffle window may hold; None for 'shards' (whole-shard windows, budget permitting)."""
    if size is None or str(size).strip().lower() == "shards":
        return None
    try:
        n = parse_size(size)
    except ValueError as e:
        raise TrainError(f"--shuffle-window {size!r}: {e}; or 'shards'") from None
    if n <= 0:
        raise TrainError(f"--shuffle-window {size!r} must be positive (or 'shards')")
    return n
