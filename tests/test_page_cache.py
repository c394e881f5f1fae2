"""``cache.page_cache``: which ranges of a file sit in the page cache, asked of the kernel."""

from __future__ import annotations

import os

from pipeline.cache import page_cache

PAGE = page_cache.PAGE


def _file(tmp_path, pages: int = 8):
    f = tmp_path / "frames.bin"
    f.write_bytes(os.urandom(pages * PAGE))
    return f


def test_a_written_file_is_cached_and_an_evicted_one_is_not(tmp_path):
    assert page_cache.available()
    f = _file(tmp_path)
    ranges = [(0, 10), (PAGE - 1, 2), (3 * PAGE, 2 * PAGE), (8 * PAGE - 5, 5)]
    assert page_cache.resident(f, ranges) == [True] * 4
    assert page_cache.evict(tmp_path) == 1
    assert page_cache.resident(f, ranges) == [False] * 4
    # reading a range caches its pages (and maybe the kernel's read-ahead past them), not those before it
    with open(f, "rb") as fh:
        fh.seek(3 * PAGE)
        fh.read(2 * PAGE)
    assert page_cache.resident(f, ranges)[2] and not page_cache.resident(f, ranges)[0]


def test_a_range_is_cached_only_where_all_its_pages_are(tmp_path):
    f = _file(tmp_path)
    page_cache.evict(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.pread(fd, 10, 2 * PAGE)  # one page in
        got = page_cache.resident(f, [(2 * PAGE, PAGE), (2 * PAGE + 100, PAGE), (0, 8 * PAGE)])
    finally:
        os.close(fd)
    assert got[0]
    assert not got[2]  # the whole file spans pages never read (unless the kernel read all of it ahead)
    assert got[1] == page_cache.resident(f, [(3 * PAGE, 1)])[0]  # spans pages 2 and 3


def test_what_cannot_be_told_reads_as_not_cached(tmp_path):
    f = _file(tmp_path, pages=2)
    assert page_cache.resident(f, []) == []
    assert page_cache.resident(tmp_path / "missing", [(0, 1)]) == [False]
    assert page_cache.resident(f, [(PAGE, 2 * PAGE), (0, 0), (0, 1)]) == [False, False, True]  # past the end; empty
    (tmp_path / "empty").write_bytes(b"")
    assert page_cache.resident(tmp_path / "empty", [(0, 1)]) == [False]


def test_a_descriptor_the_caller_holds_answers_the_same_and_stays_open(tmp_path):
    """The read-ahead asks through the ``O_DIRECT`` descriptor it reads with, rather than opening the file again."""
    f = _file(tmp_path)
    ranges = [(0, 10), (3 * PAGE, 2 * PAGE)]
    fd = os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        assert page_cache.resident(f, ranges, fd) == page_cache.resident(f, ranges) == [True, True]
        page_cache.evict(f)
        assert page_cache.resident(f, ranges, fd) == [False, False]
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
