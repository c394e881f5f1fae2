"""Backbones: name resolution, frozen loading, tap extraction, fingerprints, init pack."""

from __future__ import annotations

from pipeline.lazy import lazy_getattr

# Imported on first use, so `import pipeline.<pkg>.config` (the CLI's --help) stays free of torch.
_LAZY = {
    "Backbone": "model",
    "family_of": "model",
    "forward_taps": "model",
    "init_pack_state": "model",
    "load_backbone": "model",
    "tokenizer_sha256": "model",
    "weights_sha256": "model",
    "DEFAULT_BACKBONE": "registry",
    "KNOWN_BACKBONES": "registry",
    "BackboneError": "registry",
    "resolve_backbone": "registry",
    "TINY_FAMILIES": "tiny",
    "make_tiny_backbone": "tiny",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
