"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import sharding as shd
from n3jax.nn import _common


class RMSNorm(nn.Module):
  """`scale * x / rms(x)`, computed in f32 and cast to `dtype` (HF `NemotronHRMSNorm`, 5.24: the weight
  multiply happens in f32 before the cast)."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., D]
    scale = _common.param(self, "scale", nn.initializers.ones, (x.shape[-1],), (shd.NORM,), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (scale.astype(jnp.float32) * y).astype(self.dtype)


def gated_group_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, *, groups: int, eps: float) -> jax.Array:
  """`GroupRMSNorm(y * silu(z)) * scale` in f32 (HF `NemotronHRMSNormGated`, `norm_before_gate=False`).

  y, z, scale: [..., M, P]. The normalisation groups are `groups` (J) contiguous blocks of heads, each of
  d_inner / J channels: group g holds heads [g*M/J, (g+1)*M/J) - the same channels as the B/C group of
  those heads, so under tensor parallelism over heads the norm stays local. Returns f32.
  """
  *lead, m, p = y.shape
  x = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  xg = x.reshape(*lead, groups, (m // groups) * p)
  xg = xg * jax.lax.rsqrt(jnp.mean(jnp.square(xg), axis=-1, keepdims=True) + eps)
  return xg.reshape(*lead, m, p) * scale.astype(jnp.float32)
