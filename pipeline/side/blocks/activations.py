"""Activation functions by their Hugging Face config names, without importing ``transformers``.

``transformers.activations`` pulls in most of ``transformers`` (~0.7 s of every cached `lst train`,
`lst sweep` and sweep-worker start on two cores) for what is, for the activations our backbones
name, one torch function. Those names map to the torch modules that compute exactly what HF's
classes compute (``GELUActivation`` calls ``nn.functional.gelu``, ``SiLUActivation``
``nn.functional.silu``, ``GELUTanh`` ``gelu(approximate="tanh")``); any other name (``gelu_new``,
``quick_gelu``, ...) still comes from ``transformers.activations``, so every config keeps working.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_TORCH: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    """A fresh module for the config's activation ``name`` (as ``transformers.activations.ACT2FN[name]``)."""
    make = _TORCH.get(name)
    if make is not None:
        return make()
    from transformers.activations import ACT2FN

    return ACT2FN[name]
