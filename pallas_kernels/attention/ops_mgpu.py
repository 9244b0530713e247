"""Mosaic GPU path of `ops.attention` (Hopper): tiling, kernel calls and the custom VJP.

Pallas Mosaic GPU is the GPU backend JAX keeps as it deprecates Pallas Triton (jax 0.12); on Hopper it
reaches the tensor cores through `wgmma` on tiles that the TMA engine stages in swizzled shared memory.
Kernel bodies: `kernel_mgpu.py`. Pipeline, as the Triton path's (`ops_triton.py`):

  jnp     pad T to a multiple of the blocks (padding is segment -1: it sees only itself) and H to a
          multiple of 64 (one 128-byte swizzle row of bf16) with zeros; the scale is the real H's.
  kernel  forward   grid (B, N, T/bq)   o [B,T,N,H], lse [B,N,T] f32
Backward (saves q, k, v, o and lse; no [T, T] tensor is stored):
  jnp     delta = rowsum(do * o) [B,N,T] f32
  kernel  dkdv      grid (B, K, T/bk)   dk, dv [B,T,K,H], summed over the G query heads in registers
  kernel  dq        grid (B, N, T/bq)   dq [B,T,N,H]

bf16 / f16 only (wgmma would run f32 as TF32; f32 runs on the Triton or XLA paths). Verified in JAX's
Mosaic GPU interpreter on CPU against the reference, outputs and gradients, and lowered for an abstract
H100 (`ops_test.py`); one warpgroup per program, untuned tiles. Owed: runs, tuning and the comparison
with the Triton kernel, cuDNN and torch SDPA on an H100 (`benchmarks/attention.py`).
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu
from pallas_kernels import _target
from pallas_kernels import _vma
from pallas_kernels.attention import _flash
from pallas_kernels.attention import kernel_mgpu

_F32 = jnp.float32
_OPERAND_DTYPES = _mgpu.OPERAND_DTYPES


@dataclasses.dataclass(frozen=True, kw_only=True)
class MgpuBlockSizes:
  """Static tiling of the Mosaic GPU attention kernels (one warpgroup per program).

  Attributes:
    block_q, block_k: query / key rows per step of the forward and dq kernels (powers of 2 >= 64; the
      wgmma M of a warpgroup is 64, and an f32 [block_q, block_k] score tile plus the [block_q, H]
      accumulator live in its registers).
    block_q_bwd, block_k_bwd: query rows per step / key rows per program of the dk/dv kernel.
    max_concurrent_steps: pipeline stages (shared-memory buffers of the streamed k/v or q/do tiles). At
      head dim 128, 3 stages take 125 / 140 / 148 KB (forward / dq / dk-dv; one program per H100 SM),
      2 stages 93 / 108 / 116 KB (two programs per SM for the forward and dq), by
      `benchmarks/kernel_resources.py`; `benchmarks/attention.py` times both.
  """

  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  max_concurrent_steps: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
      size = getattr(self, name)
      if size < 64 or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two >= 64.")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1.")

  @classmethod
  def for_device(cls, device: Optional[Any] = None) -> "MgpuBlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Untuned: 64-row tiles keep the score tile and the accumulator of head dim 128 in one warpgroup's
# registers (64 + 64 f32 per thread); not yet swept on a GPU with benchmarks/attention.py.
_DEFAULTS: tuple[tuple[str, MgpuBlockSizes], ...] = (
    ("h200", MgpuBlockSizes(max_concurrent_steps=3)),
    ("h100", MgpuBlockSizes(max_concurrent_steps=3)),
)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) configuration of one padded problem."""

  blocks: MgpuBlockSizes
  scale: float
  interpret: Any


_transforms, _kernel = _mgpu.transforms, _mgpu.kernel


def _forward(cfg: _Config, q, k, v, seg):
  """Padded q [B,T,N,H], k/v [B,T,K,H], seg [B,T] -> o [B,T,N,H], lse [B,N,T] f32."""
  b, t, n, h = q.shape
  blocks = cfg.blocks
  bq = blocks.block_q
  tr = _transforms(q.dtype)
  body = functools.partial(
      kernel_mgpu.forward_kernel, block_q=bq, block_k=blocks.block_k, groups=n // k.shape[2],
      scale=cfg.scale, max_concurrent_steps=blocks.max_concurrent_steps, transforms=tr,
      in_place=cfg.interpret is None)
  scratch = (plgpu.SMEM((bq, h), q.dtype, transforms=tr), plgpu.SMEM((bq,), jnp.int32),
             plgpu.SMEM((bq,), _F32), plgpu.SMEM((bq, blocks.block_k), q.dtype, transforms=tr),
             plgpu.Barrier(num_barriers=2))
  o, lse = _kernel(body, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), _F32)),
                   (b, n, t // bq), ("b", "n", "i"), scratch, cfg.interpret, name="attention_fwd")(q, k, v, seg)
  return _vma.vary_like(o, q), _vma.vary_like(lse, q)


def _backward(cfg: _Config, q, k, v, seg, o, lse, do):
  b, t, n, h = q.shape
  kvh = k.shape[2]
  blocks = cfg.blocks
  tr = _transforms(q.dtype)
  delta = _flash.row_delta(o, do)                                              # [B, N, T] f32
  common = dict(groups=n // kvh, scale=cfg.scale, max_concurrent_steps=blocks.max_concurrent_steps,
                transforms=tr, in_place=cfg.interpret is None)

  bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
  dkdv = functools.partial(kernel_mgpu.dkdv_kernel, block_q=bq, block_k=bk, seq_len=t, **common)
  scratch = (plgpu.SMEM((bk, h), q.dtype, transforms=tr), plgpu.SMEM((bk, h), q.dtype, transforms=tr),
             plgpu.SMEM((bk,), jnp.int32), plgpu.SMEM((bk, bq), q.dtype, transforms=tr),
             plgpu.SMEM((bk, bq), q.dtype, transforms=tr), plgpu.Barrier(num_barriers=3))
  dk, dv = _kernel(dkdv, (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
                   (b, kvh, t // bk), ("b", "k", "j"), scratch, cfg.interpret,
                   name="attention_bwd_dkdv")(q, k, v, seg, do, lse, delta)

  bq, bk = blocks.block_q, blocks.block_k
  dq_body = functools.partial(kernel_mgpu.dq_kernel, block_q=bq, block_k=bk, **common)
  scratch = (plgpu.SMEM((bq, h), q.dtype, transforms=tr), plgpu.SMEM((bq, h), q.dtype, transforms=tr),
             plgpu.SMEM((bq,), jnp.int32), plgpu.SMEM((bq,), _F32), plgpu.SMEM((bq,), _F32),
             plgpu.SMEM((bq, bk), q.dtype, transforms=tr), plgpu.Barrier(num_barriers=5))
  dq = _kernel(dq_body, jax.ShapeDtypeStruct(q.shape, q.dtype), (b, n, t // bq), ("b", "n", "i"), scratch,
               cfg.interpret, name="attention_bwd_dq")(q, k, v, seg, do, lse, delta)
  return _vma.vary_like(dq, q), _vma.vary_like(dk, q), _vma.vary_like(dv, q)


_core = _flash.differentiable(_forward, _backward)


def attention_mgpu(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                   block_sizes: Optional[MgpuBlockSizes] = None, interpret: bool = False) -> jax.Array:
  """`ops.attention(..., backend="mosaic_gpu")`: shapes already checked by the caller."""
  if q.dtype not in _OPERAND_DTYPES:
    raise ValueError(f"backend='mosaic_gpu' takes bf16 or f16 q, k, v (wgmma would run {q.dtype} as TF32); "
                     "use backend='triton' or 'xla' for f32")
  blocks = block_sizes or MgpuBlockSizes.for_device()
  t, h = q.shape[1], q.shape[3]
  multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)   # powers of 2
  cfg = _Config(blocks=blocks, scale=h ** -0.5,
                interpret=_mgpu.interpret_params(interpret))
  return _flash.run_padded(_core, cfg, q, k, v, segment_ids, padded_t=-(-t // multiple) * multiple,
                           padded_h=_mgpu.aligned(h))
