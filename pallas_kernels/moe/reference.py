"""Pure-JAX routed-expert (MoE) dispatch: dropless ragged_dot + dense oracle.

Both functions share one signature and one set of numerics:

  combined[t] = sum_r router_weights[t, r] * out_{expert_ids[t, r]}(tokens[t])
  out_e(v)    = act(v @ w_up[e]) @ w_down[e]          (ungated expert MLP)

Numerics mirror the HF PyTorch reference (bf16 ``nn.Linear`` experts):

  * both matmuls take operands in ``tokens.dtype`` (weights are cast to it) and
    accumulate in ``preferred_element_type`` (f32 by default);
  * the activation is applied to the f32 accumulator and the result is cast
    back to ``tokens.dtype`` before the down projection;
  * the per-expert output is rounded to ``tokens.dtype`` (as a bf16 Linear's
    output would be), then multiplied by the f32 routing weight and summed
    over the R slots in f32; the sum is returned in ``tokens.dtype``.

Einsum alphabet: T tokens, D d_model, F expert hidden, E experts, R experts per
token, and N = T * R flattened (token, slot) assignments.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DTypeLike = jax.typing.DTypeLike

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # Nemotron-H's squared ReLU.
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "silu": jax.nn.silu,
    # Exact (erf) GELU, matching torch.nn.GELU()'s default.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _validate(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    activation: str,
) -> None:
  """Raises ValueError on inconsistent shapes/dtypes or an unknown activation.

  Value checks on ``expert_ids`` (range [0, E)) only run when the ids are
  concrete (eager calls); under ``jit`` out-of-range ids cannot be detected and
  give unspecified results.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(
        f"Unknown {activation=!r}; known activations: {sorted(ACTIVATIONS)}."
    )
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [T, D], got {tokens.shape=}.")
  if not jnp.issubdtype(tokens.dtype, jnp.floating):
    raise ValueError(f"tokens must be floating point, got {tokens.dtype=}.")
  if w_up.ndim != 3 or w_down.ndim != 3:
    raise ValueError(
        f"w_up must be [E, D, F] and w_down [E, F, D], got {w_up.shape=},"
        f" {w_down.shape=}."
    )
  num_tokens, d_model = tokens.shape
  num_experts, _, d_hidden = w_up.shape
  if w_up.shape[1] != d_model:
    raise ValueError(
        f"w_up [E, D, F] must have D == tokens.shape[1], got {w_up.shape=},"
        f" {tokens.shape=}."
    )
  if w_down.shape != (num_experts, d_hidden, d_model):
    raise ValueError(
        f"w_down must be [E, F, D] = {(num_experts, d_hidden, d_model)} to"
        f" match {w_up.shape=} and {tokens.shape=}, got {w_down.shape=}."
    )
  if expert_ids.ndim != 2 or expert_ids.shape[0] != num_tokens:
    raise ValueError(
        f"expert_ids must be [T, R] with T == {num_tokens}, got"
        f" {expert_ids.shape=}, {tokens.shape=}."
    )
  if router_weights.shape != expert_ids.shape:
    raise ValueError(
        f"router_weights and expert_ids must both be [T, R], got"
        f" {router_weights.shape=}, {expert_ids.shape=}."
    )
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(
        f"expert_ids must be an integer array, got {expert_ids.dtype=}."
    )
  if not jnp.issubdtype(router_weights.dtype, jnp.floating):
    raise ValueError(
        f"router_weights must be floating point, got {router_weights.dtype=}."
    )
  if not isinstance(expert_ids, jax.core.Tracer) and expert_ids.size:
    ids = np.asarray(expert_ids)
    if ids.min() < 0 or ids.max() >= num_experts:
      raise ValueError(
          f"expert_ids must lie in [0, {num_experts}) for {w_up.shape=}, got"
          f" values in [{ids.min()}, {ids.max()}]."
      )


def _expert_counts(expert_ids: Array, num_experts: int) -> Array:
  """Number of (token, slot) assignments per expert, [E] int32."""
  return jnp.bincount(expert_ids.reshape(-1), length=num_experts).astype(
      jnp.int32
  )


class GroupedMatmul(Protocol):
  """``jax.lax.ragged_dot``'s 2-D x 3-D form: [M, K] x [E, K, N] -> [M, N]."""

  def __call__(
      self,
      lhs: Array,
      rhs: Array,
      group_sizes: Array,
      *,
      preferred_element_type: jax.typing.DTypeLike | None = None,
  ) -> Array:
    ...



def expert_mlp(
    rows: Array,
    group_sizes: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str,
    preferred_element_type: jax.typing.DTypeLike,
    grouped_matmul: GroupedMatmul,
    partial_sum: Callable[[Array], Array] | None = None,
) -> Array:
  """act(rows @ w_up[g]) @ w_down[g] per group, rows sorted by group.

  Args:
    rows: [N, D] rows sorted by expert; rows past sum(group_sizes) give zeros.
    group_sizes: [E] int32 rows per expert.
    w_up: [E, D, F]; w_down: [E, F, D] (cast to rows.dtype).
    activation: A key of ``reference.ACTIVATIONS``.
    preferred_element_type: Accumulation (and up-projection output) dtype;
      the activation runs on it, then the result is cast to rows.dtype.
    grouped_matmul: ``jax.lax.ragged_dot`` or a kernel with its signature.
    partial_sum: Tensor parallelism: the weights are an F-slice (w_up's
      columns, w_down's rows), and this sums the shards' partial down
      products (e.g. a ``psum`` over the tensor axis) before they are rounded
      to rows.dtype.

  Returns:
    [N, D] in rows.dtype.
  """
  dtype = rows.dtype
  # [N, D] x [E, D, F] (grouped) -> [N, F]
  h = grouped_matmul(rows, w_up.astype(dtype), group_sizes,
                     preferred_element_type=preferred_element_type)
  h = ACTIVATIONS[activation](h).astype(dtype)
  # [N, F] x [E, F, D] (grouped) -> [N, D]
  y = grouped_matmul(h, w_down.astype(dtype), group_sizes,
                     preferred_element_type=preferred_element_type)
  if partial_sum is not None:
    y = partial_sum(y.astype(jnp.promote_types(y.dtype, jnp.float32)))
  return y.astype(dtype)


def combine(y: Array, order: Array, slot_weights: Array) -> Array:
  """Weights, un-sorts and sums the slots of sorted expert outputs.

  Args:
    y: [N, D] expert outputs in sorted order (N = T * R).
    order: [N] the sort permutation (sorted position -> flat (t, r) index).
    slot_weights: [T, R] routing weights.

  Returns:
    [T, D] f32: sum_r slot_weights[t, r] * y[position of (t, r)].
  """
  num_tokens, num_slots = slot_weights.shape
  w = jnp.take(slot_weights.reshape(-1).astype(jnp.float32), order)  # [N]
  y = y.astype(jnp.float32) * w[:, None]  # [N, D]
  # Unsort with the inverse permutation, then a fixed-order sum over R (no
  # scatter-add, so the reduction order is deterministic on every backend).
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=order.dtype)
  )  # [N]
  # D named, not -1: with no tokens (or no slots) -1 cannot be inferred (a ZeroDivisionError in reshape).
  y = jnp.take(y, inverse, axis=0).reshape(num_tokens, num_slots, y.shape[-1])
  return jnp.sum(y, axis=1)  # [T, R, D] -> [T, D]


def sorted_dispatch(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    preferred_element_type: jax.typing.DTypeLike = jnp.float32,
    grouped_matmul: GroupedMatmul = jax.lax.ragged_dot,
    partial_sum: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array]:
  """Dropless dispatch: sort by expert, grouped MLP, un-sort and combine.

  ``grouped_matmul`` is ``jax.lax.ragged_dot`` (``moe_dispatch_ragged_dot``) or a
  kernel with its signature (``ops.GROUPED_MATMULS``); ``partial_sum`` as in
  ``expert_mlp`` (tensor parallelism).
  """
  _validate(tokens, router_weights, expert_ids, w_up, w_down, activation)
  num_slots = expert_ids.shape[1]
  num_experts = w_up.shape[0]
  flat_ids = expert_ids.reshape(-1)  # [N]
  # Stable sort keeps tokens of one expert in token order (deterministic).
  order = jnp.argsort(flat_ids, stable=True)  # [N]
  counts = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)  # [E]
  rows = jnp.take(tokens, order // num_slots, axis=0)  # [N, D]
  y = expert_mlp(
      rows, counts, w_up, w_down, activation=activation,
      preferred_element_type=preferred_element_type,
      grouped_matmul=grouped_matmul, partial_sum=partial_sum,
  )  # [N, D]
  combined = combine(y, order, router_weights)  # [T, D] f32
  return combined.astype(tokens.dtype), counts


def moe_dispatch_ragged_dot(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    preferred_element_type: DTypeLike = jnp.float32,
) -> tuple[Array, Array]:
  """Dropless routed-expert MLP via sort + ``jax.lax.ragged_dot``.

  All shapes are static (the T * R assignments are sorted by expert and the
  per-expert group sizes are data, not shapes), so this jits once per shape
  and is differentiable w.r.t. tokens, router_weights, w_up and w_down.

  Args:
    tokens: [T, D] activations; their dtype is the compute dtype.
    router_weights: [T, R] float routing weights (already normalised/scaled).
    expert_ids: [T, R] integer expert index of each slot, in [0, E).
    w_up: [E, D, F] up projections (cast to tokens.dtype).
    w_down: [E, F, D] down projections (cast to tokens.dtype).
    activation: One of ``ACTIVATIONS`` ("relu2", "silu", "gelu").
    preferred_element_type: Matmul accumulation dtype.

  Returns:
    combined: [T, D] in tokens.dtype, the routing-weighted sum over slots.
    counts: [E] int32 number of (token, slot) assignments per expert.
  """
  return sorted_dispatch(tokens, router_weights, expert_ids, w_up, w_down, activation=activation,
                         preferred_element_type=preferred_element_type, grouped_matmul=jax.lax.ragged_dot)


def moe_dispatch_dense(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    preferred_element_type: DTypeLike = jnp.float32,
) -> tuple[Array, Array]:
  """Dense one-hot oracle: every expert on every token. O(T * E * D * F).

  Same signature, semantics and numerics as ``moe_dispatch_ragged_dot``; meant
  for tests and tiny shapes only.
  """
  _validate(tokens, router_weights, expert_ids, w_up, w_down, activation)
  act_fn = ACTIVATIONS[activation]
  dtype = tokens.dtype
  num_experts = w_up.shape[0]
  # The einsums run on operands rounded to tokens.dtype and then upcast to the
  # (wider) accumulation dtype at HIGHEST precision. For bf16 operands this is
  # the same math as a bf16 x bf16 -> f32 dot (the products are exact in f32),
  # and it sidesteps XLA:CPU's DotThunk, which rejects batched
  # bf16 x bf16 -> f32 dots in some layouts ("Unsupported element type").
  acc_dtype = jnp.promote_types(dtype, preferred_element_type)
  highest = jax.lax.Precision.HIGHEST

  def up(x: Array) -> Array:
    return x.astype(dtype).astype(acc_dtype)

  # [T, D] x [E, D, F] -> [E, T, F]
  h = jnp.einsum(
      "TD,EDF->ETF",
      up(tokens),
      up(w_up),
      precision=highest,
      preferred_element_type=preferred_element_type,
  )
  h = act_fn(h).astype(dtype)
  # [E, T, F] x [E, F, D] -> [E, T, D]
  y = jnp.einsum(
      "ETF,EFD->ETD",
      up(h),
      up(w_down),
      precision=highest,
      preferred_element_type=preferred_element_type,
  )
  y = y.astype(dtype).astype(jnp.float32)
  one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)
  # Gather each slot's expert output (exact at HIGHEST precision):
  # [T, R, E] x [E, T, D] -> [T, R, D]
  y = jnp.einsum("TRE,ETD->TRD", one_hot, y, precision=highest)
  y = y * router_weights.astype(jnp.float32)[..., None]  # [T, R, D]
  combined = jnp.sum(y, axis=1)  # [T, R, D] -> [T, D]
  return combined.astype(dtype), _expert_counts(expert_ids, num_experts)


def gathered_expert_mlp_reference(
    tokens: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
) -> Array:
  """Each slot's expert output, unrounded: y[t, r] = act(tokens[t] @ w_up[e]) @ w_down[e], e = expert_ids[t, r].

  The pure-jnp twin of ``gathered.gathered_expert_mlp`` (and its gradient): the rows' weights are gathered,
  [N, D, F], which is what a few rows (decoding) can afford. Operands in tokens.dtype, products summed in
  f32, the activation's result rounded to tokens.dtype; returns [T, R, D] f32, before the rounding that
  ``expert_mlp`` applies.
  """
  num_tokens, num_slots = expert_ids.shape
  dtype = tokens.dtype
  acc_dtype = jnp.promote_types(dtype, jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  ids = expert_ids.reshape(-1)                                                  # [N]
  up = lambda x: x.astype(dtype).astype(acc_dtype)  # exact products at HIGHEST (see moe_dispatch_dense)
  rows = jnp.repeat(tokens, num_slots, axis=0)                                  # [N, D]
  h = jnp.einsum("ND,NDF->NF", up(rows), up(jnp.take(w_up, ids, axis=0)), precision=highest,
                 preferred_element_type=jnp.float32)                            # [N, F]
  h = ACTIVATIONS[activation](h).astype(dtype)
  y = jnp.einsum("NF,NFD->ND", up(h), up(jnp.take(w_down, ids, axis=0)), precision=highest,
                 preferred_element_type=jnp.float32)                            # [N, D]
  return y.reshape(num_tokens, num_slots, -1)
