"""pipeline/cache/native_read.py and read_cpu.cpp: the native frame reader decodes what Zarr reads.

Set-up builds the reader (``python -m pipeline.cache``); these tests need it. Arrays are made as
``tests/test_fastread.py`` makes them (the store's codec chain, 4-row inner chunks, 16-row shards),
and every native read is compared with Zarr's read of the same rows: whole and cut chunks, shard
edges, missing shards and chunks, runs scattered to other rows, corrupted and truncated frames, one
slot and several. The stage-two reader hands out the same batches with it and without it.
"""

from __future__ import annotations

import crc32c
import numpy as np
import pytest
import torch

from pipeline.cache import native_read
from pipeline.cache.fastread import DirectArray, FrameTasks, Segments, WindowFrames
from pipeline.errors import ChecksumError
from tests.test_fastread import HIDDEN, RANGES, ROWS, SHARD, T, _index, _make, _values, damaged_chunk


@pytest.fixture(scope="module", autouse=True)
def _built():
    assert native_read.module() is not None, "scripts/setup.sh builds the reader (python -m pipeline.cache)"


def _reader(d: DirectArray, slots: int = 2) -> native_read.FrameReader:
    return native_read.FrameReader(slots, d.chunk_nbytes + 64, d.block_nbytes(), d.chunk_nbytes)


def _decode(d: DirectArray, fill, slots: int = 2) -> None:
    tasks = FrameTasks()
    try:
        fill(tasks)
        r = _reader(d, slots)
        try:
            r.decode(tasks)
        finally:
            r.close()
    finally:
        tasks.close()


def test_crc32c_equals_the_crc32c_package_at_every_length():
    m = native_read.module()
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 4095, 12_287, 12_288, 12_289, 100_003, 786_432):
        buf = rng.integers(0, 256, n, dtype=np.uint8)
        assert m.crc32c(torch.from_numpy(buf)) == crc32c.crc32c(buf.tobytes()), n


@pytest.mark.parametrize("codec", ["bf16", "fp16", "fp32", "int8"])
@pytest.mark.parametrize("slots", [1, 2])
def test_frame_tasks_decode_what_zarr_reads(tmp_path, codec, slots):
    v = _make(tmp_path, codec)
    arr = v.tap_array(1)
    arr[:] = _values(codec, T)
    d = DirectArray.for_array(arr)
    for a, b in RANGES:
        out = np.full((b - a, HIDDEN), 99, d.dtype)
        _decode(d, lambda t: d.frame_tasks(a, b, out, t), slots)
        np.testing.assert_array_equal(out, arr[a:b], err_msg=f"rows {a}:{b}")


def test_scale_arrays_and_missing_shards_and_chunks(tmp_path):
    v = _make(tmp_path, "int8")
    sc = v.scale_array(0)
    sc[:] = np.random.default_rng(5).uniform(0.1, 2.0, T).astype(np.float32)
    ds = DirectArray.for_array(sc)
    out = np.empty(T - 3, np.float32)
    _decode(ds, lambda t: ds.frame_tasks(3, T, out, t))
    np.testing.assert_array_equal(out, sc[3:T])

    arr = v.tap_array(1)
    vals = _values("int8", T)
    arr[0:4] = vals[0:4]
    arr[8:16] = vals[8:16]  # chunk 1 of shard 0 never written; shards 1-3 never written
    arr[68:T] = vals[68:T]
    d = DirectArray.for_array(arr)
    for a, b in RANGES:
        out = np.full((b - a, HIDDEN), 99, d.dtype)
        _decode(d, lambda t: d.frame_tasks(a, b, out, t))
        np.testing.assert_array_equal(out, arr[a:b], err_msg=f"rows {a}:{b}")


def test_segments_cut_runs_at_chunk_edges_and_group_them_by_chunk():
    s = Segments(src=[2, 9, 30], n=[5, 2, 0], dst=[10, 0, 50], chunk_rows=4)
    # run 2:7 cut into 2:4 and 4:7; run 9:11 stays; the empty run goes
    assert s.chunk.tolist() == [0, 1, 2]
    assert s.src.tolist() == [2, 4, 9] and s.n.tolist() == [2, 3, 2] and s.dst.tolist() == [10, 12, 0]
    assert s.bounds.tolist() == [0, 1, 2, 3] and s.lo.tolist() == [2, 4, 9] and s.hi.tolist() == [4, 7, 11]


@pytest.mark.parametrize("compression", ["lz4", "none"])
@pytest.mark.parametrize("slots", [1, 2])
def test_scattered_runs_land_where_asked(tmp_path, slots, compression):
    """Runs of rows from anywhere (cut chunks, shard edges, a missing shard, the partial last shard) go
    to the destination rows given, as the reader lays a window out in batch order. Frames stored as they
    are (``--compression none``) are copied out of the frame itself, with no decode between."""
    v = _make(tmp_path, "bf16", compression=compression)
    arr = v.tap_array(1)
    vals = _values("bf16", T)
    arr[0:2 * SHARD] = vals[0:2 * SHARD]
    arr[3 * SHARD:T] = vals[3 * SHARD:T]  # shard 2 never written
    d = DirectArray.for_array(arr)
    rng = np.random.default_rng(1)
    bounds = np.unique(np.r_[0, rng.choice(np.arange(1, T), 20, replace=False), T])
    src, n = bounds[:-1], np.diff(bounds)
    order = rng.permutation(len(src))  # runs in a shuffled destination order
    src, n = src[order], n[order]
    dst = np.cumsum(n) - n
    out = np.full((T, HIDDEN), 99, d.dtype)
    _decode(d, lambda t: d.scatter_tasks(Segments(src, n, dst, ROWS), out, t), slots)
    want = np.concatenate([arr[s:s + k] for s, k in zip(src, n)])
    np.testing.assert_array_equal(out, want)
    if compression == "none":  # the frames are Blosc1's stored-as-is ones the native reader copies from
        f = d._shard_file(0)
        off, nbytes = (int(x) for x in _index(f, d.chunks_per_shard)[0])
        head = f.read_bytes()[off:off + 16]
        assert head[2] & 0x02 and int.from_bytes(head[12:16], "little") == nbytes - 4 == d.chunk_nbytes + 16


def test_a_flipped_frame_byte_names_its_rows_and_a_cut_file_is_an_error(tmp_path):
    arr, d = damaged_chunk(tmp_path)  # rows 24:28
    out = np.empty((T, HIDDEN), d.dtype)
    with pytest.raises(ChecksumError, match=r"rows 24:28 fails its checksum"):
        _decode(d, lambda t: d.frame_tasks(0, T, out, t))
    with pytest.raises(ChecksumError, match=r"rows 24:28"):
        _decode(d, lambda t: d.scatter_tasks(Segments([25], [2], [0], ROWS), out, t))
    # rows beside the damaged chunk still decode
    _decode(d, lambda t: d.frame_tasks(0, 24, out[:24], t))
    np.testing.assert_array_equal(out[:24], arr[0:24])

    g = d._shard_file(3)  # cut the file inside its chunks' frames, keep a valid index at its end
    data = g.read_bytes()
    idx = _index(g, d.chunks_per_shard)
    tail = data[len(data) - 16 * d.chunks_per_shard - 4:]
    last_off = int(idx[:, 0].max())
    g.write_bytes(data[:last_off + 4] + tail)  # the last frame: 4 bytes, then the index
    with pytest.raises(ChecksumError):
        _decode(d, lambda t: d.frame_tasks(3 * SHARD, 4 * SHARD, out[:SHARD], t))


def test_the_reader_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(native_read.ENV, "0")
    assert native_read.module() is None
    monkeypatch.setenv(native_read.ENV, "1")
    monkeypatch.setenv("LST_CPU_KERNELS", "off")
    assert native_read.module() is None


def _read_ahead(d: DirectArray, segs: Segments, out: np.ndarray, nbytes: int = 1 << 20) -> int:
    """``segs`` decoded into ``out`` from frames read ahead (``train.prefetch``; by default even those in
    the page cache, as a freshly written store's all are); how many came from it."""
    from pipeline.train.prefetch import FramePrefetch

    ahead = FramePrefetch(nbytes, skip_cached=False)
    try:
        ahead.start("window", lambda: WindowFrames(segs, [d]))
        assert ahead.listed("another window") is None
        listed = ahead.listed("window")
        _decode(d, lambda t: d.scatter_tasks(segs, out, t, listed.found[0], listed.copies[0]))
        return listed.placed
    finally:
        ahead.close()


@pytest.mark.parametrize("compression", ["lz4", "none"])
@pytest.mark.parametrize("nbytes", [1 << 20, 3 * 4096])
def test_frames_read_ahead_decode_as_frames_read_by_the_decode(tmp_path, nbytes, compression):
    """Frames read ahead with O_DIRECT are checked and decoded from memory into the same rows; past the
    buffer's room (a few blocks), the rest are read by the decode as before."""
    v = _make(tmp_path, "bf16", compression=compression)
    arr = v.tap_array(1)
    arr[0:T] = _values("bf16", T)
    d = DirectArray.for_array(arr)
    rng = np.random.default_rng(2)
    bounds = np.unique(np.r_[0, rng.choice(np.arange(1, T), 12, replace=False), T])
    src, n = bounds[:-1], np.diff(bounds)
    order = rng.permutation(len(src))
    src, n = src[order], n[order]
    segs = Segments(src, n, np.cumsum(n) - n, ROWS)
    frames = WindowFrames(segs, [d]).frames()
    assert len(frames) == len(segs.chunk) and all(f.exists() and k > 0 for f, _, k in frames)
    out = np.full((T, HIDDEN), 99, d.dtype)
    used = _read_ahead(d, segs, out, nbytes)
    assert 0 < used <= len(frames) and (used == len(frames)) == (nbytes == 1 << 20)
    np.testing.assert_array_equal(out, np.concatenate([arr[s:s + k] for s, k in zip(src, n)]))


def test_frames_in_the_page_cache_are_left_to_the_decode(tmp_path):
    """Read-ahead skips the frames the page cache holds (the decode reads them there) and reads the
    rest; either way the rows decoded are the store's."""
    from pipeline.cache import page_cache

    from pipeline.train.prefetch import FramePrefetch

    v = _make(tmp_path, "bf16")
    arr = v.tap_array(1)
    arr[0:T] = _values("bf16", T)
    d = DirectArray.for_array(arr)
    segs = Segments([0], [T], [0], ROWS)
    for cold in (False, True):
        window = WindowFrames(segs, [d])  # listed here: these shard files are a page each, index and all
        if cold:
            assert page_cache.evict(tmp_path) > 0
        ahead = FramePrefetch(1 << 20)
        try:
            ahead.start("window", lambda: window)
            listed = ahead.listed("window")
            n = len(listed.frames())
            assert (listed.placed, listed.in_page_cache) == ((n, 0) if cold else (0, n))
            out = np.full((T, HIDDEN), 99, d.dtype)
            _decode(d, lambda t: d.scatter_tasks(segs, out, t, listed.found[0], listed.copies[0]))
        finally:
            ahead.close()
        np.testing.assert_array_equal(out, arr[0:T])


def test_a_flipped_byte_in_a_frame_read_ahead_names_its_rows(tmp_path):
    arr, d = damaged_chunk(tmp_path)  # rows 24:28
    out = np.empty((T, HIDDEN), d.dtype)
    with pytest.raises(ChecksumError, match=r"rows 24:28 fails its checksum"):
        _read_ahead(d, Segments([0], [T], [0], ROWS), out)


def test_read_ahead_ranges_are_block_aligned_merged_and_within_room():
    from pipeline.train.prefetch import ALIGN, MERGE_GAP, aligned_ranges

    frames = [(10 ** 6, 10), (5000, 100), (12_298, 50)]
    assert aligned_ranges(frames, room=1 << 30) == [(4096, 16_384, [(5000, 100), (12_298, 50)]),
                                                    (999_424, 1_003_520, [(10 ** 6, 10)])]
    # the far frame does not fit the room left: it is left to the decode
    assert aligned_ranges(frames, room=3 * ALIGN) == [(4096, 16_384, [(5000, 100), (12_298, 50)])]
    assert aligned_ranges(frames, room=ALIGN) == [(4096, 8192, [(5000, 100)])]
    # frames within MERGE_GAP of the range before are read with it, gap and all
    assert aligned_ranges([(0, 1), (ALIGN + MERGE_GAP, 1)], room=1 << 20) == [
        (0, 2 * ALIGN + MERGE_GAP, [(0, 1), (ALIGN + MERGE_GAP, 1)])]
    assert len(aligned_ranges([(0, 1), (2 * ALIGN + MERGE_GAP, 1)], room=1 << 20)) == 2


def test_a_window_listed_once_binds_its_frames_to_their_copies(tmp_path):
    """``WindowFrames`` lists each array's frames in the decode's order; the tasks built from it are the
    tasks built from the shard indexes, but for the frames given a copy, which point at it (fd -1)."""
    v = _make(tmp_path, "bf16")
    for tap in (0, 1):
        v.tap_array(tap)[0:T] = _values("bf16", T)
    arrays = [DirectArray.for_array(v.tap_array(tap)) for tap in (0, 1)]
    segs = Segments([SHARD + 5, 2, 3 * SHARD], [6, 9, 4], [0, 6, 15], ROWS)
    listed = WindowFrames(segs, arrays)
    frames = listed.frames()
    per_array = len(frames) // 2
    assert per_array == len(segs.chunk) and frames[:per_array] != frames[per_array:]
    listed.place([0] * (len(frames) - 1) + [7777])
    assert listed.placed == 1
    out = np.empty((19, HIDDEN), arrays[0].dtype)
    for k, d in enumerate(arrays):
        plain, bound = FrameTasks(), FrameTasks()
        try:
            d.scatter_tasks(segs, out, plain)
            d.scatter_tasks(segs, out, bound, listed.found[k], listed.copies[k])
            a, b = plain.task_table(), bound.task_table()
            assert plain.where == bound.where and np.array_equal(a[:, 2:], b[:, 2:])
            same = slice(None) if k == 0 else slice(0, -1)
            assert np.array_equal(a[same, 1], b[same, 1])
            if k == 1:
                assert b[-1, :2].tolist() == [-1, 7777] and a[-1, 0] >= 0
        finally:
            plain.close()
            bound.close()
