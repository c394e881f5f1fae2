"""Compute one shard: run the frozen backbone over the examples that overlap the shard's token rows.

The batching of a shard is a pure function of the shard (examples in storage order, cut by token
budget), so whichever process computes a shard, first run or resume, produces the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.backbones import Backbone, forward_taps
from pipeline.backbones.seq2seq import LabelTargets, forward_label_taps
from pipeline.cache import codecs as C
from pipeline.cache.draws import parse_draw
from pipeline.cache.store import SplitView
from pipeline.extract.plan import batches_by_token_budget


@dataclass(frozen=True)
class ComputeSettings:
    taps: tuple[int, ...]
    codec: str
    batch_tokens: int = 8192
    precision: str = "fp32"  # compute dtype: fp32 | fp16 | bf16 (half precision is for CUDA)
    decoder_taps: tuple[int, ...] = ()  # T5 label targets: decoder taps cached per candidate
    targets: LabelTargets | None = None


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward_real_tokens(
    backbone: Backbone, seqs: list[np.ndarray], settings: ComputeSettings, device: torch.device,
    types: list[np.ndarray] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Taps of the real tokens of these sequences, concatenated in order: one [n_tokens, d] per
    tap; and with label targets, each example's decoder rows: one [n_examples, D, d] per decoder tap.

    An out-of-memory batch is split in half and retried, down to single examples.
    """
    longest = max(len(s) for s in seqs)
    pad = backbone.tokenizer.pad_token_id or 0
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    tt = torch.zeros_like(ids) if types is not None else None
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[k, : len(s)] = 1
        if tt is not None:
            tt[k, : len(s)] = torch.from_numpy(types[k].astype(np.int64))
    try:
        with torch.inference_mode(), _autocast(device, settings.precision):
            ids_d = ids.to(device, non_blocking=True)
            mask_d = mask.to(device, non_blocking=True)
            tt_d = tt.to(device, non_blocking=True) if tt is not None else None
            dec: list[torch.Tensor] = []
            if settings.targets is not None:
                taps, dec = forward_label_taps(backbone, ids_d, mask_d, list(settings.taps),
                                               list(settings.decoder_taps), settings.targets)
            else:
                taps = forward_taps(backbone, ids_d, mask_d, list(settings.taps), token_type_ids=tt_d)
            keep = mask_d.bool()
            return [t[keep].float() for t in taps], [t.float() for t in dec]
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not _is_oom(err) or len(seqs) == 1:
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(seqs) // 2
        a, da = _forward_real_tokens(backbone, seqs[:half], settings, device, types[:half] if types else None)
        b, db = _forward_real_tokens(backbone, seqs[half:], settings, device, types[half:] if types else None)
        return [torch.cat([x, y]) for x, y in zip(a, b)], [torch.cat([x, y]) for x, y in zip(da, db)]


Encoded = dict[int, tuple[np.ndarray, np.ndarray | None]]


@contextlib.contextmanager
def dropout_draw(backbone: Backbone, split: str, shard: int) -> Iterator[None]:
    """A dropout draw's shard (``pipeline.cache.draws``) runs with the backbone in train mode, its
    dropout drawn from a generator seeded by (draw, shard) alone: a resume, or another Dask worker,
    computes the same values. The global RNG state and the eval mode are restored after. An example
    that straddles two shards is computed in both, so its two parts come from different draws."""
    drawn = parse_draw(split)
    if drawn is None:
        yield
        return
    model = backbone.model
    device = next(model.parameters()).device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(drawn[1] * 1_000_003 + shard)
        model.train()
        try:
            yield
        finally:
            model.eval()


def compute_shard(
    backbone: Backbone, split: SplitView, shard: int, settings: ComputeSettings, device: torch.device
) -> tuple[Encoded, Encoded | None]:
    """Encoded values of every tap for the shard's rows, and (label targets) the decoder rows of
    the examples that start in it: the arguments of ``SplitView.write_shard``."""
    start, end = split.shard_rows(shard)
    i0, i1 = split.shard_examples(shard)
    offsets = split.offsets
    input_ids = split.input_ids
    token_types = split.token_type_ids
    lengths = np.diff(offsets[i0 : i1 + 1])
    parts: list[list[torch.Tensor]] = [[] for _ in settings.taps]
    dec_parts: list[list[torch.Tensor]] = [[] for _ in settings.decoder_taps]
    with dropout_draw(backbone, split.name, shard):
        for a, b in batches_by_token_budget(lengths, settings.batch_tokens):
            seqs = [input_ids[offsets[i] : offsets[i + 1]] for i in range(i0 + a, i0 + b)]
            types = None if token_types is None else [token_types[offsets[i] : offsets[i + 1]]
                                                      for i in range(i0 + a, i0 + b)]
            enc, dec = _forward_real_tokens(backbone, seqs, settings, device, types)
            for k, t in enumerate(enc):
                parts[k].append(t)
            for k, t in enumerate(dec):
                dec_parts[k].append(t)
    lo, hi = start - int(offsets[i0]), end - int(offsets[i0])
    out = {}
    for tap, chunks in zip(settings.taps, parts):
        rows = torch.cat(chunks)[lo:hi]
        out[tap] = C.encode(rows, settings.codec)  # encodes on device, copies the smaller result
    if settings.targets is None:
        return out, None
    e0, e1 = split.unit_examples(shard)
    dec_out = {}
    for tap, chunks in zip(settings.decoder_taps, dec_parts):
        rows = torch.cat(chunks)[e0 - i0 : e1 - i0]
        dec_out[tap] = C.encode(rows.reshape(-1, rows.shape[-1]), settings.codec)
    return out, dec_out
