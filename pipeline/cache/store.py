"""The activation cache: a Zarr v3 group that is the contract between stage one and stage two.

Layout (README.md, "The cache")::

    <name>.zarr/
      zarr.json                 attrs: format_version, fingerprint, versions, created, complete, ...
      init/                     init pack (weights.safetensors, config.json, tokenizer/)
      <split>/
        offsets     int64 [N+1] example i owns token rows offsets[i]:offsets[i+1]
        input_ids   int32 [T]
        labels            [N]
        source_rows int64 [N]   row of each example in its source file
        token_type_ids int8 [T] segment ids, pair inputs on BERT-style tokenizers only
        acts/<tap>        [T, d] one array per tap, sharded along T
        scales/<tap> f32  [T]    int8 codec only: per-token scale
        dec/acts/<tap>    [S, U*D, d]  T5 label targets only: teacher-forced decoder taps of every
                                 candidate label (D rows per example) for the examples whose first
                                 token row lies in shard s, in storage order (U = most such examples
                                 of any shard); one Zarr shard per store shard, so one writer each
        dec/scales/<tap>  [S, U*D]     int8 codec only
        done        bool  [S]    one flag (one chunk) per shard, set after the shard is fully written

Examples are stored sorted by token count (stable), so every shard holds examples of similar
length and extraction batches carry almost no padding; ``source_rows`` maps back.

A shard (``shard_tokens`` rows of every tap) is the unit of work, of resume and of reading.
Writers only ever write whole shards, and each shard is assigned to exactly one writer, because
concurrent partial writes into one Zarr shard lose data.
"""

from __future__ import annotations

import datetime as _dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.cache import codecs as C
from pipeline.cache.fastread import DirectArray

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 16384
CHUNK_TARGET_BYTES = 1 << 20


class CacheError(RuntimeError):
    """A store that cannot be used as asked (stale, incomplete, missing, corrupt)."""


def tap_name(index: int) -> str:
    return "embeddings" if index == 0 else f"layer_{index}"


def tap_index(name: str) -> int:
    return 0 if name == "embeddings" else int(name.split("_", 1)[1])


def chunk_rows_for(hidden: int, codec: str, shard_tokens: int) -> int:
    """Inner chunk rows: about 1 MB of stored values, a power of two dividing the shard."""
    itemsize = np.dtype(C.codec_spec(codec).storage_dtype).itemsize
    rows = 1
    while rows * 2 * hidden * itemsize <= CHUNK_TARGET_BYTES and rows * 2 <= shard_tokens:
        rows *= 2
    while shard_tokens % rows:
        rows //= 2
    return max(rows, 1)


@dataclass
class SplitPlan:
    """Everything about a split that is fixed before the backbone runs (sizes, order, labels)."""

    name: str
    offsets: np.ndarray  # int64 [N+1]
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # [N]
    source_rows: np.ndarray  # int64 [N]
    shard_tokens: int
    num_truncated: int = 0
    token_type_ids: np.ndarray | None = None  # int8 [T], pair inputs on BERT-style tokenizers

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_tokens // self.shard_tokens))


def shard_rows(num_tokens: int, shard_tokens: int, shard: int) -> tuple[int, int]:
    start = shard * shard_tokens
    return start, min(start + shard_tokens, num_tokens)


def shard_examples(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Examples [i0, i1) whose token rows overlap [start, end)."""
    i0 = int(np.searchsorted(offsets, start, side="right")) - 1
    i1 = int(np.searchsorted(offsets, end, side="left"))
    return max(i0, 0), min(i1, len(offsets) - 1)


def unit_examples(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """Examples [e0, e1) whose *first* token row lies in [start, end): each example belongs to
    exactly one such unit, which is what per-example (decoder) arrays and the reader group by."""
    starts = offsets[:-1]
    return int(np.searchsorted(starts, start, side="left")), int(np.searchsorted(starts, end, side="left"))


def max_unit_examples(offsets: np.ndarray, shard_tokens: int) -> int:
    counts = np.bincount(offsets[:-1] // shard_tokens) if len(offsets) > 1 else np.zeros(1, dtype=np.int64)
    return max(int(counts.max()), 1)


def open_group(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    kwargs: dict[str, Any] = {"mode": mode}
    if storage_options:
        kwargs["storage_options"] = storage_options
    return zarr.open_group(url, zarr_format=3, **kwargs)


def create_store(
    url: str,
    *,
    fingerprint: dict,
    meta: dict,
    plans: list[SplitPlan],
    taps: list[int],
    codec: str,
    hidden_size: int,
    versions: dict,
    storage_options: dict | None = None,
    decoder: dict | None = None,
) -> "ActivationCache":
    """Create an empty store with every array sized up front (no activations yet).

    ``decoder`` ({'taps': [...], 'rows': D}) adds the per-example decoder arrays of a T5
    label-target cache.
    """
    spec = C.codec_spec(codec)
    root = open_group(url, mode="w", storage_options=storage_options)
    root.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "versions": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "complete": False,
            "codec": codec,
            "logical_dtype": spec.logical_dtype,
            "hidden_size": hidden_size,
            "taps": [tap_name(t) for t in taps],
            "splits": [p.name for p in plans],
            **meta,
        }
    )
    for plan in plans:
        g = root.create_group(plan.name)
        n, t = plan.num_examples, max(plan.num_tokens, 1)
        shard = plan.shard_tokens
        g.attrs.update(
            {
                "num_examples": n,
                "num_tokens": plan.num_tokens,
                "shard_tokens": shard,
                "num_shards": plan.num_shards,
                "num_truncated": plan.num_truncated,
            }
        )
        small = C.compressors(clevel=3)
        g.create_array("offsets", data=plan.offsets.astype(np.int64), compressors=small)
        g.create_array("input_ids", data=plan.input_ids.astype(np.int32), compressors=small)
        g.create_array("labels", data=plan.labels, compressors=small)
        g.create_array("source_rows", data=plan.source_rows.astype(np.int64), compressors=small)
        if plan.token_type_ids is not None:
            g.create_array("token_type_ids", data=plan.token_type_ids.astype(np.int8), compressors=small)
        g.create_array(
            "done", shape=(plan.num_shards,), chunks=(1,), dtype="bool", fill_value=False,
            compressors=None,
        )
        rows = chunk_rows_for(hidden_size, codec, shard)
        acts = g.create_group("acts")
        for tap in taps:
            acts.create_array(
                tap_name(tap), shape=(t, hidden_size), dtype=spec.storage_dtype,
                chunks=(rows, hidden_size), shards=(shard, hidden_size),
                compressors=C.compressors(codec=codec), fill_value=0,
                attributes={"logical_dtype": spec.logical_dtype, "codec": codec, "tap": tap},
            )
        if spec.has_scale:
            scales = g.create_group("scales")
            srows = min(shard, 1 << 16)
            while shard % srows:
                srows //= 2
            for tap in taps:
                scales.create_array(
                    tap_name(tap), shape=(t,), dtype="float32", chunks=(srows,), shards=(shard,),
                    compressors=C.compressors(), fill_value=0,
                )
        if decoder:
            _create_decoder_arrays(g, plan, decoder, hidden_size, codec)
    return ActivationCache(url, root, storage_options)


def _create_decoder_arrays(g: zarr.Group, plan: SplitPlan, decoder: dict, hidden_size: int, codec: str) -> None:
    spec = C.codec_spec(codec)
    per_unit = max_unit_examples(plan.offsets, plan.shard_tokens) * int(decoder["rows"])
    rows = chunk_rows_for(hidden_size, codec, 1 << 30)
    rows = min(rows, 1 << (per_unit - 1).bit_length())
    padded = -(-per_unit // rows) * rows
    g.attrs["decoder_unit_rows"] = padded
    dec = g.create_group("dec")
    acts = dec.create_group("acts")
    for tap in decoder["taps"]:
        acts.create_array(
            tap_name(tap), shape=(plan.num_shards, padded, hidden_size), dtype=spec.storage_dtype,
            chunks=(1, rows, hidden_size), shards=(1, padded, hidden_size),
            compressors=C.compressors(codec=codec), fill_value=0,
            attributes={"logical_dtype": spec.logical_dtype, "codec": codec, "tap": tap},
        )
    if spec.has_scale:
        scales = dec.create_group("scales")
        for tap in decoder["taps"]:
            scales.create_array(tap_name(tap), shape=(plan.num_shards, padded), dtype="float32",
                                chunks=(1, padded), compressors=C.compressors(), fill_value=0)


class SplitView:
    """Read/write access to one split of an open store."""

    def __init__(self, cache: "ActivationCache", name: str):
        self.cache = cache
        self.name = name
        self.group: zarr.Group = cache.root[name]
        a = self.group.attrs
        self.num_examples: int = a["num_examples"]
        self.num_tokens: int = a["num_tokens"]
        self.shard_tokens: int = a["shard_tokens"]
        self.num_shards: int = a["num_shards"]
        self.num_truncated: int = a.get("num_truncated", 0)
        self._direct: dict[str, DirectArray | None] = {}

    @cached_property
    def offsets(self) -> np.ndarray:
        return self.group["offsets"][:]

    @cached_property
    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    @cached_property
    def input_ids(self) -> np.ndarray:
        return self.group["input_ids"][:]

    @cached_property
    def token_type_ids(self) -> np.ndarray | None:
        return self.group["token_type_ids"][:] if "token_type_ids" in self.group else None

    @cached_property
    def source_rows(self) -> np.ndarray:
        return self.group["source_rows"][:]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def done(self) -> np.ndarray:
        return self.group["done"][:]

    def pending_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard_rows(self.num_tokens, self.shard_tokens, shard)

    def shard_examples(self, shard: int) -> tuple[int, int]:
        return shard_examples(self.offsets, *self.shard_rows(shard))

    def unit_examples(self, shard: int) -> tuple[int, int]:
        """Examples whose first token row lies in the shard (their decoder rows live in it)."""
        return unit_examples(self.offsets, *self.shard_rows(shard))

    def tap_array(self, tap: int) -> zarr.Array:
        return self.group["acts"][tap_name(tap)]

    def decoder_array(self, tap: int, scale: bool = False) -> zarr.Array:
        return self.group["dec"]["scales" if scale else "acts"][tap_name(tap)]

    def scale_array(self, tap: int) -> zarr.Array:
        return self.group["scales"][tap_name(tap)]

    # -- writing -----------------------------------------------------------------------------
    def write_shard(self, shard: int, values: dict[int, tuple[np.ndarray, np.ndarray | None]],
                    decoder: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = None) -> None:
        """Write every tap of one shard (and its examples' decoder rows), then its done flag
        (the flag is the commit point)."""
        start, end = self.shard_rows(shard)
        for tap, (vals, scale) in (decoder or {}).items():
            self.decoder_array(tap)[shard, : vals.shape[0]] = vals
            if scale is not None:
                self.decoder_array(tap, scale=True)[shard, : vals.shape[0]] = scale
        for tap, (vals, scale) in values.items():
            if vals.shape[0] != end - start:
                raise CacheError(
                    f"shard {shard} of {self.name}: {vals.shape[0]} rows for tap {tap}, expected {end - start}"
                )
            self.tap_array(tap)[start:end] = vals
            if scale is not None:
                self.scale_array(tap)[start:end] = scale
        self.group["done"][shard] = True

    # -- reading -----------------------------------------------------------------------------
    def _read(self, key: str, arr_fn, start: int, end: int) -> np.ndarray:
        """Rows of one array: the direct shard decoder where it applies, Zarr otherwise."""
        if key not in self._direct:
            self._direct[key] = DirectArray.for_array(arr_fn()) if self.cache.direct_reads else None
        direct = self._direct[key]
        if direct is None:
            return arr_fn()[start:end]
        return direct.read(start, end, self.cache.decode_pool())

    def read_rows_raw(self, tap: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray | None]:
        vals = self._read(f"acts/{tap}", lambda: self.tap_array(tap), start, end)
        scale = None
        if self.cache.spec.has_scale:
            scale = self._read(f"scales/{tap}", lambda: self.scale_array(tap), start, end)
        return vals, scale

    def read_rows(self, tap: int, start: int, end: int) -> torch.Tensor:
        """Decoded float32 activations of token rows [start, end) for one tap."""
        vals, scale = self.read_rows_raw(tap, start, end)
        return C.decode(vals, self.cache.codec, scale)

    def read_decoder_unit(self, tap: int, shard: int, rows: int, raw: bool = False, start: int = 0):
        """Decoder rows [start, start + rows) stored for a shard's examples (decoded float32, or
        (values, scale) with ``raw``)."""
        sel = (shard, slice(start, start + rows))
        vals = self.decoder_array(tap)[sel]
        scale = self.decoder_array(tap, scale=True)[sel] if self.cache.spec.has_scale else None
        return (vals, scale) if raw else C.decode(vals, self.cache.codec, scale)

    def read_example(self, tap: int, i: int) -> torch.Tensor:
        o = self.offsets
        return self.read_rows(tap, int(o[i]), int(o[i + 1]))


class ActivationCache:
    """An opened activation store."""

    def __init__(self, url: str, root: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.root = root
        self.storage_options = storage_options
        self.direct_reads = os.environ.get("LST_DIRECT_READ", "1") != "0"
        self._pool: ThreadPoolExecutor | None = None
        self._splits: dict[str, SplitView] = {}

    def decode_pool(self) -> ThreadPoolExecutor:
        """Threads that decode inner chunks in parallel (Blosc releases the GIL)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="lst-decode")
        return self._pool

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> "ActivationCache":
        try:
            root = open_group(url, mode=mode, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise CacheError(f"no activation cache at {url}: run `lst extract ... --out {url}` first") from e
        if "format_version" not in root.attrs:
            raise CacheError(f"{url} is a Zarr group but not an lst activation cache (no format_version)")
        if root.attrs["format_version"] != FORMAT_VERSION:
            raise CacheError(
                f"{url} has cache format {root.attrs['format_version']}, this lst reads {FORMAT_VERSION}: re-extract it"
            )
        return cls(url, root, storage_options)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def fingerprint(self) -> dict:
        return dict(self.root.attrs["fingerprint"])

    @property
    def codec(self) -> str:
        return self.root.attrs["codec"]

    @property
    def spec(self) -> C.CodecSpec:
        return C.codec_spec(self.codec)

    @property
    def hidden_size(self) -> int:
        return int(self.root.attrs["hidden_size"])

    @property
    def taps(self) -> list[int]:
        return [tap_index(n) for n in self.root.attrs["taps"]]

    @property
    def label_targets(self) -> dict | None:
        """T5 label-target layout (``LabelTargets.to_dict``) when decoder taps are cached."""
        return self.root.attrs.get("label_targets")

    @property
    def decoder_taps(self) -> list[int]:
        return [tap_index(n) for n in self.root.attrs.get("decoder_taps", [])]

    @property
    def splits(self) -> list[str]:
        return list(self.root.attrs["splits"])

    @property
    def complete(self) -> bool:
        return bool(self.root.attrs.get("complete", False))

    def split(self, name: str) -> SplitView:
        if name not in self.splits:
            raise CacheError(f"cache {self.url} has no split {name!r}; it has {', '.join(self.splits)}")
        if name not in self._splits:
            self._splits[name] = SplitView(self, name)
        return self._splits[name]

    def mark_complete(self) -> bool:
        """Set ``complete`` once every shard of every split is done; returns the new state."""
        done = bool(all(self.split(s).done().all() for s in self.splits))
        if done != self.complete:  # a finished store is never rewritten (DVC may hard-link its files)
            self.root.attrs["complete"] = done
        return done

    def require_complete(self) -> None:
        if not self.complete:
            missing = {s: len(self.split(s).pending_shards()) for s in self.splits}
            raise CacheError(
                f"cache {self.url} is incomplete (pending shards per split: {missing}); "
                "re-run the same `lst extract` command to finish it"
            )
