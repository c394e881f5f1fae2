"""How float tap chunks are packed on disk, named once. No torch import: ``lst extract --help``
and the extract config read these without loading it."""

from __future__ import annotations

#: lz4 (bitshuffled Blosc frames, ~1.4x smaller) or none (Blosc frames stored as they are)
COMPRESSIONS = ("lz4", "none")
DEFAULT_COMPRESSION = "lz4"
