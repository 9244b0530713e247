"""Triton path of `ops.attention`: tiling, pallas_calls and the custom VJP.

Pipeline (kernel bodies in `kernel.py`):

  jnp     pad T to a multiple of the blocks (padding is segment -1: it sees only itself, and no real
          query sees it, being later than every real key) and H to a power of 2 >= 16 with zeros (the
          scores do not change; the scale is the real H's). Differentiated by JAX around the core
          (`_flash.py`, shared with the Mosaic GPU path).
  Pallas  forward   grid (B, N, T/bq)   o [B,T,N,H], lse [B,N,T] f32
Backward (saves q, k, v, o and lse; no [T, T] tensor is ever stored):
  jnp     delta = rowsum(do * o) [B,N,T] f32
  Pallas  dkdv      grid (B, K, T/bk)   dk, dv [B,T,K,H], summed over the G query heads in registers
  Pallas  dq        grid (B, N, T/bq)   dq [B,T,N,H]
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _vma
from pallas_kernels.attention import _flash
from pallas_kernels.attention import kernel
from pallas_kernels import _target
from pallas_kernels import _triton_tiles

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Static tiling of the Triton attention kernels (each block a power of 2 >= 16: `_triton_tiles`).

  Attributes:
    block_q, block_k: query / key rows per step of the forward kernel.
    block_q_bwd, block_k_bwd: the same for both backward kernels.
    num_warps, num_warps_bwd: Triton warps of the forward / backward kernels.
    num_stages: Triton software-pipelining stages.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int = 4
  num_warps_bwd: int = 8
  num_stages: int = 2

  def __post_init__(self):
    _triton_tiles.check_block_sizes(self, ("block_q", "block_k", "block_q_bwd", "block_k_bwd"),
                                    ("num_warps", "num_warps_bwd", "num_stages"))

  @classmethod
  def for_device(cls, device: Optional[Any] = None) -> "BlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Matched in order against `device_kind.lower()`. Untuned: FlashAttention-2's Triton tiling for head dim
# 128 (128 x 64 forward, 64 x 64 backward), not yet swept on a GPU with benchmarks/attention.py.
_DEFAULTS: tuple[tuple[str, BlockSizes], ...] = (
    ("h200", BlockSizes()),
    ("h100", BlockSizes()),
    ("a100", BlockSizes(num_stages=3)),
)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) configuration of one padded problem."""

  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  scale: float
  interpret: bool
  num_warps: int
  num_warps_bwd: int
  num_stages: int

  def params(self, bwd: bool = False):
    return plgpu.CompilerParams(num_warps=self.num_warps_bwd if bwd else self.num_warps,
                                num_stages=self.num_stages)


def _forward(cfg: _Config, q, k, v, seg):
  """Padded q [B,T,N,H], k/v [B,T,K,H], seg [B,T] -> o [B,T,N,H], lse [B,N,T] f32."""
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  bq = cfg.block_q
  body = functools.partial(kernel.forward_kernel, block_q=bq, block_k=cfg.block_k, scale=cfg.scale)
  rows = pl.BlockSpec((None, bq, None, h), lambda b, n, i: (b, i, n, 0))
  keys = pl.BlockSpec((None, t, None, h), lambda b, n, i: (b, 0, n // groups, 0))
  return pl.pallas_call(
      body,
      grid=(b, n, t // bq),
      in_specs=[rows, keys, keys, pl.BlockSpec((None, t), lambda b, n, i: (b, 0))],
      out_specs=[rows, pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))],
      out_shape=[_vma.out_struct(q.shape, q.dtype, q), _vma.out_struct((b, n, t), _F32, q)],
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(q, k, v, seg)


def _backward(cfg: _Config, q, k, v, seg, o, lse, do):
  b, t, n, h = q.shape
  kvh = k.shape[2]
  groups = n // kvh
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  delta = _flash.row_delta(o, do)                                              # [B, N, T] f32
  seg_spec = pl.BlockSpec((None, t), lambda b, h, i: (b, 0))

  # dk, dv: one program per (batch, kv head, key block), over the kv head's G query heads.
  heads = pl.BlockSpec((None, t, groups, h), lambda b, m, j: (b, 0, m, 0))      # q, do: [T, G, H]
  head_rows = pl.BlockSpec((None, groups, t), lambda b, m, j: (b, m, 0))        # lse, delta: [G, T]
  key_block = pl.BlockSpec((None, bk, None, h), lambda b, m, j: (b, j, m, 0))
  dk, dv = pl.pallas_call(
      functools.partial(kernel.dkdv_kernel, block_q=bq, block_k=bk, groups=groups, seq_len=t, scale=cfg.scale),
      grid=(b, kvh, t // bk),
      in_specs=[heads, key_block, key_block, seg_spec, heads, head_rows, head_rows],
      out_specs=[key_block, key_block],
      out_shape=[_vma.out_struct(k.shape, k.dtype, q), _vma.out_struct(v.shape, v.dtype, q)],
      compiler_params=cfg.params(bwd=True),
      interpret=cfg.interpret,
      name="flash_attention_dkdv",
  )(q, k, v, seg, do, lse, delta)

  # dq: one program per (batch, query head, query block), over the key blocks up to the diagonal.
  rows = pl.BlockSpec((None, bq, None, h), lambda b, n, i: (b, i, n, 0))
  keys = pl.BlockSpec((None, t, None, h), lambda b, n, i: (b, 0, n // groups, 0))
  row_stats = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
  dq = pl.pallas_call(
      functools.partial(kernel.dq_kernel, block_q=bq, block_k=bk, scale=cfg.scale),
      grid=(b, n, t // bq),
      in_specs=[rows, keys, keys, seg_spec, rows, row_stats, row_stats],
      out_specs=rows,
      out_shape=_vma.out_struct(q.shape, q.dtype, q),
      compiler_params=cfg.params(bwd=True),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(q, k, v, seg, do, lse, delta)
  return dq, dk, dv


_core = _flash.differentiable(_forward, _backward)


def attention_triton(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     block_sizes: Optional[BlockSizes] = None, interpret: bool = False) -> jax.Array:
  """`ops.attention(..., backend="triton")`: shapes already checked by the caller."""
  blocks = block_sizes or BlockSizes.for_device()
  t, h = q.shape[1], q.shape[3]
  # Blocks no longer than the (power-of-2 rounded) sequence, so that short sequences pad little.
  fit = lambda size: min(size, _triton_tiles.tile(t))
  cfg = _Config(block_q=fit(blocks.block_q), block_k=fit(blocks.block_k), block_q_bwd=fit(blocks.block_q_bwd),
                block_k_bwd=fit(blocks.block_k_bwd), scale=h ** -0.5, interpret=interpret,
                num_warps=blocks.num_warps, num_warps_bwd=blocks.num_warps_bwd, num_stages=blocks.num_stages)
  multiple = max(cfg.block_q, cfg.block_k, cfg.block_q_bwd, cfg.block_k_bwd)   # powers of 2: their lcm
  return _flash.run_padded(_core, cfg, q, k, v, segment_ids, padded_t=-(-t // multiple) * multiple,
                           padded_h=_triton_tiles.tile(h))
