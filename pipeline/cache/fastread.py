"""Direct decoding of the cache's sharded arrays from local shard files: the stage-two hot path.

Zarr's generic async codec pipeline decodes our shards at 250-550 MB/s on two cores; decoding the
same bytes ourselves, inner chunks in parallel threads (Blosc releases the GIL), runs at 1-1.4 GB/s.
The format is the Zarr v3 sharding spec: a shard file is the concatenated inner chunks followed by
an index of (offset, nbytes) uint64 pairs and its crc32c. Each inner chunk is a Blosc frame
followed by the crc32c of that frame (the chain ``create_store`` writes). Both checksums are
verified, so corruption is still an error.

Only arrays whose codec chain is exactly that, in a local store, take this path;
``DirectArray.for_array`` returns None for anything else and callers fall back to Zarr.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import crc32c
import numpy as np
import zarr
from numcodecs import blosc

from pipeline.cache.blosc_decode import (HEADER_BYTES, ThreadDecoder, context_nbytes, contexts_available,
                                          decompress_into, header_block_nbytes)
from pipeline.errors import ChecksumError

EMPTY = np.uint64(2**64 - 1)
# most bytes a Blosc frame adds to its payload (header; incompressible data is stored verbatim) plus
# the crc32c that follows it, with room to spare
FRAME_OVERHEAD = 64
#: what every damaged-shard error tells the user to do
DAMAGED = "the store is damaged: re-extract it (`lst extract ... --overwrite`); `lst verify` lists every bad shard"


def damaged_shard(f: Path | str, what: str) -> ChecksumError:
    """The error for a shard file that fails a check: the file, what is wrong with it and what to do
    (a ``CacheError``, so ``lst`` reports it in one line instead of a traceback)."""
    return ChecksumError(f"{f}: {what}; {DAMAGED}")


class DirectArray:
    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, shard_rows: int, chunk_rows: int,
                 fill_value):
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.chunk_rows = chunk_rows
        self.chunks_per_shard = shard_rows // chunk_rows
        self.row_shape = shape[1:]
        self.fill_value = fill_value
        self._block_nbytes: int | None = None
        self._shard_files: dict[int, Path] = {}  # one Path a shard: its string and hash are worked out once

    @classmethod
    def for_array(cls, arr: zarr.Array) -> "DirectArray | None":
        try:
            from zarr.storage import LocalStore

            store = arr.store
            if not isinstance(store, LocalStore):
                return None
            codecs = arr.metadata.codecs
            if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
                return None
            sh = codecs[0]
            inner = [type(c).__name__ for c in sh.codecs]
            index = [type(c).__name__ for c in sh.index_codecs]
            if inner != ["BytesCodec", "BloscCodec", "Crc32cCodec"] or index != ["BytesCodec", "Crc32cCodec"]:
                return None
            if str(sh.index_location.value if hasattr(sh.index_location, "value") else sh.index_location) != "end":
                return None
            if any(c != s for c, s in zip(sh.chunk_shape[1:], arr.shape[1:])):
                return None
            endian = getattr(sh.codecs[0], "endian", None)
            if endian is not None and str(getattr(endian, "value", endian)) not in ("little", "None"):
                return None
            shard_rows = arr.metadata.chunk_grid.chunk_shape[0]
            return cls(Path(store.root) / arr.path, tuple(arr.shape), np.dtype(arr.dtype.to_native_dtype()
                       if hasattr(arr.dtype, "to_native_dtype") else arr.dtype), shard_rows, sh.chunk_shape[0],
                       arr.fill_value)
        except Exception:  # noqa: BLE001 - any surprise means: use Zarr
            return None

    def _shard_file(self, shard: int) -> Path:
        f = self._shard_files.get(shard)
        if f is None:
            f = self._shard_files[shard] = self.path.joinpath("c", str(shard), *["0"] * len(self.row_shape))
        return f

    def read(self, start: int, end: int, pool: Executor | None = None) -> np.ndarray:
        out = np.empty((end - start, *self.row_shape), dtype=self.dtype)
        jobs = []
        for shard in range(start // self.shard_rows, (end - 1) // self.shard_rows + 1 if end > start else 0):
            s0 = shard * self.shard_rows
            f = self._shard_file(shard)
            if not f.exists():
                out[max(start, s0) - start:min(end, s0 + self.shard_rows) - start] = self.fill_value
                continue
            buf = f.read_bytes()
            n = self.chunks_per_shard
            index = self._parse_index(memoryview(buf)[max(len(buf) - self.index_nbytes, 0):], len(buf), f)
            for c in range(n):
                c0 = s0 + c * self.chunk_rows
                c1 = c0 + self.chunk_rows
                if c1 <= start or c0 >= end:
                    continue
                jobs.append((buf, index[c], c0, c1, start, end, out, f))
        if pool is not None and len(jobs) > 1:
            list(pool.map(self._decode, jobs))
        else:
            for j in jobs:
                self._decode(j)
        return out

    def _decode(self, job) -> None:
        buf, (off, nbytes), c0, c1, start, end, out, f = job
        lo, hi = max(c0, start), min(c1, end)
        if off == EMPTY:
            out[lo - start:hi - start] = self.fill_value
            return
        mv = memoryview(buf)[int(off):int(off) + int(nbytes)]
        frame = mv[:-4]
        if crc32c.crc32c(frame) != int.from_bytes(mv[-4:], "little"):
            raise damaged_shard(f, f"chunk at rows {c0}:{c1} fails its checksum")
        if lo == c0 and hi == c1:
            blosc.decompress(frame, out[lo - start:hi - start])
        else:
            tmp = np.empty((self.chunk_rows, *self.row_shape), dtype=self.dtype)
            blosc.decompress(frame, tmp)
            out[lo - start:hi - start] = tmp[lo - c0:hi - c0]

    # -- bounded reads (the stage-two reader) -----------------------------------------------------
    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one inner chunk."""
        return self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def index_nbytes(self) -> int:
        """Bytes of one shard's index (with its checksum)."""
        return 16 * self.chunks_per_shard + 4

    def block_nbytes(self) -> int:
        """Decoded bytes of the Blosc blocks of this array's frames, from the first stored frame's
        header (the store writes every chunk of an array with one codec setting); ``chunk_nbytes``, the
        most a block can be, where there is no frame yet or its header is unreadable."""
        if self._block_nbytes is None:
            self._block_nbytes = self.chunk_nbytes
            f = self._shard_file(0)
            try:
                with open(f, "rb") as fh:
                    for off, _ in self._shard_index(fh.fileno(), f):
                        if off != EMPTY:
                            block = header_block_nbytes(os.pread(fh.fileno(), HEADER_BYTES, int(off)))
                            if 0 < block <= self.chunk_nbytes:
                                self._block_nbytes = block
                            break
            except (OSError, ValueError):  # no file, or a damaged one (ChecksumError): its read reports it
                pass
        return self._block_nbytes

    def max_read_bytes(self) -> int:
        """Most bytes one ``read_into`` call holds at any moment besides ``out``: the shard index
        (raw and parsed), one compressed chunk frame and, at a range edge, one decoded chunk."""
        return 2 * self.chunk_nbytes + FRAME_OVERHEAD + 2 * self.index_nbytes

    def read_into(self, start: int, end: int, out: np.ndarray,
                  track: Callable[[int, int], ContextManager] | None = None,
                  scratch: "ReadScratch | None" = None) -> None:
        """Rows [start, end) into ``out`` (shape [end - start, *row_shape], this dtype).

        Unlike ``read`` it never loads a whole shard file: it reads the shard index and then the
        compressed frame of each overlapping inner chunk (``os.pread``), one chunk at a time, and
        decodes it straight into ``out`` (through a one-chunk scratch only where the range cuts a
        chunk). ``track(encoded_bytes, scratch_bytes)`` returns a context manager held while those
        buffers are alive, so a caller can account for them. With a ``scratch`` (one per thread) the
        frame and the cut chunk land in its reused buffers instead, and ``track`` sees only the index:
        the caller accounts for the scratch as long as it keeps it. Checksums are verified as in ``read``.
        Frames decode through a shared context (``decompress_into``: c-blosc2's, else c-blosc's): the
        reader's decode threads would otherwise allocate and fault in a context's temporaries on every frame.
        """
        if end <= start:
            return
        track = track or (lambda e, s: nullcontext())
        for shard in range(start // self.shard_rows, (end - 1) // self.shard_rows + 1):
            s0 = shard * self.shard_rows
            lo_s, hi_s = max(start, s0), min(end, s0 + self.shard_rows)
            f = self._shard_file(shard)
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                out[lo_s - start:hi_s - start] = self.fill_value
                continue
            try:
                with track(2 * self.index_nbytes, 0):
                    index = self._shard_index(fd, f)
                    for c0, c1, lo, hi, off, nbytes in self._chunks_of(index, s0, lo_s, hi_s):
                        if off == EMPTY:
                            out[lo - start:hi - start] = self.fill_value
                            continue
                        partial = not (lo == c0 and hi == c1)
                        n_frame = int(nbytes)
                        held = (0, 0) if scratch is not None else (n_frame, self.chunk_nbytes if partial else 0)
                        with track(*held):
                            if scratch is None:
                                raw = os.pread(fd, n_frame, int(off))
                                got, mv = len(raw), memoryview(raw)
                            else:
                                mv = scratch.frame(n_frame)
                                got = os.preadv(fd, [mv], int(off))
                            if got != n_frame or crc32c.crc32c(mv[:-4]) != int.from_bytes(mv[-4:], "little"):
                                raise damaged_shard(f, f"chunk at rows {c0}:{c1} fails its checksum")
                            dec = scratch.decoder if scratch is not None and out.flags.c_contiguous else None
                            if dec is not None and partial:
                                # only the blocks holding the rows, straight into ``out``
                                row_bytes = self.chunk_nbytes // self.chunk_rows
                                dec.decompress_part(mv[:-4], (lo - c0) * row_bytes, out[lo - start:hi - start])
                            elif dec is not None:
                                dec.decompress_into(mv[:-4], out[lo - start:hi - start])
                            elif partial:
                                shape = (self.chunk_rows, *self.row_shape)
                                tmp = np.empty(shape, self.dtype) if scratch is None else \
                                    scratch.chunk(self.chunk_nbytes).view(self.dtype).reshape(shape)
                                decompress_into(mv[:-4], tmp)
                                out[lo - start:hi - start] = tmp[lo - c0:hi - c0]
                                del tmp
                            else:
                                decompress_into(mv[:-4], out[lo - start:hi - start])
                            del mv
                            raw = None  # the pread's bytes go while the accounting still holds them
            finally:
                os.close(fd)

    def _shard_index(self, fd: int, f: Path) -> np.ndarray:
        """The open shard file's index, [chunks, 2] (offset, nbytes), checked (``_parse_index``)."""
        size = os.fstat(fd).st_size
        return self._parse_index(os.pread(fd, self.index_nbytes, max(size - self.index_nbytes, 0)), size, f)

    def _parse_index(self, raw: bytes | memoryview, size: int, f: Path) -> np.ndarray:
        """The index at the end (``raw``) of a ``size``-byte shard file, [chunks, 2] (offset, nbytes).

        Why each check: a file cut short (a truncated copy, a full disk) has no index or garbage where
        it should be, and an unchecked offset read from it makes ``pread`` fail with an ``OverflowError``
        or ``EINVAL`` instead of saying which file is damaged; every frame must lie before the index."""
        if size < self.index_nbytes or len(raw) != self.index_nbytes:
            raise damaged_shard(f, f"{size} bytes, too short to hold its shard index ({self.index_nbytes} bytes)")
        if crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise damaged_shard(f, "shard index checksum mismatch (the file is cut short or overwritten)")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.chunks_per_shard, 2)
        off, nbytes = index[:, 0], index[:, 1]
        room = np.uint64(size - self.index_nbytes)
        if ((off != EMPTY) & ((off > room) | (nbytes > room - np.minimum(off, room)))).any():
            raise damaged_shard(f, "its shard index points past the end of the file")
        return index

    def _chunks_of(self, index: np.ndarray, s0: int, lo_s: int, hi_s: int):
        """(first row, end row, first row wanted, end row wanted, frame offset, frame bytes) of each
        inner chunk of the shard at row ``s0`` that rows [lo_s, hi_s) overlap."""
        for c in range((lo_s - s0) // self.chunk_rows, (hi_s - 1 - s0) // self.chunk_rows + 1):
            c0 = s0 + c * self.chunk_rows
            c1 = c0 + self.chunk_rows
            off, nbytes = index[c]
            yield c0, c1, max(c0, lo_s), min(c1, hi_s), off, nbytes

    def frame_tasks(self, start: int, end: int, out: np.ndarray, tasks: "FrameTasks") -> None:
        """Rows [start, end) into ``out`` (C-contiguous, shape [end - start, *row_shape]), as tasks for the
        native frame reader (``native_read``): each overlapping inner chunk's frame, to be read from the
        shard file ``tasks`` holds open, checked and decoded into ``out`` (only the blocks of the rows
        wanted where the range cuts the chunk). Shard indexes are read and verified here; rows with no
        file or no chunk take the fill value now."""
        if end <= start:
            return
        if not out.flags.c_contiguous:
            raise ValueError("native frame reads go into C-contiguous buffers only")
        row_bytes = self.chunk_nbytes // self.chunk_rows
        base = out.ctypes.data
        for shard in range(start // self.shard_rows, (end - 1) // self.shard_rows + 1):
            s0 = shard * self.shard_rows
            lo_s, hi_s = max(start, s0), min(end, s0 + self.shard_rows)
            f = self._shard_file(shard)
            fd = tasks.open(f)
            if fd is None:
                out[lo_s - start:hi_s - start] = self.fill_value
                continue
            index = tasks.index(fd, f, self._shard_index)
            for c0, c1, lo, hi, off, nbytes in self._chunks_of(index, s0, lo_s, hi_s):
                if off == EMPTY:
                    out[lo - start:hi - start] = self.fill_value
                    continue
                part = -1 if (lo == c0 and hi == c1) else (lo - c0) * row_bytes
                tasks.add(fd, int(off), int(nbytes), base + (lo - start) * row_bytes, (hi - lo) * row_bytes, part,
                          (f, c0, c1))

    def scatter_tasks(self, segs: "Segments", out: np.ndarray, tasks: "FrameTasks",
                      found: list[tuple[Path, np.ndarray, np.ndarray]] | None = None,
                      copies: np.ndarray | None = None) -> None:
        """``segs``' runs of rows into rows of ``out`` (C-contiguous, [rows, *row_shape]), as tasks for the
        native frame reader: each inner chunk's frame decoded once (only its blocks holding wanted rows
        where the runs do not cover it) into the reader's chunk scratch, and its runs copied out. Rows with
        no file or no chunk take the fill value now. Built with array arithmetic over every chunk at once
        (the Python loop is per shard file): a MiniLM window has ~100 chunks and ~3,000 runs a tap. What
        does not depend on the array (its chunks' shards, their byte ranges, the segment table but for
        its destinations) is worked out once per ``Segments`` for all arrays of its layout.
        ``found``: this array's frames as ``chunk_frames`` lists them, where a ``WindowFrames`` did
        already (else the shard indexes are read here); ``copies``: the address in memory of each chunk's
        frame where it was read ahead (0: the decode reads it from its file)."""
        if not out.flags.c_contiguous:
            raise ValueError("native frame reads go into C-contiguous buffers only")
        if segs.chunk_rows != self.chunk_rows:
            raise ValueError(f"segments cut at {segs.chunk_rows}-row chunks, this array's are {self.chunk_rows} rows")
        if not len(segs.chunk):
            return
        g = self.geometry(segs)
        rows = g.rows.copy()  # fd, offset, frame bytes to come (-1: none); the rest is the layout's
        files = {}
        for f, at, got in (self.chunk_frames(segs, tasks) if found is None else found):
            fd = tasks.open(f)
            if fd is None:  # (gone since it was listed: its rows take the fill value)
                continue
            rows[at, 0], rows[at, 1], rows[at, 2] = fd, got[:, 0], got[:, 1]
            files[fd] = f
        empty = rows[:, 1] == -1
        for k in np.flatnonzero(empty).tolist():  # no file or no chunk: the fill value, now
            a, b = int(segs.bounds[k]), int(segs.bounds[k + 1])
            for d, n in zip(segs.dst[a:b].tolist(), segs.n[a:b].tolist()):
                out[d:d + n] = self.fill_value
        table = g.table.copy()
        table[:, 2] += out.ctypes.data
        keep = np.flatnonzero(~empty)
        where = [(files[fd], c0, c0 + self.chunk_rows)
                 for fd, c0 in zip(rows[keep, 0].tolist(), g.first_row[keep].tolist())]
        if copies is not None:  # fd -1 and the copy's address: ``read_cpu.cpp`` checks and decodes it there
            held = (copies != 0) & ~empty
            rows[held, 0], rows[held, 1] = -1, copies[held]
        tasks.add_many(rows[keep], table, where)

    def geometry(self, segs: "Segments") -> "ScatterGeometry":
        return segs.geometry(self.shard_rows // self.chunk_rows, self.chunk_nbytes // self.chunk_rows)

    def chunk_frames(self, segs: "Segments", tasks: "FrameTasks"):
        """Per shard file of ``segs``' chunks that exists: (file, the chunks' positions in its geometry,
        their (frame offset, frame bytes) from its checked index, EMPTY read as -1). ``tasks`` opens the
        files and reads each index once."""
        g = self.geometry(segs)
        for sh, at in g.by_shard:
            f = self._shard_file(sh)
            fd = tasks.open(f)
            if fd is None:
                continue
            yield f, at, tasks.index(fd, f, self._shard_index)[g.chunk_in_shard[at]].astype(np.int64)


class WindowFrames:
    """The frames ``DirectArray.scatter_tasks`` reads for each of ``arrays`` over ``segs``, listed once
    from their checked shard indexes. Why once: a window read ahead (``train.prefetch``) is listed on
    the read-ahead thread, to read its frames, and its decode then binds the same list to its buffers
    and to the copies read ahead (``copies``). The consumer had listed it again and then found each
    copy with a per-frame Python loop: its window preparation took 0.112 s of a cached MiniLM SST-2
    epoch, 0.080 s without (session 38). It holds the window's own chunks' rows only, so it grows with
    the window, not the cache. ``files``: where the decode's ``FrameTasks`` lists it, its descriptors
    and indexes are kept for the decode; else they are closed once listed."""

    def __init__(self, segs: "Segments", arrays: list[DirectArray], files: "FrameTasks | None" = None) -> None:
        self.segs = segs
        own = files is None
        files = FrameTasks() if own else files
        try:
            self.found = [list(a.chunk_frames(segs, files)) for a in arrays]
        finally:
            if own:
                files.close()
        # each array's frames in the decode's order: their chunks' positions, files, offsets and bytes
        self._listed = []
        for found in self.found:
            pos = np.concatenate([at for _, at, _ in found]) if found else np.zeros(0, np.int64)
            got = np.concatenate([g for _, _, g in found]) if found else np.zeros((0, 2), np.int64)
            which = np.repeat(np.arange(len(found)), [len(at) for _, at, _ in found])
            order = np.argsort(pos, kind="stable")
            order = order[got[order, 0] != -1]  # EMPTY: no frame, the fill value
            self._listed.append((pos[order], [found[i][0] for i in which[order].tolist()], got[order]))
        self.copies = [np.zeros(len(segs.chunk), np.int64) for _ in arrays]
        self.placed = 0  # how many frames have a copy
        self.in_page_cache = 0  # how many were left to the decode as already in the page cache

    def frames(self) -> list[tuple[Path, int, int]]:
        """Every frame as (file, offset, bytes), in the decode's order: each array's in turn, by chunk."""
        return [(f, off, n) for _, fs, got in self._listed for f, (off, n) in zip(fs, got.tolist())]

    def place(self, addresses: list[int]) -> None:
        """Where ``frames()`` (in its order) were read into memory: an address each, 0 where not read."""
        addr = np.asarray(addresses, np.int64)
        i = 0
        for copies, (pos, _, _) in zip(self.copies, self._listed):
            copies[pos] = addr[i:i + len(pos)]
            i += len(pos)
        self.placed = int(np.count_nonzero(addr))


class ScatterGeometry:
    """What ``DirectArray.scatter_tasks`` needs of a ``Segments`` beside the array itself, for arrays
    of ``chunks_per_shard`` chunks a shard and ``row_bytes`` bytes a row: each chunk's shard (grouped,
    ``by_shard``: shard, positions), its index within the shard and first row, the task rows but for
    the file, frame offset and frame bytes, and the segment table with destinations relative to the
    buffer's start."""

    def __init__(self, segs: "Segments", chunks_per_shard: int, row_bytes: int) -> None:
        shard, self.chunk_in_shard = np.divmod(segs.chunk, chunks_per_shard)
        order = np.argsort(shard, kind="stable")
        cut = np.flatnonzero(np.diff(shard[order])) + 1
        self.by_shard = [(int(shard[o[0]]), o) for o in np.split(order, cut)] if len(order) else []
        self.first_row = segs.chunk * segs.chunk_rows
        whole = (segs.lo == self.first_row) & (segs.hi == self.first_row + segs.chunk_rows)
        n = len(segs.chunk)
        self.rows = np.zeros((n, FrameTasks.COLS), np.int64)
        self.rows[:, 0:2] = -1  # no file, no frame: until the array's shard indexes say where
        self.rows[:, 4] = (segs.hi - segs.lo) * row_bytes
        self.rows[:, 5] = np.where(whole, -1, (segs.lo - self.first_row) * row_bytes)
        self.rows[:, 6], self.rows[:, 7] = segs.bounds[:-1], segs.bounds[1:]
        lo_of_seg = np.repeat(segs.lo, np.diff(segs.bounds))
        self.table = np.stack([(segs.src - lo_of_seg) * row_bytes, segs.n * row_bytes, segs.dst * row_bytes], axis=1)


class Segments:
    """Runs of rows (first source row, rows, first destination row) cut at the edges of ``chunk_rows``-row
    inner chunks and grouped by chunk: group ``g`` is chunk ``chunk[g]`` (global, row // chunk_rows),
    whose rows [lo[g], hi[g]) are wanted, by segments [bounds[g], bounds[g + 1]) in source order.
    Arrays of one store share their row layout, so one ``Segments`` serves every tap."""

    def __init__(self, src: np.ndarray, n: np.ndarray, dst: np.ndarray, chunk_rows: int) -> None:
        src, n, dst = (np.asarray(x, np.int64) for x in (src, n, dst))
        keep = n > 0
        src, n, dst = src[keep], n[keep], dst[keep]
        first, last = src // chunk_rows, (src + n - 1) // chunk_rows
        parts = last - first + 1
        run = np.repeat(np.arange(len(src)), parts)
        k = np.arange(len(run)) - np.repeat(np.cumsum(parts) - parts, parts)  # the part of its run
        chunk = first[run] + k
        s0 = np.maximum(src[run], chunk * chunk_rows)
        s1 = np.minimum(src[run] + n[run], (chunk + 1) * chunk_rows)
        order = np.lexsort((s0, chunk))
        self.chunk_rows = int(chunk_rows)
        self.src, self.n = s0[order], (s1 - s0)[order]
        self.dst = (dst[run] + (s0 - src[run]))[order]
        seg_chunk = chunk[order]
        starts = np.flatnonzero(np.r_[True, seg_chunk[1:] != seg_chunk[:-1]]) if len(seg_chunk) else \
            np.zeros(0, np.int64)
        self.chunk = seg_chunk[starts]
        self.bounds = np.r_[starts, len(seg_chunk)].astype(np.int64)
        self.lo = self.src[starts] if len(starts) else np.zeros(0, np.int64)
        ends = self.src + self.n
        self.hi = np.maximum.reduceat(ends, starts) if len(starts) else np.zeros(0, np.int64)
        self._geometry: dict[tuple[int, int], ScatterGeometry] = {}

    def geometry(self, chunks_per_shard: int, row_bytes: int) -> ScatterGeometry:
        """The arrays' side of ``DirectArray.scatter_tasks``, worked out once for every array of the
        window that shares it (a MiniLM window's 7 taps: a cached SST-2 epoch's 175 calls took 19-22 ms
        against 31-34 ms, session 32)."""
        key = (int(chunks_per_shard), int(row_bytes))
        g = self._geometry.get(key)
        if g is None:
            g = self._geometry[key] = ScatterGeometry(self, *key)
        return g


class FrameTasks:
    """Frames for one call of the native frame reader, and the shard files they are read from (open
    until ``close``, their checked indexes kept as long). ``where[i]`` names task ``i``'s file and
    rows, for errors. A task with a segment table (``scatter_tasks``) decodes into the reader's chunk
    scratch and copies its runs out."""

    COLS = 8  # fd, file offset, frame bytes with its crc32c, destination address (0: segments), its bytes,
    # part offset or -1, first and end row of its segments in the joined table
    SEG_COLS = 3  # source byte offset from the first wanted byte, bytes, destination address

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []  # blocks of task rows, [n, COLS] each, in task order
        self.where: list[tuple[Path, int, int]] = []
        self.tables: list[np.ndarray] = []
        self.segments = 0
        self._fds: dict[Path, int] = {}
        self._indexes: dict[Path, np.ndarray] = {}

    def index(self, fd: int, f: Path, read: Callable[[int, Path], np.ndarray]) -> np.ndarray:
        """Shard file ``f``'s index, read (``read(fd, f)``) once per call."""
        idx = self._indexes.get(f)
        if idx is None:
            idx = self._indexes[f] = read(fd, f)
        return idx

    def task_table(self) -> np.ndarray:
        """Every task, joined: int64 [F, COLS]."""
        return np.concatenate(self._rows) if self._rows else np.zeros((0, self.COLS), np.int64)

    def segment_table(self) -> np.ndarray:
        """Every task's segments, joined: int64 [S, SEG_COLS]."""
        return np.concatenate(self.tables) if self.tables else np.zeros((0, self.SEG_COLS), np.int64)

    def __len__(self) -> int:
        return len(self.where)

    def open(self, f: Path) -> int | None:
        """The shard file's descriptor (opened once per call), None where there is no such file."""
        fd = self._fds.get(f)
        if fd is None:
            try:
                fd = os.open(f, os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._fds[f] = fd
        return fd

    def add(self, fd: int, offset: int, nbytes: int, dest: int, dest_nbytes: int, part: int,
            where: tuple[Path, int, int]) -> None:
        """One frame decoded straight into ``dest`` (no segments)."""
        self._rows.append(np.array([[fd, offset, nbytes, dest, dest_nbytes, part, 0, 0]], np.int64))
        self.where.append(where)

    def add_many(self, rows: np.ndarray, table: np.ndarray, where: list[tuple[Path, int, int]]) -> None:
        """Tasks [n, COLS] whose segment columns count rows of ``table`` (which joins the table here)."""
        rows = rows.astype(np.int64, copy=True)
        rows[:, 6:8] += self.segments
        self.tables.append(table.astype(np.int64, copy=False))
        self.segments += len(table)
        self._rows.append(rows)
        self.where.extend(where)

    def close(self) -> None:
        self._indexes = {}
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


class ReadScratch:
    """One thread's reused buffers for ``DirectArray.read_into``: a compressed frame, a decoding
    context of its own (``ThreadDecoder``) and, only where there is no such context, a decoded chunk.

    Why: a fresh buffer per chunk (the ``bytes`` of a pread, a cut chunk's ``np.empty``) is, under
    lst's 128 KiB mmap threshold, mapped and zero-filled page by page and unmapped again: on a cached
    MiniLM SST-2 epoch, ~330 k page faults and ~0.5 s of the reader's CPU. These grow to the largest
    frame and chunk asked for and are reused; ``nbytes`` is what they hold, for the caller's accounting.
    With a context, a chunk cut at a range edge decodes its needed blocks straight into the
    destination, so no chunk scratch is kept; the context's temporaries (``context_nbytes`` of
    ``block_bytes``) count instead.
    """

    def __init__(self, frame_bytes: int = 0, chunk_bytes: int = 0, block_bytes: int | None = None) -> None:
        """Sized up front (``frame_bytes``, ``chunk_bytes``, the frames' ``block_bytes``, at most
        ``chunk_bytes``) where the caller knows the largest it reads, so what it accounts for never
        changes."""
        self._frame = bytearray(frame_bytes)
        self.decoder: ThreadDecoder | None = ThreadDecoder() if contexts_available() else None
        self._decoder_bytes, chunk = self._besides_frame(chunk_bytes, block_bytes)
        self._chunk = np.empty(chunk, np.uint8)

    @staticmethod
    def _besides_frame(chunk_bytes: int, block_bytes: int | None) -> tuple[int, int]:
        """(decoding context, chunk buffer) bytes a scratch holds beside its frame buffer: the context's
        temporaries where c-blosc2 has contexts, else a decoded chunk."""
        if contexts_available():
            return context_nbytes(chunk_bytes if block_bytes is None else block_bytes), 0
        return 0, chunk_bytes

    @staticmethod
    def sizes(frame_bytes: int, chunk_bytes: int, block_bytes: int | None = None) -> int:
        """``nbytes`` of a scratch built with these sizes (for planning before any is built)."""
        return frame_bytes + sum(ReadScratch._besides_frame(chunk_bytes, block_bytes))

    @property
    def nbytes(self) -> int:
        return len(self._frame) + self._chunk.nbytes + self._decoder_bytes

    def frame(self, n: int) -> memoryview:
        """A writable buffer of exactly ``n`` bytes (the first ``n`` of the frame buffer)."""
        if len(self._frame) < n:
            self._frame = bytearray(n + n // 8)  # frames differ a little in size: grow once, not per frame
        return memoryview(self._frame)[:n]

    def chunk(self, n: int) -> np.ndarray:
        """A uint8 array of exactly ``n`` bytes (the first ``n`` of the chunk buffer)."""
        if self._chunk.nbytes < n:
            self._chunk = np.empty(n, np.uint8)
        return self._chunk[:n]

    def close(self) -> None:
        """Frees the decoding context's temporaries now (the buffers go with the object)."""
        if self.decoder is not None:
            self.decoder.close()
