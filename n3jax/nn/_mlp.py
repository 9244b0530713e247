"""Dense squared-ReLU MLP: `down(relu(up(x))**2)`, ungated (HF `NemotronHMLP`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common


class MLP(nn.Module):
  """Used for `-` layers (width `intermediate_size`) and the MoE shared expert."""
  cfg: ModelConfig
  features: int  # F
  layer_index: int | None = None  # static, for the low-precision recipe's BF16 table

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, D]
    cfg, d = self.cfg, x.shape[-1]
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    w_up = _common.param(self, "up_proj", _common.dense_init(cfg), (d, self.features), (shd.EMBED, shd.MLP), pdtype)
    w_down = _common.param(self, "down_proj", _common.out_proj_init(cfg), (self.features, d), (shd.MLP, shd.EMBED),
                           pdtype)
    h = _common.linear(self, cfg, "mlp", "BTD,DF->BTF", x.astype(dtype), w_up.astype(dtype))
    if cfg.mlp_bias:
      h = h + _common.param(self, "up_proj_bias", nn.initializers.zeros, (self.features,), (shd.MLP,), pdtype)
    h = _common.relu2(h.astype(dtype))
    out = _common.linear(self, cfg, "mlp", "BTF,FD->BTD", h, w_down.astype(dtype))
    if cfg.mlp_bias:
      out = out + _common.param(self, "down_proj_bias", nn.initializers.zeros, (d,), (shd.NORM,), pdtype)
    return out.astype(dtype)  # [B, T, D]
