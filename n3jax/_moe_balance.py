"""MoE load balancing for training: the aux-loss-free expert bias and the sequence-level balance loss.

Aux-loss-free bias (DeepSeek-V3 §2.1.2; Megatron `get_updated_expert_bias`, `moe_router_bias_update_rate`):
after each step, per MoE layer, `b_e += rate * sign(mean_e(load) - load_e)` from the step's routed-token
counts. The bias only picks experts; it is updated outside the optimizer.

Sequence-level balance loss (DeepSeek-V3 eq. 17-20; Megatron `moe_router_load_balancing_type=
"seq_aux_loss"`, coefficient 1e-4 for Nemotron 3): each MoE layer adds it itself when
`models.apply(..., balance_loss_coef=c)` is given (`nn._moe.sequence_balance_loss`), through the gradient
of its output (the gradient-injection trick of Megatron's `MoEAuxLossAutoScaler`), under every layer
strategy and for the MTP modules' MoE layers too. The loss value itself is not returned (it would have to
leave a scan); logs show expert-load balance from the counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from n3jax.nn._moe import sequence_balance_loss

__all__ = ["sequence_balance_loss", "update_expert_bias", "load_imbalance"]


def update_expert_bias(params: dict, counts: jax.Array, rate: float) -> dict:
  """counts [n_moe (+ MTP MoE layers), E] tokens routed per expert this step -> params with the moved
  correction biases: the main stack's rows first, then the MTP modules' MoE layers in order
  (`models.apply`'s `expert_counts` then `mtp_expert_counts`)."""
  if counts.size == 0 or rate == 0:
    return params
  load = counts.astype(jnp.float32)
  delta = rate * jnp.sign(load.mean(-1, keepdims=True) - load)                  # [rows, E]
  params = dict(params)
  n_main = 0
  if "moe" in params["layers"]:
    mixer = params["layers"]["moe"]["mixer"]
    n_main = mixer["e_score_correction_bias"].shape[0]
    new_mixer = {**mixer, "e_score_correction_bias": mixer["e_score_correction_bias"] + delta[:n_main]}
    params["layers"] = {**params["layers"], "moe": {**params["layers"]["moe"], "mixer": new_mixer}}
  row = n_main
  for m in sorted(params.get("mtp", {}), key=int):
    module = dict(params["mtp"][m])
    for name in sorted((n for n in module if n.startswith("layer_")), key=lambda n: int(n.split("_")[1])):
      mixer = module[name]["mixer"]
      if "e_score_correction_bias" in mixer and row < delta.shape[0]:
        module[name] = {**module[name], "mixer": {**mixer, "e_score_correction_bias":
                                                  mixer["e_score_correction_bias"] + delta[row]}}
        row += 1
    params["mtp"] = {**params["mtp"], m: module}
  return params


def load_imbalance(counts: jax.Array) -> jax.Array:
  """max / mean routed tokens per expert, averaged over MoE layers (1.0 = perfectly balanced)."""
  if counts.size == 0:
    return jnp.float32(0.0)
  load = counts.astype(jnp.float32)
  return jnp.mean(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
