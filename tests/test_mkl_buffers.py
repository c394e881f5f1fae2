"""MKL's GEMM buffer cache, freed between steps of what a step does not need again."""

from __future__ import annotations

import torch

from pipeline.alloc import mkl_buffers
from pipeline.alloc.mkl_buffers import MklBuffers, cap_bytes


def test_the_cap_is_a_share_of_the_reader_budget_at_most_8mb():
    assert cap_bytes(512 << 20) == 8 << 20
    assert cap_bytes(128 << 20) == 2 << 20
    assert cap_bytes(4 << 30) == 8 << 20
    assert cap_bytes(None) == 8 << 20


def test_trim_frees_only_above_the_cap():
    held, freed = [5 << 20], []

    def free():
        freed.append(held[0])
        held[0] = 0

    m = MklBuffers(held=lambda: held[0], free=free, cap=8 << 20)
    assert m.trim() is False and freed == []  # under the cap: kept for the next step
    held[0] = 9 << 20
    assert m.trim() is True and freed == [9 << 20] and held[0] == 0


def test_trim_keeps_what_one_step_maps_afresh_and_frees_only_past_it():
    """The step after a free shows what one step needs (``need``); the cache is then freed only when it
    holds more than ``cap`` beyond that, so a step no longer re-maps its own buffers every time."""
    held, freed = [18 << 20], []

    def free():
        freed.append(held[0])
        held[0] = 0

    m = MklBuffers(held=lambda: held[0], free=free, cap=8 << 20)
    assert m.trim() is True and m.need == 0  # over the cap, nothing learned yet
    held[0] = 17 << 20  # the next step mapped this from nothing
    assert m.trim() is False and m.need == 17 << 20
    held[0] = 25 << 20  # other shapes' buffers, within the cap beyond a step's need
    assert m.trim() is False
    held[0] = 26 << 20
    assert m.trim() is True and freed == [18 << 20, 26 << 20]
    held[0] = 12 << 20  # a smaller step after this free: the need stays the most seen
    assert m.trim() is False and m.need == 17 << 20
    m.release()  # before an evaluation: freed whatever it holds
    assert held[0] == 0 and freed[-1] == 12 << 20


def test_torchs_mkl_buffers_grow_with_a_gemm_and_trim_frees_them():
    m = mkl_buffers.find(0)
    if not torch.backends.mkl.is_available():
        assert m is None  # nothing to trim where torch has no MKL
        return
    assert m is not None
    m.free()
    a, b = torch.randn(256, 4096), torch.randn(4096, 256)
    expected = a @ b
    assert m.held() > 0  # the GEMM kept its packing buffers
    assert m.trim() is True
    assert m.held() == 0
    torch.testing.assert_close(a @ b, expected, rtol=0, atol=0)  # the next GEMM allocates them again
