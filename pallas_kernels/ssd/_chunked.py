"""The jnp around the GPU SSD kernels (Triton and Mosaic GPU): prologue, chunk cumsum, carry decay.

Both GPU paths share this pipeline around their kernels; only the tiling, the kernel calls and the
layout of the chunk states differ (`ops_triton.py`, `ops_mgpu.py`).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _vma
from pallas_kernels.ssd import reference

_F32 = jnp.float32
_pad_dim = reference._pad_dim  # pylint: disable=protected-access


class Padded(NamedTuple):
  """Inputs of a custom_vjp core: T padded to the chunk, P and Q to the kernels' tiles."""

  x: jax.Array  # [B, T, M, P] input dtype
  dtp: jax.Array  # [B, M, T] f32, processed dt (0 on padding)
  a: jax.Array  # [B, M, T] f32, dt A
  b: jax.Array  # [B, T, J, Q] mm dtype
  c: jax.Array  # [B, T, J, Q] mm dtype
  d: jax.Array  # [M] f32 (zeros without D)
  h0: jax.Array  # [B, M, P, Q] f32
  seg: Optional[jax.Array]  # [B, T] int32 document index, or None
  carry: Optional[jax.Array]  # [B, T] f32 carry mask, or None


def prologue(x, dt, A, B, C, D, dt_bias, *, initial_state, doc_ids, chunk, padded_p, padded_q, mm_dtype,
             dt_softplus, dt_min, dt_max) -> Padded:
  """dt processing, padding and document masks (jnp, differentiated by JAX).

  Padding comes after dt processing: dt = 0 (decay 1) and x = B = C = 0 change neither y nor the final
  state.
  """
  bsz, seqlen, nheads, _ = x.shape
  padded_t = -(-seqlen // chunk) * chunk
  dtp = reference._process_dt(  # pylint: disable=protected-access
      dt, dt_bias, dt_softplus, dt_min, dt_max
  )  # [B,T,M] f32
  dtp = jnp.moveaxis(_pad_dim(dtp, 1, padded_t), 1, 2)  # [B,M,T]
  a = dtp * A.astype(_F32)[None, :, None]  # [B,M,T]
  xp = _pad_dim(_pad_dim(x, 1, padded_t), 3, padded_p)  # [B,T,M,P]
  pad_bc = lambda v: _pad_dim(_pad_dim(v, 1, padded_t), 3, padded_q)
  bp, cp = (pad_bc(v).astype(mm_dtype) for v in (B, C))  # [B,T,J,Q]
  d = jnp.zeros((nheads,), _F32) if D is None else D.astype(_F32)
  if initial_state is None:
    h0 = jnp.zeros((bsz, nheads, padded_p, padded_q), _F32)
  else:
    h0 = _pad_dim(_pad_dim(initial_state.astype(_F32), 2, padded_p), 3, padded_q)
  seg = carry = None
  if doc_ids is not None:
    segc, carry = reference._chunked_segments(  # pylint: disable=protected-access
        doc_ids, bsz, seqlen, chunk
    )  # [B,C,L] each
    seg = segc.reshape(bsz, padded_t)
    carry = carry.astype(_F32).reshape(bsz, padded_t)
  # Inside shard_map (check_vma): one varying set for every operand, so that the custom_vjp's
  # cotangents are typed like its primals; the replicated ones (D; A and dt_bias through a) are cast
  # here, outside it, where JAX's transpose of the cast sums their cotangents over the shards.
  present = [v for v in (xp, dtp, a, bp, cp, d, h0, seg, carry) if v is not None]
  matched = iter(_vma.match_vma(*present))
  return Padded(*(None if v is None else next(matched) for v in (xp, dtp, a, bp, cp, d, h0, seg, carry)))


def chunk_cumsum(chunk: int, a: jax.Array) -> jax.Array:
  """[B,M,T] -> cum_l = sum of a over the chunk up to l, [B,M,T]."""
  bsz, nheads, seqlen = a.shape
  a = a.reshape(bsz, nheads, seqlen // chunk, chunk)
  return jnp.cumsum(a, axis=-1).reshape(bsz, nheads, seqlen)


def carry_decay(chunk: int, cum: jax.Array, carry: Optional[jax.Array]) -> jax.Array:
  """g [B,M,C]: decay of the state carried over each chunk (0 if a document cuts it)."""
  bsz, nheads, seqlen = cum.shape
  nchunks = seqlen // chunk
  g = jnp.exp(cum.reshape(bsz, nheads, nchunks, chunk)[..., -1])
  if carry is not None:
    g = g * carry.reshape(bsz, 1, nchunks, chunk)[..., -1]
  return g


def add_carry_term(chunk: int, da: jax.Array, dg: jax.Array, g: jax.Array) -> jax.Array:
  """da [B,M,T] plus the carry decay's term: g_c = exp(sum of a over chunk c), so da_i += dg_c g_c."""
  bsz, nheads, seqlen = da.shape
  da = da.reshape(bsz, nheads, seqlen // chunk, chunk) + (dg * g)[..., None]
  return da.reshape(bsz, nheads, seqlen)


def core_cotangents(chunk, ngroups, *, dx, ddt, da, dg, g, db, dc, dskip, dh0, b, c, d):
  """The custom_vjp cores' cotangents of (x, dtp, a, b, c, d, h0, seg, carry) from their kernels' outputs.

  da gets the carry decay's term; db / dc [B, T, K, Q] (partial sums over the heads of K head blocks)
  are summed over each group's blocks; dskip [B, M, T] (rowsum(dy o x)) over batch and tokens to dD.
  """
  return (
      dx, ddt, add_carry_term(chunk, da, dg, g), group_sum(db, ngroups).astype(b.dtype),
      group_sum(dc, ngroups).astype(c.dtype), dskip.sum(axis=(0, 2)).astype(d.dtype), dh0, None, None,
  )


def group_sum(v: jax.Array, ngroups: int) -> jax.Array:
  """[B, T, K, Q] partial sums over the heads of K head blocks -> [B, T, J, Q] (K = J x heads per group)."""
  bsz, seqlen = v.shape[:2]
  return v.reshape(bsz, seqlen, ngroups, -1, v.shape[-1]).sum(axis=3)
