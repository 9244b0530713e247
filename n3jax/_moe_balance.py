"""MoE load balancing for training: the aux-loss-free expert bias and the sequence-level balance loss.

Aux-loss-free bias (DeepSeek-V3 §2.1.2; Megatron `get_updated_expert_bias`, `moe_router_bias_update_rate`):
after each step, per MoE layer, `b_e += rate * sign(mean_e(load) - load_e)` from the step's routed-token
counts. The bias only picks experts; it is updated outside the optimizer.

Sequence-level balance loss (DeepSeek-V3 eq. 17-20; Megatron `moe_router_load_balancing_type=
"seq_aux_loss"`, coefficient 1e-4 for Nemotron 3), per MoE layer and averaged over sequences:

    s'_{t,e} = s_{t,e} / sum_e s_{t,e}     s = sigmoid router scores
    f_e = E / (R * T) * #{t : e in top-R(t)}     P_e = mean_t s'_{t,e}     L = sum_e f_e P_e

`models.apply` does not return per-token router scores, so the loss is attached with a Flax method
interceptor (`flax.linen.intercept_methods`) around each `MoE.__call__`: it recomputes the router
scores from the layer's input and `gate`, and adds `coef * L` to the gradient through a custom VJP on
the layer output (the gradient-injection trick of Megatron's `MoEAuxLossAutoScaler`). This works
unrolled, under `scan_layers` and under remat, and covers the MTP module's MoE layer too. The loss value
itself is not returned (it would have to leave a scan); logs show expert-load balance from the counts.
A direct `models.apply(..., router_scores=True)` output would replace the interceptor (issue #5 note); the
model does not expose one yet.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax.configs import ModelConfig
from n3jax.nn import _moe

__all__ = ["sequence_balance_loss", "balance_loss_hook", "update_expert_bias", "load_imbalance"]


def sequence_balance_loss(logits: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """logits [B, T, E] f32 router logits, expert_ids [B, T, R] chosen experts -> scalar L (docstring)."""
  _, t, _ = logits.shape
  r = expert_ids.shape[-1]
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))                              # [B, T, E]
  probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)                        # [B, T, E]
  counts = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32).sum((1, 2))  # [B, E]
  f = jax.lax.stop_gradient(counts * num_experts / (r * t))                        # [B, E]
  return jnp.mean(jnp.sum(f * probs.mean(1), -1))


@jax.custom_vjp
def _attach(out: jax.Array, aux: jax.Array, coef: jax.Array) -> jax.Array:
  del aux, coef
  return out


def _attach_fwd(out, aux, coef):
  del aux
  return out, coef


def _attach_bwd(coef, g):
  return g, coef, jnp.zeros_like(coef)  # d(total)/d(aux) = coef, whatever flows into `out`


_attach.defvjp(_attach_fwd, _attach_bwd)


@contextlib.contextmanager
def balance_loss_hook(cfg: ModelConfig, coef: float):
  """Within this context, every MoE layer adds `coef * L` (its balance loss) to the gradient."""
  if coef <= 0:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if not (isinstance(context.module, _moe.MoE) and context.method_name == "__call__"):
      return out
    x = args[0] if args else kwargs["x"]                                        # [B, T, D]
    b, t, d = x.shape
    mod = context.module
    gate = mod.get_variable("params", "gate")
    bias = mod.get_variable("params", "e_score_correction_bias")
    # NOTE: f32 on purpose, as the router does; the ids repeat the router's own choice.
    logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), gate.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)                    # [B, T, E]
    _, ids = _moe.route(jax.lax.stop_gradient(logits).reshape(b * t, -1), bias, cfg)
    loss = sequence_balance_loss(logits, ids.reshape(b, t, -1), cfg.n_routed_experts)
    y, counts = out
    return _attach(y, loss, jnp.asarray(coef, jnp.float32)), counts

  with nn.intercept_methods(interceptor):
    yield


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
