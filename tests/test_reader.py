"""pipeline/train/reader.py: a CacheReader whose host memory is bounded by a byte budget.

Real small caches (tiny random BERT on an SST-2 slice, several shards of several inner chunks each)
read at a budget barely above the minimum (sub-shard windows, one queued batch) and at a large one
(the pre-budget plan): every example once, the plan a pure function of (seed, epoch), the token
budget held, the reader's byte accounting under the budget, and batch values equal to
``SplitView.read_rows`` of the same examples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbones import make_tiny_backbone
from pipeline.cache import codecs as C
from pipeline.cache import native_read
from pipeline.cache import store as S
from pipeline.cache.store import ActivationCache
from pipeline.errors import CacheError
from pipeline.extract.runner import ExtractConfig, run_extract
from pipeline.train.reader import CacheReader
from pipeline.sizes import parse_size

BIG = 1 << 30


def _extract(tmp_path_factory, backbone: str, codec: str, n: int = 200, **kw) -> str:
    out = tmp_path_factory.mktemp("reader") / f"{codec}-{Path(backbone).name}.zarr"
    with pytest.MonkeyPatch.context() as mp:
        # 16 rows per inner chunk, so a 512-row shard holds 32 and ranges cut chunks
        itemsize = np.dtype(S.C.codec_spec(codec).storage_dtype).itemsize
        mp.setattr(S, "CHUNK_TARGET_BYTES", 16 * 32 * itemsize)
        run_extract(ExtractConfig(backbone=backbone, dataset="sst2", out=str(out), max_examples=n, codec=codec,
                                  shard_tokens=512, progress=False, **kw))
    return str(out)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, str]:
    # only the two families used here (the session-wide tiny_backbones fixture builds four)
    root = tmp_path_factory.mktemp("reader-backbones")
    return {f: str(make_tiny_backbone(f, root / f)) for f in ("bert", "t5")}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, backbones) -> dict[str, ActivationCache]:
    return {c: ActivationCache.open(_extract(tmp_path_factory, backbones["bert"], c)) for c in ("bf16", "int8")}


def _tiny(cache, **kw) -> CacheReader:
    """A reader at a budget a little above the smallest that works (sub-shard windows)."""
    probe = CacheReader(cache, "train", kw.pop("taps", cache.taps), memory_budget=BIG, **kw)
    budget = probe.layout.min_budget + probe.layout.window_min
    r = CacheReader(cache, "train", probe.taps, memory_budget=budget, **kw)
    assert r.layout.mode == "bytes" and r.layout.window_cap < max(r._unit_bytes())
    return r


def _small_windows(cache, **kw) -> CacheReader:
    """A reader with room to spare (windows in batch order fit its budget, ``_scatters``) whose shuffle
    window holds a few batches only, so an epoch has many windows."""
    probe = CacheReader(cache, "train", kw.pop("taps", cache.taps), memory_budget=BIG, **kw)
    r = CacheReader(cache, "train", probe.taps, memory_budget=BIG, window_cap=3 * probe.layout.window_min, **kw)
    assert r.layout.mode == "bytes" and len(r.plan_epoch(0)) > 3
    return r


def _legacy_plan(r: CacheReader, epoch: int) -> list[list[np.ndarray]]:
    """The plan of the reader before budgets (windows of window_shards whole shards)."""
    rng = np.random.default_rng([r.seed, epoch])
    order = rng.permutation(len(r.units)) if r.shuffle else np.arange(len(r.units))
    plan = []
    for w in range(0, len(order), r.window_shards):
        units = [int(u) for u in order[w:w + r.window_shards] if len(r.units[u])]
        if not units:
            continue
        ex = np.concatenate([r.units[u] for u in units])
        if r.shuffle:
            ex = ex[rng.permutation(len(ex))]
        plan.append(r._cut(ex))
    return [b for bs in plan for b in bs]


def _flat(plan) -> list[np.ndarray]:
    return [b for w in plan for b in w.batches]


@pytest.mark.parametrize("size", ["tiny", "big"])
@pytest.mark.parametrize("limits", [dict(batch_size=4), dict(batch_size=None, batch_tokens=160)])
def test_plan_is_an_exact_seeded_cover(caches, size, limits):
    cache = caches["bf16"]
    r = _tiny(cache, **limits, seed=5) if size == "tiny" else CacheReader(cache, "train", cache.taps, memory_budget=BIG,
                                                                          seed=5, **limits)
    n = r.num_examples
    p0, p0b, p1 = _flat(r.plan_epoch(0)), _flat(r.plan_epoch(0)), _flat(r.plan_epoch(1))
    for plan in (p0, p1):
        assert sorted(np.concatenate(plan).tolist()) == list(range(n))
    assert [b.tolist() for b in p0] == [b.tolist() for b in p0b]
    assert [b.tolist() for b in p0] != [b.tolist() for b in p1]
    if "batch_tokens" in limits:
        longest = int(r.lengths.max())
        assert all(len(b) * int(r.lengths[b].max()) <= max(limits["batch_tokens"], longest) for b in p0)
        assert all(len(b) == 1 for b in p0 if len(b) * int(r.lengths[b].max()) > limits["batch_tokens"])
    else:
        assert max(len(b) for b in p0) == limits["batch_size"]
    seen = [b.index.tolist() for b in r.iter_epoch(0)]
    assert len(seen) == r.num_batches(0) == len(p0)
    assert seen == [b.tolist() for b in p0]
    # a second reader with the same settings (a resumed run) plans the same epoch
    same = CacheReader(cache, "train", cache.taps, memory_budget=r.memory_budget, seed=5, **limits)
    assert [b.tolist() for b in _flat(same.plan_epoch(1))] == [b.tolist() for b in p1]
    if size == "tiny":
        assert len(r.plan_epoch(0)) > len(r.units)  # sub-shard windows


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_budget_that_holds_whole_windows_keeps_the_old_plan(caches, shuffle):
    cache = caches["bf16"]
    for limits in (dict(batch_size=4), dict(batch_size=None, batch_tokens=160)):
        r = CacheReader(cache, "train", cache.taps, memory_budget=BIG, seed=3, shuffle=shuffle, window_shards=2,
                        **limits)
        assert r.layout.mode == "shards"
        for epoch in (0, 1):
            assert [b.tolist() for b in _flat(r.plan_epoch(epoch))] == \
                   [b.tolist() for b in _legacy_plan(r, epoch)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("size", ["tiny", "big"])
def test_accounting_stays_within_the_budget(caches, size, inline, packed):
    """Packed batches are gathered into the kept gather buffers, counted under "gather" instead of
    "batches": together they stay within the batch share."""
    cache = caches["int8"]
    r = _tiny(cache, batch_size=4, inline=inline, packed=packed) if size == "tiny" else CacheReader(
        cache, "train", cache.taps, batch_size=4, memory_budget=BIG, inline=inline, packed=packed)
    lay = r.layout
    assert lay.transient_bytes + lay.window_bytes + lay.batch_bytes <= r.memory_budget
    for epoch in (0, 1):
        for _ in r.iter_epoch(epoch):
            assert r.accounting.total <= r.memory_budget
    acc = r.accounting.as_dict()
    assert 0 < r.peak_bytes <= r.memory_budget, acc
    assert all(v == 0 for v in acc["current"].values()), acc  # everything released at the end
    assert acc["peak"]["window"] <= lay.window_bytes
    assert acc["peak"]["batches"] + acc["peak"]["gather"] <= lay.batch_bytes
    assert (acc["peak"]["gather"] > 0) == (packed and inline)  # an assembler thread gathers into fresh buffers
    assert acc["peak"]["encoded"] + acc["peak"]["scratch"] <= 2 * lay.transient_bytes
    assert acc["peak"]["encoded"] + acc["peak"]["scratch"] > 0 and acc["peak"]["window"] > 0
    if size == "tiny":  # many windows an epoch: later ones decode into the earlier ones' buffers
        assert r.stats.buffer_hits > r.stats.buffer_misses > 0, r.stats
    cpu = r.stats.cpu_s  # the reader's own threads' CPU (lst train reports it per epoch)
    assert cpu > 0, r.stats
    # an epoch abandoned half way releases everything too
    it = r.iter_epoch(2)
    next(it), next(it)
    it.close()
    assert all(v == 0 for v in r.accounting.as_dict()["current"].values())
    assert r.stats.cpu_s > cpu


@pytest.mark.parametrize("inline", [False, True])  # gathered on an assembler thread, or when asked for
@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_batches_at_a_tiny_budget_equal_direct_reads(caches, codec, inline):
    cache = caches[codec]
    v = cache.split("train")
    taps = [cache.taps[0], cache.taps[-1]]
    r = _tiny(cache, taps=taps, batch_size=None, batch_tokens=120, seed=1, inline=inline)
    seen = 0
    for b in r.iter_epoch(0):
        assert b.taps is not None and len(b.taps) == len(taps)
        B, L = b.input_ids.shape
        for k, tap in enumerate(taps):
            assert b.taps[k].shape == (B, L, cache.hidden_size) and b.taps[k].dtype == torch.float32
            for row, i in enumerate(b.index):
                o0, o1 = int(v.offsets[i]), int(v.offsets[i + 1])
                want = v.read_rows(tap, o0, o1)
                assert torch.equal(b.taps[k][row, : o1 - o0], want)
                assert not b.taps[k][row, o1 - o0:].any()  # padding is zero
                assert b.input_ids[row, : o1 - o0].tolist() == v.input_ids[o0:o1].tolist()
        assert b.labels.tolist() == v.labels[b.index].tolist()
        seen += B
    assert seen == r.num_examples
    assert r.peak_bytes <= r.memory_budget


def test_zarr_fallback_and_decoder_taps_read_the_same(tmp_path_factory, backbones, monkeypatch):
    """A T5 label cache (decoder taps, always read through Zarr) with the direct reader off."""
    url = _extract(tmp_path_factory, backbones["t5"], "int8", n=120, label_words="auto")
    monkeypatch.setenv("LST_DIRECT_READ", "0")
    cache = ActivationCache.open(url)
    v = cache.split("train")
    r = _tiny(cache, batch_size=4, decoder_taps=cache.decoder_taps, seed=2)
    D = r.dec_rows
    unit_of = v.offsets[:-1] // v.shard_tokens
    acts = {t: v.read_rows(t, 0, v.num_tokens) for t in cache.taps}  # one Zarr read per array
    dec = {t: C.decode(v.decoder_array(t)[:], "int8", v.decoder_array(t, scale=True)[:]) for t in cache.decoder_taps}
    seen = 0
    for b in r.iter_epoch(0):
        for row, i in enumerate(b.index):
            o0, o1 = int(v.offsets[i]), int(v.offsets[i + 1])
            for k, tap in enumerate(cache.taps):
                assert torch.equal(b.taps[k][row, : o1 - o0], acts[tap][o0:o1])
            u = int(unit_of[i])
            p = (int(i) - int(np.flatnonzero(unit_of == u)[0])) * D
            for k, tap in enumerate(cache.decoder_taps):
                assert torch.equal(b.dec_taps[k][row], dec[tap][u, p:p + D])
        seen += len(b.index)
    assert seen == r.num_examples and r.peak_bytes <= r.memory_budget


def test_read_into_equals_zarr(caches):
    cache = caches["int8"]
    v = cache.split("train")
    from pipeline.cache.blosc_decode import context_nbytes
    from pipeline.cache.fastread import FRAME_OVERHEAD, DirectArray, ReadScratch

    rng = np.random.default_rng(0)
    for arr, chunks in ((v.tap_array(cache.taps[1]), 32), (v.scale_array(cache.taps[1]), 1)):
        d = DirectArray.for_array(arr)
        assert d is not None and d.chunks_per_shard == chunks
        sizes = (d.chunk_nbytes + FRAME_OVERHEAD, d.chunk_nbytes, d.block_nbytes())
        scratch = ReadScratch(*sizes)
        held = scratch.nbytes
        # with a context of its own (c-blosc2): the frame and the context's temporaries, no chunk scratch
        assert scratch.decoder is not None and held == ReadScratch.sizes(*sizes) == \
            d.chunk_nbytes + FRAME_OVERHEAD + context_nbytes(d.block_nbytes())
        full = arr[:]
        for _ in range(20):
            a = int(rng.integers(0, len(full) - 1))
            b = int(rng.integers(a + 1, min(len(full), a + 300) + 1))
            out = np.empty((b - a, *full.shape[1:]), dtype=full.dtype)
            d.read_into(a, b, out)
            np.testing.assert_array_equal(out, full[a:b])
            out[:] = 0  # and through one reused scratch (the reader's decode threads keep one each)
            d.read_into(a, b, out, scratch=scratch)
            np.testing.assert_array_equal(out, full[a:b])
            assert scratch.nbytes == held  # sized once, never grown


def test_read_into_without_a_decoding_context_decodes_cut_chunks_through_its_chunk_scratch(caches, monkeypatch):
    """Where c-blosc2 has no context API, a scratch keeps a decoded-chunk buffer instead and the
    rows still equal Zarr's (a cut chunk is decoded whole into it and copied)."""
    import pipeline.cache.fastread as F

    monkeypatch.setattr(F, "contexts_available", lambda: False)
    v = caches["bf16"].split("train")
    arr = v.tap_array(caches["bf16"].taps[0])
    d = F.DirectArray.for_array(arr)
    sizes = (d.chunk_nbytes + F.FRAME_OVERHEAD, d.chunk_nbytes, d.block_nbytes())
    scratch = F.ReadScratch(*sizes)
    assert scratch.decoder is None and scratch.nbytes == F.ReadScratch.sizes(*sizes) == 2 * d.chunk_nbytes + F.FRAME_OVERHEAD
    full = arr[:]
    for a, b in ((1, 7), (3, len(full) - 2), (0, len(full))):
        out = np.zeros((b - a, *full.shape[1:]), dtype=full.dtype)
        d.read_into(a, b, out, scratch=scratch)
        np.testing.assert_array_equal(out, full[a:b])


def test_a_budget_too_small_for_one_batch_is_refused(caches):
    cache = caches["bf16"]
    need = CacheReader(cache, "train", cache.taps, batch_size=4, memory_budget=BIG).layout.min_budget
    with pytest.raises(CacheError) as e:
        CacheReader(cache, "train", cache.taps, batch_size=4, memory_budget=need - 1)
    msg = str(e.value)
    assert "--reader-memory" in msg and "--batch-tokens" in msg and "--batch-size" in msg
    assert f"{-(-need // 2**20)}MB" in msg
    CacheReader(cache, "train", cache.taps, batch_size=4, memory_budget=need)  # the named minimum works


@pytest.mark.parametrize("text,want", [
    ("512MB", 512 * 2**20), ("512M", 512 * 2**20), ("1.5GB", 3 * 2**29), ("2G", 2 * 2**30),
    ("128MiB", 128 * 2**20), ("1048576", 1048576), ("64kb", 64 * 1024), (" 2 gb ", 2 * 2**30), (4096, 4096),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-5MB", "0", "1.5", "ten MB", "5 MiBs", "iB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size|whole|positive"):
        parse_size(text)


@pytest.mark.parametrize("codec", ["bf16", "int8"])
def test_packed_batches_hold_the_padded_batches_real_rows(caches, codec):
    """Packed readers hand out the same batches (same plan) with only the real rows, in the store's
    dtype (int8: the codes, with their rows' scales); scattered back they equal the padded batch exactly."""
    from pipeline.side.packed import PackedTap

    cache = caches[codec]
    kw = dict(batch_size=None, batch_tokens=120, seed=2)
    padded = list(_tiny(cache, **kw).iter_epoch(0))
    r = _tiny(cache, packed=True, **kw)
    packed = list(r.iter_epoch(0))
    assert [b.index.tolist() for b in packed] == [b.index.tolist() for b in padded]
    for p, q in zip(packed, padded):
        assert torch.equal(p.attention_mask, q.attention_mask)
        for tp, tq in zip(p.taps, q.taps):
            assert isinstance(tp, PackedTap) and tp.values.shape[0] == int(q.attention_mask.sum())
            assert tp.values.dtype == (torch.int8 if codec == "int8" else torch.bfloat16)
            assert (tp.scale is not None) == (codec == "int8")
            if codec == "int8":
                assert tp.scale.dtype == torch.float32 and tp.scale.shape == (tp.values.shape[0],)
            assert torch.equal(tp.padded(torch.float32), tq)
    assert r.peak_bytes <= r.memory_budget


def test_by_length_order_is_a_seeded_cover_with_little_padding(caches):
    cache = caches["bf16"]
    kw = dict(batch_size=8, seed=4)
    rand = CacheReader(cache, "train", cache.taps, memory_budget=BIG, window_cap=1, **kw)
    grouped = CacheReader(cache, "train", cache.taps, memory_budget=BIG, window_cap=1, by_length=True, **kw)
    assert rand.layout.mode == grouped.layout.mode == "bytes"  # a window cap below a shard: sub-shard windows
    n = grouped.num_examples
    p0, p0b, p1 = _flat(grouped.plan_epoch(0)), _flat(grouped.plan_epoch(0)), _flat(grouped.plan_epoch(1))
    assert sorted(np.concatenate(p0).tolist()) == list(range(n))
    assert [b.tolist() for b in p0] == [b.tolist() for b in p0b] and [b.tolist() for b in p0] != [b.tolist() for b in p1]

    def pad(plan):
        grid = sum(len(b) * int(grouped.lengths[b].max()) for b in plan)
        return 1 - sum(int(grouped.lengths[b].sum()) for b in plan) / grid
    assert pad(p0) < pad(_flat(rand.plan_epoch(0)))
    # the window cap bounds each window's stored bytes (but a window holds at least one batch's rows)
    assert all(w.nbytes <= max(grouped.layout.window_cap, grouped.layout.window_min) for w in grouped.plan_epoch(0))
    assert grouped.layout.window_bytes == grouped.layout.window_cap  # one window at a time


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_packed_taps_give_the_side_network_the_padded_loss_and_gradients(noise):
    """PackedTap through the ladders (bias on the padding rows), the tap-0 dropout and --tap-noise
    (the padded draws): loss and every gradient equal those of the padded batch."""
    from pipeline.backbones import make_tiny_backbone  # noqa: F401 (fixture-free: a config is enough)
    from transformers import BertConfig

    from pipeline.side.config import SideConfig
    from pipeline.side.model import LadderSideNetwork
    from pipeline.side.packed import PackedTap

    cfg = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     vocab_size=50)
    torch.manual_seed(0)
    model = LadderSideNetwork(SideConfig(r=4, dropout=0.1, num_labels=2, tap_noise=noise), cfg)
    B, L = 5, 7
    lens = torch.tensor([7, 3, 1, 5, 6])
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    rows = mask.view(-1).nonzero().squeeze(1)
    padded = [torch.randn(B, L, 32) * mask[..., None] for _ in model.required_taps()]
    packed = [PackedTap(t.view(B * L, 32)[rows].clone(), rows, B, L) for t in padded]
    # int8 codes with each row's scale, as an int8 cache's packed reader hands them out (the scale applied
    # after the ladder), against the padded batch of the same dequantized values
    codes = [torch.randint(-127, 128, (len(rows), 32), dtype=torch.int8) for _ in padded]
    scales = [torch.rand(len(rows)) * 0.1 for _ in padded]
    quant = [PackedTap(c, rows, B, L, sc) for c, sc in zip(codes, scales)]
    dequant = [q.padded(torch.float32) for q in quant]
    labels = torch.tensor([0, 1, 1, 0, 1])
    out = []
    for taps in (padded, packed, dequant, quant):
        model.zero_grad()
        torch.manual_seed(7)
        loss = model.training_loss(taps, mask, labels)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    for a, b in ((0, 1), (2, 3)):
        assert torch.allclose(out[a][0], out[b][0], atol=1e-6)
        assert out[a][1].keys() == out[b][1].keys()
        for n in out[a][1]:
            assert torch.allclose(out[a][1][n], out[b][1][n], atol=1e-5, rtol=1e-5), n


def test_train_config_picks_the_reader_plan(caches):
    """Defaults: a 64MB shuffle window, by-length batches; 'shards' + 'random' give the earlier plan."""
    import pytest as _pt

    from pipeline.errors import TrainError
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import make_readers

    cache = caches["bf16"]
    dflt = TrainConfig(cache="x", out="y")
    assert (dflt.shuffle_window, dflt.batch_order) == ("64MB", "by-length")
    tr, ev = make_readers(cache, dflt, cache.taps, [], torch.device("cpu"), data_seed=0, packed=True)
    assert tr.by_length and tr.window_limit == 64 << 20 and tr.packed and not ev.shuffle
    old = TrainConfig(cache="x", out="y", shuffle_window="shards", batch_order="random")
    tr, _ = make_readers(cache, old, cache.taps, [], torch.device("cpu"), data_seed=0)
    assert not tr.by_length and tr.window_limit is None and not tr.packed
    for bad in ("lots", "-1MB"):
        with _pt.raises(TrainError, match="--shuffle-window"):
            TrainConfig(cache="x", out="y", shuffle_window=bad)
    with _pt.raises(TrainError, match="batch_order"):
        TrainConfig(cache="x", out="y", batch_order="sorted")


def test_readers_of_any_taps_or_none_plan_the_same_batches(caches):
    """Live LST and full fine-tuning read ids only, cached LST reads some taps: same plan, same batches."""
    cache = caches["bf16"]
    kw = dict(batch_size=6, seed=9, window_cap=1, by_length=True, memory_budget=BIG)
    plans = [_flat(CacheReader(cache, "train", taps, load_acts=load, **kw).plan_epoch(1))
             for taps, load in ((cache.taps, True), (cache.taps[:1], True), ([], False), (cache.taps, False))]
    for p in plans[1:]:
        assert [b.tolist() for b in p] == [b.tolist() for b in plans[0]]


def test_window_buffer_pool_reuses_any_freed_buffer_and_holds_only_what_is_resident():
    """Every buffer maps the pool's ``capacity``, so any freed buffer serves any later request; the pool
    counts what is resident (each buffer's request), never more than the requests in use and the freed
    buffers' last requests, and drops the freed buffers a window does not take."""
    from pipeline.train.bufpool import WindowBufferPool

    changes = []
    pool = WindowBufferPool(limit=10_000, on_change=changes.append, capacity=6_000)
    a = pool.take(4_000)
    assert a.nbytes == 6_000 and pool.misses == 1 and pool.held == pool.in_use == 4_000
    pool.give(a)
    assert pool.pooled == 4_000 and pool.in_use == 0
    b = pool.take(1_000)  # far smaller: the same buffer, resident only up to the request
    assert b is a and pool.hits == 1 and pool.held == 1_000 and pool.pooled == 0
    pool.give(b)
    c = pool.take(5_500)  # longer than what it held: the same buffer, the difference faulted in
    assert c is a and pool.hits == 2 and pool.faulted == 4_500 and pool.held == 5_500
    pool.give(c)
    d = pool.take(7_000)  # past the capacity: a new buffer of its own size; the freed one is dropped
    assert d is not a and d.nbytes == 7_000 and pool.pooled == 0 and pool.held == 7_000 <= pool.limit
    pool.give(d)
    pool.clear()
    assert pool.held == pool.in_use == pool.pooled == 0
    assert sum(changes) == 0  # every freed byte reported was reported back


# -- dropout draws (`lst extract --dropout-draws`) ------------------------------------------------
def test_dropout_draws_are_seeded_train_mode_passes_that_epochs_read_in_turn(tmp_path_factory, backbones):
    """Each draw split holds the train split's rows with other (train-mode) values, the same on a
    second extraction; a reader given the draws reads draw e mod N + 1 at epoch e, through its
    budgeted windows (tiny budget: sub-shard windows), and the eval-mode split otherwise."""
    from pipeline.cache.draws import draws_of

    paths = [_extract(tmp_path_factory, backbones["bert"], "bf16", n=120, dropout_draws=2) for _ in range(2)]
    cache, again = (ActivationCache.open(p) for p in paths)
    draws = draws_of(cache.splits, "train")
    assert draws == ["train.dropout1", "train.dropout2"] and cache.fingerprint["dropout_draws"] == 2
    train = cache.split("train")
    tap = cache.taps[-1]
    rows = (0, int(train.offsets[-1]))
    values = {s: cache.split(s).read_rows(tap, *rows) for s in ["train", *draws]}
    assert all(np.array_equal(cache.split(s).offsets, train.offsets) for s in draws)
    assert not torch.equal(values["train"], values[draws[0]]) and not torch.equal(values[draws[0]], values[draws[1]])
    assert all(torch.equal(values[s], again.split(s).read_rows(tap, *rows)) for s in draws)  # seeded
    noise = (values[draws[0]] - values["train"]).abs().mean() / values["train"].abs().mean()
    assert 0.01 < float(noise) < 1.0  # dropout noise, not another model

    probe = CacheReader(cache, "train", [tap], memory_budget=BIG, batch_size=16, seed=3)
    budget = probe.layout.min_budget + probe.layout.window_min
    reader = CacheReader(cache, "train", [tap], memory_budget=budget, batch_size=16, seed=3, value_splits=draws)
    plain = CacheReader(cache, "train", [tap], memory_budget=budget, batch_size=16, seed=3)
    assert reader.dropout_draws == 2 and plain.dropout_draws == 0
    for epoch in range(3):
        want = values[draws[epoch % 2]]
        assert reader.values_split(epoch) == draws[epoch % 2]
        for b, ref in zip(reader.iter_epoch(epoch), plain.iter_epoch(epoch), strict=True):
            assert np.array_equal(b.index, ref.index)  # the same batches
            for row, i in enumerate(b.index):
                o0, o1 = int(train.offsets[i]), int(train.offsets[i + 1])
                assert torch.equal(b.taps[0][row, : o1 - o0], want[o0:o1])
                assert torch.equal(ref.taps[0][row, : o1 - o0], values["train"][o0:o1])
    assert reader.peak_bytes <= reader.memory_budget


def test_dropout_draws_need_the_train_split_and_change_the_fingerprint(tmp_path_factory, backbones):
    from pipeline.errors import ExtractError

    with pytest.raises(ExtractError, match="--dropout-draws draws the 'train' split"):
        _extract(tmp_path_factory, backbones["bert"], "bf16", n=20, dropout_draws=1, splits=["validation"])
    out = _extract(tmp_path_factory, backbones["bert"], "bf16", n=20)
    with pytest.raises(CacheError, match="dropout_draws: store has None, requested 1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(S, "CHUNK_TARGET_BYTES", 16 * 32 * 2)
            run_extract(ExtractConfig(backbone=backbones["bert"], dataset="sst2", out=out, max_examples=20,
                                      shard_tokens=512, progress=False, dropout_draws=1))


def test_gather_buffers_reuse_only_what_no_tensor_uses():
    """The buffer of a key is handed out again only once every tensor made from it is gone; one still
    in use is left to its holder (a fresh one is kept instead), so reuse never overwrites live data."""
    from pipeline.train.bufpool import GatherBuffers

    changes = []
    g = GatherBuffers(on_change=changes.append)
    a = g.take(0, 1_000)
    t = torch.from_numpy(a)[:800].view(torch.bfloat16)  # a batch's tap, as the reader makes it
    del a
    b = g.take(0, 900)  # `t` still holds the first buffer: a new one
    assert g.misses == 2 and g.held == 900 and not np.shares_memory(b, t.view(torch.uint8).numpy())
    del b
    view = t[:10]  # a view keeps the storage, and so the buffer, alive
    del t
    c = g.take(0, 900)  # the second buffer: nothing uses it
    assert g.hits == 1 and g.held == 900
    del c
    assert g.take(0, 2_000).nbytes == g.held == 2_000  # too short: replaced
    g.take(1, 10)
    g.clear()
    assert g.held == 0 and sum(changes) == 0 and view.shape == (10,)


def test_gather_buffers_keep_the_longest_batch_resident_until_idle():
    """A shorter batch leaves the pages a longer one touched resident (counted in ``held``), so the next
    longer batch faults nothing in; ``idle`` frees them, not just unmaps them: a private mapping reads
    them back as zeros. (A shared anonymous mapping, Python's default, kept them as shmem with their old
    bytes: out of the process's RSS but still allocated.) A buffer maps ``capacity`` bytes up front, so a
    longer batch than any before grows into the same buffer instead of replacing it."""
    import mmap

    from pipeline.train.bufpool import GatherBuffers

    page = mmap.PAGESIZE
    g = GatherBuffers(capacity=128 * page)
    a = g.take(0, 64 * page)
    a[:64 * page] = 7
    del a
    b = g.take(0, 8 * page)  # the same buffer, its batch now 8 pages long: the 64 touched stay
    assert g.hits == 1 and g.held == 64 * page and b.nbytes == 128 * page
    assert (b[:64 * page] == 7).all()
    del b
    c = g.take(0, 100 * page)  # longer than any before, within the capacity: still the same buffer
    assert g.hits == 2 and g.misses == 1 and g.held == 100 * page
    c[:100 * page] = 5
    del c
    g.idle()
    assert g.held == 0
    d = g.take(0, 100 * page)
    assert g.hits == 3 and not d.any()  # the pages went back to the OS: they read as zeros


def test_packed_batches_reuse_their_buffers_unless_the_consumer_keeps_them(caches):
    """A consumer that drops each batch before asking for the next gets every batch after the first
    gathered into the same buffers; one that keeps them all (a list) gets fresh ones: the same
    batches either way, and the byte accounting stays within the budget."""
    cache = caches["bf16"]
    kw = dict(batch_size=None, batch_tokens=120, seed=2, packed=True)
    kept = list(_tiny(cache, **kw).iter_epoch(0))
    r = _tiny(cache, **kw)
    n = 0
    for b in r.iter_epoch(0):  # (enumerate would hold the previous batch while asking for the next)
        assert b.index.tolist() == kept[n].index.tolist()
        assert all(torch.equal(p.values, q.values) for p, q in zip(b.taps, kept[n].taps))
        n += 1
        del b
    assert n == len(kept) > 2 and r.stats.gather_hits > 0
    assert r.peak_bytes <= r.memory_budget and r.accounting.current["gather"] == 0


def test_without_decode_ahead_a_window_decodes_only_once_the_last_batch_is_done(caches):
    """``decode_ahead=False``: the next window decodes only after the consumer has taken the current
    window's last batch and asked for more (not beside its step), and the batches are the same (as
    grids: a window decoded in batch order hands out its rows in batch order, not grouped by piece)."""
    cache = caches["bf16"]
    kw = dict(batch_size=None, batch_tokens=120, seed=3, packed=True, by_length=True)
    ahead = [(b.index.tolist(), [t.padded() for t in b.taps]) for b in _tiny(cache, **kw).iter_epoch(0)]
    r = _tiny(cache, decode_ahead=False, **kw)
    windows = r.plan_epoch(0)
    assert len(windows) > 2
    taken = []  # batches the consumer had taken when each window's decode began
    decode = r._decode_window

    def spy(window, pool, run):
        taken.append(got[0])
        return decode(window, pool, run)

    r._decode_window = spy
    got = [0]
    waited = []
    for b in r.iter_epoch(0):
        got[0] += 1
        waited.append((b.index.tolist(), [t.padded() for t in b.taps]))
        time.sleep(0.002)  # a step: long enough for an eager decode thread to start the next window
    ends = np.cumsum([len(w.batches) for w in windows])
    assert taken == [0, *ends[:-1].tolist()]
    assert [i for i, _ in waited] == [i for i, _ in ahead]
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for (_, a), (_, b) in zip(waited, ahead))
    assert r.peak_bytes <= r.memory_budget


def test_decode_ahead_follows_the_device_and_the_free_cores():
    from pipeline.train.trainer import decode_ahead

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_ahead(None, cpu, torch_threads=2, cores=2) is False  # the step keeps every core busy
    assert decode_ahead(None, cpu, torch_threads=1, cores=2) is True  # a core is free for the reader
    assert decode_ahead(None, cuda, torch_threads=2, cores=2) is True  # the step runs on the GPU
    assert decode_ahead(True, cpu, torch_threads=2, cores=2) is True  # a setting wins
    assert decode_ahead(False, cuda) is False


def _spy_runs(r: CacheReader) -> list:
    runs, decode = [], r._decode_window

    def spy(window, pool, run):
        runs.append(run)
        return decode(window, pool, run)

    r._decode_window = spy
    return runs


def test_past_its_idle_cap_a_decoded_window_keeps_no_spare_buffers_or_scratch(caches):
    """Once a window is decoded, idle memory over 1/32 of the budget (freed buffers it did not reuse,
    the decode threads' read scratch) goes back (``_after_decode``):
    at a tiny budget every batch is handed out with none of it held, and the batches are those of a
    reader that kept it. Under the cap (a large budget) the scratch stays for the next decode."""
    cache = caches["bf16"]
    kw = dict(batch_size=None, batch_tokens=120, seed=3, packed=True, by_length=True, decode_ahead=False)
    r = _tiny(cache, **kw)
    assert len(r.plan_epoch(0)) > 2 and r.idle_cap == r.memory_budget // 32
    r.idle_cap = 0  # the tiny cache's read scratch alone may fit 1/32 of its tiny budget: any idle memory is past 0
    runs = _spy_runs(r)
    seen = []
    for b in r.iter_epoch(0):
        run = runs[-1]
        assert run.pool.pooled == 0 and run.scratches == {}
        assert r.accounting.current["scratch"] == 0
        seen.append((b.index.tolist(), [t.values.clone() for t in b.taps]))
    kept = _tiny(cache, **kw)
    kept._after_decode = lambda run, consumer=False: None
    before = [(b.index.tolist(), [t.values.clone() for t in b.taps]) for b in kept.iter_epoch(0)]
    assert [i for i, _ in seen] == [i for i, _ in before]
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for (_, a), (_, b) in zip(seen, before))
    assert r.peak_bytes <= r.memory_budget

    roomy = CacheReader(cache, "train", cache.taps, memory_budget=BIG, **kw)
    runs = _spy_runs(roomy)
    for b in roomy.iter_epoch(0):
        assert runs[-1].scratches  # 1/32 of a large budget holds the scratch: kept between decodes
        break


def test_a_new_window_buffer_is_resident_before_it_is_written():
    """A window buffer the pool has to allocate comes with its pages already allocated (``MAP_POPULATE``),
    so the decode threads that write it next take no page faults on it; it reads as zeros."""
    import mmap
    import resource

    from pipeline.train.bufpool import WindowBufferPool

    if not hasattr(mmap, "MAP_POPULATE"):
        pytest.skip("no MAP_POPULATE on this platform")
    n = 8 << 20
    # mapped at the request (MAP_POPULATE), and mapped longer than the request (MADV_POPULATE_WRITE on
    # the request's pages only)
    for capacity in (0, 3 * n):
        pool = WindowBufferPool(limit=64 << 20, capacity=capacity)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = pool.take(n)
        took = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf[:n] = 3
        writing = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        assert pool.misses == 1 and buf.nbytes == max(n, capacity)
        # 2,048 pages: faulted one by one they would be ~2,048 faults here
        assert writing < n // mmap.PAGESIZE // 20, (capacity, took, writing)
        pool.give(buf)


def test_a_reused_window_buffer_hands_its_tail_pages_back():
    """A freed buffer reused for a shorter request hands the whole pages past the request back at once
    (they read as zeros again) and keeps the bytes before it; what it holds is then the request."""
    import mmap

    from pipeline.train.bufpool import WindowBufferPool

    pool = WindowBufferPool(limit=64 << 20)
    buf = pool.take(4 << 20)
    buf[:] = 0xFF
    pool.give(buf)
    again = pool.take(3 << 20)
    assert again is buf and pool.hits == 1 and pool.held == 3 << 20
    cut = -(-(buf.ctypes.data + (3 << 20)) // mmap.PAGESIZE) * mmap.PAGESIZE - buf.ctypes.data
    assert (buf[:3 << 20] == 0xFF).all()
    assert (buf[cut:cut + ((1 << 20) - mmap.PAGESIZE)] == 0).all()


def test_a_window_takes_its_buffers_at_once_and_drops_the_freed_ones_it_cannot_use():
    """``take_all`` serves the largest requests first, each from the freed buffer whose resident bytes
    are the smallest that cover it (else the one holding the most), drops every freed buffer left over,
    and only then maps new ones: nothing is kept for a later window."""
    from pipeline.train.bufpool import WindowBufferPool

    changes = []
    pool = WindowBufferPool(limit=100_000, on_change=changes.append, capacity=12_000)
    first = pool.take_all([10_000, 4_000, 1_000, 500])
    for b in first:
        pool.give(b)
    assert pool.pooled == 15_500 and pool.misses == 4
    second = pool.take_all([11_000, 3_000, 800])  # 10,000 (faults 1,000 in), then 4,000 and 1,000
    assert second[0] is first[0] and second[1] is first[1] and second[2] is first[2]
    assert pool.hits == 3 and pool.misses == 4 and pool.faulted == 1_000
    assert pool.pooled == 0 and pool.in_use == 14_800  # the freed 500 fitted no request: dropped
    for b in second:
        pool.give(b)
    third = pool.take_all([2_000] * 4)  # one more buffer than was freed: the fourth is new
    assert pool.misses == 5 and {id(b) for b in third[:3]} == {id(b) for b in second}
    for b in third:
        pool.give(b)
    pool.clear()
    assert pool.held == 0 and sum(changes) == 0


def _taps_of(reader: CacheReader, epoch: int = 0) -> list:
    """Each batch's index and its taps' values, copied (the batches themselves are dropped)."""
    return [(b.index.tolist(), [t.values.clone() for t in b.taps]) for b in reader.iter_epoch(epoch)]


def _same_batches(a: list, b: list) -> bool:
    return [i for i, _ in a] == [i for i, _ in b] and \
        all(all(torch.equal(x, y) for x, y in zip(ta, tb)) for (_, ta), (_, tb) in zip(a, b))


@pytest.mark.parametrize("make", ["tiny", "small_windows"])
@pytest.mark.parametrize("decode_ahead", [False, True])
def test_a_batch_whose_rows_are_one_run_of_its_window_is_a_view_of_it(caches, decode_ahead, make):
    """A packed batch of one example needs no gathering: its taps are views of the window's rows, the
    gather buffers hold nothing while it is out, the window buffers are still reused, and the values are
    those a reader that gathers every batch (an assembler thread) hands out. With ``decode_ahead`` a
    window's last batch is gathered: the window goes before that batch's step. Where windows are laid out
    in batch order (``_scatters``) it is a view too, for a consumer that drops each batch before asking
    for the next."""
    cache = caches["bf16"]
    kw = dict(batch_size=1, seed=3, packed=True, decode_ahead=decode_ahead)
    r = _tiny(cache, **kw) if make == "tiny" else _small_windows(cache, **kw)
    runs = _spy_runs(r)
    seen, views = [], 0
    for b in r.iter_epoch(0):
        run = runs[-1]
        ptr = b.taps[0].values.untyped_storage().data_ptr()
        view = any(w.ctypes.data <= ptr < w.ctypes.data + w.nbytes for w in run.pool._in_use_buffers())
        views += view
        if view and not r._scatters:  # nothing gathered is held while a view is out
            assert r.accounting.current["gather"] == 0
        seen.append((b.index.tolist(), [t.values.clone() for t in b.taps]))
        del b
    windows = len(r.plan_epoch(0))
    # a tiny budget has no room for windows in batch order; a roomy one has, without decode_ahead
    assert r._scatters == (make == "small_windows" and not decode_ahead and native_read.module() is not None)
    assert views == len(seen) - (windows if decode_ahead else 0) > 0
    assert r.stats.buffer_hits > 0  # a view's buffer goes back to the pool once its batch is dropped
    assert r.peak_bytes <= r.memory_budget
    gathering = (_tiny if make == "tiny" else _small_windows)(cache, inline=False, **kw)
    assert _same_batches(seen, _taps_of(gathering))


def test_a_consumer_that_holds_a_windows_last_batch_gets_later_last_batches_gathered(caches):
    """Windows in batch order: a consumer that still holds a window's last batch (a view) when it asks
    for the next (a plain ``for`` loop does) keeps that window's buffers from reuse once; from then on
    each window's last batch is gathered, so the window buffers are reused again, and the batches are
    the same as those of a consumer that drops each one first."""
    kw = dict(native=True, batch_size=None, batch_tokens=120, seed=3, packed=True, by_length=True,
              decode_ahead=False)
    dropping = _small_windows(caches["bf16"], **kw)
    dropped = []
    for b in dropping.iter_epoch(0):
        dropped.append((b.index.tolist(), [t.padded() for t in b.taps]))
        del b
    holding = _small_windows(caches["bf16"], **kw)
    assert holding._scatters and len(holding.plan_epoch(0)) > 3
    runs = _spy_runs(holding)
    held = _grids(holding)  # holds each batch while asking for the next
    assert [i for i, _ in held] == [i for i, _ in dropped]
    assert all(all(torch.equal(x, y) for x, y in zip(ta, tb)) for (_, ta), (_, tb) in zip(held, dropped))
    assert runs[-1].last_views is False  # found holding the first window's last batch
    windows = len(holding.plan_epoch(0))
    # one window's buffers kept from reuse (the first), every later window's taken from the pool
    assert holding.stats.buffer_misses == 2 * dropping.stats.buffer_misses
    assert holding.stats.buffer_hits == dropping.stats.buffer_hits - dropping.stats.buffer_misses > 0
    assert holding.stats.gather_misses + holding.stats.gather_hits > 0 and windows > 3
    assert dropping.stats.gather_misses + dropping.stats.gather_hits == 0  # nothing gathered at all
    assert holding.peak_bytes <= holding.memory_budget and dropping.peak_bytes <= dropping.memory_budget


def test_batches_kept_past_their_window_keep_their_values(caches):
    """A consumer that keeps every batch (views of windows long freed) reads the values it was handed:
    a window buffer a kept batch still reads is never decoded into again."""
    cache = caches["bf16"]
    kw = dict(batch_size=1, seed=3, packed=True, decode_ahead=False)
    kept = list(_tiny(cache, **kw).iter_epoch(0))
    copied = _taps_of(_tiny(cache, inline=False, **kw))
    assert _same_batches([(b.index.tolist(), [t.values for t in b.taps]) for b in kept], copied)


def _grids(reader: CacheReader, epoch: int = 0) -> list:
    """Each batch's index and its taps as padded grids (packed rows' order aside)."""
    out = []
    for b in reader.iter_epoch(epoch):
        out.append((b.index.tolist(), [t.padded() if hasattr(t, "padded") else t.clone() for t in b.taps]))
    return out


@pytest.mark.parametrize("codec", ["bf16", "int8"])
@pytest.mark.parametrize("decode_ahead", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_the_native_frame_reader_hands_out_the_batches_python_decodes(caches, codec, decode_ahead, packed):
    """With the native reader (decoding on the consumer's thread, where windows of packed store-dtype
    batches are laid out in batch order, or on the decode threads) the batches equal those of the
    Python decode, at the same plan and layout, within the budget."""
    assert native_read.module() is not None, "scripts/setup.sh builds the native reader"
    kw = dict(batch_size=None, batch_tokens=120, seed=3, packed=packed, by_length=True, decode_ahead=decode_ahead)
    py = _small_windows(caches[codec], native=False, **kw)
    nat = _small_windows(caches[codec], native=True, **kw)
    assert not py.native_read and nat.native_read
    assert nat._scatters == (packed and not decode_ahead) and not py._scatters  # int8: its scales too
    assert nat.layout == py.layout  # the plan never depends on whether the native reader is here
    for epoch in (0, 1):
        a, b = _grids(py, epoch), _grids(nat, epoch)
        assert [i for i, _ in a] == [i for i, _ in b]
        assert all(all(torch.equal(x, y) for x, y in zip(ta, tb)) for (_, ta), (_, tb) in zip(a, b))
    assert nat.peak_bytes <= nat.memory_budget and py.peak_bytes <= py.memory_budget
    assert nat.stats.buffer_hits > 0  # window buffers are reused in batch order too


def test_frames_read_ahead_give_the_batches_of_frames_read_by_the_decode(caches):
    """With read-ahead (each next window's frames read with O_DIRECT while the loop steps, then decoded
    from memory) every batch of two epochs equals the reader's without it; every window after each
    epoch's first decodes from the buffer, but for the frames the page cache holds, whose bytes count
    against the budget until the epoch ends. On a warm page cache nothing is read ahead."""
    from pipeline.cache import page_cache

    kw = dict(batch_size=None, batch_tokens=120, seed=3, packed=True, by_length=True, decode_ahead=False, native=True)
    plain = _small_windows(caches["bf16"], **kw)
    ahead = _small_windows(caches["bf16"], read_ahead=4 << 20, **kw)
    assert ahead._scatters and ahead.read_ahead == 4 << 20 and plain.read_ahead == 0
    assert ahead.layout == plain.layout
    frames = [sum(len(ahead._window_frames(w).frames()) for w in ahead.plan_epoch(e)[1:]) for e in (0, 1)]
    for epoch in (0, 1):
        a = _grids(plain, epoch)  # (reads every frame into the page cache)
        ahead.stats = type(ahead.stats)()
        if epoch == 1:
            assert page_cache.evict(Path(caches["bf16"].url)) > 0
        b = _grids(ahead, epoch)
        assert [i for i, _ in a] == [i for i, _ in b]
        assert all(all(torch.equal(x, y) for x, y in zip(ta, tb)) for (_, ta), (_, tb) in zip(a, b))
        got = ahead.stats.read_ahead_frames, ahead.stats.page_cache_frames
        assert sum(got) == frames[epoch] > 0
        # warm: all left to the page cache; cold: read ahead, but for those the kernel's own read-ahead
        # brought into it while the epoch's first window was read at its decode
        assert got == (0, frames[0]) if epoch == 0 else got[0] > got[1]
    assert ahead.accounting.current["prefetch"] == 0 < ahead.accounting.peak["prefetch"]
    assert ahead.peak_bytes <= ahead.memory_budget
    # a budget with nothing to spare beside its shares reads nothing ahead
    assert _tiny(caches["bf16"], read_ahead=4 << 20, **kw).read_ahead == 0


def test_a_window_in_batch_order_frees_its_frames_when_the_epoch_stops_early(caches):
    """An epoch abandoned after one batch closes the shard files its undecoded windows held open."""
    r = _small_windows(caches["bf16"], native=True, batch_size=None, batch_tokens=120, seed=3, packed=True,
              by_length=True, decode_ahead=False)
    assert r._scatters
    before = len(os.listdir("/proc/self/fd"))
    for _ in r.iter_epoch(0):
        break
    assert len(os.listdir("/proc/self/fd")) <= before
    assert r.accounting.current["window"] == 0 and r.accounting.current["scratch"] == 0


def test_the_decode_loop_never_frees_the_consumers_reader_while_it_decodes(caches):
    """Past the idle cap the decode loop frees idle scratch after preparing a window (``_after_decode``)
    while the consumer may be decoding the window before it with its own native reader: the loop frees
    the decode threads' scratch only, and the consumer frees its own after its decode."""
    r = _small_windows(caches["bf16"], native=True, batch_size=None, batch_tokens=120, seed=3, packed=True,
              by_length=True, decode_ahead=False)
    runs = _spy_runs(r)
    it = r.iter_epoch(0)
    next(it)
    run = runs[-1]
    consumer = r._scratch(run, consumer=True)
    r.idle_cap = 0
    r._after_decode(run)  # as the decode loop does
    assert run.scratches.get("consumer") is consumer and consumer._contexts
    r._after_decode(run, consumer=True)  # as the consumer does after its own decode
    assert "consumer" not in run.scratches and not consumer._contexts
    rest = list(it)
    assert rest and r.accounting.current["scratch"] == 0
