"""Causal, segment-masked grouped-query attention kernels and references.

`attention` (`ops.py`) dispatches to a Pallas Triton flash-attention kernel on GPUs (`ops_triton.py` +
`kernel.py`, tiling `BlockSizes`), JAX's Pallas splash-attention kernel on TPUs (`ops_tpu.py`, tiling
`TpuBlockSizes`), the same algorithm in XLA anywhere (`blockwise.py`), or the materialised reference
(`reference.py`).
"""

from pallas_kernels.attention.ops import BACKENDS, BlockSizes, TpuBlockSizes, attention
from pallas_kernels.attention.reference import attention_mask, attention_reference, dot_product_attention

__all__ = ["BACKENDS", "BlockSizes", "TpuBlockSizes", "attention", "attention_mask", "attention_reference",
           "dot_product_attention"]
