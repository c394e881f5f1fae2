"""`lst inspect` and `lst verify`: what a store holds, and whether every byte of it is sound."""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np
import zarr

from pipeline.cache.compression import DEFAULT_COMPRESSION
from pipeline.cache.store import ActivationCache, SplitView, tap_name
from pipeline.errors import CacheError


def _stored_bytes(cache: ActivationCache, rel: str) -> int:
    fs, root = fsspec.core.url_to_fs(cache.url, **(cache.storage_options or {}))
    path = f"{root}/{rel}"
    return int(fs.du(path)) if fs.exists(path) else 0


def inspect_cache(cache: ActivationCache) -> dict:
    """Splits, sizes, taps, codec, stored vs raw bytes, completeness and fingerprint."""
    spec = cache.spec
    itemsize = np.dtype(spec.storage_dtype).itemsize
    splits = {}
    total_stored = total_raw = total_fp16 = 0
    for name in cache.splits:
        v = cache.split(name)
        v.check_arrays()  # a tap with no metadata is damage to report, not bytes to count
        stored = sum(_stored_bytes(cache, f"{name}/{sub}") for sub in ("acts", "scales", "dec"))
        # rows per tap: every real token, plus D decoder rows per example for T5 label targets
        dec_rows = v.num_examples * int(cache.label_targets["rows"]) if cache.label_targets else 0
        rows = v.num_tokens * len(cache.taps) + dec_rows * len(cache.decoder_taps)
        values = rows * cache.hidden_size
        raw = values * itemsize + (rows * 4 if spec.has_scale else 0)
        done = v.done()
        splits[name] = {
            "examples": v.num_examples,
            "tokens": v.num_tokens,
            "truncated": v.num_truncated,
            "shards": v.num_shards,
            "shards_done": int(done.sum()),
            "stored_bytes": stored,
            "raw_bytes": raw,
            "fp16_bytes": values * 2,
        }
        total_stored += stored
        total_raw += raw
        total_fp16 += values * 2
    m = cache.manifest
    attrs = m.to_attrs()
    return {
        "store": cache.url,
        "format_version": m.format_version,
        "complete": cache.complete,
        "codec": cache.codec,
        "compression": cache.fingerprint.get("compression", DEFAULT_COMPRESSION),  # named only when not the default
        "logical_dtype": spec.logical_dtype,
        "storage_dtype": spec.storage_dtype,
        "hidden_size": cache.hidden_size,
        "taps": list(m.taps),
        "splits": splits,
        "stored_bytes": total_stored,
        "raw_bytes": total_raw,
        "compression_ratio": round(total_raw / total_stored, 4) if total_stored else None,
        "compression_vs_fp16": round(total_fp16 / total_stored, 4) if total_stored else None,
        "bytes_per_value": round(total_stored / (total_fp16 / 2), 4) if total_fp16 else None,
        "task": attrs["task"],
        "label_targets": attrs.get("label_targets"),
        "decoder_taps": attrs.get("decoder_taps"),
        "backbone": attrs["backbone"],
        "created": m.created,
        "fingerprint": cache.fingerprint,
        "versions": attrs["versions"],
    }


@dataclass
class VerifyReport:
    ok: bool = True
    checked_shards: int = 0
    corrupt: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked_shards": self.checked_shards, "corrupt": self.corrupt,
                "missing": self.missing, "problems": self.problems}


def readable_splits(cache: ActivationCache) -> tuple[dict[str, SplitView], list[str]]:
    """The splits whose group and manifest read, by name, and the problem with each other one (a
    missing split directory, a refused manifest): findings for ``lst verify``, not crashes."""
    views, problems = {}, []
    for name in cache.splits:
        try:
            views[name] = cache.split(name)
        except CacheError as e:
            problems.append(str(e))
    return views, problems


def _shard_arrays(v: SplitView, rep: VerifyReport) -> dict[str, zarr.Array]:
    """The split's activation arrays that open, by path; each that does not is a problem (opened once
    here, not per shard, so a tap whose zarr.json is gone is reported once)."""
    arrays = {}
    for path in v.activation_arrays():
        try:
            arrays[path] = v.array(path)
        except CacheError as e:
            rep.problems.append(str(e))
    return arrays


def verify_cache(cache: ActivationCache, progress=None) -> VerifyReport:
    """Read every chunk of every shard (checksums are checked by the crc32c codec on decode)."""
    rep = VerifyReport()
    views, rep.problems = readable_splits(cache)
    for name, v in views.items():
        bad_meta = False
        for arr in ("offsets", "labels", "input_ids", "source_rows"):
            try:  # each named on its own (checksums, deleted chunks, offsets/labels contents)
                getattr(v, arr)
            except Exception as e:  # noqa: BLE001 - any decode failure is a finding, not a crash
                rep.problems.append(f"{name}/{arr}: {type(e).__name__}: {e}")
                bad_meta = True
        if bad_meta:
            continue
        try:
            done = v.done()
        except Exception as e:  # noqa: BLE001
            rep.problems.append(f"{name}/done: {type(e).__name__}: {e}")
            continue
        arrays = _shard_arrays(v, rep)
        for shard in range(v.num_shards):
            start, end = v.shard_rows(shard)
            if not done[shard]:
                rep.missing.append({"split": name, "shard": shard, "rows": [start, end]})
                continue
            for label, arr in arrays.items():
                where = shard if label.startswith("dec/") else slice(start, end)
                problem = v.shard_file_problem(label, shard) if label.startswith("acts/") else None
                if problem:
                    rep.corrupt.append({"split": name, "shard": shard, "array": label, "rows": [start, end],
                                        "error": f"marked done but {problem}"})
                    continue
                try:
                    arr[where]
                except Exception as e:  # noqa: BLE001
                    rep.corrupt.append({
                        "split": name, "shard": shard, "array": label, "rows": [start, end],
                        "error": f"{type(e).__name__}: {e}"[:300],
                    })
            rep.checked_shards += 1
            if progress is not None:
                progress(end - start)
    from pipeline.cache import initpack

    rep.problems += initpack.verify_init_pack(cache.url, cache.storage_options)
    if not cache.complete and not rep.missing:
        rep.problems.append("store is not marked complete")
    rep.ok = not (rep.corrupt or rep.missing or rep.problems)
    return rep


def store_arrays(url: str) -> dict[str, np.ndarray]:
    """Every array of every split of a store, by path (for value-for-value comparisons)."""
    cache = ActivationCache.open(url)
    out = {}
    for s in cache.splits:
        v = cache.split(s)
        for name in ("offsets", "input_ids", "labels", "source_rows", "done"):
            out[f"{s}/{name}"] = v.group[name][:]
        for t in cache.taps:
            out[f"{s}/acts/{tap_name(t)}"] = v.tap_array(t)[:]
            if cache.spec.has_scale:
                out[f"{s}/scales/{tap_name(t)}"] = v.scale_array(t)[:]
        for t in cache.decoder_taps:
            out[f"{s}/dec/acts/{tap_name(t)}"] = v.decoder_array(t)[:]
            if cache.spec.has_scale:
                out[f"{s}/dec/scales/{tap_name(t)}"] = v.decoder_array(t, scale=True)[:]
    return out
