"""The activation cache: a Zarr v3 group that is the contract between stage one and stage two.

Its layout -- every attribute and every array -- is described once, as data, in
``pipeline/cache/schema.py`` (``python -m pipeline.cache.schema`` prints the tree README.md shows).
This module is the only writer of the manifests (``create_store``, ``ActivationCache.mark_complete``)
and ``ActivationCache``/``SplitView`` are their only readers, through the typed
``StoreManifest``/``SplitManifest`` (which refuse unknown, missing, mistyped or absurd attributes).

Examples are stored sorted by token count (stable), so every shard holds examples of similar
length and extraction batches carry almost no padding; ``source_rows`` maps back.

A shard (``shard_tokens`` rows of every tap) is the unit of work, of resume and of reading.
Writers only ever write whole shards, and each shard is assigned to exactly one writer, because
concurrent partial writes into one Zarr shard lose data.
"""

from __future__ import annotations

from pipeline.errors import CacheError

import dataclasses
import datetime as _dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import fsspec
import numpy as np
import torch
import zarr

from pipeline.cache import codecs as C
from pipeline.cache.fastread import DirectArray
from pipeline.cache.faultpoints import fault_point
from pipeline.cache.schema import (FORMAT_VERSION, SplitManifest, StoreManifest, expected_num_shards, tap_index,
                                   tap_name)
from pipeline.outdirs import is_local, local_path

__all__ = ["FORMAT_VERSION", "ActivationCache", "CacheError", "DamagedStoreError", "SplitPlan", "SplitView",
           "check_url", "create_store", "open_group", "store_state", "tap_index", "tap_name"]

DEFAULT_SHARD_TOKENS = 16384
CHUNK_TARGET_BYTES = 1 << 20
REEXTRACT = "re-extract it (`lst extract ... --overwrite`)"
#: what zarr raises for a node whose zarr.json is not JSON, or not the metadata of the node expected there
UNREADABLE_METADATA = (ValueError, TypeError)


class DamagedStoreError(CacheError):
    """A store is there but its own metadata cannot be read (garbage or empty zarr.json, a refused
    manifest): ``lst verify`` reports it as a finding (FAILED), where a path with no store at all, or
    an unusable URL, stays bad input."""


def check_url(url: str) -> None:
    """Refuse a store URL whose protocol fsspec does not know, or whose filesystem package is not
    installed, with what to do; fsspec would raise a bare ValueError / ImportError from deep inside Zarr."""
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol is None:
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CacheError(f"{url}: unknown storage protocol {protocol!r}; give a local path or a URL fsspec "
                         "knows (s3://, gs://, file://, ...)") from None
    except ImportError as e:
        raise CacheError(f"{url}: the {protocol}:// filesystem is not installed ({e}); install its fsspec "
                         "package (e.g. `pip install s3fs`) or use a local path") from None


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
        return expected_num_shards(self.num_tokens, self.shard_tokens)


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


def store_state(url: str, storage_options: dict | None = None) -> str | None:
    """What is at ``url``: None (no Zarr group opens there), 'foreign' (a group that is not an lst
    cache), 'invalid' (an lst cache whose manifest this lst refuses: another format version, or
    damaged), 'partial' (its creation was interrupted) or 'cache' (a fully laid-out store)."""
    try:
        root = open_group(url, mode="r", storage_options=storage_options)
    except Exception:  # noqa: BLE001 - absent, unreadable or not Zarr: the caller decides
        return None
    attrs = dict(root.attrs)
    if "format_version" not in attrs:
        return "foreign"
    try:
        manifest = StoreManifest.from_attrs(attrs, where=f"cache {url}")
    except CacheError:
        return "invalid"
    return "cache" if manifest.layout_complete else "partial"


def _no_cache_error(url: str) -> CacheError:
    """Why there is no store at ``url``, and what to do: an existing non-empty directory is not one
    to extract into (extract refuses it), so it is named as not a cache rather than sent to extract."""
    p = local_path(url) if is_local(url) else None
    if p is None or not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return CacheError(f"no activation cache at {url}: run `lst extract ... --out {url}` first")
    if p.is_dir() and ((p / "init").is_dir() or any(p.glob("*/acts"))):  # a cache's init pack, or a split
        return DamagedStoreError(f"cache {url}: its root zarr.json is missing; the store is damaged: {REEXTRACT}")
    what = "directory but not an lst activation cache (it has no zarr.json)" if p.is_dir() else \
        "file, not an lst activation cache"
    return CacheError(f"{url} is a {what}: give the path of a cache (e.g. data/cache/NAME.zarr), or extract one "
                      "into a new directory with `lst extract ... --out NEW.zarr`")


def _decoder_unit_rows(plan: SplitPlan, decoder: dict, hidden_size: int, codec: str) -> tuple[int, int]:
    """(rows per shard of the decoder arrays, padded to whole inner chunks; inner chunk rows)."""
    per_unit = max_unit_examples(plan.offsets, plan.shard_tokens) * int(decoder["rows"])
    rows = chunk_rows_for(hidden_size, codec, 1 << 30)
    rows = min(rows, 1 << (per_unit - 1).bit_length())
    return -(-per_unit // rows) * rows, rows


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
    compression: str = C.DEFAULT_COMPRESSION,
) -> "ActivationCache":
    """Create an empty store with every array sized up front (no activations yet).

    ``meta`` holds the remaining root attributes of :class:`StoreManifest` (task, backbone,
    max_length, and label_words / label_targets + decoder_taps where they apply); the manifests are
    checked before anything is written, so a bad one never replaces a store. ``decoder``
    ({'taps': [...], 'rows': D}) adds the per-example decoder arrays of a T5 label-target cache.
    The store is marked ``layout_complete`` once every array exists. ``compression``: how float tap
    chunks are packed (``codecs.compressors``).
    """
    spec = C.codec_spec(codec)
    C.compressors(codec=codec, compression=compression)  # an unknown name fails before anything is written
    where = f"create_store({url})"
    manifest = StoreManifest.from_attrs(
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "versions": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "complete": False,
            "codec": codec,
            "logical_dtype": spec.logical_dtype,
            "hidden_size": int(hidden_size),
            "taps": [tap_name(t) for t in taps],
            "splits": [p.name for p in plans],
            **meta,
        },
        where=where,
    )
    if (decoder is None) != (manifest.decoder_taps is None) or (
            decoder is not None and [tap_name(t) for t in decoder["taps"]] != manifest.decoder_taps):
        raise CacheError(f"{where}: the decoder arrays ({decoder}) and meta's decoder_taps "
                         f"({manifest.decoder_taps}) disagree")
    split_manifests = {}
    for plan in plans:
        unit_rows = _decoder_unit_rows(plan, decoder, hidden_size, codec)[0] if decoder else None
        m = SplitManifest.from_attrs(
            {"num_examples": plan.num_examples, "num_tokens": plan.num_tokens, "shard_tokens": int(plan.shard_tokens),
             "num_shards": plan.num_shards, "num_truncated": int(plan.num_truncated),
             **({"decoder_unit_rows": unit_rows} if decoder else {})},
            where=f"{where}: split {plan.name}",
        )
        m.check_against(manifest, f"{where}: split {plan.name}")
        split_manifests[plan.name] = m

    root = open_group(url, mode="w", storage_options=storage_options)
    root.attrs.update(manifest.to_attrs())
    for plan in plans:
        g = root.create_group(plan.name)
        t = max(plan.num_tokens, 1)
        shard = plan.shard_tokens
        g.attrs.update(split_manifests[plan.name].to_attrs())
        small = C.compressors(clevel=3)
        every = {"write_empty_chunks": True}  # every chunk on disk: a deleted one is then detectable
        g.create_array("offsets", data=plan.offsets.astype(np.int64), compressors=small, config=every)
        g.create_array("input_ids", data=plan.input_ids.astype(np.int32), compressors=small, config=every)
        g.create_array("labels", data=plan.labels, compressors=small, config=every)
        g.create_array("source_rows", data=plan.source_rows.astype(np.int64), compressors=small, config=every)
        if plan.token_type_ids is not None:
            g.create_array("token_type_ids", data=plan.token_type_ids.astype(np.int8), compressors=small,
                           config=every)
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
                compressors=C.compressors(codec=codec, compression=compression), fill_value=0,
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
            _create_decoder_arrays(g, plan, decoder, hidden_size, codec, compression)
    cache = ActivationCache(url, root, storage_options)
    cache._update_manifest(layout_complete=True)
    return cache


def _create_decoder_arrays(g: zarr.Group, plan: SplitPlan, decoder: dict, hidden_size: int, codec: str,
                           compression: str = C.DEFAULT_COMPRESSION) -> None:
    spec = C.codec_spec(codec)
    padded, rows = _decoder_unit_rows(plan, decoder, hidden_size, codec)
    dec = g.create_group("dec")
    acts = dec.create_group("acts")
    for tap in decoder["taps"]:
        acts.create_array(
            tap_name(tap), shape=(plan.num_shards, padded, hidden_size), dtype=spec.storage_dtype,
            chunks=(1, rows, hidden_size), shards=(1, padded, hidden_size),
            compressors=C.compressors(codec=codec, compression=compression), fill_value=0,
            attributes={"logical_dtype": spec.logical_dtype, "codec": codec, "tap": tap},
        )
    if spec.has_scale:
        scales = dec.create_group("scales")
        for tap in decoder["taps"]:
            scales.create_array(tap_name(tap), shape=(plan.num_shards, padded), dtype="float32",
                                chunks=(1, padded), compressors=C.compressors(), fill_value=0)


def _node(group: zarr.Group, path: str, damaged: Callable[[str], CacheError]) -> zarr.Group | zarr.Array:
    """``group[path]``, or ``damaged(what is wrong)`` raised where the node is missing or its zarr.json
    does not read."""
    try:
        return group[path]
    except KeyError:
        raise damaged("is missing (its zarr.json is gone)") from None
    except UNREADABLE_METADATA as e:
        raise damaged(f"has unreadable metadata ({type(e).__name__}: {str(e)[:200]})") from None


class SplitView:
    """Read/write access to one split of an open store."""

    def __init__(self, cache: "ActivationCache", name: str):
        self.cache = cache
        self.name = name
        self.group: zarr.Group = _node(cache.root, name, lambda what: CacheError(
            f"cache {cache.url}: split {name} {what}; the store is damaged: {REEXTRACT}"))
        where = f"cache {cache.url}: split {name}"
        self.manifest: SplitManifest = SplitManifest.from_attrs(dict(self.group.attrs), where=where)
        self.manifest.check_against(cache.manifest, where)
        self._direct: dict[str, DirectArray | None] = {}

    @property
    def num_examples(self) -> int:
        return self.manifest.num_examples

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def shard_tokens(self) -> int:
        return self.manifest.shard_tokens

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def num_truncated(self) -> int:
        return self.manifest.num_truncated

    @property
    def decoder_unit_rows(self) -> int | None:
        """Rows per shard of the decoder arrays (T5 label targets), else None."""
        return self.manifest.decoder_unit_rows

    def _damaged(self, what: str) -> CacheError:
        return CacheError(f"cache {self.cache.url}: {self.name}/{what}; the store is damaged: {REEXTRACT}")

    def _small(self, name: str, shape: tuple[int, ...], every_chunk: bool = False) -> np.ndarray:
        """A whole per-example/per-token array, after checking its stored shape against the
        manifest (so a damaged store cannot make us allocate from a bogus shape). Checksum
        failures and (``every_chunk``) deleted chunks are refused as damage."""
        arr = self.array(name)
        if tuple(arr.shape) != shape:
            raise self._damaged(f"{name} has shape {tuple(arr.shape)}, the split's manifest says {shape}")
        if every_chunk and shape[0] and arr.nchunks_initialized != arr.nchunks:
            raise self._damaged(f"{name}: {arr.nchunks - arr.nchunks_initialized} of its {arr.nchunks} chunk(s) "
                                "are missing")
        try:
            return arr[:]
        except Exception as e:  # noqa: BLE001 - checksum mismatch, truncated or undecodable chunk
            raise self._damaged(f"{name} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None

    @cached_property
    def offsets(self) -> np.ndarray:
        o = self._small("offsets", (self.num_examples + 1,), every_chunk=True)
        if o.dtype.kind not in "iu" or o[0] != 0 or o[-1] != self.num_tokens or (np.diff(o) <= 0).any():
            raise self._damaged(f"offsets: not a strictly increasing 0..{self.num_tokens} sequence")
        return o

    @cached_property
    def labels(self) -> np.ndarray:
        y = self._small("labels", (self.num_examples,), every_chunk=True)
        task = self.cache.manifest.task
        n = getattr(task, "num_labels", None)
        if y.dtype.kind in "iu" and getattr(task, "task_type", None) == "classification":
            if n and ((y < 0).any() or (y >= int(n)).any()):
                raise self._damaged(f"labels: values outside 0..{int(n) - 1}")
        elif y.dtype.kind == "f":
            if not np.isfinite(y).all():
                raise self._damaged("labels: non-finite values")
        return y

    @cached_property
    def input_ids(self) -> np.ndarray:
        return self._small("input_ids", (self.num_tokens,), every_chunk=True)

    @cached_property
    def token_type_ids(self) -> np.ndarray | None:
        return self._small("token_type_ids", (self.num_tokens,)) if "token_type_ids" in self.group else None

    @cached_property
    def source_rows(self) -> np.ndarray:
        return self._small("source_rows", (self.num_examples,))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def done(self) -> np.ndarray:
        return self._small("done", (self.num_shards,))

    def shard_file_problem(self, array: str, shard: int) -> str | None:
        """Why the file of a done shard of ``array`` ('acts/layer_1') cannot hold its data -- missing, or
        empty -- else None (and None for a store that is not local). Zarr reads either back as zeros."""
        if not self.cache.local_root:
            return None
        f = self.cache.local_root / self.name / array / "c" / str(shard) / "0"
        if not f.is_file():
            return f"its file {f} is missing"
        if f.stat().st_size == 0:
            return f"its file {f} is empty"
        return None

    def check_shard_files(self) -> None:
        """A shard marked done must have its data: in a local store, every tap's shard file exists
        and is not empty (``shard_file_problem``)."""
        if not self.cache.local_root:
            return
        done = self.done()
        arrays = [f"acts/{tap_name(t)}" for t in self.cache.taps]
        for shard in np.flatnonzero(done):
            for a in arrays:
                problem = self.shard_file_problem(a, int(shard))
                if problem:
                    raise self._damaged(f"{a}: shard {int(shard)} is marked done but {problem}")

    def pending_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard_rows(self.num_tokens, self.shard_tokens, shard)

    def shard_examples(self, shard: int) -> tuple[int, int]:
        return shard_examples(self.offsets, *self.shard_rows(shard))

    def unit_examples(self, shard: int) -> tuple[int, int]:
        """Examples whose first token row lies in the shard (their decoder rows live in it)."""
        return unit_examples(self.offsets, *self.shard_rows(shard))

    def array(self, path: str) -> zarr.Array:
        """The array at ``path`` under the split ('offsets', 'acts/layer_1', ...), a missing or unreadable
        node refused as damage (Zarr's bare KeyError or JSONDecodeError would name neither store nor fix)."""
        node = _node(self.group, path, lambda what: self._damaged(f"{path} {what}"))
        if not isinstance(node, zarr.Array):
            raise self._damaged(f"{path} is a group, not an array")
        return node

    def activation_arrays(self) -> list[str]:
        """The path of every activation array the manifests say this split holds: each tap's values
        (and scales, for scaled codecs) and, for T5 label targets, each decoder tap's."""
        kinds = ("acts", "scales") if self.cache.spec.has_scale else ("acts",)
        return ([f"{k}/{tap_name(t)}" for k in kinds for t in self.cache.taps]
                + [f"dec/{k}/{tap_name(t)}" for k in kinds for t in self.cache.decoder_taps])

    def check_arrays(self) -> None:
        """Every activation array is there and its metadata reads: a tap whose zarr.json is gone must
        fail here, in one line, not as a KeyError in the middle of training."""
        for path in self.activation_arrays():
            self.array(path)

    def tap_array(self, tap: int) -> zarr.Array:
        return self.array(f"acts/{tap_name(tap)}")

    def decoder_array(self, tap: int, scale: bool = False) -> zarr.Array:
        return self.array(f"dec/{'scales' if scale else 'acts'}/{tap_name(tap)}")

    def scale_array(self, tap: int) -> zarr.Array:
        return self.array(f"scales/{tap_name(tap)}")

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
            fault_point("shard-write")
            self.tap_array(tap)[start:end] = vals
            if scale is not None:
                self.scale_array(tap)[start:end] = scale
        fault_point("before-done")  # test hook (off by default): see pipeline/cache/faultpoints.py
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
    """An opened activation store; its root attributes are read once into :attr:`manifest`."""

    def __init__(self, url: str, root: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.root = root
        self.storage_options = storage_options
        self.manifest: StoreManifest = StoreManifest.from_attrs(dict(root.attrs), where=f"cache {url}")
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
        """The store at ``url``; ``CacheError`` (``DamagedStoreError`` where a store is there but its root
        metadata does not read) saying what is wrong and what to do."""
        check_url(url)
        try:
            root = open_group(url, mode=mode, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise _no_cache_error(url) from e
        except UNREADABLE_METADATA as e:
            raise DamagedStoreError(f"cache {url}: its root zarr.json does not read as a Zarr group "
                                    f"({type(e).__name__}: {str(e)[:200]}); the store is damaged: {REEXTRACT}") from None
        if "format_version" not in root.attrs:
            raise CacheError(f"{url} is a Zarr group but not an lst activation cache (no format_version)")
        try:
            return cls(url, root, storage_options)
        except DamagedStoreError:
            raise
        except CacheError as e:  # the manifest is refused: damaged, or written by another lst
            raise DamagedStoreError(str(e)) from None

    def _update_manifest(self, **changes) -> None:
        """Write changed root attributes (checked through the manifest first)."""
        new = dataclasses.replace(self.manifest, **changes)
        attrs = new.to_attrs(f"cache {self.url}")
        self.root.attrs.update({k: attrs[k] for k in changes})
        self.manifest = new

    @cached_property
    def local_root(self):
        """The store's directory when it is a plain local path, else None."""
        if not is_local(self.url):
            return None
        p = local_path(self.url)
        return p if p.is_dir() else None

    @property
    def attrs(self) -> dict:
        """The root attributes as a plain dict (a copy, checked: same keys and values as on disk)."""
        return self.manifest.to_attrs()

    @property
    def fingerprint(self) -> dict:
        return dict(self.manifest.fingerprint)

    @property
    def codec(self) -> str:
        return self.manifest.codec

    @property
    def spec(self) -> C.CodecSpec:
        return C.codec_spec(self.codec)

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def taps(self) -> list[int]:
        return self.manifest.tap_indices

    @property
    def label_targets(self) -> dict | None:
        """T5 label-target layout (``LabelTargets.to_dict``) when decoder taps are cached."""
        return self.manifest.label_targets

    @property
    def decoder_taps(self) -> list[int]:
        return self.manifest.decoder_tap_indices

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def layout_complete(self) -> bool:
        return bool(self.manifest.layout_complete)

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
            self._update_manifest(complete=done)
        return done

    def require_complete(self) -> None:
        """Refuse a store that stage two must not train on: incomplete, a ``done`` shard whose
        data files are gone, damaged per-example arrays, or a damaged init pack."""
        self._require_marked_complete()
        for s in self.splits:
            v = self.split(s)
            v.offsets, v.labels  # noqa: B018 - read and validated on first access
            v.check_arrays()
            v.check_shard_files()
        from pipeline.cache import initpack

        problems = initpack.verify_init_pack(self.url, self.storage_options)
        if problems:
            raise CacheError(problems[0])

    def _require_marked_complete(self) -> None:
        if not self.complete:
            missing = {s: len(self.split(s).pending_shards()) for s in self.splits}
            raise CacheError(
                f"cache {self.url} is incomplete (pending shards per split: {missing}); "
                "re-run the same `lst extract` command to finish it"
            )
