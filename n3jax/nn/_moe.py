"""Mixture of experts with sigmoid routing, a shared expert, and LatentMoE (HF `NemotronHMoE`).

    s = sigmoid(x W_gate)                            # f32 [T, E]
    chosen = top_k(s + e_score_correction_bias)      # the bias picks experts, it never weights them
    w = s[chosen] / sum(s[chosen]) * routed_scaling_factor       (normalised if `norm_topk_prob`)
    v = fc1_latent_proj(x) if LatentMoE else x
    out = fc2_latent_proj(sum_r w_r * expert_r(v)) + shared_expert(x)

Group-limited routing (`n_group` > 1, DeepSeek-V3 style): a group's score is the sum of its two best
biased scores; only the `topk_group` best groups are eligible. Experts are ungated relu^2 MLPs. Dispatch
is dropless and goes through `pallas_kernels.moe.moe_dispatch`, whose backend the config selects; under a
layout that splits experts over the mesh (`n3jax.sharding`), through `expert_parallel_moe` instead.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import quant
from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common
from n3jax.nn import _mlp
from pallas_kernels.moe import expert_parallel
from pallas_kernels.moe import ops as moe_ops


def route(logits: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """logits [T, E] f32, bias [E] -> (weights [T, R] f32, expert ids [T, R] int32)."""
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))                         # [T, E]
  choice = scores + bias.astype(jnp.float32)                                  # selection only
  if cfg.n_group > 1:
    t, e = choice.shape
    grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                       # [T, n_group]
    _, keep = jax.lax.top_k(group_scores, cfg.topk_group)                     # [T, topk_group]
    group_mask = jnp.zeros_like(group_scores, dtype=bool).at[jnp.arange(t)[:, None], keep].set(True)
    choice = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), choice, -jnp.inf)
  _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)                    # [T, R]
  weights = jnp.take_along_axis(scores, ids, axis=-1)                         # [T, R]
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32)


class MoE(nn.Module):
  """Under `cfg.quant` every linear product follows the recipe: the routed experts' grouped GEMMs through
  `n3jax.quant.make_grouped_matmul` (per-expert scales, handed to `moe_dispatch` as its grouped matmul),
  the latent projections and the shared expert through `_common.linear`; the router stays f32."""
  cfg: ModelConfig
  layer_index: int | None = None  # static, for the low-precision recipe's BF16 table

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D] -> (out [B, T, D], per-expert assignment counts [E] int32)."""
    cfg = self.cfg
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    bsz, t, d = x.shape
    e, f, din = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_size
    init = _common.dense_init(cfg)
    # NOTE: router weight and correction bias live in f32 (HF `_keep_in_fp32_modules_strict`); the
    # scores are f32 on purpose: bf16 rounding changes top-k picks.
    w_gate = _common.param(self, "gate", init, (d, e), (shd.EMBED, shd.NORM), jnp.float32)
    bias = _common.param(self, "e_score_correction_bias", nn.initializers.zeros, (e,), (shd.NORM,), jnp.float32)
    width = shd.LATENT if cfg.moe_latent_size else shd.EMBED  # the experts' input/output width
    w_up = _common.param(self, "experts_up_proj", init, (e, din, f), (shd.EXPERT, width, shd.EXPERT_MLP), pdtype)
    w_down = _common.param(self, "experts_down_proj", _common.out_proj_init(cfg), (e, f, din),
                           (shd.EXPERT, shd.EXPERT_MLP, width), pdtype)

    tokens = x.astype(dtype).reshape(bsz * t, d)                              # [T, D]
    logits = jnp.einsum("TD,DE->TE", tokens.astype(jnp.float32), w_gate.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)                  # [T, E] f32
    weights, ids = route(logits, bias, cfg)                                   # [T, R], [T, R]

    v = tokens
    if cfg.moe_latent_size:
      w_fc1 = _common.param(self, "fc1_latent_proj", init, (d, din), (shd.EMBED, shd.LATENT), pdtype)
      v = _common.linear(self, cfg, "latent_proj", "TD,DI->TI", tokens, w_fc1.astype(dtype)).astype(dtype)
    grouped_matmul = None  # the backend's own (bf16) grouped matmul
    if cfg.quant != "none" and not self.is_initializing():
      key = self.make_rng("quant") if self.has_rng("quant") else None
      grouped_matmul = quant.make_grouped_matmul(_common.quant_config(cfg), layer_index=self.layer_index,
                                                 num_layers=cfg.num_hidden_layers, key=key,
                                                 backend=cfg.moe_backend)
    # Init traces a 1-token dummy: it creates params only, so it never needs the expert exchange.
    if self.is_initializing() or (ep := shd.moe_shard_axes()) is None:
      routed, counts = moe_ops.moe_dispatch(v, weights, ids, w_up.astype(dtype), w_down.astype(dtype),
                                            activation="relu2", backend=cfg.moe_backend,
                                            grouped_matmul=grouped_matmul)  # [T, Din], [E]
    else:  # per token shard (shard_map); experts split: + token exchange (dropless unless a capacity factor)
      routed, counts = expert_parallel.expert_parallel_moe(
          v, weights, ids, w_up.astype(dtype), w_down.astype(dtype), mesh=jax.sharding.get_abstract_mesh(),
          expert_axis=ep[0], data_axes=ep[1], activation="relu2", backend=cfg.moe_backend,
          exchange=cfg.moe_ep_exchange, grouped_matmul=grouped_matmul,
          capacity_factor=cfg.moe_ep_capacity_factor if ep[0] is not None else None)
    if cfg.moe_latent_size:
      w_fc2 = _common.param(self, "fc2_latent_proj", _common.out_proj_init(cfg), (din, d), (shd.LATENT, shd.EMBED),
                            pdtype)
      routed = _common.linear(self, cfg, "latent_proj", "TI,ID->TD", routed.astype(dtype),
                              w_fc2.astype(dtype)).astype(dtype)
    shared = _mlp.MLP(cfg, cfg.moe_shared_expert_intermediate_size, self.layer_index, name="shared_experts")(x)
    return (routed.reshape(bsz, t, d).astype(dtype) + shared).astype(dtype), counts
