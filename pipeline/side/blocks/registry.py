"""Side-block registry: a new side-block type is one file with one decorated factory.

A factory takes the side network's reduced HF config (``families.reduced_config``) and
returns an ``nn.Module`` with ``forward(hidden, ctx) -> hidden`` (see ``base.SideBlock``).
``index`` is the block's position among the side blocks (0 = first; T5/MPNet keep their
relative-position bias there), ``layer`` the 1-based backbone block it stands beside.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from torch import nn

__all__ = ["BlockFactory", "register_block", "build_block", "available_blocks"]


class BlockFactory(Protocol):
    def __call__(self, side_hf_config: Any, *, index: int, layer: int) -> nn.Module: ...


_REGISTRY: dict[str, BlockFactory] = {}


def register_block(name: str) -> Callable[[BlockFactory], BlockFactory]:
    """Register ``factory`` under ``name`` (the value of ``SideConfig.block``)."""

    def deco(factory: BlockFactory) -> BlockFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"side block {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def build_block(name: str, side_hf_config: Any, *, index: int = 0, layer: int = 1) -> nn.Module:
    """Instantiate the registered side block ``name`` at the width of ``side_hf_config``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown side block {name!r}; registered: {', '.join(available_blocks())}") from None
    return factory(side_hf_config, index=index, layer=layer)


def available_blocks() -> list[str]:
    return sorted(_REGISTRY)
