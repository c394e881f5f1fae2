"""Backbones: name resolution, frozen loading, tap extraction, fingerprints, init pack."""

from .model import (
    Backbone,
    family_of,
    forward_taps,
    init_pack_state,
    load_backbone,
    tokenizer_sha256,
    weights_sha256,
)
from .registry import DEFAULT_BACKBONE, KNOWN_BACKBONES, BackboneError, resolve_backbone
from .tiny import TINY_FAMILIES, make_tiny_backbone

__all__ = [
    "Backbone",
    "BackboneError",
    "DEFAULT_BACKBONE",
    "KNOWN_BACKBONES",
    "TINY_FAMILIES",
    "family_of",
    "forward_taps",
    "init_pack_state",
    "load_backbone",
    "make_tiny_backbone",
    "resolve_backbone",
    "tokenizer_sha256",
    "weights_sha256",
]
