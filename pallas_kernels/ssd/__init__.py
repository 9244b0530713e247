"""Mamba-2 SSD (state space duality) kernels and references.

`ssd` (`ops.py`) is a drop-in for `reference.ssd_reference` on Pallas kernels
with a custom VJP: Triton kernels for NVIDIA GPUs (`ops_triton.py` +
`kernel.py`, tiling `BlockSizes`), Mosaic GPU kernels for Hopper
(`ops_mgpu.py` + `kernel_mgpu.py`, `MgpuBlockSizes`; `backend="mosaic_gpu"`)
and Mosaic kernels for TPUs (`ops_tpu.py` + `kernel_tpu.py`, tiling
`TpuBlockSizes`); `backend="auto"` picks by the target platform (Triton on
GPUs until a GPU has compared the two). `ssd_decode_step` (`ops_decode.py` +
`kernel_decode.py`) is the one-token update of decoding as a Triton kernel that
reads and writes the state once, in place (`DecodeBlockSizes`), a drop-in for
`reference.ssd_decode_step_reference`.
Verified on CPU hosts only: interpret-mode parity with the reference (outputs
and gradients; the Mosaic GPU kernels in JAX's Mosaic GPU interpreter),
lowering for an abstract H100 / TPU v5e, and ahead-of-time
Mosaic compilation with libtpu (no TPU). Owed: runs on a real TPU and GPU, and
tuning of both.
"""

from pallas_kernels.ssd.ops import BlockSizes, MgpuBlockSizes, TpuBlockSizes, ssd
from pallas_kernels.ssd.ops_decode import DecodeBlockSizes, ssd_decode_step

__all__ = ["BlockSizes", "DecodeBlockSizes", "MgpuBlockSizes", "TpuBlockSizes", "ssd", "ssd_decode_step"]
