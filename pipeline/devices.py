"""Device choice, shared by both stages (so stage two never imports stage one for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import LstError

if TYPE_CHECKING:
    import torch


class DeviceError(LstError, RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(device: str) -> "torch.device":
    """'auto' picks CUDA when torch sees it; asking for CUDA without one is a user error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DeviceError(f"--device {device!r}: use auto, cpu or cuda")
    return torch.device(device)
