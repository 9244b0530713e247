"""What the flash-attention kernel paths share (`ops_triton.py`, `ops_mgpu.py`): padding and the custom VJP.

Both run three kernels on a padded problem: a forward that also returns the row log-sum-exp, and a
backward from the saved q, k, v, o and lse. Padding: T to a multiple of the blocks with segment id -1 (a
padded query sees only itself; no real query sees it, being later than every real key), H with zeros (the
scores do not change; the scale stays the real H's).

This module imports only jax.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import _vma

Array = jax.Array


def pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  """``x`` padded at the end of ``axis`` to ``size`` with ``value``."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def row_delta(o: Array, do: Array) -> Array:
  """[B, N, T] f32 rowsum(do * o) of o, do [B, T, N, H]: the softmax backward's correction."""
  return jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32))


def differentiable(forward: Callable[..., tuple[Array, Array]], backward: Callable[..., tuple[Array, ...]]):
  """``core(cfg, q, k, v, seg) -> o`` with a ``jax.custom_vjp`` (``cfg`` static and hashable).

  forward(cfg, q, k, v, seg) -> (o, lse); backward(cfg, q, k, v, seg, o, lse, do) -> (dq, dk, dv), with
  ``do`` in o's dtype. Residuals: q, k, v, seg, o and lse (nothing of size [T, T]).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def core(cfg, q, k, v, seg):
    return forward(cfg, q, k, v, seg)[0]

  def core_fwd(cfg, q, k, v, seg):
    o, lse = forward(cfg, q, k, v, seg)
    return o, (q, k, v, seg, o, lse)

  def core_bwd(cfg, residuals, do):
    q, k, v, seg, o, lse = residuals
    dq, dk, dv = backward(cfg, q, k, v, seg, o, lse, do.astype(o.dtype))
    return dq, dk, dv, None

  core.defvjp(core_fwd, core_bwd)
  return core


def run_padded(core, cfg: Any, q: Array, k: Array, v: Array, segment_ids: Array, *, padded_t: int,
               padded_h: int) -> Array:
  """``core`` on q, k, v [B, T, ., H] and segment ids padded to ``padded_t`` x ``padded_h``; the [B, T, N, H] result."""
  t, h = q.shape[1], q.shape[3]
  prep = lambda x: pad_axis(pad_axis(x, 1, padded_t), 3, padded_h)
  seg = pad_axis(segment_ids.astype(jnp.int32), 1, padded_t, -1)
  # One varying set for every operand (no-op outside shard_map; see `_vma`).
  q, k, v, seg = _vma.match_vma(prep(q), prep(k), prep(v), seg)
  return core(cfg, q, k, v, seg)[:, :t, :, :h]
