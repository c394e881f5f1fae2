"""FLOP counts behind the speed goals: what fraction of a live LST step is the side network?

``speedup_limit(backbone, side_configs, batch)`` counts, with ``torch.utils.flop_counter.
FlopCounterMode`` on one real batch, the backbone's forward (as live LST runs it: up to the last
tap the side networks read) and one training step (forward + backward) of each side network,
and returns per-token numbers and

    speedup_limit = (backbone forward + side training) / side training

the most that training from the cache can gain over live LST per variant, if the side network
ran at the backbone's FLOP efficiency and reading the cache were free.

CPU's fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) is missing from
torch's FLOP registry, so it is counted here with torch's own SDPA formulas; otherwise the
attention matmuls of one model would count and the other's not.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["speedup_limit", "count_flops"]


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return out


def count_flops(fn, *args, **kwargs) -> tuple[int, Any]:
    """(FLOPs counted while running ``fn(*args, **kwargs)``, its result)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc:
        res = fn(*args, **kwargs)
    return int(fc.get_total_flops()), res


def _get(batch: Any, key: str):
    return batch.get(key) if isinstance(batch, dict) else getattr(batch, key, None)


def speedup_limit(backbone_name: str, side_configs: Sequence[Any], batch: Any, backbone=None,
                  models: Sequence[Any] | None = None, targets: Any = None) -> dict:
    """Per-token FLOPs of the backbone forward and of side-network training on ``batch``.

    ``side_configs``: SideConfig objects or dicts of SideConfig fields (the variants; the side cost
    is their mean). ``batch``: a reader ``Batch`` or a dict with ``input_ids``, ``attention_mask``
    (and optionally ``token_type_ids``, ``labels``). ``backbone``: an already loaded
    ``pipeline.backbones.Backbone`` to reuse (else ``load_backbone(backbone_name)``). ``models``:
    side networks already built (instead of ``side_configs``), e.g. T5 label scorers, whose live
    forward also runs the decoder once per candidate of ``targets`` (``LabelTargets``)."""
    from pipeline.backbones.seq2seq import forward_label_taps
    from pipeline.backbones import forward_taps, load_backbone
    from pipeline.side.config import SideConfig
    from pipeline.side.model import LadderSideNetwork

    bb = backbone if backbone is not None else load_backbone(backbone_name)
    ids, mask = _get(batch, "input_ids"), _get(batch, "attention_mask")
    tt = _get(batch, "token_type_ids")
    labels = _get(batch, "labels")
    models = list(models or [])
    for c in side_configs:
        cfg = c if isinstance(c, SideConfig) else SideConfig(**dict(c))
        torch.manual_seed(0)
        models.append(LadderSideNetwork(cfg, bb.config))
    taps = sorted({t for m in models for t in m.required_taps()})
    dec_taps = sorted({t for m in models for t in m.required_decoder_taps()})
    dec_map: dict = {}
    with torch.no_grad():
        if dec_taps:
            bb_flops, (tap_vals, dec_vals) = count_flops(forward_label_taps, bb, ids, mask, taps, dec_taps, targets)
            dec_map = dict(zip(dec_taps, dec_vals))
        else:
            bb_flops, tap_vals = count_flops(forward_taps, bb, ids, mask, taps, token_type_ids=tt)
    tap_map = dict(zip(taps, [t.float() for t in tap_vals]))
    side = []
    for m in models:
        m.train()
        y = labels if labels is not None else torch.zeros(ids.shape[0], dtype=torch.long)
        if m.config.task_type == "regression":
            y = y.float()

        def step(m=m, y=y):
            inputs = {"taps": [tap_map[t] for t in m.required_taps()], "attention_mask": mask}
            if m.required_decoder_taps():
                inputs["dec_taps"] = [dec_map[t] for t in m.required_decoder_taps()]
            loss = m.training_loss(labels=y, **inputs)
            loss.backward()
            return loss

        f, _ = count_flops(step)
        side.append(f)
    side_mean = sum(side) / len(side)
    tokens = int(mask.sum())
    return {
        "backbone": backbone_name,
        "batch_shape": list(ids.shape),
        "tokens": tokens,
        "padded_tokens": int(ids.numel()),
        "backbone_forward_flops": bb_flops,
        "side_train_flops_mean": side_mean,
        "side_train_flops": side,
        "backbone_forward_flops_per_token": bb_flops / tokens,
        "side_train_flops_per_token": side_mean / tokens,
        "taps": taps,
        "speedup_limit": (bb_flops + side_mean) / side_mean,
    }
