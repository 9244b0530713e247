"""The pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`.

State is a plain dict pytree (what orbax saves): `step` int32, `params`, `opt_state`, `rng` (raw key
data, uint32 [2]). A batch is the dict of `n3jax.data` (int32 [B, T]). Losses are per-token means over
the whole global batch, so gradient accumulation over micro-batches (a `lax.scan`) gives the same
update as one big batch:

    loss = CE(main) + mtp_loss_scale / D * sum_k CE_k          (+ the balance loss, via its gradient)

MTP depth k at position i predicts token i + k + 1, i.e. `targets[i + k]`; it counts where that target
is in the loss and in the same document as position i.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from n3jax import _moe_balance
from n3jax import models
from n3jax import sharding
from n3jax.configs import Block, ModelConfig

__all__ = ["init_state", "make_train_step", "make_eval_step", "mtp_depths"]

State = dict[str, Any]
Batch = dict[str, jax.Array]


def mtp_depths(cfg: ModelConfig, config) -> int:
  if not cfg.num_nextn_predict_layers:
    return 0
  return config.mtp_depths or cfg.num_nextn_predict_layers


def init_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> State:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(rng)}


def _ce_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked token cross-entropy, summed. logits [B, T, V] f32."""
  logz = jax.nn.logsumexp(logits, axis=-1)                                        # [B, T]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]      # [B, T]
  return jnp.sum((logz - picked) * mask)


def _ce_sum_chunked(cfg: ModelConfig, h: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                    chunk: int) -> jax.Array:
  """`_ce_sum(project_to_vocab(h, w), ...)` over pieces of `chunk` positions, one at a time.

  h [B, T, D] (after the final norm), w [D, V]. The f32 logits of one piece, [B, chunk, V], are live at
  a time, in the forward and (rematerialised: one more LM-head product per piece) in the backward pass;
  whole, they are [B, T, V] f32 per head and XLA keeps copies for the softmax's backward (at Super's
  T = 8192 and V = 131072, 4.3 GB per head, three heads with MTP). The pieces' sums and w's gradient
  add up in f32 in sequence order. T that `chunk` does not divide is padded with masked positions.
  """
  b, t, d = h.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, mask = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, mask))

  def split(x):  # [B, T', ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(total, xs):
    h_c, t_c, m_c = xs
    return total + _ce_sum(models.project_to_vocab(cfg, h_c, w), t_c, m_c), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h), split(targets), split(mask)))
  return total


def _shift_left(x: jax.Array, k: int) -> jax.Array:
  return jnp.pad(x[:, k:], ((0, 0), (0, k)))


def _mtp_targets(batch: Batch, k: int) -> tuple[jax.Array, jax.Array]:
  same_doc = _shift_left(batch["segment_ids"], k) == batch["segment_ids"]
  return _shift_left(batch["targets"], k), _shift_left(batch["loss_mask"], k) * same_doc


def _denominators(batch: Batch, depths: int) -> jax.Array:
  """Loss tokens of the whole batch: [1 + depths] (main, then each MTP depth), at least 1."""
  counts = [batch["loss_mask"].sum()] + [_mtp_targets(batch, k)[1].sum() for k in range(1, depths + 1)]
  return jnp.maximum(jnp.stack(counts).astype(jnp.float32), 1.0)


def _micro_batches(batch: Batch, accum: int) -> Batch:
  """[B, ...] -> [accum, B / accum, ...]. Micro-batch m holds rows m, m + accum, m + 2 accum, ...: every
  device's share of the batch (its consecutive rows) then gives each micro-batch the same number of rows,
  where they lie. Consecutive rows per micro-batch put each on a few devices: XLA moved every micro-batch's
  rows, activations and logits to their compute devices (collective-permutes; 8 CPU devices, fsdp)."""
  return jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0), batch)


def _head_weight(cfg: ModelConfig, params) -> jax.Array:
  # As the Head uses it: gathered over the FSDP axes (tied or not, its axes are embed x vocab here).
  return sharding.gathered_for_compute(models.lm_head_weight(cfg, params), (sharding.EMBED, sharding.VOCAB))


def _forward_losses(cfg: ModelConfig, params, batch: Batch, depths: int, balance_coef: float, quant_key=None,
                    loss_chunk: int = 0):
  """-> (CE sums [1 + depths], expert counts [n_moe (+ MTP MoE layers when depths > 0), E]).

  loss_chunk > 0: the cross-entropy from the heads' hidden states in pieces (`_ce_sum_chunked`); the
  model's own logits are then unused, and jit drops them."""
  out = models.apply(cfg, params, batch["tokens"], segment_ids=batch["segment_ids"], mtp_depths=depths,
                     quant_key=quant_key, balance_loss_coef=balance_coef)
  if loss_chunk:
    w = _head_weight(cfg, params)
    ce = lambda i, tgt, mask: _ce_sum_chunked(cfg, out["hidden"] if i == 0 else out["mtp_hidden"][i - 1], w,
                                              tgt, mask, loss_chunk)
  else:
    ce = lambda i, tgt, mask: _ce_sum(out["logits"] if i == 0 else out["mtp_logits"][i - 1], tgt, mask)
  sums = [ce(0, batch["targets"], batch["loss_mask"])]
  for k in range(1, depths + 1):
    sums.append(ce(k, *_mtp_targets(batch, k)))
  counts = out["expert_counts"]
  if "mtp_expert_counts" in out and counts.shape[-1] == out["mtp_expert_counts"].shape[-1]:
    counts = jnp.concatenate([counts, out["mtp_expert_counts"]])  # MTP MoE layers balance their bias too
  return jnp.stack(sums), counts


def make_train_step(cfg: ModelConfig, config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[State, Batch], tuple[State, dict]]:
  depths = mtp_depths(cfg, config)
  accum = config.grad_accum_steps
  has_moe = Block.MOE in cfg.blocks
  balance_coef = config.moe.balance_loss_coef / accum if has_moe else 0.0
  weights = jnp.asarray([1.0] + [config.mtp_loss_scale / max(depths, 1)] * depths, jnp.float32)

  def micro_loss(params, micro: Batch, denoms: jax.Array, quant_key):
    sums, counts = _forward_losses(cfg, params, micro, depths, balance_coef, quant_key, config.loss_chunk)
    return jnp.sum(weights * sums / denoms), (sums, counts)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    params = state["params"]
    denoms = _denominators(batch, depths)
    # Stochastic rounding of the low-precision recipes (`cfg.quant`) draws new noise every step.
    quant_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1) if cfg.quant != "none" else None
    if accum == 1:
      (_, (sums, counts)), grads = grad_fn(params, batch, denoms, quant_key)
    else:
      micro = _micro_batches(batch, accum)

      def body(carry, xs):
        mb, i = xs
        g_acc, s_acc, c_acc = carry
        (_, (s, c)), g = grad_fn(params, mb, denoms, None if quant_key is None else jax.random.fold_in(quant_key, i))
        return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, c_acc + c), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      n_mtp_moe = cfg.num_nextn_predict_layers * sum(k == Block.MOE for k in cfg.mtp_blocks) if depths else 0
      n_moe, e = cfg.count(Block.MOE) + (n_mtp_moe if has_moe else 0), (cfg.n_routed_experts if has_moe else 0)
      init = (zeros, jnp.zeros((1 + depths,), jnp.float32), jnp.zeros((n_moe, e), jnp.int32))
      (grads, sums, counts), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if has_moe:
      params = _moe_balance.update_expert_bias(params, counts, config.moe.bias_update_rate)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
    losses = sums / denoms
    metrics = {"loss": losses[0], "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "loss_tokens": denoms[0], "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
               "expert_imbalance": _moe_balance.load_imbalance(counts)}
    if depths:
      metrics["mtp_loss"] = jnp.mean(losses[1:])
    return new_state, metrics

  return train_step


def make_eval_step(cfg: ModelConfig, config=None) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
  """(params, batch) -> (main CE sum, loss tokens).

  With the training `config`, a batch runs as the training step runs it: in its `grad_accum_steps`
  micro-batches (a `lax.scan`) and with the cross-entropy over `loss_chunk` pieces. Whole, the eval batch
  (the training batch's size) took more memory than the training step: configs/nemotron_h_8b.py on 64
  H100s, by XLA's count, 156 GB per GPU (its f32 logits of 12 rows alone 52 GB) against 36.8 GB.
  """
  accum = 1 if config is None else config.grad_accum_steps
  loss_chunk = 0 if config is None else config.loss_chunk

  def ce_sum(params, batch: Batch) -> jax.Array:
    out = models.apply(cfg, params, batch["tokens"], segment_ids=batch["segment_ids"], mtp_depths=0)
    if loss_chunk:
      return _ce_sum_chunked(cfg, out["hidden"], _head_weight(cfg, params), batch["targets"], batch["loss_mask"],
                             loss_chunk)
    return _ce_sum(out["logits"], batch["targets"], batch["loss_mask"])

  def eval_step(params, batch: Batch):
    if accum == 1:
      total = ce_sum(params, batch)
    else:
      total, _ = jax.lax.scan(lambda t, mb: (t + ce_sum(params, mb), None), jnp.zeros((), jnp.float32),
                              _micro_batches(batch, accum))
    return total, batch["loss_mask"].sum()
  return eval_step
