"""Stage-two reader: streams cached taps to the side network and measures whether it keeps up.

Order of an epoch: shards in a seeded random order, grouped into windows of ``window_shards``;
examples are shuffled inside a window and cut into batches (by example count or token budget).
The epoch's batches are planned up front from indices alone, so the step count is known and a
resumed run sees exactly the batches an uninterrupted one would.

A background thread reads and decodes each window (Zarr/Blosc decode in a small thread pool, GIL
released) and assembles padded batches with one gather per tap; the training loop only waits
when the reader falls behind, and that wait is the reported stall fraction.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.cache import codecs as C
from pipeline.cache.store import ActivationCache


@dataclass
class Batch:
    index: np.ndarray  # storage indices of the examples
    input_ids: torch.Tensor  # [B, L] (pad 0)
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B]
    taps: list[torch.Tensor] | None  # one [B, L, d] per requested tap (None in ids-only mode)
    token_type_ids: torch.Tensor | None = None
    dec_taps: list[torch.Tensor] | None = None  # T5 label targets: one [B, D, d] per decoder tap

    def side_inputs(self) -> dict:
        """Keyword arguments of the side network's forward."""
        out = {"taps": self.taps, "attention_mask": self.attention_mask}
        if self.dec_taps is not None:
            out["dec_taps"] = self.dec_taps
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class ReaderStats:
    wait_s: float = 0.0
    total_s: float = 0.0
    batches: int = 0

    @property
    def stall_fraction(self) -> float:
        return self.wait_s / self.total_s if self.total_s > 0 else 0.0


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
        prefetch: int = 8,
        device: str | torch.device = "cpu",
        load_acts: bool = True,
        decoder_taps: list[int] | None = None,
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
        self.cache = cache
        self.view = cache.split(split)
        self.taps = list(taps)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.shuffle = shuffle
        self.window_shards = max(1, window_shards)
        self.seed = seed
        self.workers = max(1, workers)
        self.prefetch = prefetch
        self.device = torch.device(device)
        self.load_acts = load_acts
        self.offsets = self.view.offsets
        self.lengths = np.diff(self.offsets)
        self.labels = self.view.labels
        self.input_ids = self.view.input_ids
        self.token_types = self.view.token_type_ids
        self.stats = ReaderStats()
        # examples whose first row lies in shard s form read unit s
        starts = self.offsets[:-1]
        unit_of = starts // self.view.shard_tokens
        self.units = [np.flatnonzero(unit_of == s) for s in range(self.view.num_shards)]

    @property
    def num_examples(self) -> int:
        return self.view.num_examples

    # -- planning --------------------------------------------------------------------------------
    def plan_epoch(self, epoch: int) -> list[tuple[list[int], list[np.ndarray]]]:
        """[(units of the window, [example indices per batch])] for the epoch; pure in (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        plan = []
        for w in range(0, len(order), self.window_shards):
            units = [int(u) for u in order[w : w + self.window_shards] if len(self.units[u])]
            if not units:
                continue
            ex = np.concatenate([self.units[u] for u in units])
            if self.shuffle:
                ex = ex[rng.permutation(len(ex))]
            plan.append((units, self._cut(ex)))
        return plan

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
        return sum(len(b) for _, b in self.plan_epoch(epoch))

    # -- reading ---------------------------------------------------------------------------------
    def _decode(self, vals: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        return C.to_bf16_tensor(vals) if self.cache.codec == "bf16" else C.decode(vals, self.cache.codec, scale)

    def _read_unit(self, unit: int) -> tuple[int, int, list[torch.Tensor], list[torch.Tensor]]:
        ex = self.units[unit]
        r0, r1 = int(self.offsets[ex[0]]), int(self.offsets[ex[-1] + 1])
        if not self.load_acts:
            return r0, r1, [], []
        out = [self._decode(*self.view.read_rows_raw(tap, r0, r1)) for tap in self.taps]
        dec = [self._decode(*self.view.read_decoder_unit(tap, unit, len(ex) * self.dec_rows, raw=True))
               for tap in self.decoder_taps]
        return r0, r1, out, dec

    def _assemble(self, idx: np.ndarray, row_base: dict[int, int], pool: list[torch.Tensor] | None,
                  dec_base: dict[int, int] | None = None, dec_pool: list[torch.Tensor] | None = None) -> Batch:
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
        taps = None
        if pool is not None:
            local = np.array([row_base[int(i)] for i in idx])[:, None] + pos
            zero_row = pool[0].shape[0] - 1
            gather = torch.from_numpy(np.where(valid, local, zero_row).reshape(-1))
            taps = [t.index_select(0, gather).view(B, L, -1).float() for t in pool]
        dec = None
        if dec_pool:
            rows = np.array([dec_base[int(i)] for i in idx])[:, None] + np.arange(self.dec_rows)[None, :]
            g = torch.from_numpy(rows.reshape(-1))
            dec = [t.index_select(0, g).view(B, self.dec_rows, -1).float() for t in dec_pool]
        return Batch(
            index=idx, input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
            labels=torch.from_numpy(np.asarray(self.labels[idx])), taps=taps, token_type_ids=tt, dec_taps=dec,
        )

    def _produce(self, epoch: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="lst-read") as ex:
                plan = self.plan_epoch(epoch)
                futures = [ex.map(self._read_unit, units) for units, _ in plan[:2]]
                for w, (units, batches) in enumerate(plan):
                    if w + 2 < len(plan):
                        futures.append(ex.map(self._read_unit, plan[w + 2][0]))
                    parts = list(futures[w])
                    futures[w] = None
                    row_base: dict[int, int] = {}
                    dec_base: dict[int, int] = {}
                    base = dbase = 0
                    for (r0, r1, _, _), u in zip(parts, units):
                        for p, i in enumerate(self.units[u]):
                            row_base[int(i)] = base + int(self.offsets[i]) - r0
                            dec_base[int(i)] = dbase + p * self.dec_rows
                        base += r1 - r0
                        dbase += len(self.units[u]) * self.dec_rows
                    pool = dec_pool = None
                    if self.load_acts:
                        pool = [torch.cat([p[2][k] for p in parts] + [parts[0][2][k].new_zeros(1, parts[0][2][k].shape[1])])
                                for k in range(len(self.taps))]
                        dec_pool = [torch.cat([p[3][k] for p in parts]) for k in range(len(self.decoder_taps))]
                    for idx in batches:
                        if stop.is_set():
                            return
                        b = self._assemble(idx, row_base, pool, dec_base, dec_pool)
                        if self.device.type == "cuda":
                            b.taps = [t.pin_memory() for t in b.taps] if b.taps else None
                            b.dec_taps = [t.pin_memory() for t in b.dec_taps] if b.dec_taps else None
                        q.put(b)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        finally:
            q.put(None)

    def iter_epoch(self, epoch: int) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        t = threading.Thread(target=self._produce, args=(epoch, q, stop), daemon=True)
        t0 = time.perf_counter()
        t.start()
        try:
            while True:
                w0 = time.perf_counter()
                item = q.get()
                self.stats.wait_s += time.perf_counter() - w0
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.stats.batches += 1
                if self.device.type != "cpu":
                    item = _to_device(item, self.device)
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)
            self.stats.total_s += time.perf_counter() - t0


def _to_device(b: Batch, device: torch.device) -> Batch:
    nb = device.type == "cuda"
    return Batch(
        index=b.index, input_ids=b.input_ids.to(device, non_blocking=nb),
        attention_mask=b.attention_mask.to(device, non_blocking=nb), labels=b.labels.to(device, non_blocking=nb),
        taps=[t.to(device, non_blocking=nb) for t in b.taps] if b.taps is not None else None,
        token_type_ids=b.token_type_ids.to(device, non_blocking=nb) if b.token_type_ids is not None else None,
        dec_taps=[t.to(device, non_blocking=nb) for t in b.dec_taps] if b.dec_taps is not None else None,
    )
