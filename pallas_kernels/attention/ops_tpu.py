"""Mosaic TPU path of `ops.attention`: JAX's Pallas splash-attention kernel, as MaxText uses it on TPUs.

`jax.experimental.pallas.ops.tpu.splash_attention` is a block-sparse FlashAttention for TPUs with a
custom VJP (forward, dq and dk/dv kernels); it skips the key blocks the causal mask hides and takes
segment ids for packed documents. Its MHA form takes grouped-query heads directly (query head n reads kv
head n // G). This module adapts it to `ops.attention`'s contract:

  jnp     q scaled by 1 / sqrt(H) (splash applies no scale; the product rounds to q's dtype, as in
          MaxText); T padded to a multiple of the blocks (padding is segment -1, later than every real
          key, so no real query sees it); [B, T, N, H] <-> [B, N, T, H].
  Pallas  splash MHA with a causal mask and segment ids, vmapped over the batch.

Block sizes are `TpuBlockSizes` (one size for every splash block, at least 128: the TPU lane width).
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from pallas_kernels import _target

_LANES = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuBlockSizes:
  """Static tiling of the splash kernels: query and key rows per block, forward and backward.

  Attributes:
    block: rows per block of every splash kernel; a multiple of 128, clamped to the padded sequence.
  """

  block: int = 512

  def __post_init__(self):
    if self.block < _LANES or self.block % _LANES:
      raise ValueError(f"block={self.block} must be a multiple of {_LANES}")

  @classmethod
  def for_device(cls, device: Optional[Any] = None) -> "TpuBlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Matched in order against `device_kind.lower()`. MaxText's default splash blocks (512); not yet swept.
_DEFAULTS: tuple[tuple[str, TpuBlockSizes], ...] = ()


def _splash_blocks(size: int) -> splash.BlockSizes:
  return splash.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                           block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)


def attention_splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     block_sizes: Optional[TpuBlockSizes] = None, interpret: bool = False) -> jax.Array:
  """`ops.attention(..., backend="mosaic_tpu")`: shapes already checked by the caller."""
  b, t, n, h = q.shape
  size = min((block_sizes or TpuBlockSizes.for_device()).block, -(-t // _LANES) * _LANES)
  padded = -(-t // size) * size
  pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2),
                                   constant_values=value)
  heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)                       # [B, heads, T', H]
  seg = pad(segment_ids.astype(jnp.int32), -1)                             # [B, T']
  kernel = splash.make_splash_mha(
      mask_lib.MultiHeadMask([mask_lib.CausalMask((padded, padded))] * n), block_sizes=_splash_blocks(size),
      head_shards=1, q_seq_shards=1, interpret=interpret)
  scaled = (q * jnp.asarray(h ** -0.5, q.dtype)).astype(q.dtype)
  run = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  o = jax.vmap(run)(heads_first(scaled), heads_first(k), heads_first(v), seg)  # [B, N, T', H]
  return jnp.swapaxes(o, 1, 2)[:, :t].astype(v.dtype)
