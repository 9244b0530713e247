"""Mamba-2 SSD (state space duality) kernels and references.

`ssd` (Pallas kernels with a custom VJP; `ops.py`) is a drop-in for
`reference.ssd_reference`; `BlockSizes` is its static tiling.
"""

from pallas_kernels.ssd.ops import BlockSizes, ssd

__all__ = ["BlockSizes", "ssd"]
