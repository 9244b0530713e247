"""Mixture of experts with sigmoid routing, a shared expert, and LatentMoE (HF `NemotronHMoE`).

    s = sigmoid(x W_gate)                            # f32 [T, E]
    chosen = top_k(s + e_score_correction_bias)      # the bias picks experts, it never weights them
    w = s[chosen] / sum(s[chosen]) * routed_scaling_factor       (normalised if `norm_topk_prob`)
    v = fc1_latent_proj(x) if LatentMoE else x
    out = fc2_latent_proj(sum_r w_r * expert_r(v)) + shared_expert(x)

Group-limited routing (`n_group` > 1, DeepSeek-V3 style): a group's score is the sum of its two best
biased scores; only the `topk_group` best groups are eligible. Experts are ungated relu^2 MLPs. Training
may add the sequence-level balance loss (`balance_loss_coef`, `sequence_balance_loss`) through the
gradient of the layer output, as Megatron does. Dispatch is dropless and goes through
`pallas_kernels.moe.moe_dispatch`, whose backend the config selects; under a layout that splits the tokens,
the experts or their hidden width over the mesh (`n3jax.sharding.moe_shard_axes`), through
`expert_parallel_moe` instead. A call with few rows (decoding: at most `moe_gather_max_rows` (token, slot)
pairs per shard) can skip the sort: each row runs its expert's weights read by id
(`pallas_kernels.moe.gathered`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import quant
from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common
from n3jax.nn import _mlp
from pallas_kernels.moe import expert_parallel
from pallas_kernels.moe import gathered as moe_gathered
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


def _in_sequence_chunks(fn, chunks: int, tokens: jax.Array, v: jax.Array, mask: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """`fn(tokens, v, mask, w_up, w_down, key)` over `chunks` consecutive pieces of the sequence, one at a time.

  Routing and the experts act on each token alone, so the pieces give the layer's own output; their
  dispatch buffers (sorted rows, the exchange's receive buffers, the experts' hidden activations) are
  1/chunks of the whole. Each piece is rematerialised (`jax.checkpoint`), so the backward pass also holds
  one piece's buffers at a time, at the cost of one more forward pass of the routed experts. The weights
  enter in their storage dtype, so their gradients add up over pieces in it (f32 master weights: f32 sums).
  Stochastic rounding draws a fresh key per piece; per-tensor scales of the low-precision recipes are taken
  per piece (what a micro-batch of that many tokens would see).
  """
  b, t, d = tokens.shape

  def split(x):  # [B, T, ...] -> [chunks, B, T / chunks, ...], sequence order kept
    return jnp.moveaxis(x.reshape(b, chunks, t // chunks, *x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(counts, xs):
    tok, vv, m, i = xs
    out, c = fn(tok, vv, m, w_up, w_down, None if key is None else jax.random.fold_in(key, i))
    return counts + c, out

  counts, routed = jax.lax.scan(body, jnp.zeros((w_up.shape[0],), jnp.int32),
                                (split(tokens), split(v), split(mask), jnp.arange(chunks)))
  return jnp.moveaxis(routed, 0, 1).reshape(b, t, -1), counts                # [B, T, Din], [E]


def sequence_balance_loss(logits: jax.Array, expert_ids: jax.Array, num_experts: int,
                          mask: jax.Array | None = None) -> jax.Array:
  """Sequence-level balance loss (DeepSeek-V3 eq. 17-20; Megatron `moe_router_load_balancing_type=
  "seq_aux_loss"`), averaged over sequences. logits [B, T, E] f32 router logits, expert_ids [B, T, R],
  mask [B, T] (True: a token; padding counts in neither f nor P, and a row of padding not at all):

      s'_{t,e} = s_{t,e} / sum_e s_{t,e}     s = sigmoid router scores
      f_e = E / (R * T) * #{t : e in top-R(t)}     P_e = mean_t s'_{t,e}     L = sum_e f_e P_e
  """
  r = expert_ids.shape[-1]
  m = jnp.ones(logits.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)  # [B, T]
  t = m.sum(1)                                                                      # [B] tokens per row
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))                              # [B, T, E]
  probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)                        # [B, T, E]
  counts = jnp.einsum("BTRE,BT->BE", jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), m)  # [B, E]
  f = jax.lax.stop_gradient(counts * num_experts / (r * jnp.maximum(t, 1.0))[:, None])  # [B, E]
  p = jnp.einsum("BTE,BT->BE", probs, m) / jnp.maximum(t, 1.0)[:, None]          # [B, E]
  rows = (t > 0).astype(jnp.float32)
  return jnp.sum(rows * jnp.sum(f * p, -1)) / jnp.maximum(rows.sum(), 1.0)


def _token_counts(ids: jax.Array, mask: jax.Array, num_experts: int) -> jax.Array:
  """ids [T, R] expert choices, mask [T] -> assignments of the masked-in tokens per expert [E] int32."""
  weights = jnp.broadcast_to(mask.astype(jnp.int32)[:, None], ids.shape)
  return jnp.zeros((num_experts,), jnp.int32).at[ids.reshape(-1)].add(weights.reshape(-1))


def _gathered_rows(cfg: ModelConfig, ep, num_tokens: int) -> bool:
  """Whether this call's routed rows take `pallas_kernels.moe.gathered` (each row through its expert's
  weights read by id, no sort): at most `cfg.moe_gather_max_rows` (token, slot) rows per token shard, the
  experts not split over the mesh, and the Pallas kernels of `cfg.moe_backend` ("auto" on a GPU or TPU)."""
  if cfg.moe_gather_max_rows <= 0 or (ep is not None and ep[0] is not None):
    return False
  if moe_ops.resolve_backend(cfg.moe_backend) not in ("pallas", "pallas_mgpu"):
    return False
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if ep is None else math.prod(mesh.shape[a] for a in ep[1])
  return num_tokens * cfg.num_experts_per_tok <= cfg.moe_gather_max_rows * shards


@jax.custom_vjp
def _attach(out: jax.Array, aux: jax.Array, coef: jax.Array) -> jax.Array:
  """`out`, with `coef * aux` added to the loss through the gradient only (Megatron's
  `MoEAuxLossAutoScaler`): d(total)/d(aux) = coef, whatever flows into `out`."""
  del aux, coef
  return out


def _attach_fwd(out, aux, coef):
  del aux
  return out, coef


def _attach_bwd(coef, g):
  return g, coef, jnp.zeros_like(coef)


_attach.defvjp(_attach_fwd, _attach_bwd)


class MoE(nn.Module):
  """Under `cfg.quant` every linear product follows the recipe: the routed experts' grouped GEMMs through
  `n3jax.quant.make_grouped_matmul` (per-expert scales, handed to `moe_dispatch` as its grouped matmul),
  the latent projections and the shared expert through `_common.linear`; the router stays f32."""
  cfg: ModelConfig
  layer_index: int | None = None  # static, for the low-precision recipe's BF16 table
  balance_loss_coef: float = 0.0  # training: adds coef x `sequence_balance_loss` to the loss (via its gradient)

  @nn.compact
  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, T, D], token_mask [B, T] bool (None: all tokens) -> (out [B, T, D], per-expert assignment counts
    [E] int32 of the masked-in tokens). Padding is routed like any token (its output is never used) but
    counts neither in the counts, which move the expert bias, nor in the balance loss."""
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

    tokens = x.astype(dtype)                                                  # [B, T, D]
    v = tokens
    if cfg.moe_latent_size:
      w_fc1 = _common.param(self, "fc1_latent_proj", init, (d, din), (shd.EMBED, shd.LATENT), pdtype)
      v = _common.linear(self, cfg, "latent_proj", "TD,DI->TI", tokens.reshape(bsz * t, d),
                         w_fc1.astype(dtype)).astype(dtype).reshape(bsz, t, din)
    key = None
    if cfg.quant != "none" and not self.is_initializing() and self.has_rng("quant"):
      key = self.make_rng("quant")
    # Init traces a 1-token dummy: it creates params only, so it never needs the expert exchange.
    ep = None if self.is_initializing() else shd.moe_shard_axes()

    mask = jnp.ones((bsz, t), bool) if token_mask is None else token_mask

    def routed_experts(tokens, v, mask, w_up, w_down, key):
      """tokens [B, t, D], v [B, t, Din], mask [B, t] -> (routed [B, t, Din], counts [E])."""
      b, tc, _ = tokens.shape
      logits = _common.one_row_as_two(functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST), "TD,DE->TE",
                                      tokens.reshape(b * tc, d).astype(jnp.float32),
                                      w_gate.astype(jnp.float32))             # [T, E] f32
      weights, ids = route(logits, bias, cfg)                                 # [T, R], [T, R]
      w_up, w_down = w_up.astype(dtype), w_down.astype(dtype)
      grouped_matmul = None  # the backend's own (bf16) grouped matmul
      if cfg.quant != "none" and not self.is_initializing():
        grouped_matmul = quant.make_grouped_matmul(_common.quant_config(cfg), layer_index=self.layer_index,
                                                   num_layers=cfg.num_hidden_layers, key=key,
                                                   backend=cfg.moe_backend)
      rows = v.reshape(b * tc, din)
      gathered_rows = not self.is_initializing() and grouped_matmul is None and _gathered_rows(cfg, ep, b * tc)
      if ep is None and gathered_rows:
        routed, counts = moe_gathered.gathered_dispatch(rows, weights, ids, w_up, w_down, activation="relu2")
      elif ep is None:
        routed, counts = moe_ops.moe_dispatch(rows, weights, ids, w_up, w_down, activation="relu2",
                                              backend=cfg.moe_backend, grouped_matmul=grouped_matmul)
      else:  # per shard (shard_map): tokens split, experts split (+ token exchange), hidden width split (+ psum)
        routed, counts = expert_parallel.expert_parallel_moe(
            rows, weights, ids, w_up, w_down, mesh=jax.sharding.get_abstract_mesh(), expert_axis=ep[0],
            data_axes=ep[1], tensor_axis=ep[2], activation="relu2", backend=cfg.moe_backend,
            exchange=cfg.moe_ep_exchange, grouped_matmul=grouped_matmul, gathered_rows=gathered_rows,
            capacity_factor=cfg.moe_ep_capacity_factor if ep[0] is not None else None)
      if token_mask is not None:
        counts = _token_counts(ids, mask.reshape(b * tc), e)
      return routed.reshape(b, tc, din), counts                               # [B, t, Din], [E]

    # `models.apply` checks that the pieces divide a training sequence; generation's decode steps and
    # prompt pieces that they do not divide run in one piece.
    chunks = 1 if self.is_initializing() or t % cfg.moe_seq_chunks else cfg.moe_seq_chunks
    if chunks == 1:
      routed, counts = routed_experts(tokens, v, mask, w_up, w_down, key)
    else:
      routed, counts = _in_sequence_chunks(routed_experts, chunks, tokens, v, mask, w_up, w_down, key)
    if cfg.moe_latent_size:
      w_fc2 = _common.param(self, "fc2_latent_proj", _common.out_proj_init(cfg), (din, d), (shd.LATENT, shd.EMBED),
                            pdtype)
      routed = _common.linear(self, cfg, "latent_proj", "TI,ID->TD", routed.reshape(bsz * t, din).astype(dtype),
                              w_fc2.astype(dtype)).astype(dtype).reshape(bsz, t, d)
    shared = _mlp.MLP(cfg, cfg.moe_shared_expert_intermediate_size, self.layer_index, name="shared_experts")(x)
    out = (routed.astype(dtype) + shared).astype(dtype)
    if self.balance_loss_coef > 0 and not self.is_initializing():
      # NOTE: f32 on purpose, as the router does; the ids repeat the router's own choice.
      logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), w_gate.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)                  # [B, T, E]
      _, ids = route(jax.lax.stop_gradient(logits).reshape(bsz * t, e), bias, cfg)
      loss = sequence_balance_loss(logits, ids.reshape(bsz, t, -1), e, token_mask)
      out = _attach(out, loss, jnp.asarray(self.balance_loss_coef, jnp.float32))
    return out, counts
