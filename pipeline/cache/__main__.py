"""``python -m pipeline.cache``: build lst's native cache reader now (set-up does this)."""

from pipeline import native
from pipeline.cache import native_read

print(native.build(native_read.EXTENSION))
