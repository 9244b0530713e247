"""`attention(q, k, v, segment_ids)`: causal, segment-masked GQA self-attention, with its VJP.

Same semantics as `reference.attention_reference` (query t sees key u iff u <= t and both have the same
segment id; query head n reads kv head n // G; f32 softmax, probabilities into P V in the value dtype).
Backends:

  "triton"     Pallas Triton flash-attention kernels for NVIDIA GPUs (`ops_triton.py` + `kernel.py`);
               `BlockSizes` is its tiling. Nothing of size [T, T] is stored.
  "mosaic_gpu" Pallas Mosaic GPU flash-attention kernels for Hopper (`ops_mgpu.py` + `kernel_mgpu.py`:
               wgmma on TMA-staged shared-memory tiles; bf16 / f16); `MgpuBlockSizes`. Pallas Mosaic GPU
               is the GPU backend JAX keeps as it deprecates Pallas Triton.
  "mosaic_tpu" JAX's Pallas splash-attention kernels for TPUs (`ops_tpu.py`); `TpuBlockSizes`.
  "xla"        `blockwise.blockwise_attention`: the same FlashAttention-2 algorithm written in XLA
               (loops of einsums, own VJP); memory O(T * block) on any platform.
  "reference"  the materialised `reference.attention_reference` ([B, N, T, T] f32 scores).
  "auto"       "triton" on GPUs, "mosaic_tpu" on TPUs, "xla" elsewhere, by the target platform (the
               abstract mesh's device when one is set, as for AOT lowering on a CPU host).

Verified on CPU hosts (`ops_test.py`): the three kernel paths match the reference in their Pallas
interpreters, outputs and gradients, and lower for an abstract H100 (Triton IR, Mosaic GPU) and TPU v5e
(Mosaic); the Triton kernels compile for an H100 without one (`tests/test_aot.py`). Owed: running them on a GPU and a TPU, and
tuning `BlockSizes` / `TpuBlockSizes` (`benchmarks/attention.py`).
"""

from typing import Optional

import jax
from jax.experimental.pallas import mosaic_gpu as plmgpu
import jax.numpy as jnp

from pallas_kernels.attention import blockwise
from pallas_kernels.attention import ops_mgpu
from pallas_kernels.attention import ops_tpu
from pallas_kernels.attention import ops_triton
from pallas_kernels.attention import reference
from pallas_kernels.attention.ops_mgpu import MgpuBlockSizes
from pallas_kernels.attention.ops_tpu import TpuBlockSizes
from pallas_kernels.attention.ops_triton import BlockSizes
from pallas_kernels import _target

__all__ = ["BACKENDS", "BlockSizes", "MgpuBlockSizes", "TpuBlockSizes", "attention"]

BACKENDS = ("auto", "triton", "mosaic_gpu", "mosaic_tpu", "xla", "reference")
_KERNEL_PLATFORMS = {"triton": ("gpu", "NVIDIA GPUs"), "mosaic_gpu": ("gpu", "NVIDIA Hopper GPUs"),
                     "mosaic_tpu": ("tpu", "TPUs")}
_AUTO = {"gpu": "triton", "tpu": "mosaic_tpu"}


def _resolve(backend: str, interpret: bool) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"Unknown backend {backend!r}; expected one of {BACKENDS}")
  if backend == "auto":
    return _AUTO.get(_target.platform(), "xla")
  if backend in _KERNEL_PLATFORMS and not interpret and _target.platform() != _KERNEL_PLATFORMS[backend][0]:
    raise ValueError(f"backend={backend!r} compiles for {_KERNEL_PLATFORMS[backend][1]}, and the target is "
                     f"{_target.platform()!r}; pass interpret=True to run the kernels in the Pallas interpreter")
  return backend


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, backend: str = "auto",
              block_sizes: Optional[BlockSizes | MgpuBlockSizes | TpuBlockSizes] = None, xla_block: int = 512,
              interpret: bool = False) -> jax.Array:
  """q [B,T,N,H], k/v [B,T,K,H] (N % K == 0), segment_ids [B,T] int (>= 0) -> [B,T,N,H] in v.dtype.

  `block_sizes` tiles a kernel backend (`BlockSizes`: "triton", `MgpuBlockSizes`: "mosaic_gpu",
  `TpuBlockSizes`: "mosaic_tpu"),
  `xla_block` the "xla" one; `interpret` runs the kernels in the Pallas interpreter (on any platform): True,
  or for "mosaic_gpu" also a `plgpu.InterpretGPUParams`.
  """
  b, t, n, h = q.shape
  kvh = k.shape[2]
  if k.shape != (b, t, kvh, h) or v.shape != k.shape or n % kvh or segment_ids.shape != (b, t):
    raise ValueError(f"attention needs q [B,T,N,H], k/v [B,T,K,H] with N % K == 0 and segment_ids [B,T]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}, {segment_ids.shape=}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q, k and v must be floating point; got {q.dtype}")
  # The kernels cast segment ids to int32 (float ids 1.0 and 1.5 became one segment) where the reference
  # compares them as given.
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integer; got {segment_ids.dtype}")
  backend = _resolve(backend, interpret)
  # Mosaic GPU interpreter options run only those kernels; the Triton and splash ones failed deep in Pallas.
  if isinstance(interpret, plmgpu.InterpretGPUParams) and backend in ("triton", "mosaic_tpu"):
    raise ValueError(f"interpret={interpret!r} (Mosaic GPU interpreter options) takes backend='mosaic_gpu', "
                     f"not {backend!r}; pass interpret=True")
  tiling = {"triton": BlockSizes, "mosaic_gpu": MgpuBlockSizes, "mosaic_tpu": TpuBlockSizes}.get(backend)
  if block_sizes is not None and not isinstance(block_sizes, tiling or ()):
    raise ValueError(f"block_sizes {type(block_sizes).__name__} do not tile the {backend!r} backend")
  if backend == "triton":
    return ops_triton.attention_triton(q, k, v, segment_ids, block_sizes=block_sizes, interpret=interpret)
  if backend == "mosaic_gpu":
    return ops_mgpu.attention_mgpu(q, k, v, segment_ids, block_sizes=block_sizes, interpret=interpret)
  if backend == "mosaic_tpu":
    return ops_tpu.attention_splash(q, k, v, segment_ids, block_sizes=block_sizes, interpret=interpret)
  if backend == "xla":
    return blockwise.blockwise_attention(q, k, v, segment_ids, block=xla_block)
  return reference.attention_reference(q, k, v, segment_ids)
