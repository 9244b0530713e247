"""Pallas (Triton GPU) kernel bodies of causal, segment-masked GQA flash attention.

Kernel bodies only; `ops_triton.py` owns shapes, grids, padding and the `custom_vjp`. FlashAttention-2
(Dao 2023) with the online softmax (Milakov & Gimelshein 2018), per (batch b, query head n, block):

  forward  (query block i)    for key blocks j up to the diagonal:
             s = q_i k_j^T * scale (f32), masked; m, l: running max and sum; acc += exp(s - m) v_j
           o_i = acc / l,  lse_i = m + log l
  dk, dv   (kv head, key block j)   for each of the G query heads of the kv head, for query blocks i
           from the diagonal on:  p = exp(s - lse_i);  dv_j += p^T do_i;  ds = p (do_i v_j^T - delta_i) scale;
           dk_j += ds^T q_i   (delta = rowsum(do * o), computed by `ops_triton` in jnp)
  dq       (query block i)    for key blocks j up to the diagonal: dq_i += ds k_j

Mask: key u is visible to query t iff u <= t and seg[u] == seg[t]. A query always sees itself, so l > 0
at the end; masked entries are exactly 0 in p (never exp of a masked score), so a block where a row sees
nothing leaves that row unchanged. The dk/dv program of a kv head sums the gradients of all G query heads
in registers, so GQA costs no [B, T, N, H] per-query-head copy of dk/dv.

Refs (one batch row and head; T padded to the blocks, H to a power of 2 >= 16):
  q, o, do, dq   [bq, H] (forward, dq) or [T, G, H] (dk/dv: the kv head's G query heads)
  k, v, dk, dv   [T, H] (forward, dq: every key, sliced per block) or [bk, H] (dk/dv)
  seg            [T] int32 segment ids (padding is its own segment, -1)
  lse, delta     [bq] f32 (forward, dq) or [G, T] f32 (dk/dv)
Products run on the input dtype with f32 accumulation (f32 inputs: IEEE f32, not TF32).
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32
_NEG = -1e30  # masked score: finite, so exp(m - m_new) never sees (-inf) - (-inf)


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b (either transposed) with f32 accumulation; f32 operands get IEEE f32 products, not TF32."""
  precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _visible(seg_q, seg_k, q0, k0):
  """[bq, bk] bool: key k0 + u visible to query q0 + t."""
  rows = q0 + lax.broadcasted_iota(jnp.int32, (seg_q.shape[0], seg_k.shape[0]), 0)
  cols = k0 + lax.broadcasted_iota(jnp.int32, (seg_q.shape[0], seg_k.shape[0]), 1)
  return (cols <= rows) & (seg_q[:, None] == seg_k[None, :])


def _probs(q, k, seg_q, seg_k, q0, k0, lse, scale):
  """p [bq, bk] f32 = exp(q k^T scale - lse) where visible, else exactly 0."""
  s = _dot(q, k, trans_b=True) * scale
  return jnp.where(_visible(seg_q, seg_k, q0, k0), jnp.exp(s - lse[:, None]), 0.0)


def forward_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, block_q, block_k, scale):
  i = pl.program_id(2)
  q0 = i * block_q
  q = q_ref[...]                                                       # [bq, H]
  seg_q = seg_ref[pl.ds(q0, block_q)]                                  # [bq]

  def body(j, carry):
    m, l, acc = carry
    k0 = j * block_k
    k = k_ref[pl.ds(k0, block_k), :]                                   # [bk, H]
    v = v_ref[pl.ds(k0, block_k), :]
    visible = _visible(seg_q, seg_ref[pl.ds(k0, block_k)], q0, k0)
    s = jnp.where(visible, _dot(q, k, trans_b=True) * scale, _NEG)     # [bq, bk] f32
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l * correction + jnp.sum(p, axis=1), acc

  init = (jnp.full((block_q,), _NEG, _F32), jnp.zeros((block_q,), _F32),
          jnp.zeros((block_q, q.shape[1]), _F32))
  last = lax.div(q0 + block_q + block_k - 1, block_k)                  # key blocks up to the diagonal
  m, l, acc = lax.fori_loop(0, last, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def dkdv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, block_k,
                groups, seq_len, scale):
  j = pl.program_id(2)
  k0 = j * block_k
  k, v = k_ref[...], v_ref[...]                                        # [bk, H]
  seg_k = seg_ref[pl.ds(k0, block_k)]

  def one_query_block(i, carry, g):
    dk, dv = carry
    q0 = i * block_q
    q = q_ref[pl.ds(q0, block_q), g, :]                                # [bq, H]
    do = do_ref[pl.ds(q0, block_q), g, :]
    p = _probs(q, k, seg_ref[pl.ds(q0, block_q)], seg_k, q0, k0, lse_ref[g, pl.ds(q0, block_q)], scale)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)               # [bk, H]
    dp = _dot(do, v, trans_b=True)                                     # [bq, bk] f32
    ds = p * (dp - delta_ref[g, pl.ds(q0, block_q)][:, None]) * scale
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  first = lax.div(k0, block_q)                                         # the first query block that sees j
  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = lax.fori_loop(
      0, groups, lambda g, c: lax.fori_loop(first, seq_len // block_q, lambda i, c: one_query_block(i, c, g), c),
      (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_q, block_k, scale):
  i = pl.program_id(2)
  q0 = i * block_q
  q, do = q_ref[...], do_ref[...]                                      # [bq, H]
  seg_q = seg_ref[pl.ds(q0, block_q)]
  lse, delta = lse_ref[...], delta_ref[...]                            # [bq] f32

  def body(j, dq):
    k0 = j * block_k
    k = k_ref[pl.ds(k0, block_k), :]                                   # [bk, H]
    v = v_ref[pl.ds(k0, block_k), :]
    p = _probs(q, k, seg_q, seg_ref[pl.ds(k0, block_k)], q0, k0, lse, scale)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None]) * scale      # [bq, bk] f32
    return dq + _dot(ds.astype(k.dtype), k)

  last = lax.div(q0 + block_q + block_k - 1, block_k)
  dq = lax.fori_loop(0, last, body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = dq.astype(dq_ref.dtype)
