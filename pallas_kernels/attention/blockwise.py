"""Causal, segment-masked GQA attention in blocks: memory O(T * block), never the [T, T] scores.

The "xla" backend of `ops.attention`, the blockwise twin of `reference.attention_reference` (same inputs,
same f32 softmax): FlashAttention-2 in XLA (Dao 2023; online softmax: Milakov & Gimelshein 2018) with its
own VJP:

  forward   for each query block i: for each key block j <= i (causal): s = q_i k_j^T / sqrt(H) in f32,
            running max m and sum l, acc += exp(s - m) v_j  ->  o_i = acc / l, lse_i = m + log l
  backward  saves only q, k, v, o and lse [B, T, N] f32; for each key block j: for each query block i >= j:
            p = exp(s - lse_i), dv_j += p^T do_i, ds = p (do_i v_j^T - delta_i), dk_j += ds^T q_i / sqrt(H),
            dq_i += ds k_j / sqrt(H)  with delta = rowsum(do * o)

Blocks above the diagonal are skipped (the loops stop at the last block a query can see), so the work is
the causal half. A dense [B, K, G, T, T] f32 score tensor is 8.6 GB per layer at Nemotron 3 Super's
T = 8192 (32 heads), and XLA keeps several of them for the backward pass; here one [B, K, G, bq, bk]
block is live at a time. Probabilities enter the P V and dS K products in the compute dtype (bf16 for
bf16 inputs), as the dense path and flash kernels do; every accumulation is f32.

Same rule as the dense path: query t sees key s iff s <= t and both have the same segment id. A query
always sees itself, so no row is empty. The sequence is padded internally to a multiple of the block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["blockwise_attention"]

_NEG = -1e30  # masked score: finite, so exp(m - m_new) never sees (-inf) - (-inf)


def _pad_to(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = length - x.shape[1]
  return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _scores(qi, kj, seg_q, seg_k, q0, k0, scale):
  """qi [B,bq,K,G,H], kj [B,bk,K,H] -> (f32 scores [B,K,G,bq,bk] with masked entries at _NEG, mask)."""
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qi, kj, preferred_element_type=jnp.float32) * scale
  q_pos = q0 + jnp.arange(qi.shape[1], dtype=jnp.int32)
  k_pos = k0 + jnp.arange(kj.shape[1], dtype=jnp.int32)
  visible = (k_pos[None, None, :] <= q_pos[None, :, None]) & (seg_k[:, None, :] == seg_q[:, :, None])  # [B,bq,bk]
  visible = visible[:, None, None]                                                                    # [B,1,1,bq,bk]
  return jnp.where(visible, s, _NEG), visible


def _blocks(x: jax.Array, size: int) -> jax.Array:
  """[B, T, ...] -> [T / size, B, size, ...]."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
  """[n, B, size, ...] -> [B, n * size, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _forward(q, k, v, seg, block_q, block_k):
  """Padded inputs: q [B,T,K,G,H], k/v [B,T,K,H], seg [B,T] -> (o [B,T,K,G,H] in v.dtype, lse [B,K,G,T] f32)."""
  b, t, kvh, g, h = q.shape
  scale = h ** -0.5
  kb, vb, sb = _blocks(k, block_k), _blocks(v, block_k), _blocks(seg, block_k)

  def one_query_block(xs):
    i, qi, seg_q = xs                                                     # qi [B, bq, K, G, H]
    q0 = i * block_q

    def body(j, carry):
      m, l, acc = carry
      s, visible = _scores(qi, kb[j], seg_q, sb[j], q0, j * block_k, scale)  # [B, K, G, bq, bk]
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      acc = acc * correction[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), vb[j],
                                                     preferred_element_type=jnp.float32)
      return m_new, l * correction + p.sum(-1), acc

    init = (jnp.full((b, kvh, g, block_q), _NEG, jnp.float32), jnp.zeros((b, kvh, g, block_q), jnp.float32),
            jnp.zeros((b, kvh, g, block_q, h), jnp.float32))
    last = (q0 + block_q - 1) // block_k + 1                              # key blocks up to the diagonal
    m, l, acc = jax.lax.fori_loop(0, last, body, init)
    o = jnp.einsum("BKGTH->BTKGH", acc / l[..., None]).astype(v.dtype)    # [B, bq, K, G, H]
    return o, m + jnp.log(l)                                              # lse [B, K, G, bq]

  n = t // block_q
  o, lse = jax.lax.map(one_query_block, (jnp.arange(n), _blocks(q, block_q), _blocks(seg, block_q)))
  return _unblock(o), jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, t)       # [B,T,K,G,H], [B,K,G,T]


def _backward(q, k, v, seg, o, lse, do, block_q, block_k):
  """-> dq [B,T,K,G,H], dk, dv [B,T,K,H], each in its input's dtype."""
  b, t, kvh, g, h = q.shape
  scale = h ** -0.5
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", do.astype(jnp.float32), o.astype(jnp.float32))  # [B, K, G, T]
  qb, dob, sqb = _blocks(q, block_q), _blocks(do.astype(q.dtype), block_q), _blocks(seg, block_q)
  lseb = jnp.moveaxis(lse.reshape(b, kvh, g, t // block_q, block_q), 3, 0)    # [n, B, K, G, bq]
  deltab = jnp.moveaxis(delta.reshape(b, kvh, g, t // block_q, block_q), 3, 0)
  n_q = t // block_q

  def one_key_block(dq, xs):
    j, kj, vj, seg_k = xs                                                 # kj, vj [B, bk, K, H]
    k0 = j * block_k

    def body(i, carry):
      dk, dv, dq = carry
      s, visible = _scores(qb[i], kj, sqb[i], seg_k, i * block_q, k0, scale)     # [B, K, G, bq, bk]
      p = jnp.where(visible, jnp.exp(s - lseb[i][..., None]), 0.0)                # f32
      dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(v.dtype), dob[i], preferred_element_type=jnp.float32)
      dp = jnp.einsum("BTKGH,BSKH->BKGTS", dob[i], vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - deltab[i][..., None]) * scale).astype(q.dtype)
      dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, qb[i], preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("BKGTS,BSKH->BTKGH", ds, kj, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
      return dk, dv, dq

    first = k0 // block_q                                                 # the first query block that sees j
    zeros = jnp.zeros((b, block_k, kvh, h), jnp.float32)
    dk, dv, dq = jax.lax.fori_loop(first, n_q, body, (zeros, zeros, dq))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros((n_q, b, block_q, kvh, g, h), jnp.float32)
  n_k = t // block_k
  dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, (jnp.arange(n_k), _blocks(k, block_k), _blocks(v, block_k),
                                                    _blocks(seg, block_k)))
  return _unblock(dq).astype(q.dtype), _unblock(dk), _unblock(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, block_q, block_k):
  return _forward(q, k, v, seg, block_q, block_k)[0]


def _attention_fwd(q, k, v, seg, block_q, block_k):
  o, lse = _forward(q, k, v, seg, block_q, block_k)
  return o, (q, k, v, seg, o, lse)


def _attention_bwd(block_q, block_k, residuals, do):
  q, k, v, seg, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, block_q, block_k)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                        block: int = 512) -> jax.Array:
  """q [B,T,N,H], k/v [B,T,K,H] (N % K == 0), segment_ids [B,T] int -> [B,T,N,H] in v.dtype.

  Causal self-attention within segments, equal to `reference.attention_reference(q, k, v, segment_ids)`
  up to f32 summation order. `block`: queries and keys per block (the live score block
  is [B, K, G, block, block] f32); sequences shorter than it use one block of their (8-rounded) length.
  """
  b, t, n, h = q.shape
  kvh = k.shape[2]
  if k.shape != (b, t, kvh, h) or v.shape != k.shape or n % kvh or segment_ids.shape != (b, t):
    raise ValueError(f"blockwise_attention needs q [B,T,N,H], k/v [B,T,K,H] with N % K == 0 and segment_ids "
                     f"[B,T]; got {q.shape=}, {k.shape=}, {v.shape=}, {segment_ids.shape=}")
  if block < 1:
    raise ValueError(f"{block=} must be >= 1")
  size = min(block, -(-t // 8) * 8)
  padded = -(-t // size) * size
  # Pad positions form their own segment (-1): they see only each other, and real queries never see them
  # (they come after every real position).
  seg = _pad_to(segment_ids.astype(jnp.int32), padded, -1)
  qg = _pad_to(q, padded).reshape(b, padded, kvh, n // kvh, h)           # [B, T', K, G, H]
  o = _attention(qg, _pad_to(k, padded), _pad_to(v, padded), seg, size, size)
  return o[:, :t].reshape(b, t, n, h)
