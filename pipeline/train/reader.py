"""Stage-two reader: streams cached taps to the side network within a host-memory budget.

Every host buffer the reader holds counts against ``memory_budget`` (bytes, default 512 MB;
``lst train --reader-memory``): compressed chunk frames in flight, one-chunk decode scratch,
the decoded values of the windows being shuffled (kept in the store's dtype: bf16 bits, int8
codes plus float32 scales, fp16, fp32), the assembled fp32 batches (queued, being assembled,
or the one last handed to the caller) and the next window's frames read ahead.
``reader.accounting`` keeps current and peak bytes per category and ``reader.peak_bytes`` the
peak of their sum; the plan below guarantees
``peak_bytes <= memory_budget`` whatever the hidden size, tap count, shard size or sequence
length. Not counted: the split's index arrays (offsets, input ids, labels: 4-12 bytes a token,
loaded once per split) and allocator caching (glibc arenas, CUDA's pinned-memory cache).

Budget split (``reader.layout``), computed once from the cache's shapes::

    budget = transient + windows + batches
    transient = decode threads x (2 x one inner chunk + shard index + frame overhead)
    batches   >= one batch bound: a padded fp32 batch of every requested tap at the worst
                 shape the batch limits allow (batch_size x longest example, or batch_tokens)
    windows   >= the stored rows one batch can draw on

If even one batch, its source rows and one chunk being decoded do not fit, the constructor raises
``CacheError`` naming the smallest budget that works. What the three shares leave over (a shuffle
window smaller than the budget allows leaves most of it) may hold the next window's frames, read
ahead (``read_ahead``, ``train.prefetch``).

Order of an epoch. Read *units* are the examples whose first token row lies in one shard
(contiguous in storage order; storage is sorted by length). The plan is computed up front from
indices alone, a pure function of (seed, epoch, budget, shapes), so ``num_batches`` is known and a
resumed run sees exactly the batches an uninterrupted one would; every example appears once.

* **shards mode** (the budget holds ``window_shards`` of the largest units plus one batch bound):
  exactly the plan of the reader before budgets: units in seeded random order, grouped into windows
  of ``window_shards`` units; examples shuffled inside a window and cut into batches (by example
  count or token budget). Same seed, same batches in the same order. Whatever budget is left over
  is used for a deeper batch queue (up to ``prefetch``) and then for decoding up to two windows
  ahead (three in flight, as before).
* **bytes mode** (smaller budgets): the window budget is halved so the next window decodes while
  the current one is consumed (if half cannot hold one batch's rows, one window takes it all and
  nothing overlaps). A window holds at most ``window_cap`` bytes of stored rows. Units are split
  into *pieces* (consecutive examples, at most ``window_cap / window_shards`` bytes, but no
  smaller than four inner chunks per tap); all pieces of the split are put in seeded random order
  and packed greedily into windows; examples are shuffled inside a window and cut into batches.
  A window thus mixes about ``window_shards`` pieces from random places of the split (random
  length ranges), of ``window_cap / (bytes per token row)`` tokens in all.
  How batches differ from shards mode: a window holds fewer examples, so each batch is drawn from
  a smaller pool (``layout.window_tokens`` token rows instead of ``window_shards`` shards) and
  every window ends in a short batch, so there are a few more, smaller batches per epoch; the
  order of pieces is a different random stream, so no batch of a bytes-mode plan equals one of the
  shards-mode plan even at the same seed. Changing the budget within bytes mode changes the plan
  (the number of steps too); within shards mode it does not.

Defaults of ``lst train`` (``make_readers``): ``window_cap`` (``--shuffle-window``, 64 MB) caps each
window below what the budget allows, which puts every cache whose 4 shards exceed it in bytes mode,
and then only one window is held at a time (the next is decoded beside the step on the current one's
last batch, or, where that step's threads use every CPU core, once the loop asks for the batch after
it: ``decode_ahead``); ``by_length`` sorts each shuffled window by length
(equal lengths stay in random order), cuts it and shuffles the batches, so batches carry little
padding; ``packed`` hands out each tap's real rows only (``side.packed.PackedTap``, store dtype, int8
codes with their rows' scales, applied after the ladder) with their positions, never a padded fp32
grid. ``--shuffle-window shards --batch-order random`` gives back the plan and batches of the earlier
reader.

Shuffle quality at a given budget: a batch's examples are a uniform sample of its window, so the
window size is what mixes. At 512 MB, a MiniLM-L6 bf16 cache (7 taps, d 384, 16,384-token shards,
5.4 kB a token row) stays in shards mode when the batch bound fits beside the 4-shard window
(~350 MB): 65k token rows, thousands of SST-2 examples from 4 random shards per window, as before. A
Llama-7B-shaped cache (33 taps, d 4096, 270 kB a token row in bf16) at 512 MB with
``--batch-tokens 512`` needs 277 MB for the batch bound and leaves one ~230 MB window (~850 token
rows; pieces are at least four 128-row inner chunks, so a window mixes 1-2 pieces, i.e. a few
dozen examples of one or two length ranges) with no room to decode ahead; at 1 GB the window budget
splits in two ~360 MB windows (double buffered, ~1,300 rows, 2-3 pieces each). Raise the budget
for better mixing; ``layout.describe()`` prints these numbers.

Stall fraction: the training loop waits only when the reader falls behind (``stats``). With room
for one window ahead and a queue of several batches, decoding hides behind training as before.
At small budgets the queue shrinks to one or two batches and windows shrink to a few batches, so
each window's decode (and a second read of the inner chunk cut at each piece edge, at most two
chunks per piece and tap, of which only the blocks holding the piece's rows are decoded) is less
well hidden; when half the window budget cannot hold one batch,
decoding and training alternate and the stall fraction approaches decode / (decode + step) time.

Decoding, native (``native_read``, where it is built): a window's frames are read, checked and decoded
in one C++ call with the GIL released. Without ``decode_ahead`` the consumer makes that call when it
asks for the window's first batch, on torch's own threads (``_decode_frames``), and a window of packed
store-dtype batches is laid out in batch order as it decodes (``_decode_window_scattered``: each
chunk's rows copied from the slot's scratch to where their batch wants them), so every batch but the
window's last (gathered, since the consumer still holds it when the window goes) is a view of the
window. With ``decode_ahead`` each read job below goes through the same call on its decode thread.

Decoding, in Python: one read job per piece and array (``DirectArray.read_into``: each shard's index, then the
compressed frames of the overlapping inner chunks one at a time, never a whole shard file) runs on
``workers`` threads straight into per-piece buffers, each thread decoding through a c-blosc2
context of its own (``blosc_decode.ThreadDecoder``: no shared lock, the GIL released); only the
requested taps and the planned rows are read. Nothing on that path is allocated per chunk or per
window: each decode thread reads frames into one scratch it keeps for the epoch, and a window's piece
buffers are handed to the next window (``bufpool.WindowBufferPool``, within the window share); both
are in the byte accounting (``scratch``, ``pool``) and released when the epoch ends. A batch is
gathered with one copy per example and tap from those buffers into a preallocated zero-padded
[B, L, d] fp32 tensor (int8 scaled in place), with no concatenated copy of a window.
By default (``inline``) a batch is gathered on the consumer's thread when the loop asks for it, so
only the decode threads run beside the training step; ``inline=False`` gathers on an assembler
thread into a queue of ``prefetch`` batches instead. An inline packed batch whose rows are one run of
one piece (a batch of one example: most batches of a long-sequence cache at a small
``--batch-tokens``) is not gathered at all: its taps are views of the window, which an inline reader
frees only once the consumer asks for the batch after it. A window buffer a kept view still reads is
never reused (its reference count says so), so a consumer that keeps batches reads what it was handed.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.cache import codecs as C
from pipeline.cache import native_read
from pipeline.cache.fastread import FRAME_OVERHEAD, DirectArray, FrameTasks, ReadScratch, Segments, WindowFrames
from pipeline.cache.store import ActivationCache
from pipeline.errors import CacheError
from pipeline.train.bufpool import GatherBuffers, WindowBufferPool
from pipeline.train.prefetch import FramePrefetch
from pipeline.sizes import MB, format_size

DEFAULT_MEMORY_BUDGET = 512 * MB
#: idle memory the reader keeps between decodes for speed, as a share of its budget (``_after_decode``):
#: 16 MB at the default 512 MB, which a cached MiniLM SST-2 epoch stays under (its 3 MB of read scratch), 4 MB at 128 MB
IDLE_SHARE = 32
#: references to a freed window's buffer that nothing outside the reader reads: ``_free_window``'s own,
#: the pool's record of the buffer in use, and getrefcount's argument (a batch that is a view of the
#: buffer adds one through the numpy view its tensor's storage keeps)
_WINDOW_BUFFER_REFS = 3
MAX_WINDOWS_IN_FLIGHT = 3  # the one being gathered and two decoding ahead (the old reader's depth)
META_BYTES_PER_TOKEN = 32  # int64 ids, mask, token types and their construction temporaries
MIN_PIECE_CHUNKS = 4  # bytes-mode pieces span at least this many inner chunks per tap
_CONSUMER = "consumer"  # the consumer's key among a run's read scratches
SCATTER_SHARE = 8  # windows in batch order where their resident extras fit 1/8 of the budget (``_scatters``)


@dataclass
class Batch:
    index: np.ndarray  # storage indices of the examples
    input_ids: torch.Tensor  # [B, L] (pad 0)
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B]
    taps: list | None  # one [B, L, d] tensor (or PackedTap: packed readers) per requested tap; None: ids only
    token_type_ids: torch.Tensor | None = None
    dec_taps: list[torch.Tensor] | None = None  # T5 label targets: one [B, D, d] per decoder tap

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class ReaderStats:
    wait_s: float = 0.0
    total_s: float = 0.0
    batches: int = 0
    buffer_hits: int = 0  # window buffers reused from an earlier window of the epoch
    buffer_misses: int = 0  # ... and newly allocated
    gather_hits: int = 0  # packed taps gathered into the buffer the batch before used
    gather_misses: int = 0  # ... and into a new one (the first, a longer batch, or one still in use)
    # CPU seconds of the reader's own threads (decode loop and read jobs), not the consumer's gather: on
    # a machine whose cores the step keeps busy, an epoch pays about this much beside its steps
    cpu_s: float = 0.0
    read_ahead_frames: int = 0  # frames decoded from the read-ahead buffer (``train.prefetch``)
    page_cache_frames: int = 0  # frames of windows read ahead left to the decode as already in the page cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_cpu(self, seconds: float) -> None:
        with self._lock:
            self.cpu_s += seconds

    @property
    def stall_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s > 0 else 0.0


class ByteAccounting:
    """Current and peak bytes the reader holds, per category and in total (thread-safe)."""

    # pool: reused window buffers beyond the requests in use (freed ones kept, tails of reused ones)
    # gather: the kept buffers packed batches are gathered into (``GatherBuffers``); the batches in them
    # count here, not under "batches"; prefetch: the buffer the next window's frames are read ahead into
    CATEGORIES = ("encoded", "scratch", "window", "pool", "batches", "gather", "prefetch")

    def __init__(self, budget: int):
        self.budget = budget
        self.current = dict.fromkeys(self.CATEGORIES, 0)
        self.peak = dict.fromkeys(self.CATEGORIES, 0)
        self.peak_total = 0
        self._lock = threading.Lock()

    def add(self, category: str, n: int) -> None:
        with self._lock:
            self.current[category] += n
            self.peak[category] = max(self.peak[category], self.current[category])
            self.peak_total = max(self.peak_total, sum(self.current.values()))

    def sub(self, category: str, n: int) -> None:
        with self._lock:
            self.current[category] -= n

    @contextmanager
    def hold(self, category: str, n: int):
        self.add(category, n)
        try:
            yield
        finally:
            self.sub(category, n)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.current.values())

    def as_dict(self) -> dict:
        with self._lock:
            return {"budget": self.budget, "current": dict(self.current), "peak": dict(self.peak),
                    "peak_total": self.peak_total}


@dataclass(frozen=True)
class ReaderLayout:
    """How the budget is split (bytes) and what it means for the plan."""

    budget: int
    mode: str  # "shards" (the pre-budget plan) or "bytes" (sub-shard windows)
    workers: int  # decode threads
    transient_bytes: int  # chunk frames + scratch of the decode threads
    window_bytes: int  # all windows in flight
    batch_bytes: int  # queued + assembling + handed-out batches
    batch_bound: int  # bytes of the largest possible batch
    window_cap: int  # bytes of stored rows one window may hold
    piece_cap: int  # bytes of one piece (bytes mode)
    row_bytes: int  # stored bytes of one token row over the requested taps
    min_budget: int  # smallest budget that works
    window_min: int = 0  # stored bytes of the rows one batch can draw on (the least a window holds)

    @property
    def window_tokens(self) -> int:
        return self.window_cap // self.row_bytes if self.row_bytes else 0

    @property
    def queue_batches(self) -> int:
        return max(1, self.batch_bytes // max(1, self.batch_bound))

    def describe(self) -> str:
        return (f"reader memory {format_size(self.budget)} ({self.mode} mode): windows {format_size(self.window_bytes)} "
                f"(one window <= {format_size(self.window_cap)}, ~{self.window_tokens} token rows), batches "
                f"{format_size(self.batch_bytes)} (>= {self.queue_batches} of <= {format_size(self.batch_bound)}), "
                f"decode {format_size(self.transient_bytes)} on {self.workers} threads")


@dataclass(frozen=True)
class Piece:
    """Consecutive examples [e0, e1) of one read unit, token rows [r0, r1)."""

    unit: int
    e0: int
    e1: int
    r0: int
    r1: int
    d0: int  # first decoder row within the unit's decoder block
    nbytes: int  # stored bytes of every tap (and decoder tap) of the cache for these examples: plan units


@dataclass
class Window:
    """One shuffle window of a plan. Unpacks as ``(units, batches)`` like the old plan tuples."""

    units: list[int]
    batches: list[np.ndarray]
    pieces: list[Piece]
    nbytes: int

    def __iter__(self):
        return iter((self.units, self.batches))


@dataclass
class _Decoded:
    window: Window
    nbytes: int = 0
    buffers: list[np.ndarray] = field(default_factory=list)  # the pool's buffers the values live in
    vals: list[list[torch.Tensor]] = field(default_factory=list)  # [piece][tap] rows in store dtype
    scales: list[list[torch.Tensor]] = field(default_factory=list)  # int8: [piece][tap] float32
    dvals: list[list[torch.Tensor]] = field(default_factory=list)  # [piece][decoder tap]
    dscales: list[list[torch.Tensor]] = field(default_factory=list)
    # the directly read arrays' frames, still to be decoded by the consumer (``CacheReader.native_read``
    # without ``decode_ahead``); None once decoded, or where the decode threads did it
    frames: FrameTasks | None = None
    # a window laid out in batch order (``CacheReader._scatters``): batch i's (piece, first row, None)
    # locations, its rows one run of the single piece; None for a window laid out by piece
    batch_locs: list[tuple[np.ndarray, np.ndarray, None]] | None = None
    next_window: Window | None = None  # the plan's window after this one (read ahead once this one is decoded)


class _Run:
    """Reservations of one epoch's threads against the window and batch shares, and the epoch's
    reused buffers (window buffers, one read scratch per decode thread, the gather buffers)."""

    def __init__(self, pool: WindowBufferPool, gather: GatherBuffers):
        self.cond = threading.Condition()
        self.gather = gather
        self.stopped = False
        self.window_held = 0
        self.windows = 0
        self.batch_held = 0
        self.batches = 0
        self.pool = pool
        # per decode thread (its id), and the consumer's (key CONSUMER): ReadScratch, or native_read.FrameReader
        self.scratches: dict[int | str, ReadScratch | native_read.FrameReader] = {}
        # a window in batch order hands out its last batch as a view too, until the consumer is found
        # still holding one when it asks for the batch after (``CacheReader._batches``)
        self.last_views = True
        self.prefetch: FramePrefetch | None = None  # the next window's frames, read ahead (``read_ahead``)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class CacheReader:
    def __init__(
        self,
        cache: ActivationCache,
        split: str,
        taps: list[int],
        *,
        batch_size: int | None = 32,
        batch_tokens: int | None = None,
        shuffle: bool = True,
        window_shards: int = 4,
        seed: int = 0,
        workers: int = 2,
        prefetch: int = 1,
        device: str | torch.device = "cpu",
        load_acts: bool = True,
        decoder_taps: list[int] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        packed: bool = False,
        window_cap: int | None = None,
        by_length: bool = False,
        inline: bool = True,
        value_splits: list[str] | None = None,
        decode_ahead: bool = True,
        native: bool | None = None,
        read_ahead: int = 0,
    ):
        missing = [t for t in taps if t not in cache.taps]
        if missing and load_acts:
            raise ValueError(
                f"the side network needs taps {missing} but cache {cache.url} holds only {cache.taps}; "
                "re-extract with those --layers or choose layers the cache has"
            )
        self.decoder_taps = list(decoder_taps or [])
        dmissing = [t for t in self.decoder_taps if t not in cache.decoder_taps]
        if dmissing and load_acts:
            raise ValueError(
                f"the side decoder needs decoder taps {dmissing} but cache {cache.url} holds {cache.decoder_taps}; "
                "re-extract with --label-words"
            )
        self.dec_rows = int(cache.label_targets["rows"]) if self.decoder_taps else 0
        if not batch_size and not batch_tokens:
            raise ValueError("give a batch size or a token budget")
        if int(memory_budget) <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, not {memory_budget!r}")
        self.cache = cache
        self.view = cache.split(split)
        self.taps = list(taps)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.shuffle = shuffle
        self.window_shards = max(1, window_shards)
        self.seed = seed
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self.device = torch.device(device)
        self.load_acts = load_acts
        self.memory_budget = int(memory_budget)
        # packed: taps handed out as their real rows (side.packed.PackedTap), not padded fp32 grids
        self.packed = bool(packed) and load_acts and not self.decoder_taps
        # the most stored bytes one shuffle window may hold (None: only the budget limits it)
        self.window_limit = int(window_cap) if window_cap else None
        # batches of similar lengths: each window sorted by length (ties at random), cut, batches shuffled
        self.by_length = bool(by_length)
        # batches gathered on the consumer's thread, when asked for, instead of by an assembler thread:
        # measured on 2 cores (MiniLM SST-2 20k, one cached epoch against 15 s of bare side steps),
        # 16-19 s inline against 29-31 s with the assembler thread, whose Python (index arithmetic,
        # one gather call per piece and tap) competed with the training step's own op dispatch
        self.inline = bool(inline)
        # the next window decoded beside the step on the current one's last batch (True), or only once
        # the consumer asks for the batch after it, while the loop waits (False): see ``_batches``
        self.decode_ahead = bool(decode_ahead)
        # directly read frames go through the native frame reader (``native_read``; None: where it is
        # available): on the decode threads with ``decode_ahead``, else on the consumer's thread, over
        # torch's own threads, when it asks for the window's first batch (``_batches``)
        self.native_read = native_read.module() is not None if native is None else \
            bool(native) and native_read.module() is not None
        self.offsets = self.view.offsets
        self.lengths = np.diff(self.offsets)
        self.labels = self.view.labels
        self.input_ids = self.view.input_ids
        self.token_types = self.view.token_type_ids
        self.stats = ReaderStats()
        self.accounting = ByteAccounting(self.memory_budget)
        self.idle_cap = self.memory_budget // IDLE_SHARE  # see ``_after_decode``
        # examples whose first row lies in shard s form read unit s (a contiguous example range)
        starts = self.offsets[:-1]
        unit_of = starts // self.view.shard_tokens
        self.units = [np.flatnonzero(unit_of == s) for s in range(self.view.num_shards)]
        # where the tap values come from: the split itself, or splits of the same rows (its dropout
        # draws, ``pipeline.cache.draws``) that the epochs take in turn
        self.value_splits = list(value_splits or [split])
        self._open_arrays()
        self.layout = self._layout()
        # each window's rows laid out in batch order as they are decoded, so each batch is a view of its
        # window and nothing is gathered (``_decode_window_scattered``): where the consumer decodes
        # natively, batches may be views, and what such windows keep beside the step (a chunk scratch
        # per decode thread, a window's last batch where it is gathered) fits in 1/SCATTER_SHARE of the budget. (On
        # the 7B shape at 128 MB @ 128 tokens, whose batches are mostly one example and views already,
        # they took the reader's peak from 115 to 127 MB.) A run-time choice: the layout budgets the chunk
        # scratch for every reader of directly read taps, so the plan depends on none of this
        self._scatters = (self.native_read and not self.decode_ahead and self._may_view(self.inline)
                          and self._direct_taps() and self.workers * self._scratch_sizes()[1] +
                          self.layout.batch_bound <= self.memory_budget // SCATTER_SHARE)
        self._pieces_cache: list[Piece] | None = None
        # the next window's frames read ahead with O_DIRECT while the steps run (``train.prefetch``): for
        # windows in batch order only (their frames are decoded by the consumer), in what the budget's
        # shares leave over, at most ``read_ahead`` bytes
        spare = self.memory_budget - (self.layout.transient_bytes + self.layout.window_bytes + self.layout.batch_bytes)
        self.read_ahead = max(0, min(int(read_ahead), spare)) if self._scatters else 0

    @property
    def num_examples(self) -> int:
        return self.view.num_examples

    @property
    def peak_bytes(self) -> int:
        return self.accounting.peak_total

    # -- shapes and budget -------------------------------------------------------------------------
    def _open_arrays(self) -> None:
        spec = self.cache.spec
        self.hidden = self.cache.hidden_size
        self._itemsize = np.dtype(spec.storage_dtype).itemsize
        self._has_scale = spec.has_scale
        views = [self.cache.split(s) for s in self.value_splits]
        for v in views:
            if v.num_shards != self.view.num_shards or v.shard_tokens != self.view.shard_tokens or \
                    not np.array_equal(v.offsets, self.offsets):
                raise CacheError(f"split {v.name} of {self.cache.url} does not hold the rows of split "
                                 f"{self.view.name}: re-extract the cache")
        self._values = [self._value_arrays(v) for v in views]
        self._acts, self._scales, self._dec, self._dec_scales = self._values[0]

    def _value_arrays(self, view) -> tuple[list, list, list, list]:
        """(taps, their scales, decoder taps, their scales) of ``view``: (zarr array, DirectArray | None) each."""
        acts: list[tuple] = []
        scales: list[tuple] = []
        dec: list[tuple] = []
        dec_scales: list[tuple] = []
        if not self.load_acts:
            return acts, scales, dec, dec_scales
        direct = self.cache.direct_reads

        def pair(arr):
            return arr, (DirectArray.for_array(arr) if direct else None)

        for t in self.taps:
            acts.append(pair(view.tap_array(t)))
            if self._has_scale:
                scales.append(pair(view.scale_array(t)))
        for t in self.decoder_taps:
            dec.append((view.decoder_array(t), None))
            if self._has_scale:
                dec_scales.append((view.decoder_array(t, scale=True), None))
        return acts, scales, dec, dec_scales

    @property
    def dropout_draws(self) -> int:
        """How many splits other than its own the reader takes tap values from (its dropout draws)."""
        return 0 if self.value_splits == [self.view.name] else len(self.value_splits)

    def values_split(self, epoch: int) -> str:
        """The split whose tap values epoch ``epoch`` reads."""
        return self.value_splits[epoch % len(self.value_splits)]

    def _tap_row_bytes(self) -> int:
        """Stored bytes of one row of one tap (values, plus its int8 scale)."""
        return self.hidden * self._itemsize + (4 if self._has_scale else 0)

    @staticmethod
    def _job_bytes(arr, direct: DirectArray | None, row_axis: int) -> int:
        """Most transient bytes one chunk-sized read job of this array holds."""
        if direct is not None:
            return direct.max_read_bytes()
        chunk = arr.chunks
        n = int(np.prod(chunk, dtype=np.int64)) * np.dtype(arr.dtype.to_native_dtype()
                                                            if hasattr(arr.dtype, "to_native_dtype") else arr.dtype).itemsize
        return 3 * n + FRAME_OVERHEAD  # Zarr: compressed frame, decoded chunk, the slice it returns

    def _chunk_rows(self, arr, direct: DirectArray | None, row_axis: int) -> int:
        return direct.chunk_rows if direct is not None else int(arr.chunks[row_axis])

    def _tap_nbytes(self, rows: int) -> int:
        """Bytes of ``rows`` token rows of every requested tap, as a batch hands them out."""
        K = len(self.taps) if self.load_acts else 0
        return self._handed_row_bytes() * K * rows

    def _gathered_nbytes(self, real: int) -> int:
        """Bytes of a packed batch's taps (``real`` token rows), which go to the gather buffers."""
        return self._tap_nbytes(real) if self.packed else 0

    def _gather_capacity(self, plan: list[Window]) -> int:
        """Bytes of one tap of the plan's longest packed batch: the gather buffers map this much at once,
        so a longer batch than any before it grows into pages already mapped (a replacement buffer would
        fault in again every page the one it replaces held)."""
        if not (self.packed and self.load_acts):
            return 0
        rows = max((int(self.lengths[idx].sum()) for w in plan for idx in w.batches), default=0)
        return self._handed_row_bytes() * rows

    def _window_buffer_capacity(self, plan: list[Window]) -> int:
        """Bytes of the plan's largest window buffer (one piece's rows of one tap, or of one decoder
        tap; a whole window's rows of one tap where windows are laid out in batch order): the window
        buffers map this much each, so any freed one can serve any later request."""
        if not self.load_acts:
            return 0
        pieces = [p for w in plan for p in w.pieces]
        if self._scatters:
            rows = max((sum(p.r1 - p.r0 for p in w.pieces) for w in plan), default=0)
        else:
            rows = max((p.r1 - p.r0 for p in pieces), default=0)
        dec_rows = max(((p.e1 - p.e0) * self.dec_rows for p in pieces), default=0)
        per_row = [self._store_dtype(a).itemsize * self.hidden for a, _ in self._acts]
        per_dec = [self._store_dtype(a).itemsize * self.hidden for a, _ in self._dec]
        return max([rows * b for b in per_row] + [dec_rows * b for b in per_dec] + [4 * max(rows, dec_rows)])

    def _handed_row_bytes(self) -> int:
        """Bytes of one token row of one tap as a batch hands it out: fp32 values in a padded batch; in
        a packed one the store's dtype, plus each row's float32 scale for int8 codes (``PackedTap.scale``).
        A packed tap's gather buffer holds both, the scales after the codes at a 4-byte boundary
        (``_gather_tap``)."""
        if not self.packed:
            return 4 * self.hidden
        return self._itemsize * self.hidden + (4 if self._has_scale else 0)

    def _batch_nbytes(self, B: int, L: int, real: int | None = None) -> int:
        """Bytes of a batch of B examples padded to L (``real`` token rows when packed)."""
        Kd = len(self.decoder_taps) if self.load_acts else 0
        rows = real if self.packed and real is not None else B * L
        packed_index = 8 * rows if self.packed else 0
        return (self._tap_nbytes(rows) + 4 * self.hidden * Kd * B * self.dec_rows
                + META_BYTES_PER_TOKEN * B * L + 8 * B + packed_index)

    def _layout(self) -> ReaderLayout:
        K = len(self.taps) if self.load_acts else 0
        Kd = len(self.decoder_taps) if self.load_acts else 0
        rb = self._tap_row_bytes()
        # Windows and pieces are planned in the cache's whole stored row (every tap, whatever this
        # reader reads), so readers of different taps, or of none (live LST, full fine-tuning), plan
        # the same batches; their reservations are then upper bounds of what they decode.
        self._row_bytes = len(self.cache.taps) * rb  # plan units: per token row
        plan_dec_rows = int(self.cache.label_targets["rows"]) if self.cache.decoder_taps else 0
        self._ex_dec_bytes = len(self.cache.decoder_taps) * plan_dec_rows * rb  # plan units: per example
        self._mem_row_bytes = K * rb  # what is really decoded: per token row
        self._mem_ex_dec_bytes = Kd * self.dec_rows * rb  # ... per example
        lens = self.lengths
        max_len = int(lens.max()) if len(lens) else 1
        min_len = max(1, int(lens.min())) if len(lens) else 1
        if self.batch_tokens:
            b_max = max(1, self.batch_tokens // min_len)
            if self.batch_size:
                b_max = min(b_max, self.batch_size)
            tokens_max = min(b_max * max_len, max(self.batch_tokens, max_len))
        else:
            b_max = self.batch_size
            tokens_max = b_max * max_len
        b_max = min(b_max, max(1, len(lens)))
        tokens_max = max(tokens_max, max_len)
        if self.packed:  # real rows of the largest batch: the b_max longest examples, at most tokens_max
            real_max = min(tokens_max, int(np.sort(lens)[::-1][:b_max].sum())) if len(lens) else tokens_max
            batch_bound = ((self._handed_row_bytes() * K + 8) * real_max
                           + META_BYTES_PER_TOKEN * tokens_max + 8 * b_max)
        else:
            batch_bound = (4 * self.hidden * (K * tokens_max + Kd * b_max * self.dec_rows)
                           + META_BYTES_PER_TOKEN * tokens_max + 8 * b_max)
        window_min = tokens_max * self._mem_row_bytes + b_max * self._mem_ex_dec_bytes  # memory
        plan_min = tokens_max * self._row_bytes + b_max * self._ex_dec_bytes  # the same rows, plan units
        jobs = [self._job_bytes(a, d, 0) for a, d in self._acts + self._scales if d is None] + \
               [self._job_bytes(a, d, 1) for a, d in self._dec + self._dec_scales]
        direct = [d for _, d in self._acts + self._scales if d is not None]
        if direct:  # a decode thread's scratch (kept all epoch) plus the shard index a read job holds
            jobs.append(self._scratch_bytes() + max(2 * d.index_nbytes for d in direct))
        job = max(jobs) if jobs else 0
        min_budget = job + batch_bound + window_min
        M = self.memory_budget
        if M < min_budget:
            need = math.ceil(min_budget / MB)
            what = f"{K} taps" + (f" and {Kd} decoder taps" if Kd else "")
            shape = (f"{tokens_max} padded tokens" if self.batch_tokens else f"{b_max} examples x {max_len} tokens")
            raise CacheError(
                f"--reader-memory {format_size(M)} cannot hold one batch of split {self.view.name}: a padded fp32 "
                f"batch of {what} (d {self.hidden}, up to {shape}) takes {format_size(batch_bound)}, its source rows "
                f"as stored {format_size(window_min)} and one chunk being decoded {format_size(job)}; "
                f"give --reader-memory {need}MB or more, or a smaller --batch-tokens/--batch-size"
            )
        workers = self.workers
        while workers > 1 and workers * job + batch_bound + window_min > M:
            workers -= 1
        transient = workers * job
        avail = M - transient
        unit_bytes = self._unit_bytes()
        top = sorted(range(len(unit_bytes)), key=lambda u: -unit_bytes[u])[: self.window_shards]
        w_full = int(sum(unit_bytes[u] for u in top))  # plan units
        w_full_mem = int(sum(self._mem_bytes_of(self._unit_piece(u, int(self.units[u][0]), int(self.units[u][-1]) + 1))
                             for u in top if len(self.units[u])))
        q_target = self.prefetch * batch_bound
        limit = self.window_limit
        if avail >= w_full_mem + batch_bound and (limit is None or w_full <= limit):
            mode = "shards"
            batch_bytes = min(q_target, avail - w_full_mem)
            window_bytes = avail - batch_bytes
            cap, piece_cap = w_full, w_full
        else:
            mode = "bytes"
            batch_bytes = max(batch_bound, min(q_target, avail // 4))
            if avail - batch_bytes < window_min:
                batch_bytes = batch_bound
            window_bytes = avail - batch_bytes
            cap_mem = window_bytes // 2 if window_bytes // 2 >= window_min else window_bytes
            # the memory share in plan units (the same token rows of every tap of the cache)
            cap = self._to_plan(cap_mem, default=max(w_full, plan_min))
            if limit is not None and cap > max(limit, plan_min):
                # a shuffle window smaller than the budget allows, and one at a time: the next window
                # decodes as soon as the last batch of this one is queued, while the queue drains
                # (a 64 MB window decodes in ~30 ms against ~1 s of queued steps)
                cap = max(limit, plan_min)
                window_bytes = min(window_bytes, max(window_min, self._to_mem(cap)))
            chunk_min = MIN_PIECE_CHUNKS * self._plan_chunk_rows() * self._row_bytes
            piece_cap = min(cap, max(cap // self.window_shards, chunk_min))
        return ReaderLayout(budget=M, mode=mode, workers=workers, transient_bytes=transient,
                            window_bytes=window_bytes, batch_bytes=batch_bytes, batch_bound=batch_bound,
                            window_cap=cap, piece_cap=piece_cap, row_bytes=self._row_bytes, min_budget=min_budget,
                            window_min=window_min)

    def _to_plan(self, mem: int, default: int) -> int:
        """Memory bytes of requested rows as plan bytes of the same rows (``default`` if nothing is decoded)."""
        return int(mem * self._row_bytes / self._mem_row_bytes) if self._mem_row_bytes else default

    def _to_mem(self, plan: int) -> int:
        return math.ceil(plan * self._mem_row_bytes / self._row_bytes) if self._row_bytes else 0

    def _mem_bytes_of(self, p: Piece) -> int:
        """Bytes a piece really decodes (the requested taps only)."""
        return (p.r1 - p.r0) * self._mem_row_bytes + (p.e1 - p.e0) * self._mem_ex_dec_bytes

    def window_mem_bytes(self, w: Window) -> int:
        return sum(self._mem_bytes_of(p) for p in w.pieces)

    def _plan_chunk_rows(self) -> int:
        """Inner-chunk rows of the cache's taps (all taps of a store share one chunking)."""
        if self._acts:
            return min(self._chunk_rows(a, d, 0) for a, d in self._acts)
        if not self.cache.taps:
            return 1
        arr = self.view.tap_array(self.cache.taps[0])
        return self._chunk_rows(arr, DirectArray.for_array(arr) if self.cache.direct_reads else None, 0)

    def _ex_bytes(self, e0: int, e1: int) -> int:
        return int(self.offsets[e1] - self.offsets[e0]) * self._row_bytes + (e1 - e0) * self._ex_dec_bytes

    def _unit_bytes(self) -> list[int]:
        return [self._ex_bytes(int(u[0]), int(u[-1]) + 1) if len(u) else 0 for u in self.units]

    def _unit_piece(self, u: int, e0: int, e1: int) -> Piece:
        first = int(self.units[u][0])
        return Piece(u, e0, e1, int(self.offsets[e0]), int(self.offsets[e1]), (e0 - first) * self.dec_rows,
                     self._ex_bytes(e0, e1))

    def _pieces(self) -> list[Piece]:
        """Bytes mode: every unit cut into consecutive pieces of at most ``piece_cap`` bytes."""
        if self._pieces_cache is None:
            cap = self.layout.piece_cap
            out = []
            for u, ex in enumerate(self.units):
                if not len(ex):
                    continue
                e_first, e_end = int(ex[0]), int(ex[-1]) + 1
                total = self._ex_bytes(e_first, e_end)
                parts = max(1, math.ceil(total / cap)) if cap else 1
                target = total / parts
                cum = (np.diff(self.offsets[e_first:e_end + 1]) * self._row_bytes + self._ex_dec_bytes).cumsum()
                e0 = e_first
                while e0 < e_end:
                    base = int(cum[e0 - e_first - 1]) if e0 > e_first else 0
                    # the last example that keeps the piece within the cap and (softly) the target
                    hard = int(np.searchsorted(cum, base + cap, side="right")) + e_first
                    soft = int(np.searchsorted(cum, base + target - 0.5, side="left")) + e_first + 1
                    e1 = max(e0 + 1, min(hard, soft, e_end))
                    out.append(self._unit_piece(u, e0, e1))
                    e0 = e1
            self._pieces_cache = out
        return self._pieces_cache

    # -- planning --------------------------------------------------------------------------------
    def plan_epoch(self, epoch: int) -> list[Window]:
        """The epoch's windows (each unpacks as ``(units, [example indices per batch])``); pure in
        (seed, epoch, budget, shapes)."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        if self.layout.mode == "shards":
            order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
            for w in range(0, len(order), self.window_shards):
                units = [int(u) for u in order[w : w + self.window_shards] if len(self.units[u])]
                if not units:
                    continue
                pieces = [self._unit_piece(u, int(self.units[u][0]), int(self.units[u][-1]) + 1) for u in units]
                plan.append(self._window(rng, units, pieces))
            return plan
        pieces = self._pieces()
        order = rng.permutation(len(pieces)) if self.shuffle else np.arange(len(pieces))
        cur: list[Piece] = []
        size = 0
        for i in order:
            p = pieces[int(i)]
            if cur and size + p.nbytes > self.layout.window_cap:
                plan.append(self._window(rng, sorted({q.unit for q in cur}), cur))
                cur, size = [], 0
            cur.append(p)
            size += p.nbytes
        if cur:
            plan.append(self._window(rng, sorted({q.unit for q in cur}), cur))
        return plan

    def _window(self, rng: np.random.Generator, units: list[int], pieces: list[Piece]) -> Window:
        ex = np.concatenate([np.arange(p.e0, p.e1) for p in pieces])
        if self.shuffle:
            ex = ex[rng.permutation(len(ex))]
        by_length = self.shuffle and self.by_length
        if by_length:  # a stable sort of the shuffled window: equal lengths stay in random order
            ex = ex[np.argsort(self.lengths[ex], kind="stable")]
        batches = self._cut(ex)
        if by_length:  # then the batches are shuffled, so lengths do not come in order either
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return Window(units, batches, pieces, sum(p.nbytes for p in pieces))

    def _cut(self, ex: np.ndarray) -> list[np.ndarray]:
        if self.batch_tokens is None:
            return [ex[i : i + self.batch_size] for i in range(0, len(ex), self.batch_size)]
        out, cur, longest = [], [], 0
        for i in ex:
            longest2 = max(longest, int(self.lengths[i]))
            if cur and (longest2 * (len(cur) + 1) > self.batch_tokens or
                        (self.batch_size and len(cur) >= self.batch_size)):
                out.append(np.array(cur))
                cur, longest2 = [], int(self.lengths[i])
            cur.append(int(i))
            longest = longest2
        if cur:
            out.append(np.array(cur))
        return out

    def num_batches(self, epoch: int = 0) -> int:
        return sum(len(w.batches) for w in self.plan_epoch(epoch))

    # -- decoding --------------------------------------------------------------------------------
    def _track(self, encoded: int, scratch: int):
        acc = self.accounting

        @contextmanager
        def both():
            acc.add("encoded", encoded)
            acc.add("scratch", scratch)
            try:
                yield
            finally:
                acc.sub("encoded", encoded)
                acc.sub("scratch", scratch)

        return both()

    def _read_job(self, run: _Run, arr, direct: DirectArray | None, lead: tuple, r0: int, r1: int,
                  out: np.ndarray) -> None:
        """Rows [r0, r1) of an array into ``out``: a piece's whole range of a directly read array
        (``read_into`` goes a chunk at a time), else rows within one inner chunk (through Zarr)."""
        if run.stopped:
            return
        c0 = time.thread_time()
        try:
            if direct is not None and self.native_read:
                tasks = FrameTasks()
                try:
                    with self._track(2 * direct.index_nbytes, 0):
                        direct.frame_tasks(r0, r1, out, tasks)
                    self._scratch(run).decode(tasks)
                finally:
                    tasks.close()
                return
            if direct is not None:
                direct.read_into(r0, r1, out, track=self._track, scratch=self._scratch(run))
                return
            with self._track(0, self._job_bytes(arr, None, len(lead))):  # Zarr's own buffers, estimated
                out[...] = arr[(*lead, slice(r0, r1))]
        finally:
            self.stats.add_cpu(time.thread_time() - c0)

    def _scratch_sizes(self) -> tuple[int, int, int]:
        """(frame, chunk, block) bytes of one decode thread's read scratch: the largest compressed frame,
        decoded inner chunk and Blosc block the decode threads read directly."""
        direct = [d for _, d in self._acts + self._scales if d is not None]
        chunk = max((d.chunk_nbytes for d in direct), default=0)
        block = max((d.block_nbytes() for d in direct), default=0)
        return chunk + FRAME_OVERHEAD, chunk, block

    def _direct_taps(self) -> bool:
        """Whether every tap this reader reads is read directly (``DirectArray``), int8 scales included."""
        return bool(self._acts) and all(d is not None for _, d in self._acts + self._scales)

    def _scratch_bytes(self) -> int:
        """One decode thread's scratch (or one slot of the consumer's ``FrameReader``) as budgeted: with a
        decoded chunk's room for windows in batch order wherever taps are read directly, whether or not
        this reader lays windows out so (``_scatters``) and the native reader is here, so that readers of
        the same cache plan the same batches on any machine, packed or padded."""
        frame, chunk, block = self._scratch_sizes()
        return ReadScratch.sizes(frame, chunk, block) + (chunk if self._direct_taps() else 0)

    def _scratch(self, run: _Run, consumer: bool = False):
        """This decode thread's read scratch (a ``ReadScratch``, or a one-slot ``FrameReader`` where
        reads are native), or with ``consumer`` the consumer's ``FrameReader`` (a slot per decode
        thread, at most torch's thread count), sized once for the largest frame and chunk (accounted
        as held until it is released, at the epoch's end or after a decode past the idle cap,
        ``_after_decode``: the ``encoded`` and ``scratch`` bytes a read job used to take). A slot holds
        what one decode thread's scratch does, so the layout's ``transient`` bytes cover either."""
        key = _CONSUMER if consumer else threading.get_ident()
        sc = run.scratches.get(key)
        if sc is None:
            frame, chunk, block = self._scratch_sizes()
            if consumer:
                sc = native_read.FrameReader(max(1, min(self.layout.workers, torch.get_num_threads())), frame, block,
                                             chunk if self._scatters else 0)
            elif self.native_read:
                sc = native_read.FrameReader(1, frame, block)
            else:
                sc = ReadScratch(frame_bytes=frame, chunk_bytes=chunk, block_bytes=block)
            self.accounting.add("scratch", sc.nbytes)
            with run.cond:
                run.scratches[key] = sc
        return sc

    def _decode_frames(self, run: _Run, dw: _Decoded) -> None:
        """The consumer decodes the window's pending frames (``_Decoded.frames``) on torch's threads."""
        tasks, dw.frames = dw.frames, None
        if tasks is None:
            return
        c0 = time.process_time()  # the call's threads are torch's: all of the process's CPU meanwhile
        try:
            self._scratch(run, consumer=True).decode(tasks)
        finally:
            tasks.close()
            self.stats.add_cpu(time.process_time() - c0)
        self._after_decode(run, consumer=True)
        self._read_ahead(run, dw.next_window)

    def _release_scratches(self, run: _Run, consumer: bool | None = None) -> None:
        """Free the run's read scratches: all of them (``consumer`` None, once no thread reads), or only
        the consumer's (True) or only the decode threads' (False). Each side frees only its own while the
        other may be decoding: the decode loop once freed the consumer's reader (its c-blosc2 contexts)
        in the middle of the consumer's decode, a use after free."""
        with run.cond:
            mine = [k for k in run.scratches if consumer is None or (k == _CONSUMER) == consumer]
            gone = [run.scratches.pop(k) for k in mine]
        for sc in gone:
            sc.close()
            self.accounting.sub("scratch", sc.nbytes)

    def _decode_window(self, window: Window, pool: ThreadPoolExecutor, run: _Run) -> _Decoded:
        dw = _Decoded(window)
        if not self.load_acts:
            return dw
        if self._scatters:
            return self._decode_window_scattered(dw, run)
        jobs = []
        acc = self.accounting
        # the consumer decodes the directly read frames when it reaches the window (``_batches``)
        frames = FrameTasks() if self.native_read and not self.decode_ahead else None

        # the window's buffers, in order: (shape, dtype, (array, direct reader, lead, first row, row axis),
        # the list its tensor joins, how the tensor is made); taken from the pool all at once below
        wanted = []

        def want(shape, dtype, arr, direct, lead, r0, row_axis, into: list, tensor) -> None:
            wanted.append((shape, np.dtype(dtype), (arr, direct, lead, r0, row_axis), into, tensor))

        def split(arr, direct, lead, r0, r1, out, row_axis):
            if direct is not None and frames is not None:
                with self._track(2 * direct.index_nbytes, 0):
                    direct.frame_tasks(r0, r1, out, frames)
                return
            if direct is not None:
                # one job for the range: ``read_into`` goes a chunk at a time through the thread's scratch
                # and reads each shard's index once (chunk-sized jobs spent ~40 us of Python each, under
                # the GIL, on opening the shard and reading its index again)
                jobs.append((arr, direct, lead, r0, r1, out))
                return
            step = self._chunk_rows(arr, direct, row_axis)
            a = r0
            while a < r1:
                b = min(r1, (a // step + 1) * step)
                jobs.append((arr, direct, lead, a, b, out[a - r0:b - r0]))
                a = b

        try:
            # every buffer of the window is asked of the pool at once (``take_all``), and read into after
            for p in window.pieces:
                n = p.r1 - p.r0
                vals, scales = [], []
                for k, (arr, direct) in enumerate(self._acts):
                    want((n, self.hidden), self._store_dtype(arr), arr, direct, (), p.r0, 0, vals, self._as_tensor)
                    if self._has_scale:
                        sarr, sdirect = self._scales[k]
                        want((n,), np.float32, sarr, sdirect, (), p.r0, 0, scales, torch.from_numpy)
                dvals, dscales = [], []
                dn = (p.e1 - p.e0) * self.dec_rows
                for k, (arr, _) in enumerate(self._dec):
                    want((dn, self.hidden), self._store_dtype(arr), arr, None, (p.unit,), p.d0, 1, dvals,
                         self._as_tensor)
                    if self._has_scale:
                        sarr, _ = self._dec_scales[k]
                        want((dn,), np.float32, sarr, None, (p.unit,), p.d0, 1, dscales, torch.from_numpy)
                dw.vals.append(vals)
                dw.scales.append(scales)
                dw.dvals.append(dvals)
                dw.dscales.append(dscales)
            sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype, *_ in wanted]
            for buf, nbytes, (shape, dtype, (arr, direct, lead, r0, row_axis), into, tensor) in zip(
                    run.pool.take_all(sizes), sizes, wanted):
                dw.buffers.append(buf)
                acc.add("window", nbytes)
                dw.nbytes += nbytes
                out = buf[:nbytes].view(dtype).reshape(shape)
                split(arr, direct, lead, r0, r0 + shape[0], out, row_axis)
                into.append(tensor(out))
            futures = [pool.submit(self._read_job, run, *j) for j in jobs]
            wait_futures(futures)
            for f in futures:
                f.result()
            dw.frames = frames
        except BaseException:
            if frames is not None:
                frames.close()
            self._free_window(run, dw)
            raise
        return dw

    def _decode_window_scattered(self, dw: _Decoded, run: _Run) -> _Decoded:
        """The window's buffers (one per tap, its rows in batch order) and the frame tasks that decode
        into them (``dw.frames``, run by the consumer): each example's rows land where its batch wants
        them, so batch i is rows [start_i, start_i + its rows) of every tap, a view. Decoding a chunk
        into scratch and copying its rows out costs the decode threads a copy from cache, where a
        gather per batch read every row back from memory on the training thread (~0.3 s an epoch of
        cached MiniLM SST-2). An int8 cache's scales are laid out the same way, from their own arrays'
        frames (a shard's scales are one small chunk, decoded once a window; never read ahead)."""
        batches = dw.window.batches
        order = self._batch_order(dw.window)
        _, _, dst, rows = order
        bounds = np.cumsum([0] + [len(b) for b in batches])
        dw.batch_locs = [(np.zeros(len(b), np.int64), dst[bounds[i]:bounds[i + 1]], None)
                         for i, b in enumerate(batches)]
        dtype = self._store_dtype(self._acts[0][0])
        nbytes = rows * self.hidden * dtype.itemsize
        K = len(self._acts)
        sizes = [nbytes] * K + [4 * rows] * len(self._scales)
        frames = FrameTasks()
        try:
            listed = run.prefetch.listed(dw.window) if run.prefetch is not None else None
            if listed is None:  # not read ahead (the epoch's first window, or read-ahead off): list it now
                with self._track(2 * self._acts[0][1].index_nbytes, 0):
                    listed = self._window_frames(dw.window, frames, order)
            self.stats.read_ahead_frames += listed.placed
            self.stats.page_cache_frames += listed.in_page_cache
            vals, scales = [], []
            for buf, n in zip(run.pool.take_all(sizes), sizes):
                dw.buffers.append(buf)
                self.accounting.add("window", n)
                dw.nbytes += n
            for k, (arr, direct) in enumerate(self._acts):
                out = dw.buffers[k][:nbytes].view(dtype).reshape(rows, self.hidden)
                direct.scatter_tasks(listed.segs, out, frames, listed.found[k], listed.copies[k])
                vals.append(self._as_tensor(out))
            if self._scales:
                segs = self._segments(order, self._scales[0][1].chunk_rows)
                for k, (_, direct) in enumerate(self._scales):
                    out = dw.buffers[K + k][:4 * rows].view(np.float32)
                    direct.scatter_tasks(segs, out, frames)
                    scales.append(torch.from_numpy(out))
            dw.vals, dw.scales, dw.dvals, dw.dscales = [vals], [scales], [[]], [[]]
            dw.frames = frames
        except BaseException:
            frames.close()
            self._free_window(run, dw)
            raise
        return dw

    def _batch_order(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """A window's examples in batch order, their lengths, their first rows in the window, its rows."""
        batches = window.batches
        order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        lens = self.lengths[order].astype(np.int64)
        return order, lens, np.cumsum(lens) - lens, int(lens.sum())

    def _window_frames(self, window: Window, files: FrameTasks | None = None,
                       batch_order: tuple | None = None) -> WindowFrames:
        """The frames a window in batch order decodes, listed from the shard indexes (``files``: the
        decode's own, which then keeps their descriptors and indexes; ``batch_order``: the window's
        ``_batch_order``, where the caller has it already)."""
        order = batch_order if batch_order is not None else self._batch_order(window)
        return WindowFrames(self._segments(order, self._acts[0][1].chunk_rows),
                            [direct for _, direct in self._acts], files)

    def _segments(self, batch_order: tuple, chunk_rows: int) -> Segments:
        """A window's runs of rows in batch order (its ``_batch_order``), cut at ``chunk_rows``-row chunks."""
        examples, lens, dst, _ = batch_order
        return Segments(self.offsets[examples], lens, dst, chunk_rows)

    def _read_ahead(self, run: _Run, window: Window | None) -> None:
        """Start reading ``window``'s frames into the run's read-ahead buffer (mapped, and counted, at
        the first window)."""
        if window is None or not self.read_ahead:
            return
        if run.prefetch is None:
            run.prefetch = FramePrefetch(self.read_ahead)
            self.accounting.add("prefetch", run.prefetch.nbytes)
        run.prefetch.start(window, lambda: self._window_frames(window))

    @staticmethod
    def _store_dtype(arr) -> np.dtype:
        dt = arr.dtype
        return np.dtype(dt.to_native_dtype() if hasattr(dt, "to_native_dtype") else dt)

    def _as_tensor(self, buf: np.ndarray) -> torch.Tensor:
        """Stored values as a tensor without widening (bf16 bits viewed as torch.bfloat16)."""
        if self.cache.codec == "bf16":
            return C.to_bf16_tensor(buf)
        return torch.from_numpy(buf)

    def _free_window(self, run: _Run, dw: _Decoded) -> bool:
        """Hand the window's buffers back to the pool; whether a batch handed out as a view of one of them
        is still held (that buffer then leaves the pool: it is never decoded into again)."""
        if dw.frames is not None:  # never decoded (the epoch stopped first)
            dw.frames.close()
            dw.frames = None
        n = dw.nbytes
        dw.vals = dw.scales = dw.dvals = dw.dscales = []
        buffers, dw.buffers = dw.buffers, []
        dw.nbytes = 0
        self.accounting.sub("window", n)
        kept = False
        while buffers:  # after the window's accounting: the pool counts them from here on
            buf = buffers.pop()
            # a batch handed out as a view of the buffer (``_one_run``) that its consumer kept still reads it
            shared = sys.getrefcount(buf) > _WINDOW_BUFFER_REFS
            kept |= shared
            run.pool.give(buf, shared)
            del buf
        with run.cond:
            run.window_held -= self.window_mem_bytes(dw.window)
            run.windows -= 1
            run.cond.notify_all()
        return kept

    # -- assembling ------------------------------------------------------------------------------
    def _assemble(self, idx: np.ndarray, locs=None, window: _Decoded | None = None,
                  gather: GatherBuffers | None = None, view: tuple[int, int] | None = None) -> Batch:
        """One padded batch; taps gathered from a decoded window when one is given (ids only otherwise),
        a packed batch's into ``gather``'s buffers when given (``_gathered_nbytes`` of them), or, with
        ``view`` (``_one_run``'s piece and first row), a packed batch's taps as views of the window."""
        lens = self.lengths[idx]
        L = int(lens.max())
        B = len(idx)
        pos = np.arange(L)[None, :]
        valid = pos < lens[:, None]
        starts = self.offsets[idx][:, None] + pos  # global rows
        ids = np.where(valid, self.input_ids[np.minimum(starts, len(self.input_ids) - 1)], 0)
        tt = None
        if self.token_types is not None:
            tt = torch.from_numpy(np.where(valid, self.token_types[np.minimum(starts, len(self.token_types) - 1)], 0).astype(np.int64))
        taps = dec = None
        if window is not None and self.load_acts:
            if self.packed:
                return self._assemble_packed(idx, locs, window, ids, valid, tt, gather, view)
            piece, row, drow = locs
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            taps = []
            for k in range(len(self.taps)):
                out = torch.zeros((B, L, self.hidden), dtype=torch.float32, pin_memory=pin)
                for b in range(B):
                    j, r, n = int(piece[b]), int(row[b]), int(lens[b])
                    dst = out[b, :n]
                    dst.copy_(window.vals[j][k][r:r + n])
                    if self._has_scale:
                        dst.mul_(window.scales[j][k][r:r + n].unsqueeze(1))
                taps.append(out)
            if self.decoder_taps:
                D = self.dec_rows
                dec = []
                for k in range(len(self.decoder_taps)):
                    out = torch.empty((B, D, self.hidden), dtype=torch.float32, pin_memory=pin)
                    for b in range(B):
                        j, r = int(piece[b]), int(drow[b])
                        out[b].copy_(window.dvals[j][k][r:r + D])
                        if self._has_scale:
                            out[b].mul_(window.dscales[j][k][r:r + D].unsqueeze(1))
                    dec.append(out)
        return Batch(
            index=idx, input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
            labels=torch.from_numpy(np.asarray(self.labels[idx])), taps=taps, token_type_ids=tt, dec_taps=dec,
        )

    def _gather_tap(self, k: int, N: int, groups: list, window: _Decoded, gather: GatherBuffers | None,
                    span: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tap ``k``'s ``N`` rows of a packed batch, and their int8 scales (else None), gathered from the
        window's pieces (``groups``: piece, source rows, grid positions) into ``gather``'s buffer for
        the tap (the scales after the codes), or fresh tensors. ``span``: the rows are one run of one
        piece (``_one_run``), copied as a slice (a window in batch order's last batch: 7 index_selects
        of it took ~1.7 ms a window)."""
        dtype = window.vals[groups[0][0]][k].dtype
        nbytes = N * self.hidden * dtype.itemsize
        at = -(-nbytes // 4) * 4  # the scales' offset in the buffer
        scaled = self._has_scale
        if gather is None:
            out = torch.empty((N, self.hidden), dtype=dtype)
            scale = torch.empty(N, dtype=torch.float32) if scaled else None
        else:
            buf = torch.from_numpy(gather.take(k, at + 4 * N if scaled else nbytes))
            out = buf[:nbytes].view(dtype).view(N, self.hidden)
            scale = buf[at:at + 4 * N].view(torch.float32) if scaled else None
        if span is not None:
            j, r0 = span
            out.copy_(window.vals[j][k][r0:r0 + N])
            if scaled:
                scale.copy_(window.scales[j][k][r0:r0 + N])
            return out, scale
        o = 0
        for j, src, _ in groups:
            n = len(src)
            torch.index_select(window.vals[j][k], 0, src, out=out[o:o + n])
            if scaled:
                torch.index_select(window.scales[j][k], 0, src, out=scale[o:o + n])
            o += n
        return out, scale

    def _may_view(self, inline: bool) -> bool:
        """Whether batches may be views of their window: packed store-dtype rows (int8 codes with views
        of their scales) handed out by an inline reader, whose consumer is done with a batch when it
        asks for the next."""
        return inline and self.packed

    @staticmethod
    def _one_run(piece: np.ndarray, row: np.ndarray, lens: np.ndarray) -> tuple[int, int] | None:
        """(piece, first row) where a packed batch's rows, in its order, are one run of one window
        piece, else None. Such a batch's taps need no gathering: they are rows the window already
        holds. A batch of one example always is one: on a long-sequence cache at a small
        ``--batch-tokens`` most batches are (the 7B-shaped bench at 128 tokens: every example over
        64 tokens is a batch of its own, whose gathered copy was 19 MB of 9 taps at 256 tokens)."""
        if len(piece) == 0 or (piece != piece[0]).any():
            return None
        start = row.astype(np.int64)
        if len(start) > 1 and (start[1:] != start[:-1] + lens[:-1]).any():
            return None
        return int(piece[0]), int(start[0])

    def _assemble_packed(self, idx: np.ndarray, locs, window: _Decoded, ids: np.ndarray, valid: np.ndarray,
                         tt: torch.Tensor | None, gather: GatherBuffers | None,
                         view: tuple[int, int] | None = None) -> Batch:
        """The batch's real rows per tap, in the store's dtype (int8: codes and their scales), plus their flat
        positions in the padded [B, L] grid. Rows are grouped by the window piece they come from and
        gathered with one ``index_select`` per piece and tap (a few per batch, instead of one copy per
        example and tap): the assembler thread then holds the GIL for microseconds, not for the
        hundreds of small copies that slowed the training loop's own Python beside it."""
        from pipeline.side.packed import PackedTap

        piece, row, _ = locs
        lens = self.lengths[idx].astype(np.int64)
        B, L = valid.shape
        N = int(lens.sum())
        groups = []  # (piece, source rows in it, grid positions)
        for j in np.unique(piece):
            g = np.flatnonzero(piece == j)
            ls = lens[g]
            within = np.arange(int(ls.sum()), dtype=np.int64) - np.repeat(np.cumsum(ls) - ls, ls)
            groups.append((int(j), torch.from_numpy(np.repeat(row[g].astype(np.int64), ls) + within),
                           np.repeat(g.astype(np.int64) * L, ls) + within))
        rows = torch.from_numpy(np.concatenate([gp for _, _, gp in groups]))
        if view is not None:  # the rows as the window holds them; the gather buffers' pages go back,
            # except where windows are in batch order (``_scatters``; their last batches may be gathered)
            # and they fit under the idle cap with the read scratch: faulting them in again each window
            # cost a MiniLM epoch ~0.1 s for the one batch they hold (on the 7B shape at 128 MB they are
            # 9 MB, over its 4 MB cap)
            if gather is not None and (not self._scatters or
                                       gather.held + self.accounting.current["scratch"] > self.idle_cap):
                gather.idle()
            j, r0 = view
            taps = [PackedTap(window.vals[j][k][r0:r0 + N], rows, B, L,
                              window.scales[j][k][r0:r0 + N] if self._has_scale else None)
                    for k in range(len(self.taps))]
        else:
            span = self._one_run(piece, row, lens) if len(groups) == 1 else None
            taps = [PackedTap(v, rows, B, L, sc) for v, sc in
                    (self._gather_tap(k, N, groups, window, gather, span) for k in range(len(self.taps)))]
        return Batch(
            index=idx, input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
            labels=torch.from_numpy(np.asarray(self.labels[idx])), taps=taps, token_type_ids=tt, dec_taps=None,
        )

    @staticmethod
    def _locator(window: Window, offsets: np.ndarray, dec_rows: int):
        pieces = sorted(range(len(window.pieces)), key=lambda j: window.pieces[j].e0)
        e0 = np.array([window.pieces[j].e0 for j in pieces])
        r0 = np.array([window.pieces[j].r0 for j in pieces])
        jj = np.array(pieces)

        def locate(idx: np.ndarray):
            s = np.searchsorted(e0, idx, side="right") - 1
            return jj[s], offsets[idx] - r0[s], (idx - e0[s]) * dec_rows

        return locate

    # -- the epoch -------------------------------------------------------------------------------
    def _reserve_window(self, run: _Run, n: int, wait: bool = True) -> bool:
        """Reserve a window of ``n`` bytes; False once the run stopped. ``wait``: until the windows held
        leave room (the decode loop), else it must fit now (the consumer, which has freed its window)."""
        with run.cond:
            while not run.stopped and (run.window_held + n > self.layout.window_bytes
                                       or run.windows >= MAX_WINDOWS_IN_FLIGHT):
                if not wait:
                    raise RuntimeError(f"a {n}-byte window does not fit beside {run.window_held} bytes of "
                                       f"{run.windows} windows held: the consumer frees each before the next")
                run.cond.wait()
            if run.stopped:
                return False
            run.window_held += n
            run.windows += 1
            return True

    def _reserve_batch(self, run: _Run, n: int, kept: int = 0) -> bool:
        """Wait for room for a batch of ``n`` bytes; ``kept`` of them will live in the gather buffers
        (which the accounting counts under "gather" as long as they are kept) or, for a batch that is a
        view of its window, in the window (counted under "window")."""
        with run.cond:
            while not run.stopped and (run.batch_held + n > self.layout.batch_bytes
                                       or run.batches >= self.prefetch + 1):
                run.cond.wait()
            if run.stopped:
                return False
            run.batch_held += n
            run.batches += 1
        self.accounting.add("batches", n - kept)
        return True

    def _release_batch(self, run: _Run, n: int, kept: int = 0) -> None:
        """Release a batch reserved as ``n`` bytes, ``kept`` of which live in the gather buffers (counted there)."""
        self.accounting.sub("batches", n - kept)
        with run.cond:
            run.batch_held -= n
            run.batches -= 1
            run.cond.notify_all()

    def _decode_loop(self, plan: list[Window], run: _Run, handoff: queue.Queue, pool) -> None:
        c0 = time.thread_time()
        try:
            for w in plan:
                if not self._reserve_window(run, self.window_mem_bytes(w)):
                    return
                decoded = self._decode_window(w, pool, run)
                self._after_decode(run)  # before the hand-off, so no batch of the window sees idle memory held
                handoff.put(decoded)
            handoff.put(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            handoff.put(e)
        finally:
            self.stats.add_cpu(time.thread_time() - c0)

    def _windows_inline(self, plan: list[Window], run: _Run) -> Iterator[_Decoded]:
        """The windows of a reader that lays them out in batch order (``_scatters``), prepared on the
        consumer's thread when it reaches each (its decode is the consumer's anyway, ``_decode_frames``).
        Why not the decode loop's thread: such a window is freed only when the consumer asks for the
        batch after its last, so the next one can never be prepared ahead, and handing it over cost a
        thread wake and the GIL both ways: in `lst train` on cached MiniLM SST-2 the consumer waited
        ~0.11 s an epoch for the hand-off of ~0.1 s of preparation (session 32). The consumer has freed
        the window before (``_batches``), so the next one always fits."""
        for i, w in enumerate(plan):
            c0 = time.thread_time()
            if not self._reserve_window(run, self.window_mem_bytes(w), wait=False):
                return
            try:
                dw = self._decode_window(w, None, run)
            finally:
                self.stats.add_cpu(time.thread_time() - c0)
            dw.next_window = plan[i + 1] if i + 1 < len(plan) else None
            yield dw
            del dw

    def _after_decode(self, run: _Run, consumer: bool = False) -> None:
        """What the reader keeps idle between decodes for speed: the decode threads' read scratch, which
        saves page faults at the next decode and sits beside every step of this window. (``take_all``
        leaves no freed window buffers and no resident tails behind.) Past ``idle_cap`` (1/32 of the
        budget, ``IDLE_SHARE``) it goes back to the OS once the window is decoded: on the 7B shape at
        128 MB @ 128 tokens that was 4 MB at the step's peak. Under it (a MiniLM cache at the default
        budget) it stays. ``consumer``: called by the consumer after its own decode (``_decode_frames``),
        which frees its own reader only."""
        if run.pool.pooled + self.accounting.current["scratch"] > self.idle_cap:
            run.pool.clear()
            self._release_scratches(run, consumer=consumer)

    def _batches(self, run: _Run, handoff: queue.Queue, plan: list[Window] | None = None
                 ) -> Iterator[tuple[Batch, int, int]]:
        """Each decoded window's batches, gathered in plan order, with the bytes reserved for each
        (released by the consumer) and how many of them live in the gather buffers. A batch is a copy,
        so with ``decode_ahead`` every window is freed as soon as its last batch is gathered, before
        that batch is handed out: the decode threads then decode the next window while the step on that
        batch runs. Without it the window is freed when the consumer asks for the batch after its last,
        so the next window decodes while the loop waits, on every core. Which is faster depends on who
        else needs the cores: on CUDA, or where torch leaves a core free, the decode hides behind the
        step; where the step's own threads keep every core busy (2 CPU cores, 2 torch threads), each
        slice of decoding displaces one of them and holds up the step's next parallel region. Measured
        there (cached MiniLM SST-2 epochs, 16 alternated pairs of fresh `lst train` processes, session 24):
        12.3 against 12.7 s on average (faster in 12 pairs; the slowest 13.5 against 14.3 s), at a stall
        fraction of ~8% against ~3%: the stall now holds the decode, where before the displaced steps
        did. ``trainer.decode_ahead`` chooses.
        Only an inline reader gathers into the kept buffers: an assembler thread gathers the next batch
        while the consumer still reads the last, so it would never find one free. A reader that lays
        windows out in batch order takes them from ``plan`` on this thread (``_windows_inline``), the
        others from the decode loop through ``handoff``."""
        gather = run.gather if self.inline else None
        windows = self._windows_inline(plan, run) if self._scatters else None
        while not run.stopped:
            dw = next(windows, None) if windows is not None else handoff.get()
            if dw is None:
                return
            if isinstance(dw, BaseException):
                raise dw
            held = True
            try:
                self._decode_frames(run, dw)
                locate = self._locator(dw.window, self.offsets, self.dec_rows)
                last = len(dw.window.batches) - 1
                for i, idx in enumerate(dw.window.batches):
                    lens = self.lengths[idx]
                    n = self._batch_nbytes(len(idx), int(lens.max()), real=int(lens.sum()))
                    locs = locate(idx) if dw.batch_locs is None else dw.batch_locs[i]
                    # a batch whose rows are one run of the window is a view of it where the window
                    # outlives the batch: an inline reader frees it only when the batch after is asked for.
                    # A window's last batch is gathered where the window goes while the consumer still
                    # holds that batch: with decode_ahead, and in batch order once a consumer was found
                    # holding it when it asked for more (a plain `for b in ...` does; `lst train`'s loop
                    # drops it first), whose reference would keep every window buffer from reuse. Its
                    # gather had cost a MiniLM SST-2 epoch ~0.05 s of copies and ~0.02 s of page faults.
                    view = None
                    last_goes = i == last and (self.decode_ahead or (dw.batch_locs is not None
                                                                     and not run.last_views))
                    if self._may_view(gather is not None) and not last_goes:
                        view = self._one_run(locs[0], locs[1], lens)
                    # bytes counted elsewhere: in the gather buffers, or in the window a view reads
                    kept = self._gathered_nbytes(int(lens.sum())) if gather is not None else 0
                    if not self._reserve_batch(run, n, kept):
                        return
                    try:
                        b = self._assemble(idx, locs, dw, gather, view)
                    except BaseException:
                        self._release_batch(run, n, kept)
                        raise
                    if i == last and self.decode_ahead:
                        held = False
                        self._free_window(run, dw)
                    yield b, n, kept
                    del b
            finally:
                if held and self._free_window(run, dw) and dw.batch_locs is not None:
                    run.last_views = False  # the consumer kept the last batch: gather it from now on
                del dw

    def _assemble_loop(self, run: _Run, handoff: queue.Queue, out: queue.Queue) -> None:
        """The assembler thread: ``_batches`` into the queue the consumer reads (``inline`` runs
        ``_batches`` on the consumer's thread instead, gathering a batch when it is asked for)."""
        try:
            for item in self._batches(run, handoff):
                out.put(item)
                del item
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            out.put(e)
        finally:
            out.put(None)

    def iter_epoch(self, epoch: int) -> Iterator[Batch]:
        plan = self.plan_epoch(epoch)
        self._acts, self._scales, self._dec, self._dec_scales = self._values[epoch % len(self._values)]
        run = _Run(WindowBufferPool(self.layout.window_bytes, on_change=lambda d: self.accounting.add("pool", d),
                                    capacity=self._window_buffer_capacity(plan)),
                   GatherBuffers(on_change=lambda d: self.accounting.add("gather", d),
                                 capacity=self._gather_capacity(plan)))
        handoff: queue.Queue = queue.Queue()
        out: queue.Queue = queue.Queue()
        pool = ThreadPoolExecutor(self.layout.workers, thread_name_prefix="lst-read")
        # windows in batch order are prepared by the consumer itself (``_windows_inline``)
        td = None if self._scatters else threading.Thread(target=self._decode_loop, args=(plan, run, handoff, pool),
                                                          daemon=True)
        ta = None if self.inline else threading.Thread(target=self._assemble_loop, args=(run, handoff, out),
                                                       daemon=True)
        inline = self._batches(run, handoff, plan) if self.inline else None
        t0 = time.perf_counter()
        if td is not None:
            td.start()
        if ta is not None:
            ta.start()
        held = kept = 0  # bytes of the batch last handed out, and of them in the gather buffers
        try:
            while True:
                if held:
                    self._release_batch(run, held, kept)
                    held = kept = 0
                w0 = time.perf_counter()
                item = next(inline, None) if inline is not None else out.get()
                self.stats.wait_s += time.perf_counter() - w0
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                b, held, kept = item
                item = None  # the consumer's reference is the batch's last: its gather buffers serve the next
                self.stats.batches += 1
                if self.device.type != "cpu":
                    b = _to_device(b, self.device)
                yield b
                del b
        finally:
            if held:
                self._release_batch(run, held, kept)
            if inline is not None:
                inline.close()  # frees the window it holds
            run.stop()
            if td is not None:
                td.join()
            # the assembler may wait on the handoff queue: hand it an end, then drain what is left
            handoff.put(None)
            while ta is not None and (ta.is_alive() or not out.empty()):
                try:
                    item = out.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, tuple):
                    self._release_batch(run, item[1], item[2])
            if ta is not None:
                ta.join()
            while not handoff.empty():
                dw = handoff.get_nowait()
                if isinstance(dw, _Decoded):
                    self._free_window(run, dw)
            pool.shutdown(wait=True, cancel_futures=True)
            if run.prefetch is not None:
                run.prefetch.close()
                self.accounting.sub("prefetch", run.prefetch.nbytes)
            run.pool.clear()
            run.gather.clear()
            self.stats.buffer_hits += run.pool.hits
            self.stats.buffer_misses += run.pool.misses
            self.stats.gather_hits += run.gather.hits
            self.stats.gather_misses += run.gather.misses
            self._release_scratches(run)
            self.stats.total_s += time.perf_counter() - t0


def _to_device(b: Batch, device: torch.device) -> Batch:
    nb = device.type == "cuda"
    return Batch(
        index=b.index, input_ids=b.input_ids.to(device, non_blocking=nb),
        attention_mask=b.attention_mask.to(device, non_blocking=nb), labels=b.labels.to(device, non_blocking=nb),
        taps=[t.to(device, non_blocking=nb) for t in b.taps] if b.taps is not None else None,  # PackedTap.to too
        token_type_ids=b.token_type_ids.to(device, non_blocking=nb) if b.token_type_ids is not None else None,
        dec_taps=[t.to(device, non_blocking=nb) for t in b.dec_taps] if b.dec_taps is not None else None,
    )
