"""Pallas Mosaic TPU kernel bodies of the chunked Mamba-2 SSD scan.

Kernel bodies only; `ops_tpu.py` owns layouts, grids, padding and the VJP.
Math as in `kernel.py` (Dao & Gu 2024, arXiv:2405.21060, Sec. 6), per
(batch b, chunk c, head m) with chunk positions l, s in [0, L):

  W_ls      = [s <= l][doc_l == doc_s] exp(cum_l - cum_s)    decay mask
  y_l       = sum_s (C_l . B_s) W_ls dt_s x_s                 (1) intra-chunk
            + e_l C_l . h_in + D x_l                          (4) + skip
  e_l       = exp(cum_l) carry_l;  w_s = W_{L-1, s};  g = e_{L-1}
  h_in[c+1] = g h_in[c] + sum_s w_s dt_s x_s B_s^T            (2) + (3)

Fused design: one grid step is (b, a block of H heads of one B/C group,
chunk). The chunk axis is the last, sequential ("arbitrary") grid axis, and the
running state of the H heads lives in a VMEM scratch across it, so steps (2),
(3) and (4) never write chunk states to HBM (except `fwd_kernel(emit_y=False)`,
which records the state entering each chunk for the backward pass). The
backward kernel walks the chunks in reverse with dL/d(state) in VMEM.

TPU layout choices (a vreg is 8 sublanes x 128 lanes):
  * Token vectors (dt, cum, seg, carry and their gradients) are rows [1, L]
    with tokens on lanes. A column [L, 1] is made in-kernel by `_col` (select
    on the diagonal, lane reduction), never stored: a [.., T, 1] HBM array
    would be padded 128-fold by the TPU tiling.
  * States are kept transposed, h^T [Q, P], so that the state update is
    B^T (w dt) x, a plain [Q, L] x [L, P] product, and C h_in = C [L, Q] h^T.
  * Products have `mm_dtype` operands (bf16 for bf16 inputs) and float32
    accumulation (`preferred_element_type`); float32 operands use
    `Precision.HIGHEST`. Transposes (`_t`) are of float32 values.

Refs (one block each; H heads per step, leading dim indexed by the head):
  x, y, dy, dx          [H, L, P]   of [B, M, T, P] (head-major)
  dt, cum, ddt, da,     [H, 1, L]   float32 rows of [B, M, 1, T]
    dskip
  b, c                  [L, Q]      one B/C group, `mm_dtype`
  db, dc                [L, Q]      float32, summed over the H heads
  d                     [M]         float32 skip weights, in SMEM
  seg, carry            [1, L]      float32 document index / incoming-state mask
  h0, final, dfinal,    [H, Q, P]   float32 transposed states
    dh0, h_in, scratch
Letters as in `kernel.py`: H heads per step (not head-dim), S a second chunk
position.
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _dot(a, b, mm_dtype, *, trans_b=False):
  """[X, K] x [K, Y] (or [Y, K] if trans_b) -> [X, Y] float32."""
  precision = lax.Precision.HIGHEST if mm_dtype == _F32 else None
  dims = (((1,), (1,) if trans_b else (0,)), ((), ()))
  return lax.dot_general(
      a.astype(mm_dtype), b.astype(mm_dtype), dims,
      precision=precision, preferred_element_type=_F32,
  )


def _t(a):
  """[X, Y] -> [Y, X] float32."""
  return a.astype(_F32).T


def _iota(chunk, axis):
  return lax.broadcasted_iota(jnp.int32, (chunk, chunk), axis)


def _dot_f32(a, ones, mm_dtype):
  """a [X, K] (float32) x ones [K, Y] (0/1 entries) to ~float32 accuracy.

  With bf16 products, a is split as hi + lo (two bf16 passes, 0/1 exact in
  bf16): the error is ~2**-17 |a| per term instead of bf16's 2**-9.
  """
  if mm_dtype == _F32:
    return _dot(a, ones, _F32)
  hi = a.astype(mm_dtype)
  lo = a - hi.astype(_F32)
  return _dot(hi, ones, mm_dtype) + _dot(lo, ones, mm_dtype)


def _col(row, eye):
  """[1, L] -> [L, 1] (exact: one nonzero term per sum)."""
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _row(col, eye):
  """[L, 1] -> [1, L]."""
  return jnp.sum(jnp.where(eye, col, 0.0), axis=0, keepdims=True)


def _last(row):
  """[1, L] -> [1, 1]: the chunk's last entry."""
  lane = lax.broadcasted_iota(jnp.int32, row.shape, 1)
  return jnp.sum(jnp.where(lane == row.shape[1] - 1, row, 0.0), axis=1,
                 keepdims=True)


class _Chunk:
  """Masks and document rows of one chunk, shared by the H heads of a step."""

  def __init__(self, chunk, seg_ref, carry_ref):
    rows, cols = _iota(chunk, 0), _iota(chunk, 1)
    self.eye = rows == cols
    self.mask = cols <= rows  # [L, S] causal
    self.carry_row = self.carry_col = self.carry_last = None
    self.to_end_row = self.to_end_col = None
    if seg_ref is not None:
      seg_row = seg_ref[...]  # [1, L]
      seg_col = _col(seg_row, self.eye)  # [L, 1]
      seg_last = _last(seg_row)  # [1, 1]
      self.mask = self.mask & (seg_col == seg_row)
      # Tokens in the document of the chunk's last token (w_s != 0).
      self.to_end_row = seg_row == seg_last  # [1, L]
      self.to_end_col = seg_col == seg_last  # [L, 1]
      self.carry_row = carry_ref[...]  # [1, L]
      self.carry_col = _col(self.carry_row, self.eye)
      self.carry_last = _last(self.carry_row)

  def decay(self, cum_row, cum_col):
    """W [L, S]; -inf before exp, so masked entries are exactly 0."""
    return jnp.exp(jnp.where(self.mask, cum_col - cum_row, -jnp.inf))


def _times(v, carry):
  """v * carry (float 0/1), or v without documents (carry None)."""
  return v if carry is None else v * carry


def _where(mask, v):
  """v where mask else 0 (no inf * 0), or v without documents."""
  return v if mask is None else jnp.where(mask, v, 0.0)


def fwd_kernel(*refs, has_docs, emit_y, mm_dtype):
  """Forward steps (1)-(4) for H heads of one group and one chunk.

  emit_y=True (the forward pass): refs are
    x, dt, cum, b, c, d, h0, [seg, carry], y, final, state scratch.
  emit_y=False (state recomputation in the backward pass): refs are
    x, dt, cum, b, h0, [seg, carry], h_in, state scratch;
  it writes the (transposed) state entering each chunk to h_in.
  """
  refs = list(refs)
  x_ref, dt_ref, cum_ref, b_ref = refs[:4]
  del refs[:4]
  c_ref = d_ref = None
  if emit_y:
    c_ref, d_ref = refs.pop(0), refs.pop(0)
  h0_ref = refs.pop(0)
  seg_ref = carry_ref = None
  if has_docs:
    seg_ref, carry_ref = refs.pop(0), refs.pop(0)
  if emit_y:
    y_ref, final_ref, state_ref = refs
    h_in_ref = None
  else:
    h_in_ref, state_ref = refs
    y_ref = final_ref = None

  heads, chunk, _ = x_ref.shape
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    state_ref[...] = h0_ref[...]

  ck = _Chunk(chunk, seg_ref, carry_ref)
  bt = _t(b_ref[...])  # [Q, L]
  if emit_y:
    cmat = c_ref[...]  # [L, Q]
    cb = _dot(cmat, b_ref[...], mm_dtype, trans_b=True)  # C B^T [L, S]
  head0 = pl.program_id(1) * heads

  def body(h, carry):
    dt_row, cum_row = dt_ref[h], cum_ref[h]  # [1, L]
    cum_last = _last(cum_row)  # [1, 1]
    x = x_ref[h]  # [L, P]
    h_in = state_ref[h]  # [Q, P]
    if h_in_ref is not None:
      h_in_ref[h] = h_in
    if emit_y:
      cum_col = _col(cum_row, ck.eye)  # [L, 1]
      scores = cb * ck.decay(cum_row, cum_col) * dt_row  # [L, S]
      y = _dot(scores, x, mm_dtype)  # (1) [L, P]
      e_col = _times(jnp.exp(cum_col), ck.carry_col)  # [L, 1]
      y += e_col * _dot(cmat, h_in, mm_dtype)  # (4)
      y += d_ref[head0 + h] * x.astype(_F32)
      y_ref[h] = y.astype(y_ref.dtype)
    w_row = _where(ck.to_end_row, jnp.exp(cum_last - cum_row))  # [1, L]
    g = _times(jnp.exp(cum_last), ck.carry_last)  # [1, 1]
    state_ref[h] = g * h_in + _dot(bt * (w_row * dt_row), x, mm_dtype)
    return carry

  lax.fori_loop(0, heads, body, 0)

  if final_ref is not None:
    @pl.when(step == pl.num_programs(2) - 1)
    def _():
      final_ref[...] = state_ref[...]


def bwd_kernel(
    x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h_in_ref, dfinal_ref, dy_ref,
    *rest, has_docs, mm_dtype,
):
  """Gradients of one chunk (the grid walks chunks last to first).

  The scratch holds G^T = (dL/d state leaving this chunk)^T [Q, P], starting
  from dfinal. With xs = dt x, S = C B^T, dS = (dy xs^T) o W (as in
  `kernel.chunk_scan_bwd_kernel`):
    dxs = (S o W)^T dy + w o (B G^T)      dx = dt o dxs + D dy
    dB  = dS^T C + w o (xs G)             dC = dS B + e o (dy h_in)
  with dw = rowsum((xs G) o B), de = rowsum((dy h_in) o C), the gradients of
  cum in W, w and e (and <G, h_in> of g = exp(cum_{L-1})), then
  G <- g G + dh_in with dh_in^T = (C^T o e) dy, and dh0 = G after chunk 0.
  da, the gradient of a_i = dt_i A (cum_l = sum_{i <= l} a_i), is written
  instead of dcum: its reverse cumsum over the chunk would cancel the
  rowsum / colsum terms above catastrophically under strong decay (the
  Triton kernel in kernel.py computes da directly too). Directly:
    da_i = sum_{l >= i, s < i} (dS o S)_ls + sum_{l >= i} de_l e_l
           + sum_{s < i} dw_s w_s + <G, h_in> g
  (the first sum as a [L, S] x [S, L] product with a 0/1 matrix).
  Refs after dy: [seg, carry], dx, ddt, da, dskip, db, dc, dh0, G scratch.
  """
  if has_docs:
    seg_ref, carry_ref, *rest = rest
  else:
    seg_ref = carry_ref = None
  dx_ref, ddt_ref, da_ref, dskip_ref, db_ref, dc_ref, dh0_ref, grad_ref = (
      rest
  )
  heads, chunk, _ = x_ref.shape
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    grad_ref[...] = dfinal_ref[...]

  ck = _Chunk(chunk, seg_ref, carry_ref)
  cmat, bmat = c_ref[...], b_ref[...]  # [L, Q]
  cf, bf = cmat.astype(_F32), bmat.astype(_F32)
  ct = _t(cf)  # [Q, L]
  cb = _dot(cmat, bmat, mm_dtype, trans_b=True)  # S [L, S]
  # [l >= i] / [s < i]: rows index l or s, columns index i.
  rows, cols = _iota(chunk, 0), _iota(chunk, 1)
  suffix = rows >= cols
  before = (rows < cols).astype(_F32)
  head0 = pl.program_id(1) * heads

  def body(h, acc):
    db_acc, dc_acc = acc
    x, dy = x_ref[h], dy_ref[h]  # [L, P]
    xf, dyf = x.astype(_F32), dy.astype(_F32)
    dt_row, cum_row = dt_ref[h], cum_ref[h]  # [1, L]
    dt_col, cum_col = _col(dt_row, ck.eye), _col(cum_row, ck.eye)  # [L, 1]
    cum_last = _last(cum_row)  # [1, 1]
    decay = ck.decay(cum_row, cum_col)  # W [L, S]
    e_col = _times(jnp.exp(cum_col), ck.carry_col)  # [L, 1]
    e_row = _times(jnp.exp(cum_row), ck.carry_row)  # [1, L]
    w_col = _where(ck.to_end_col, jnp.exp(cum_last - cum_col))  # [L, 1]
    g = _times(jnp.exp(cum_last), ck.carry_last)  # [1, 1]
    h_in, grad = h_in_ref[h], grad_ref[h]  # [Q, P] transposed

    xs = xf * dt_col  # [L, P]
    ds = _dot(dy, xs, mm_dtype, trans_b=True) * decay  # [L, S]
    dxs = _dot(_t(cb * decay), dy, mm_dtype)  # (1) [S, P]
    dxs += w_col * _dot(bmat, grad, mm_dtype)  # (2)
    xs_grad = _dot(xs, grad, mm_dtype, trans_b=True)  # [L, Q]
    db = _dot(_t(ds), cmat, mm_dtype) + w_col * xs_grad
    dy_h = _dot(dy, h_in, mm_dtype, trans_b=True)  # [L, Q]
    dc = _dot(ds, bmat, mm_dtype) + e_col * dy_h

    dw_w = jnp.sum(xs_grad * bf, axis=1, keepdims=True) * w_col  # [L, 1]
    de_e = jnp.sum(dy_h * cf, axis=1, keepdims=True) * e_col  # [L, 1]
    z_before = _dot_f32(ds * cb, before, mm_dtype)  # sum_{s < i} [L, I]
    dg = jnp.sum(jnp.sum(grad * h_in, axis=1, keepdims=True), axis=0,
                 keepdims=True)  # [1, 1]
    da_ref[h] = jnp.sum(
        jnp.where(suffix, z_before + de_e, dw_w), axis=0, keepdims=True
    ) + dg * g  # [1, I]

    dx_ref[h] = (dxs * dt_col + d_ref[head0 + h] * dyf).astype(dx_ref.dtype)
    ddt_ref[h] = _row(jnp.sum(dxs * xf, axis=1, keepdims=True), ck.eye)
    dskip_ref[h] = _row(jnp.sum(dyf * xf, axis=1, keepdims=True), ck.eye)
    grad_ref[h] = g * grad + _dot(ct * e_row, dy, mm_dtype)  # [Q, P]
    return db_acc + db, dc_acc + dc

  zeros = jnp.zeros(bmat.shape, _F32)
  db, dc = lax.fori_loop(0, heads, body, (zeros, zeros))
  db_ref[...] = db
  dc_ref[...] = dc

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = grad_ref[...]
