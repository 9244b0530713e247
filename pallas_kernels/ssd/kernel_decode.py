"""Pallas (Triton GPU) kernel body of the one-token SSD update (decoding).

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

import jax.numpy as jnp

_F32 = jnp.float32


def decode_step_kernel(decay_ref, dt_ref, keep_ref, d_ref, x_ref, b_ref, c_ref, h_ref, y_ref, h_out_ref):
  h = h_ref[...]                                               # [bp, Q] f32
  h = jnp.where(keep_ref[...] > 0, h, 0.0)                     # [1] broadcast: a restarted row reads zeros
  x = x_ref[...].astype(_F32)                                  # [bp]
  new = decay_ref[...] * h + (dt_ref[...] * x)[:, None] * b_ref[...].astype(_F32)[None, :]  # [bp, Q]
  h_out_ref[...] = new
  y = jnp.sum(new * c_ref[...].astype(_F32)[None, :], axis=1) + d_ref[...] * x  # [bp]
  y_ref[...] = y.astype(y_ref.dtype)
