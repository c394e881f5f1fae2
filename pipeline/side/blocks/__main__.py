"""``python -m pipeline.side.blocks``: build lst's CPU side-network kernels now (set-up does this)."""

from pipeline import native
from pipeline.side.blocks import cpu_kernels

print(native.build(cpu_kernels.EXTENSION))
