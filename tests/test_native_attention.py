"""lst's CPU kernels (``cpu_kernels``, C++): small-head attention (``native_attention``) and dropout,
against torch's arithmetic.

Set-up builds the kernels; these tests need them (``kernels()`` not None), as the cache tests need the
CPU buffer cache."""

from __future__ import annotations

import pytest
import torch

from pipeline.side.blocks import attention as A
from pipeline.side.blocks import cpu_kernels as K
from pipeline.side.blocks import dropout as Dr
from pipeline.side.blocks import native_attention as N
from pipeline.side.blocks.context import mask_bias


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv(K.ENV, "1")
    assert K.kernels() is not None, "scripts/setup.sh builds the kernels (python -m pipeline.side.blocks)"


def _qkv(b: int, h: int, lq: int, lk: int, d: int, seed: int):
    """q, k, v as the blocks make them: head views of [B, L, H*D] projections (strided)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h * d, generator=g).view(b, lq, h, d).transpose(1, 2)
    k, v = (torch.randn(b, lk, h * d, generator=g).view(b, lk, h, d).transpose(1, 2) for _ in range(2))
    return [t.detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("b,h,lq,lk,d,bias_kind,dropout", [
    (3, 12, 7, 7, 4, "padding", 0.1),  # 36 pairs: two full lane groups and one of 4
    (2, 8, 5, 5, 4, "padding", 0.0),  # exactly one group
    (5, 3, 9, 9, 8, "causal", 0.2),  # bias rows differ per query (causal): 15 pairs, one partial group
    (1, 4, 30, 30, 16, None, 0.1),
    (4, 6, 1, 11, 8, "padding", 0.0),  # one query row over 11 keys
    (2, 12, 40, 40, 4, "padding", 0.5),
])
def test_kernel_equals_the_written_out_function_forward_and_backward(b, h, lq, lk, d, bias_kind, dropout):
    q, k, v = _qkv(b, h, lq, lk, d, seed=lq * 7 + d)
    if bias_kind is None:
        bias = None
    else:
        mask = torch.ones(b, lk, dtype=torch.long)
        mask[0, max(1, lk - 3):] = 0  # padding on the first example
        bias = mask_bias(mask, torch.float32, causal=bias_kind == "causal", query_len=lq)
    shape = torch.Size((b, h, lq, lk))
    keep = A.keep_mask(shape, dropout, q) if dropout else None
    c = 1.0 / (1.0 - dropout)
    want = A._DropoutAttention.apply(q, k, v, bias, 0.5, c, keep)
    bits = A._pack_bits(N.lane_order(keep)) if dropout else None
    got = N.apply(q, k, v, bias, 0.5, c, bits)
    # laid out [B, L, H, D]: merging the heads is a view
    assert got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    for a, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_attend_takes_the_kernel_where_it_fits_with_the_torch_paths_draws(dropout, monkeypatch):
    """``attend``: the kernel for small float32 heads, reading the mask the torch path would draw (the
    same draws, so the RNG stream moves the same way) in lane order; equal to the torch path given
    that mask. Grouped-query heads are repeated first, and their gradients summed back."""
    q, _, _ = _qkv(3, 6, 10, 10, 4, seed=1)
    k, v = (t[:, ::3].detach().requires_grad_() for t in _qkv(3, 6, 10, 10, 4, seed=2)[1:])  # 2 kv heads
    bias = mask_bias(torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7]), torch.float32, causal=False)
    torch.manual_seed(11)
    got = A.attend(q, k, v, bias, 0.5, dropout, training=True)
    after_native = torch.rand(2)
    assert type(got.grad_fn).__name__ == "_NativeAttentionBackward"

    monkeypatch.setenv(K.ENV, "0")
    shape = torch.Size((3, 6, 10, 10))
    torch.manual_seed(11)
    keep = A.keep_mask(shape, dropout, q) if dropout else None
    torch.manual_seed(11)
    plain = A.attend(q, k, v, bias, 0.5, dropout, training=True)  # torch's path, its own mask order
    assert torch.equal(torch.rand(2), after_native)  # the stream moved the same way
    assert type(plain.grad_fn).__name__ != "_NativeAttentionBackward"
    if dropout:  # torch's arithmetic on the mask the kernel read
        keep = N.from_lane_order(keep.reshape(-1), shape)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    want = A._DropoutAttention.apply(q, kr, vr, bias, 0.5, 1.0 / (1.0 - dropout), keep)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    if not dropout:
        torch.testing.assert_close(got, plain, rtol=2e-6, atol=2e-6)
    for a, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, w, rtol=2e-5, atol=2e-6)


def test_what_the_kernel_takes():
    q, k, _ = _qkv(2, 4, 5, 5, 4, seed=0)
    assert N.fits(q, k, None, dropout=False) and N.fits(q, k, None, dropout=True)
    q16, k16, _ = _qkv(2, 4, 5, 5, 16, seed=0)
    assert N.fits(q16, k16, None, dropout=True) and not N.fits(q16, k16, None, dropout=False)  # SDPA's there
    q32, k32, _ = _qkv(2, 4, 5, 5, 32, seed=0)
    assert not N.fits(q32, k32, None, dropout=True)
    assert not N.fits(q.double(), k.double(), None, dropout=True)
    learned = torch.zeros(1, 4, 5, 5, requires_grad=True)  # T5's position bias: torch's path
    assert not N.fits(q, k, learned, dropout=True)
    _, long_k, _ = _qkv(1, 4, 1, N.MAX_KEYS + 1, 4, seed=0)
    assert not N.fits(q[:1, :, :1], long_k, None, dropout=True)
    _, k65, _ = _qkv(1, 4, 1, N.NO_DROPOUT_MAX_KEYS + 1, 4, seed=0)  # SDPA's there without dropout
    assert N.fits(q[:1, :, :1], k65, None, dropout=True) and not N.fits(q[:1, :, :1], k65, None, dropout=False)


def test_the_kernel_refuses_what_would_read_out_of_bounds():
    q, k, v = _qkv(2, 4, 5, 5, 4, seed=0)
    with pytest.raises(RuntimeError, match="mask bits"):
        K.kernels().forward(q, k, v, None, 0.5, 1.0, torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="bias"):
        K.kernels().forward(q, k, v, torch.zeros(2, 1, 1, 5), 0.5, 1.0, None)  # not expanded
    with pytest.raises(RuntimeError, match="head dim"):
        a, b, c = _qkv(1, 2, 3, 3, 5, seed=0)
        K.kernels().forward(a, b, c, None, 0.5, 1.0, None)


def test_off_switch_runs_torchs_attention(monkeypatch):
    monkeypatch.setenv(K.ENV, "0")
    assert K.kernels() is None
    q, k, v = _qkv(2, 4, 5, 5, 4, seed=0)
    out = A.attend(q, k, v, None, 0.5, 0.0, training=True)
    assert type(out.grad_fn).__name__ == "_DropoutAttentionBackward"


@pytest.mark.parametrize("b,h,l", [(3, 12, 7), (2, 8, 5), (1, 5, 9)])  # partial, one full, one partial group
def test_attention_drawing_its_mask_from_lanes_equals_the_mask_given_as_bits(b, h, l):
    """``forward_lanes`` compares the random lanes itself and hands back the mask's bits: the torch
    path's ``keep_mask`` from the same lanes, packed in draw order (which the kernel reads as lane order)."""
    q, k, v = _qkv(b, h, l, l, 4, seed=l)
    shape = torch.Size((b, h, l, l))
    torch.manual_seed(3)
    keep = A.keep_mask(shape, 0.3, q)
    torch.manual_seed(3)
    lanes = Dr.random_words(shape.numel(), q)
    out, bits = K.kernels().forward_lanes(q, k, v, None, 0.5, 1 / 0.7, lanes, Dr.mask_threshold(0.3))
    want_bits = A._pack_bits(keep)
    assert torch.equal(bits, want_bits)
    assert torch.equal(out, K.kernels().forward(q, k, v, None, 0.5, 1 / 0.7, want_bits))


@pytest.mark.parametrize("shape", [(100, 13, 48), (7,), (3, 5, 11), (2, 70000)])
def test_kernel_dropout_is_the_torch_paths_dropout_bit_for_bit(shape, monkeypatch):
    """The same lanes, so the same mask; values and gradients equal bit for bit, for sizes that are
    no multiple of 8 or 16 and ones split over several parallel tasks; a non-contiguous input too."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    for inp in (x, x.transpose(0, -1) if x.dim() > 1 else x):
        got_in = inp.detach().requires_grad_()
        torch.manual_seed(9)
        got = Dr.dropout(got_in, 0.1)
        after = torch.rand(1)
        assert type(got.grad_fn).__name__ == "_KernelDropoutBackward"
        monkeypatch.setenv(K.ENV, "0")
        want_in = inp.detach().requires_grad_()
        torch.manual_seed(9)
        want = Dr.dropout(want_in, 0.1)
        assert torch.equal(torch.rand(1), after)  # the stream moved the same way
        monkeypatch.setenv(K.ENV, "1")
        assert got.shape == want.shape and torch.equal(got, want)
        grad = torch.randn(want.shape, generator=g)
        got.backward(grad)
        want.backward(grad)
        assert torch.equal(got_in.grad, want_in.grad)


@pytest.mark.parametrize("stream", [True, False])
def test_kernel_random_words_are_int32_random_draws_and_move_the_generator_alike(stream):
    """The kernels' MT19937 words are what ``int32.random_()`` draws, and leave the generator (an own
    stream, or the global one) in the same state: sizes on both sides of its 624-word regenerations,
    from a fresh seed and mid-block, with torch's own draws after them."""
    sizes = [0, 1, 2, 3, 623, 624, 625, 1247, 1248, 1249, 700, 84_000, 5]
    for seed in (0, 1, 12345):
        mine, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for n in sizes:
            if stream:
                got = K.kernels().random_words(n, mine)
            else:  # the global generator, from the stream's state
                torch.set_rng_state(mine.get_state())
                got = K.kernels().random_words(n)
                mine.set_state(torch.get_rng_state())
            want = torch.empty(n, dtype=torch.int32).random_(generator=ref)
            assert got.dtype == torch.int32 and torch.equal(got, want), (seed, n)
            assert torch.equal(mine.get_state(), ref.get_state()), (seed, n)
            # torch's own draws carry on from where the words left the generator
            assert torch.equal(torch.randint(0, 1 << 30, (3,), generator=mine),
                               torch.randint(0, 1 << 30, (3,), generator=ref))


def test_dropout_lanes_come_from_the_kernel_as_torch_draws_them(monkeypatch):
    """``random_words`` (every CPU mask's lanes) takes the kernel where it is built and torch's
    ``random_`` where it is off: the same lanes, the stream moved the same way."""
    like = torch.zeros(1)
    torch.manual_seed(4)
    got = Dr.random_words(10_001, like)
    after = torch.rand(2)
    monkeypatch.setenv(K.ENV, "0")
    assert K.kernels() is None
    torch.manual_seed(4)
    want = Dr.random_words(10_001, like)
    assert torch.equal(got, want) and torch.equal(torch.rand(2), after)
