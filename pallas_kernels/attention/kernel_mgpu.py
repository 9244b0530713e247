"""Pallas Mosaic GPU kernel bodies of causal, segment-masked GQA flash attention (Hopper: wgmma + TMA).

Kernel bodies only; `ops_mgpu.py` owns shapes, grids, padding and the `custom_vjp`. The algorithm is the
Triton kernels' (`kernel.py`: FlashAttention-2 with the online softmax, the same mask and the same three
programs); what changes is how a program gets at the tensor cores. Each program is one warpgroup; its
query or key tile sits in shared memory, loaded once by TMA, and the tiles it loops over (keys and values,
or queries, output gradients and their row statistics, with their segment ids) stream through
`plgpu.emit_pipeline`: TMA copies into swizzled shared memory, several steps ahead of the `wgmma`s.

  forward  (b, query head n, query block i)   over key blocks j up to the diagonal:
             s = q k_j^T (wgmma, f32), masked; online max m and sum l; acc += p v_j (p staged in shared
             memory as the wgmma's A operand, `_staged`);  o = acc / l,  lse = m + log l
  dk, dv   (b, kv head, key block j)   over the kv head's G query heads g, then query blocks i from the
           diagonal on, in transposed form so that every product's A operand is a row-major tile in
           shared memory (no transpose of a register tile):  s^T = k_j q_i^T;  p^T = exp(s^T - lse_i);  dv += p^T do_i;  dp^T = v_j do_i^T;
           ds^T = p^T (dp^T - delta_i) scale;  dk += ds^T q_i     (delta = rowsum(do * o), in jnp)
  dq       (b, query head n, query block i)   over key blocks j up to the diagonal:
             p = exp(q k_j^T - lse);  ds = p (do v_j^T - delta) scale;  dq += ds k_j

Scores are kept in log2 units (scaled by scale x log2 e, exp2 on the multi-function unit); a masked score
is -1e30 (finite: exp2(m - m_new) never sees (-inf) - (-inf)) and its probability exactly 0. Refs:
  q, o, do, dq  [B, T, N, H]   k, v, dk, dv [B, T, K, H]   seg [B, T] int32 (padding: -1)
  lse, delta    [B, N, T] f32 (lse in natural-log units, as the Triton path's)
"""

import math

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu

_F32 = jnp.float32
_NEG = -1e30
_LOG2E = math.log2(math.e)
_ROWS, _COLS, _iota = _mgpu.ROWS, _mgpu.COLS, _mgpu.iota
_matmul, _staged, _load_rows, _store = _mgpu.matmul, _mgpu.stage, _mgpu.load, _mgpu.store


def _visible(seg_rows, seg_cols, row0, col0, shape, *, rows_are_queries: bool):
  """[R, C] bool of a tile: key visible to query (key <= query, same segment)."""
  rows = row0 + _iota(shape, 0)
  cols = col0 + _iota(shape, 1)
  causal = (cols <= rows) if rows_are_queries else (rows <= cols)
  same = lax.broadcast_in_dim(seg_rows, shape, [0]) == lax.broadcast_in_dim(seg_cols, shape, [1])
  return causal & same


def forward_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, q_smem, segq_smem, lse_smem, p_smem, barriers, *,
                   block_q, block_k, groups, scale, max_concurrent_steps, transforms, in_place):
  b, n, i = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("i")
  q0 = i * block_q
  kv_head = lax.div(n, groups)
  h = q_smem.shape[-1]
  _load_rows(q_ref.at[b, pl.ds(q0, block_q), n], q_smem, barriers.at[0])
  _load_rows(seg_ref.at[b, pl.ds(q0, block_q)], segq_smem, barriers.at[1])
  seg_q = plgpu.load(segq_smem, layout=_ROWS)
  tile = (block_q, block_k)
  scale2 = scale * _LOG2E

  def step(idx, k_smem, v_smem, segk_smem, carry):
    acc, m, l = carry
    (j,) = idx
    s = _matmul(q_smem, k_smem.transpose((1, 0)), tile)                     # [bq, bk] f32
    seg_k = plgpu.load(segk_smem, layout=_COLS)
    visible = _visible(seg_q, seg_k, q0, j * block_k, tile, rows_are_queries=True)
    s = jnp.where(visible, s * scale2, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(m_new, tile, [0])), 0.0)
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    acc = _mgpu.accumulate(acc, _staged(p, p_smem), v_smem, in_place=in_place)  # [bq, H]
    return acc, m_new, l

  init = (plgpu.layout_cast(jnp.zeros((block_q, h), _F32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((block_q,), _NEG, _F32), _ROWS),
          plgpu.layout_cast(jnp.zeros((block_q,), _F32), _ROWS))
  num_steps = lax.div(q0 + block_q + block_k - 1, block_k)                  # key blocks up to the diagonal
  kv_spec = plgpu.BlockSpec((block_k, h), lambda j: (j, 0), transforms=transforms)
  acc, m, l = plgpu.emit_pipeline(
      step, grid=(num_steps,),
      in_specs=[kv_spec, kv_spec, plgpu.BlockSpec((block_k,), lambda j: (j,))],
      max_concurrent_steps=max_concurrent_steps, init_carry=init,
  )(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], seg_ref.at[b])
  _store(q_smem, acc / lax.broadcast_in_dim(l, acc.shape, [0]), o_ref.at[b, pl.ds(q0, block_q), n])
  _store(lse_smem, m / _LOG2E + jnp.log(l), lse_ref.at[b, n, pl.ds(q0, block_q)])
  plgpu.wait_smem_to_gmem(0)


def dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
              q_smem, do_smem, segq_smem, lse_smem, delta_smem, ds_smem, barriers, *,
              block_q, block_k, groups, scale, max_concurrent_steps, transforms, in_place):
  b, n, i = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("i")
  q0 = i * block_q
  kv_head = lax.div(n, groups)
  h = q_smem.shape[-1]
  rows = (b, pl.ds(q0, block_q), n)
  _load_rows(q_ref.at[rows], q_smem, barriers.at[0])
  _load_rows(do_ref.at[rows], do_smem, barriers.at[1])
  _load_rows(seg_ref.at[b, pl.ds(q0, block_q)], segq_smem, barriers.at[2])
  _load_rows(lse_ref.at[b, n, pl.ds(q0, block_q)], lse_smem, barriers.at[3])
  _load_rows(delta_ref.at[b, n, pl.ds(q0, block_q)], delta_smem, barriers.at[4])
  seg_q = plgpu.load(segq_smem, layout=_ROWS)
  lse2 = plgpu.load(lse_smem, layout=_ROWS) * _LOG2E
  delta = plgpu.load(delta_smem, layout=_ROWS)
  tile = (block_q, block_k)

  def step(idx, k_smem, v_smem, segk_smem, dq):
    (j,) = idx
    s = _matmul(q_smem, k_smem.transpose((1, 0)), tile) * (scale * _LOG2E)
    seg_k = plgpu.load(segk_smem, layout=_COLS)
    visible = _visible(seg_q, seg_k, q0, j * block_k, tile, rows_are_queries=True)
    p = jnp.where(visible, jnp.exp2(s - lax.broadcast_in_dim(lse2, tile, [0])), 0.0)
    dp = _matmul(do_smem, v_smem.transpose((1, 0)), tile)
    ds = p * (dp - lax.broadcast_in_dim(delta, tile, [0])) * scale
    return _mgpu.accumulate(dq, _staged(ds, ds_smem), k_smem, in_place=in_place)  # [bq, H]

  num_steps = lax.div(q0 + block_q + block_k - 1, block_k)
  kv_spec = plgpu.BlockSpec((block_k, h), lambda j: (j, 0), transforms=transforms)
  dq = plgpu.emit_pipeline(
      step, grid=(num_steps,),
      in_specs=[kv_spec, kv_spec, plgpu.BlockSpec((block_k,), lambda j: (j,))],
      max_concurrent_steps=max_concurrent_steps,
      init_carry=plgpu.layout_cast(jnp.zeros((block_q, h), _F32), plgpu.Layout.WGMMA),
  )(k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], seg_ref.at[b])
  _store(q_smem, dq, dq_ref.at[rows])
  plgpu.wait_smem_to_gmem(0)


def dkdv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                k_smem, v_smem, segk_smem, pt_smem, dst_smem, barriers, *,
                block_q, block_k, groups, seq_len, scale, max_concurrent_steps, transforms, in_place):
  b, kv_head, j = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("j")
  k0 = j * block_k
  h = k_smem.shape[-1]
  cols = (b, pl.ds(k0, block_k), kv_head)
  _load_rows(k_ref.at[cols], k_smem, barriers.at[0])
  _load_rows(v_ref.at[cols], v_smem, barriers.at[1])
  _load_rows(seg_ref.at[b, pl.ds(k0, block_k)], segk_smem, barriers.at[2])
  seg_k = plgpu.load(segk_smem, layout=_ROWS)                          # keys are the rows here
  tile = (block_k, block_q)
  first = lax.div(k0, block_q)                                             # the first query block that sees j

  def one_head(g, carry):
    n = kv_head * groups + g

    def step(idx, q_smem, do_smem, segq_smem, lse_smem, delta_smem, carry):
      dk, dv = carry
      (i,) = idx
      s_t = _matmul(k_smem, q_smem.transpose((1, 0)), tile) * (scale * _LOG2E)   # [bk, bq]
      seg_q = plgpu.load(segq_smem, layout=_COLS)
      visible = _visible(seg_k, seg_q, k0, (first + i) * block_q, tile, rows_are_queries=False)
      lse2 = plgpu.load(lse_smem, layout=_COLS) * _LOG2E
      p_t = jnp.where(visible, jnp.exp2(s_t - lax.broadcast_in_dim(lse2, tile, [1])), 0.0)
      dv = _mgpu.accumulate(dv, _staged(p_t, pt_smem), do_smem, in_place=in_place)  # [bk, H]
      dp_t = _matmul(v_smem, do_smem.transpose((1, 0)), tile)
      delta = plgpu.load(delta_smem, layout=_COLS)
      ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, tile, [1])) * scale
      dk = _mgpu.accumulate(dk, _staged(ds_t, dst_smem), q_smem, in_place=in_place)  # [bk, H]
      return dk, dv

    row_spec = plgpu.BlockSpec((block_q, h), lambda i: (first + i, 0), transforms=transforms)
    stat_spec = plgpu.BlockSpec((block_q,), lambda i: (first + i,))
    return plgpu.emit_pipeline(
        step, grid=(seq_len // block_q - first,),
        in_specs=[row_spec, row_spec, stat_spec, stat_spec, stat_spec],
        max_concurrent_steps=max_concurrent_steps, init_carry=carry,
    )(q_ref.at[b, :, n], do_ref.at[b, :, n], seg_ref.at[b], lse_ref.at[b, n], delta_ref.at[b, n])

  zeros = plgpu.layout_cast(jnp.zeros((block_k, h), _F32), plgpu.Layout.WGMMA)
  dk, dv = lax.fori_loop(0, groups, one_head, (zeros, zeros))
  _store(k_smem, dk, dk_ref.at[cols])
  _store(v_smem, dv, dv_ref.at[cols])
  plgpu.wait_smem_to_gmem(0)
