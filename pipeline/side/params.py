"""Parameter counts per side-network component (what the paper's "trainable %" reports)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["COMPONENTS", "component_of", "count_parameters", "side_parameter_breakdown"]

COMPONENTS = ("ladders", "gates", "side_blocks", "final_norm", "upsample", "head")


def component_of(name: str) -> str:
    """Component of a parameter name of a LadderSideNetwork or T5LadderSideModel."""
    parts = name.split(".")
    if "ladders" in parts or "first_ladder" in parts:
        return "ladders"
    if any(p.startswith("gate") for p in parts):
        return "gates"
    if "blocks" in parts:
        return "side_blocks"
    if "final_norm" in parts:
        return "final_norm"
    if parts[0] == "upsample":
        return "upsample"
    if parts[0] == "head":
        return "head"
    return "other"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component plus 'total' and 'trainable' (frozen pieces, e.g. T5's LM
    head, are buffers and not counted)."""
    out = {c: 0 for c in COMPONENTS}
    total = trainable = 0
    for name, p in model.named_parameters():
        comp = component_of(name)
        out[comp] = out.get(comp, 0) + p.numel()
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    out["total"] = total
    out["trainable"] = trainable
    return out


def side_parameter_breakdown(backbone_config: Any, side_config: Any) -> dict[str, int]:
    """``count_parameters`` of the side network these configs describe, without allocating
    it (built on the meta device): cheap enough to rank a search space by size."""
    from .model import LadderSideNetwork

    with torch.device("meta"):
        model = LadderSideNetwork(side_config, backbone_config)
    return count_parameters(model)
