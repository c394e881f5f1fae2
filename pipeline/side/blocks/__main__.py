"""``python -m pipeline.side.blocks``: build the small-head CPU attention kernel now (set-up does this)."""

from pipeline import native
from pipeline.side.blocks import native_attention

print(native.build(native_attention.EXTENSION))
