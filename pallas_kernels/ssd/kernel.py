"""Pallas (Triton GPU) kernel bodies of the chunked Mamba-2 SSD scan.

Kernel bodies only; `ops_triton.py` owns shapes, grids, padding and `custom_vjp`.
Math and notation follow `reference.py` (Dao & Gu 2024, arXiv:2405.21060,
Sec. 6): per (batch b, chunk c, head m) with chunk positions l, s in [0, L)

  cum_l    = sum_{i <= l} dt_i * A                           chunk-local cumsum
  W_ls     = [s <= l][doc_l == doc_s] exp(cum_l - cum_s)     decay mask
  y_l      = sum_s (C_l . B_s) W_ls dt_s x_s                 (1) intra-chunk
           + e_l C_l . h_in                                  (4) carried state
           + D x_l                                           skip
  e_l      = exp(cum_l) [doc_l == doc of the previous chunk's last token]
  state    = sum_s W_{L-1,s} dt_s x_s B_s^T                  (2) chunk-end state
  h_in[c+1] = e_{L-1}(c) h_in[c] + state[c]                  (3) state passing

Every ref below is one block of the arrays laid out in `ops_triton.py`:
  x, dy, dx  [L, H, P]   (H heads of one B/C group per program; P tile)
  dt, cum    [H, L]      float32 (processed dt; chunk-local cumsum of dt * A)
  b, c       [L, Q]      one B/C group
  seg        [L]         int32 document index (only with doc_ids)
  carry      [L]         float32 1.0 where the incoming state reaches the token
  h, dstate  [H, P, Q]   float32 chunk states
Products run on `mm_dtype` operands (the input dtype for bf16/f16 inputs,
float32 otherwise) with float32 accumulation, as in state-spaces/mamba;
everything else is float32. Triton reductions are one axis at a time.
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32


def _dot(a, b, mm_dtype, *, trans_a=False, trans_b=False):
  """[.., K] x [K, ..] with `mm_dtype` operands and float32 accumulation.

  float32 operands get IEEE float32 products (Precision.HIGHEST), not the TF32
  that Triton's dot defaults to on NVIDIA GPUs, so that the f32 path keeps the
  reference's accuracy (as `pallas_kernels.moe.gmm` does).
  """
  precision = lax.Precision.HIGHEST if jnp.dtype(mm_dtype) == _F32 else None
  return plgpu.dot(
      a.astype(mm_dtype), b.astype(mm_dtype), trans_a=trans_a, trans_b=trans_b,
      precision=precision,
  )


def _decay_mask(cum, seg, chunk):
  """W [L, S] = [s <= l][same doc] exp(cum_l - cum_s); exactly 0 elsewhere."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  mask = cols <= rows
  if seg is not None:
    mask = mask & (seg[:, None] == seg[None, :])
  # -inf (not the masked difference, which is >= 0 above the diagonal and can
  # overflow) before exp: masked entries are exactly 0 and never inf * 0.
  return jnp.exp(jnp.where(mask, cum[:, None] - cum[None, :], -jnp.inf))


def _to_end_weights(cum_ref, seg_ref, h, chunk):
  """w_s = W_{L-1, s}: decay from token s to the chunk end, 0 across docs."""
  cum = cum_ref[h, :]  # [L]
  w = jnp.exp(cum_ref[h, chunk - 1] - cum)  # <= 1: cum is non-increasing
  if seg_ref is not None:
    w = jnp.where(seg_ref[...] == seg_ref[chunk - 1], w, 0.0)
  return w


def _from_start_weights(cum_ref, carry_ref, h):
  """e_l: decay of the incoming state at l, 0 where it is cut by a doc."""
  e = jnp.exp(cum_ref[h, :])  # [L]
  if carry_ref is not None:
    e = e * carry_ref[...]
  return e


def chunk_state_kernel(
    lhs_ref, dt_ref, cum_ref, rhs_ref, *rest, mode, has_docs, mm_dtype
):
  """out[p, q] = sum_l lhs[l, p] coef_l rhs[l, q]  (one head, one P tile).

  mode "state" (forward step 2): lhs = x, rhs = B, coef_s = w_s dt_s, giving
  the chunk-end state from the chunk's own tokens.
  mode "dout" (backward of step 4): lhs = dy, rhs = C, coef_l = e_l, giving
  d h_in from this chunk's outputs.

  Refs: lhs [L, 1, TP], dt/cum [1, L], rhs [L, Q], (seg or carry) [L],
  out [1, TP, Q] float32.
  """
  if has_docs:
    doc_ref, out_ref = rest
  else:
    (out_ref,), doc_ref = rest, None
  chunk = lhs_ref.shape[0]
  if mode == "state":
    coef = _to_end_weights(cum_ref, doc_ref, 0, chunk) * dt_ref[0, :]
  elif mode == "dout":
    coef = _from_start_weights(cum_ref, doc_ref, 0)
  else:
    raise ValueError(f"Unknown {mode=}")
  lhs = lhs_ref[:, 0, :].astype(_F32) * coef[:, None]  # [L, TP]
  out_ref[0] = _dot(lhs, rhs_ref[...], mm_dtype, trans_a=True)  # [TP, Q]


def state_passing_kernel(states_ref, g_ref, h0_ref, h_in_ref, final_ref):
  """Forward step 3: h_in[c] = state entering chunk c; final = h_in[C].

  Refs: states/h_in [C, TP, Q], g [C] (chunk carry decay), h0/final [TP, Q].
  """

  def body(c, h):
    h_in_ref[c] = h
    return g_ref[c] * h + states_ref[c]

  final_ref[...] = lax.fori_loop(
      0, states_ref.shape[0], body, h0_ref[...].astype(_F32)
  )


def state_passing_bwd_kernel(
    dh_out_ref, g_ref, h_in_ref, dfinal_ref, dstates_ref, dg_ref, dh0_ref
):
  """Reverse of step 3. G_c = dL/dh_in[c] = dh_out[c] + g_c G_{c+1}.

  Writes dstates[c] = G_{c+1} (gradient of chunk c's end state), the partial
  (this P tile) dg[c] = <G_{c+1}, h_in[c]> and dh0 = G_0.
  Refs: dh_out/h_in/dstates [C, TP, Q], g/dg [C], dfinal/dh0 [TP, Q].
  """
  nchunks = dh_out_ref.shape[0]

  def body(i, grad):
    c = nchunks - 1 - i
    dstates_ref[c] = grad
    dg_ref[c] = jnp.sum(jnp.sum(grad * h_in_ref[c], axis=1), axis=0)
    return dh_out_ref[c] + g_ref[c] * grad

  dh0_ref[...] = lax.fori_loop(0, nchunks, body, dfinal_ref[...])


def chunk_scan_fwd_kernel(
    x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h_ref, *rest,
    heads, has_docs, mm_dtype,
):
  """Forward steps 1 + 4 + skip for `heads` heads of one group, one P tile.

  C_l . B_s is computed once per program and shared by its heads.
  Refs: x/y [L, H, TP], dt/cum [H, L], b/c [L, Q], d [M], h [H, TP, Q],
  (seg, carry) [L].
  """
  if has_docs:
    seg_ref, carry_ref, y_ref = rest
    seg = seg_ref[...]
  else:
    (y_ref,), seg_ref, carry_ref, seg = rest, None, None, None
  chunk = x_ref.shape[0]
  head0 = pl.program_id(2) * heads
  cmat = c_ref[...]
  cb = _dot(cmat, b_ref[...], mm_dtype, trans_b=True)  # [L, S]

  def body(h, _):
    dt = dt_ref[h, :]  # [L]
    cum = cum_ref[h, :]
    scores = cb * _decay_mask(cum, seg, chunk) * dt[None, :]  # [L, S]
    x = x_ref[:, h, :]  # [L, TP]
    y = _dot(scores, x, mm_dtype)  # (1) [L, TP]
    e = _from_start_weights(cum_ref, carry_ref, h)
    y += e[:, None] * _dot(cmat, h_ref[h], mm_dtype, trans_b=True)  # (4)
    y += d_ref[head0 + h] * x.astype(_F32)
    y_ref[:, h, :] = y.astype(y_ref.dtype)
    return 0

  lax.fori_loop(0, heads, body, 0)


def chunk_scan_bwd_kernel(
    x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h_ref, dstate_ref, dy_ref,
    *rest, heads, has_docs, mm_dtype,
):
  """Gradients of one chunk for `heads` heads of one group (full P and Q).

  With xs = dt x, S = C B^T, SW = S o W, dP = dy xs^T, dS = dP o W:
    dxs = SW^T dy + w o (B dstate^T)        dx = dt o dxs + D dy
    dB  = dS^T C + w o (xs dstate)          (summed over this program's heads)
    dC  = dS B + e o (dy h^T)               (summed over this program's heads)
  and, with dw = rowsum((xs dstate) o B) and de = rowsum((dy h) o C), the
  gradient of a_i = dt_i A (cum_l = sum_{i <= l} a_i) from W, w and e:
    da_i = sum_{l >= i, s < i} (dS o S)_ls + sum_{l >= i} de_l e_l
           + sum_{s < i} dw_s w_s
  (dW_ls / da_i = W_ls [s < i <= l], de_l / da_i = e_l [i <= l],
  dw_s / da_i = w_s [s < i]). da is computed directly, never as the reverse
  cumsum of dcum_l = rowsum(dS o S)_l - colsum(dS o S)_l + ...: under strong
  decay the diagonal-dominated row and column sums cancel in that cumsum (it
  cost 1e-4 to 2e-3 relative error in dA at L = 128). Each sum here adds only
  terms of the result: the first as an inclusive cumsum over s (prefix_lj =
  sum_{s <= j} (dS o S)_ls, giving da_{j+1}) then an exact one-token shift,
  the others as masked [L, L] sums (no dot: float32 throughout). The term
  <dstate, h_in> g of the carry decay g = e_{L-1}, the same for every i, is
  added in `ops_triton.py`.
  Outputs: dx [L, H, P], ddt/da/dskip [H, L] (dskip_l = sum_p dy x, summed to
  dD in `ops_triton.py`), db/dc [L, Q] float32.
  """
  if has_docs:
    seg_ref, carry_ref, *outs = rest
    seg = seg_ref[...]
  else:
    outs, seg_ref, carry_ref, seg = list(rest), None, None, None
  dx_ref, ddt_ref, da_ref, dskip_ref, db_ref, dc_ref = outs
  chunk, _, _ = x_ref.shape
  head0 = pl.program_id(2) * heads
  cmat, bmat = c_ref[...], b_ref[...]
  cb = _dot(cmat, bmat, mm_dtype, trans_b=True)  # S [L, S] float32
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  after = rows > cols  # [l > j]: rows index l or s, columns j
  shift = rows + 1 == cols  # [j + 1 = i]: rows index j, columns i
  first = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == 0

  def body(h, acc):
    db_acc, dc_acc = acc
    x = x_ref[:, h, :].astype(_F32)  # [L, P]
    dy = dy_ref[:, h, :]  # [L, P]
    dt = dt_ref[h, :]
    cum = cum_ref[h, :]
    h_in, dstate = h_ref[h], dstate_ref[h]  # [P, Q]
    decay = _decay_mask(cum, seg, chunk)  # W [L, S]
    xs = x * dt[:, None]  # [L, P]
    dp = _dot(dy, xs, mm_dtype, trans_b=True)  # [L, S]
    ds = dp * decay
    w = _to_end_weights(cum_ref, seg_ref, h, chunk)  # [L]
    e = _from_start_weights(cum_ref, carry_ref, h)  # [L]

    dxs = _dot(cb * decay, dy, mm_dtype, trans_a=True)  # (1) [L, P]
    dxs += w[:, None] * _dot(bmat, dstate, mm_dtype, trans_b=True)  # (2)
    xs_dstate = _dot(xs, dstate, mm_dtype)  # [L, Q]
    db = _dot(ds, cmat, mm_dtype, trans_a=True) + w[:, None] * xs_dstate
    dy_h = _dot(dy, h_in, mm_dtype)  # [L, Q]
    dc = _dot(ds, bmat, mm_dtype) + e[:, None] * dy_h

    dw_w = jnp.sum(xs_dstate * bmat.astype(_F32), axis=1) * w  # [L]
    de_e = jnp.sum(dy_h * cmat.astype(_F32), axis=1) * e
    prefix = lax.cumsum(ds * cb, axis=1)  # sum_{s <= j} (dS o S)_ls [L, J]
    # f_j = da_{j+1}: l > j take prefix_lj + de_l e_l, s <= j take dw_s w_s.
    f = jnp.sum(
        jnp.where(after, prefix + de_e[:, None], dw_w[:, None]), axis=0
    )  # [J]
    # da_i = f_{i-1} (one nonzero term per column: exact); da_0 = sum de e.
    da = jnp.sum(jnp.where(shift, f[:, None], 0.0), axis=0)  # [I]
    da += jnp.where(first, jnp.sum(de_e, axis=0), 0.0)

    dy = dy.astype(_F32)
    dx_ref[:, h, :] = (dxs * dt[:, None] + d_ref[head0 + h] * dy).astype(
        dx_ref.dtype
    )
    ddt_ref[h, :] = jnp.sum(dxs * x, axis=1)
    da_ref[h, :] = da
    dskip_ref[h, :] = jnp.sum(dy * x, axis=1)
    return db_acc + db, dc_acc + dc

  zeros = jnp.zeros(bmat.shape, _F32)
  db, dc = lax.fori_loop(0, heads, body, (zeros, zeros))
  db_ref[...] = db
  dc_ref[...] = dc


# Named partials used by `ops_triton.py`.
chunk_state_fwd = functools.partial(chunk_state_kernel, mode="state")
chunk_state_dout = functools.partial(chunk_state_kernel, mode="dout")
