"""One residual layer of the hybrid stack: `h + mixer(rms_norm(h))` (HF `NemotronHBlock`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax.configs import Block, ModelConfig
from n3jax.nn import _attention, _common, _mamba2, _mlp, _moe, _norms


class Layer(nn.Module):
  """Returns (h_out, aux): aux["expert_counts"] [E] for MoE layers, aux["state"] for Mamba layers.

  Generation: `state` is the layer's cache, the Mamba state (see `Mamba2Mixer`) or, for attention, the
  KV cache {"k", "v": [B, K, S, H]} written at slot `cache_index` with slot segments `cache_segment_ids`
  (see `Attention`); aux["state"] is the updated cache. MLP and MoE layers have no cache.
  """
  cfg: ModelConfig
  kind: Block
  layer_index: int | None = None  # static position in the stack (low-precision recipes); None: MTP
  balance_loss_coef: float = 0.0  # MoE layers in training: the sequence balance loss (`_moe.MoE`)

  @nn.compact
  def __call__(self, h: jax.Array, segment_ids: jax.Array, state=None, cache_index: jax.Array | None = None,
               cache_segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    x = _norms.RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="norm")(h)
    aux = {}
    if self.kind == Block.MAMBA:
      y, aux["state"] = _mamba2.Mamba2Mixer(cfg, self.layer_index, name="mixer")(x, segment_ids, state)
    elif self.kind == Block.ATTENTION:
      attention = _attention.Attention(cfg, layer_index=self.layer_index, name="mixer")
      if state is None:
        y = attention(x, segment_ids)
      else:
        y, aux["state"] = attention(x, segment_ids, state, cache_index, cache_segment_ids)
    elif self.kind == Block.MLP:
      y = _mlp.MLP(cfg, cfg.intermediate_size, self.layer_index, name="mixer")(x)
    elif self.kind == Block.MOE:
      y, aux["expert_counts"] = _moe.MoE(cfg, self.layer_index, self.balance_loss_coef, name="mixer")(
          x, segment_ids > 0)  # padding (segment 0) is routed but not counted
    else:
      raise ValueError(f"Unknown block kind {self.kind!r}")
    return (h.astype(dtype) + y).astype(dtype), aux
