"""Pallas kernel bodies of the one-token SSD update (decoding): Triton (GPU) and Mosaic (TPU).

Per (row b, head m, block of head-dim rows p) with the state block h [bp, Q]:

  h   <- keep_b ? h : 0                          new-document reset
  h'   = exp(dt A) h + (dt x_p) B^T              x_p [bp], B [Q] (the head's group)
  y_p  = h' C + D x_p                            C [Q]

The state block is read once and written once, in place (`input_output_aliases`); y is reduced from the
new state while it is in registers. `ops_decode.py` owns shapes, the grid and the jnp prologue (dt
processing, exp(dt A)). Every ref is one block:
  decay, dt, keep, d   [1]       float32 (exp(dt A), processed dt, 1.0 / 0.0 keep flag, D)
  x, y                 [bp]      the head's x rows / output rows
  b, c                 [Q]       the head's B / C group
  h, h_out             [bp, Q]   float32 state (the same buffer)
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


def decode_step_kernel(decay_ref, dt_ref, keep_ref, d_ref, x_ref, b_ref, c_ref, h_ref, y_ref, h_out_ref):
  h = h_ref[...]                                               # [bp, Q] f32
  h = jnp.where(keep_ref[...] > 0, h, 0.0)                     # [1] broadcast: a restarted row reads zeros
  x = x_ref[...].astype(_F32)                                  # [bp]
  new = decay_ref[...] * h + (dt_ref[...] * x)[:, None] * b_ref[...].astype(_F32)[None, :]  # [bp, Q]
  h_out_ref[...] = new
  y = jnp.sum(new * c_ref[...].astype(_F32)[None, :], axis=1) + d_ref[...] * x  # [bp]
  y_ref[...] = y.astype(y_ref.dtype)


def decode_step_kernel_tpu(decay_ref, dt_ref, keep_ref, d_ref, x_ref, b_ref, c_ref, h_ref, y_ref, h_out_ref, *,
                           per_group: int, groups: int):
  """The Mosaic TPU twin of `decode_step_kernel`, per (row b, block of bm heads), the same update:

    decay, dt   [bm, 1]      float32 per head         keep [1, 1]    d [bm, 1]
    x, y        [bm, P]      the heads' x / output    b, c [J, Q]    the row's B / C, every group
    h, h_out    [bm, P, Q]   float32 state (the same buffer)

  A block may hold heads of two groups: each head's B and C rows are picked by an exact 0/1 mask per group
  (J of them), not a gather. The state block is read once and written once; y is reduced over Q (lanes)
  from the new state in VMEM.
  """
  bm = x_ref.shape[0]
  head = pl.program_id(1) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)  # [bm, 1]
  b, c = b_ref[...].astype(_F32), c_ref[...].astype(_F32)                        # [J, Q]
  bh = jnp.zeros((bm, b.shape[1]), _F32)
  ch = jnp.zeros_like(bh)
  for j in range(groups):
    mine = ((head >= j * per_group) & (head < (j + 1) * per_group)).astype(_F32)  # [bm, 1]
    bh, ch = bh + mine * b[j:j + 1], ch + mine * c[j:j + 1]                       # [bm, Q]
  x = x_ref[...].astype(_F32)                                                    # [bm, P]
  h = jnp.where(keep_ref[...][0, 0] > 0, h_ref[...], 0.0)                       # [bm, P, Q]
  new = h * decay_ref[...][:, :, None] + (dt_ref[...] * x)[:, :, None] * bh[:, None, :]
  h_out_ref[...] = new
  y = jnp.sum(new * ch[:, None, :], axis=-1) + d_ref[...] * x                    # [bm, P]
  y_ref[...] = y.astype(y_ref.dtype)


def conv_decode_step_kernel(*refs, width: int, per_group: int, has_bias: bool, a_is_log: bool, activation,
                            dt_softplus: bool, dt_min: float, dt_max: float):
  """The one-token conv + SSD update of a Mamba-2 mixer, per (row b, head m, block of head-dim rows p):

    win   <- keep_b ? win : 0                    conv windows (x: this block's channels; B, C: the group's)
    u_c    = act(sum_k win[k] w[k] + u w[K-1] + bias),  rounded to u's dtype,  for u in x_p, B, C
    dt     = clip(softplus(dt_raw + dt_bias), dt_min, dt_max); then the update of `decode_step_kernel`
    win'   = [win[1:], u]                        the windows shifted by the new raw inputs

  Refs (every one a block; `width` = K):
    keep                      [1]                float32 keep flag (1.0 / 0.0)
    x, b, c, dt               [bp] / [Q] / [Q] / [1]   the new token's raw inputs
    a, d, dt_bias             [1]                A (or A_log with `a_is_log`: A = -exp(A_log)), D, dt_bias, any
                                                 float dtype (used in f32)
    win_x, win_b, win_c       [K-1, bp] / [K-1, Q] ×2
    w_x, w_b, w_c             [K, bp] / [K, Q] ×2
    bias_x, bias_b, bias_c    [bp] / [Q] ×2      (only with `has_bias`)
    h                         [bp, Q]            float32 state
  outputs: y [bp]; h_out [bp, Q] (in place of h); win_x_out [K-1, bp] (in place of win_x); win_b_out,
  win_c_out [K-1, Q], fresh buffers written by the group's first program (m % per_group == 0, p == 0) only:
  the other programs of the group read the old B / C windows, which an in-place shift would race with.
  """
  (keep_ref, x_ref, b_ref, c_ref, dt_ref, a_ref, d_ref, dt_bias_ref, win_x_ref, win_b_ref, win_c_ref,
   w_x_ref, w_b_ref, w_c_ref, *rest) = refs
  if has_bias:
    bias_x_ref, bias_b_ref, bias_c_ref, *rest = rest
  else:
    bias_x_ref = bias_b_ref = bias_c_ref = None
  h_ref, y_ref, h_out_ref, win_x_out_ref, win_b_out_ref, win_c_out_ref = rest
  keep = keep_ref[...] > 0                                                  # [1]

  def conv(win_ref, w_ref, new_ref, bias_ref):
    """-> (convolved input in the input dtype, f32; old window rows (reset), the new raw input)."""
    rows = [win_ref[k] for k in range(width - 1)]
    rows = [jnp.where(keep, row, jnp.zeros_like(row)) for row in rows]
    new = new_ref[...]
    acc = None
    for k, row in enumerate([*rows, new]):
      term = row.astype(_F32) * w_ref[k].astype(_F32)
      acc = term if acc is None else acc + term
    if bias_ref is not None:
      acc = acc + bias_ref[...].astype(_F32)
    if activation == "silu":
      acc = acc * jax.nn.sigmoid(acc)
    return acc.astype(new.dtype).astype(_F32), rows, new

  def shift(out_ref, rows, new):
    for k in range(width - 2):
      out_ref[k] = rows[k + 1].astype(out_ref.dtype)
    out_ref[width - 2] = new.astype(out_ref.dtype)

  x, x_rows, x_new = conv(win_x_ref, w_x_ref, x_ref, bias_x_ref)           # [bp]
  b, b_rows, b_new = conv(win_b_ref, w_b_ref, b_ref, bias_b_ref)           # [Q]
  c, c_rows, c_new = conv(win_c_ref, w_c_ref, c_ref, bias_c_ref)           # [Q]
  dt = dt_ref[...].astype(_F32) + dt_bias_ref[...].astype(_F32)           # [1]
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  dt = jnp.clip(dt, dt_min, dt_max)
  a = -jnp.exp(a_ref[...].astype(_F32)) if a_is_log else a_ref[...].astype(_F32)
  decay = jnp.exp(dt * a)                                                  # [1]
  h = jnp.where(keep, h_ref[...], 0.0)                                     # [bp, Q] f32
  new = decay * h + (dt * x)[:, None] * b[None, :]
  h_out_ref[...] = new
  y = jnp.sum(new * c[None, :], axis=1) + d_ref[...].astype(_F32) * x     # [bp]
  y_ref[...] = y.astype(y_ref.dtype)
  shift(win_x_out_ref, x_rows, x_new)

  @pl.when(jnp.logical_and(pl.program_id(1) % per_group == 0, pl.program_id(2) == 0))
  def _():
    shift(win_b_out_ref, b_rows, b_new)
    shift(win_c_out_ref, c_rows, c_new)
