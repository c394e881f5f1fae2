"""Device choice, shared by both stages (so stage two never imports stage one for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import LstError

if TYPE_CHECKING:
    import torch


class DeviceError(LstError, RuntimeError):
    """A device was asked for that this machine does not have."""


def spare_core(device: "torch.device", torch_threads: int | None = None, cores: int | None = None) -> bool:
    """Whether a background thread (stage one's writer, stage two's window decode) has a core to itself
    beside the compute: on CUDA the host is idle while the device works; on a CPU, only where torch's
    threads leave one of this process's cores free. Otherwise the thread preempts a member of torch's
    OpenMP team, the others spin at the next barrier, and it costs more than doing the work in line."""
    import os

    import torch

    if device.type != "cpu":
        return True
    threads = torch.get_num_threads() if torch_threads is None else torch_threads
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads < cores


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
