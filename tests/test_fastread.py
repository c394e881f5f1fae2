"""pipeline/cache/fastread.py: DirectArray decodes the store's sharded arrays itself.

The arrays are made exactly as ``create_store`` makes its ``acts/<tap>`` and ``scales/<tap>``
arrays (same ``create_array`` arguments and codec chain, ``codecs.compressors``), with 4-row inner
chunks so one shard holds several. Every read is compared with Zarr's own read of the same array,
over full and partial inner chunks, shard boundaries, a missing shard file, an inner chunk that was
never written, and corrupted bytes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache import codecs as C
from pipeline.cache.fastread import EMPTY, DirectArray
from pipeline.errors import ChecksumError

HIDDEN = 6
SHARD = 16  # token rows per shard
ROWS = 4  # token rows per inner chunk
T = 70  # 5 shards, the last one partial (rows 64:70, inside its second inner chunk)


class _Split:
    """The two arrays of a split that DirectArray reads, as create_store lays them out."""

    def __init__(self, root: Path, codec: str, num_tokens: int, compression: str = C.DEFAULT_COMPRESSION):
        spec = C.codec_spec(codec)
        g = zarr.open_group(str(root / "c.zarr"), mode="w", zarr_format=3)
        self.acts = g.create_group("train").create_group("acts")
        for tap in ("embeddings", "layer_1"):
            self.acts.create_array(
                tap, shape=(num_tokens, HIDDEN), dtype=spec.storage_dtype, chunks=(ROWS, HIDDEN),
                shards=(SHARD, HIDDEN), compressors=C.compressors(codec=codec, compression=compression), fill_value=0,
                attributes={"logical_dtype": spec.logical_dtype, "codec": codec},
            )
        self.scales = g["train"].create_group("scales")
        # create_store's scale chunks are min(shard, 65536) rows; 4 here so shards hold several
        self.scales.create_array("embeddings", shape=(num_tokens,), dtype="float32", chunks=(ROWS,),
                                 shards=(SHARD,), compressors=C.compressors(), fill_value=0)

    def tap_array(self, tap: int) -> zarr.Array:
        return self.acts["embeddings" if tap == 0 else f"layer_{tap}"]

    def scale_array(self, tap: int) -> zarr.Array:
        assert tap == 0
        return self.scales["embeddings"]


def _make(tmp_path: Path, codec: str, num_tokens: int = T, compression: str = C.DEFAULT_COMPRESSION) -> _Split:
    return _Split(tmp_path, codec, num_tokens, compression)


def _values(codec: str, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(C.codec_spec(codec).storage_dtype)
    if dtype.kind == "f":
        return (rng.standard_normal((rows, HIDDEN)) * 3).astype(dtype)
    info = np.iinfo(dtype)
    # no zero rows, so no inner chunk is skipped as "all fill value" by Zarr
    return rng.integers(1, min(info.max, 127), (rows, HIDDEN)).astype(dtype)


def _index(f: Path, chunks_per_shard: int) -> np.ndarray:
    buf = f.read_bytes()
    return np.frombuffer(buf[len(buf) - 16 * chunks_per_shard - 4:-4], dtype="<u8").reshape(-1, 2)


RANGES = [
    (0, T),  # everything
    (0, 4), (4, 8), (0, 16),  # whole inner chunks, a whole shard
    (1, 3), (5, 7), (3, 5),  # inside one chunk; across two chunks
    (2, 14), (13, 19), (15, 17), (14, 50),  # partial first/last chunks, across one or several shards
    (16, 32), (31, 33), (60, 70), (64, 70), (66, 69), (69, 70),  # the partial last shard
]


@pytest.mark.parametrize("codec", ["bf16", "fp16", "fp32", "int8"])
def test_reads_equal_zarr_over_chunk_and_shard_boundaries(tmp_path, codec):
    v = _make(tmp_path, codec)
    arr = v.tap_array(1)
    vals = _values(codec, T)
    arr[:] = vals
    d = DirectArray.for_array(arr)
    assert d is not None, "the store's codec chain must take the direct path"
    assert (d.shard_rows, d.chunk_rows, d.chunks_per_shard) == (SHARD, ROWS, SHARD // ROWS)
    assert d.dtype == vals.dtype and d.shape == (T, HIDDEN)
    with ThreadPoolExecutor(3) as pool:
        for a, b in RANGES:
            ref = arr[a:b]
            np.testing.assert_array_equal(ref, vals[a:b])  # Zarr itself round-trips
            for p in (None, pool):
                got = d.read(a, b, p)
                assert got.dtype == ref.dtype and got.shape == ref.shape, (a, b)
                np.testing.assert_array_equal(got, ref, err_msg=f"rows {a}:{b} pool={p is not None}")


def test_one_dimensional_scale_arrays(tmp_path):
    """The int8 codec's per-row float32 scales are 1-D sharded arrays; they take the same path."""
    v = _make(tmp_path, "int8")
    sc = v.scale_array(0)
    d = DirectArray.for_array(sc)
    assert d is not None and d.row_shape == () and d.shard_rows == SHARD
    n = sc.shape[0]
    vals = np.random.default_rng(5).uniform(0.1, 2.0, n).astype(np.float32)
    sc[:] = vals
    for a, b in [(0, n), (0, 1), (SHARD - 1, SHARD + 1), (n - 40, n), (n - 3, n), (5, 50)]:
        np.testing.assert_array_equal(d.read(a, b), sc[a:b])
        np.testing.assert_array_equal(d.read(a, b), vals[a:b])


def test_empty_range(tmp_path):
    v = _make(tmp_path, "fp32")
    d = DirectArray.for_array(v.tap_array(0))
    for a in (0, 17, T):
        got = d.read(a, a)
        assert got.shape == (0, HIDDEN)


def test_missing_shard_file_reads_as_fill_value(tmp_path):
    v = _make(tmp_path, "bf16")
    arr = v.tap_array(1)
    vals = _values("bf16", T)
    arr[0:SHARD] = vals[0:SHARD]  # shard 0
    arr[3 * SHARD:T] = vals[3 * SHARD:T]  # shards 3 and 4; shards 1 and 2 never written
    d = DirectArray.for_array(arr)
    assert not d._shard_file(1).exists() and not d._shard_file(2).exists()
    assert d._shard_file(0).exists() and d._shard_file(3).exists()
    for a, b in [(0, T), (10, 40), (16, 32), (20, 22), (30, 50)]:
        ref = arr[a:b]
        np.testing.assert_array_equal(d.read(a, b), ref)
    np.testing.assert_array_equal(d.read(SHARD, 3 * SHARD), np.full((2 * SHARD, HIDDEN), arr.fill_value))
    # the whole array never written: no shard files at all
    d0 = DirectArray.for_array(v.tap_array(0))
    assert not any(d0._shard_file(s).exists() for s in range(5))
    np.testing.assert_array_equal(d0.read(0, T), v.tap_array(0)[:])
    assert not d0.read(0, T).any()


def test_unwritten_inner_chunk_is_an_empty_index_entry(tmp_path):
    v = _make(tmp_path, "fp16")
    arr = v.tap_array(1)
    vals = _values("fp16", T)
    arr[0:4] = vals[0:4]
    arr[8:16] = vals[8:16]  # inner chunk 1 (rows 4:8) of shard 0 never written
    arr[16:20] = vals[16:20]  # shard 1: only its first inner chunk
    arr[68:T] = vals[68:T]  # last shard (rows 64:70): only its second, partial inner chunk (rows 68:72 of 70)
    d = DirectArray.for_array(arr)
    idx0 = _index(d._shard_file(0), d.chunks_per_shard)
    assert idx0[1, 0] == EMPTY and all(idx0[c, 0] != EMPTY for c in (0, 2, 3))
    idx1 = _index(d._shard_file(1), d.chunks_per_shard)
    assert idx1[0, 0] != EMPTY and all(idx1[c, 0] == EMPTY for c in (1, 2, 3))
    idx4 = _index(d._shard_file(4), d.chunks_per_shard)
    assert idx4[1, 0] != EMPTY and idx4[0, 0] == EMPTY
    for a, b in RANGES:
        np.testing.assert_array_equal(d.read(a, b), arr[a:b], err_msg=f"rows {a}:{b}")
    got = d.read(0, T)
    assert not got[4:8].any() and not got[20:32].any() and not got[64:68].any()
    np.testing.assert_array_equal(got[68:T], vals[68:T])


def _flip(f: Path, pos: int) -> None:
    data = bytearray(f.read_bytes())
    data[pos] ^= 0x01
    f.write_bytes(bytes(data))


def damaged_chunk(tmp_path: Path):
    """An fp32 tap array (Zarr's, and its DirectArray) whose inner chunk at rows 24:28 has a flipped byte."""
    v = _make(tmp_path, "fp32")
    arr = v.tap_array(1)
    arr[:] = _values("fp32", T)
    d = DirectArray.for_array(arr)
    f = d._shard_file(1)
    off, nbytes = (int(x) for x in _index(f, d.chunks_per_shard)[2])  # inner chunk 2: rows 24:28
    _flip(f, off + nbytes // 2)
    return arr, d


def test_flipped_byte_in_a_chunk_raises_checksum_error(tmp_path):
    arr, d = damaged_chunk(tmp_path)
    with pytest.raises(ChecksumError, match=r"rows 24:28"):
        d.read(0, T)
    with ThreadPoolExecutor(2) as pool, pytest.raises(ChecksumError):
        d.read(20, 30, pool)
    # rows that do not touch the damaged chunk still read, and equal Zarr
    np.testing.assert_array_equal(d.read(0, 24), arr[0:24])
    np.testing.assert_array_equal(d.read(28, T), arr[28:T])


def test_flipped_byte_in_a_shard_index_raises_checksum_error(tmp_path):
    v = _make(tmp_path, "bf16")
    arr = v.tap_array(0)
    arr[:] = _values("bf16", T)
    d = DirectArray.for_array(arr)
    f = d._shard_file(2)
    _flip(f, f.stat().st_size - 10)  # inside the (offset, nbytes) table
    with pytest.raises(ChecksumError, match="index"):
        d.read(30, 40)
    np.testing.assert_array_equal(d.read(0, 32), arr[0:32])


def test_other_layouts_fall_back_to_zarr(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    plain = g.create_array("plain", shape=(32, HIDDEN), chunks=(8, HIDDEN), dtype="float32")  # not sharded
    assert DirectArray.for_array(plain) is None
    no_crc = g.create_array("nocrc", shape=(32, HIDDEN), chunks=(8, HIDDEN), shards=(16, HIDDEN),
                            dtype="float32", compressors=[C.compressors(codec="fp32")[0]])
    assert DirectArray.for_array(no_crc) is None
    split_rows = g.create_array("split", shape=(32, HIDDEN), chunks=(8, 3), shards=(16, HIDDEN),
                                dtype="float32", compressors=C.compressors(codec="fp32"))
    assert DirectArray.for_array(split_rows) is None


def test_compression_choices_name_their_codec_chains():
    from pipeline.cache import codecs as C
    from pipeline.extract.config import COMPRESSION_CHOICES

    assert COMPRESSION_CHOICES == C.COMPRESSIONS
    lz4, none = C.compressors(codec="bf16"), C.compressors(codec="bf16", compression="none")
    assert (lz4[0].clevel, none[0].clevel) == (5, 0) and str(none[0].shuffle.value) == "noshuffle"
    assert C.compressors(codec="int8", compression="none")[0].cname.value == "zstd"  # int8 codes keep zstd
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        C.compressors(codec="bf16", compression="zip")


def test_shared_context_decode_equals_numcodecs_from_worker_threads_and_rejects_bad_frames():
    """``decompress_into`` (a shared context, the reader's decode threads' path) gives numcodecs'
    bytes for every shuffle and codec the store writes, from several threads at once, and
    a frame that does not fit its destination or is cut short is an error, not a partial write."""
    from numcodecs import Blosc, blosc

    from pipeline.cache.blosc_decode import decompress_into

    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((1024, 384)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    frames = [Blosc(cname=c, clevel=lvl, shuffle=s).encode(raw) for c, lvl, s in
              [("lz4", 5, Blosc.BITSHUFFLE), ("lz4", 0, Blosc.NOSHUFFLE), ("zstd", 1, Blosc.SHUFFLE)]]

    def decode(frame):
        out = np.empty_like(raw)
        decompress_into(memoryview(frame), out)
        return out

    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(decode, frames * 4))
    assert all(np.array_equal(o, raw) for o in outs)
    # both shared contexts, each called directly: c-blosc2 (the first choice, installed with lst) and
    # numcodecs' c-blosc (the fallback)
    from pipeline.cache import blosc_decode as D

    assert D.shared_decoder() == "blosc2"
    for find in (D._blosc2_decompress, D._blosc1_decompress):
        fn = find()
        for frame in frames:
            src, out = np.frombuffer(frame, np.uint8), np.empty_like(raw)
            assert fn(src.ctypes.data, src.nbytes, out.ctypes.data, out.nbytes) == raw.nbytes
            assert np.array_equal(out, raw)
    assert np.array_equal(blosc.decompress(frames[0]), raw.tobytes())
    with pytest.raises(ValueError, match="too small"):
        decompress_into(frames[0], np.empty(100, np.uint16))
    with pytest.raises(RuntimeError, match="blosc decompression"):
        decompress_into(bytes(frames[0])[:200], np.empty_like(raw))


def test_a_thread_decoder_decodes_whole_frames_and_parts_as_numcodecs_from_several_threads():
    """``ThreadDecoder`` (one c-blosc2 context per decode thread, no shared mutex) gives numcodecs'
    bytes for every shuffle and codec the store writes, whole frames and any whole-item part of one
    (only the blocks holding it are decoded), from several threads at once; a part that is not whole
    items, or runs past the frame, is an error."""
    from numcodecs import Blosc

    from pipeline.cache.blosc_decode import ThreadDecoder, contexts_available

    rng = np.random.default_rng(1)
    raw = (rng.standard_normal((1024, 384)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    frames = [bytes(Blosc(cname=c, clevel=lvl, shuffle=s, blocksize=bs).encode(raw)) for c, lvl, s, bs in
              [("lz4", 5, Blosc.BITSHUFFLE, 0), ("lz4", 5, Blosc.SHUFFLE, 65536), ("lz4", 0, Blosc.NOSHUFFLE, 0),
               ("zstd", 1, Blosc.SHUFFLE, 0)]]
    flat = raw.view(np.uint8).reshape(-1)
    assert contexts_available()  # c-blosc2 comes with lst

    def decode(job):
        frame, seed = job
        dec, r = ThreadDecoder(), np.random.default_rng(seed)
        try:
            whole = np.empty_like(raw)
            dec.decompress_into(frame, whole)
            parts = []
            for _ in range(20):
                a = int(r.integers(0, raw.size - 1)) * 2
                b = int(r.integers(a // 2 + 1, raw.size + 1)) * 2
                out = np.empty(b - a, np.uint8)
                dec.decompress_part(frame, a, out)
                parts.append(np.array_equal(out, flat[a:b]))
            return np.array_equal(whole, raw) and all(parts)
        finally:
            dec.close()

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(decode, [(f, i) for i, f in enumerate(frames * 3)]))
    dec = ThreadDecoder()
    with pytest.raises(ValueError, match="whole 2-byte items"):
        dec.decompress_part(frames[0], 1, np.empty(4, np.uint8))
    with pytest.raises(ValueError, match="whole 2-byte items"):
        dec.decompress_part(frames[0], raw.nbytes - 2, np.empty(4, np.uint8))
    with pytest.raises(ValueError, match="too small"):
        dec.decompress_into(frames[0], np.empty(100, np.uint16))
    with pytest.raises(RuntimeError, match="blosc decompression"):
        dec.decompress_into(frames[0][:200], np.empty_like(raw))
    dec.close()
    dec.close()  # closing twice frees once


def _decode_in_child(frame: bytes, n: int, q) -> None:
    from pipeline.cache.blosc_decode import decompress_into

    out = np.empty(n, np.uint16)
    decompress_into(frame, out)
    q.put(out.tobytes())


def test_a_forked_child_decodes_without_the_parents_blosc_threads():
    """c-blosc's thread pool does not survive a fork: a child forked after the parent decoded through
    the shared context (Dask or multiprocessing workers) decodes through numcodecs instead, and gets
    the same bytes instead of hanging."""
    import multiprocessing as mp

    from numcodecs import Blosc

    from pipeline.cache.blosc_decode import decompress_into

    raw = np.arange(300_000, dtype=np.uint16)
    frame = bytes(Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE).encode(raw))
    out = np.empty_like(raw)
    decompress_into(frame, out)  # the parent's pool is up
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_decode_in_child, args=(frame, raw.size, q))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == raw.tobytes() and np.array_equal(out, raw)
