"""Single entry point for routed-expert (MoE) dispatch, with backend selection.

The model calls ``moe_dispatch`` for its routed experts. Implementations live
in ``BACKENDS`` (name -> function, all sharing ``moe_dispatch``'s signature
minus ``backend``): "ragged_dot" (sort + ``jax.lax.ragged_dot``, the default),
"pallas" (the same sort, with the Pallas grouped matmul of ``gmm.py``) and
"dense" (one-hot oracle). ``sorted_dispatch`` and ``expert_mlp`` are the
building blocks shared with ``expert_parallel.py``.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

from typing import Protocol

import jax
import jax.numpy as jnp

from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import reference

Array = jax.Array


class MoeBackend(Protocol):
  """Signature every ``BACKENDS`` entry implements (see ``moe_dispatch``)."""

  def __call__(
      self,
      tokens: Array,
      router_weights: Array,
      expert_ids: Array,
      w_up: Array,
      w_down: Array,
      *,
      activation: str,
      preferred_element_type: jax.typing.DTypeLike,
  ) -> tuple[Array, Array]:
    ...


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


# Grouped matmuls that ``sorted_dispatch`` (and expert parallelism) can run on.
GROUPED_MATMULS: dict[str, GroupedMatmul] = {
    "ragged_dot": jax.lax.ragged_dot,
    # Pallas Triton kernel; on CPU it runs in interpret mode (slow, exact).
    "pallas": gmm_lib.gmm,
}


def expert_mlp(
    rows: Array,
    group_sizes: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str,
    preferred_element_type: jax.typing.DTypeLike,
    grouped_matmul: GroupedMatmul,
) -> Array:
  """act(rows @ w_up[g]) @ w_down[g] per group, rows sorted by group.

  Args:
    rows: [N, D] rows sorted by expert; rows past sum(group_sizes) give zeros.
    group_sizes: [E] int32 rows per expert.
    w_up: [E, D, F]; w_down: [E, F, D] (cast to rows.dtype).
    activation: A key of ``reference.ACTIVATIONS``.
    preferred_element_type: Accumulation (and up-projection output) dtype;
      the activation runs on it, then the result is cast to rows.dtype.
    grouped_matmul: A ``GROUPED_MATMULS`` value.

  Returns:
    [N, D] in rows.dtype.
  """
  dtype = rows.dtype
  # [N, D] x [E, D, F] (grouped) -> [N, F]
  h = grouped_matmul(rows, w_up.astype(dtype), group_sizes,
                     preferred_element_type=preferred_element_type)
  h = reference.ACTIVATIONS[activation](h).astype(dtype)
  # [N, F] x [E, F, D] (grouped) -> [N, D]
  y = grouped_matmul(h, w_down.astype(dtype), group_sizes,
                     preferred_element_type=preferred_element_type)
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
  y = jnp.take(y, inverse, axis=0).reshape(num_tokens, num_slots, -1)
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
) -> tuple[Array, Array]:
  """Dropless dispatch: sort by expert, grouped MLP, un-sort and combine.

  Same signature, semantics and numerics as
  ``reference.moe_dispatch_ragged_dot``, on any ``GROUPED_MATMULS`` entry.
  """
  reference._validate(  # pylint: disable=protected-access
      tokens, router_weights, expert_ids, w_up, w_down, activation
  )
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
      grouped_matmul=grouped_matmul,
  )  # [N, D]
  combined = combine(y, order, router_weights)  # [T, D] f32
  return combined.astype(tokens.dtype), counts


def moe_dispatch_pallas(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    preferred_element_type: jax.typing.DTypeLike = jnp.float32,
) -> tuple[Array, Array]:
  """``sorted_dispatch`` on the Pallas grouped matmul (``gmm.gmm``).

  Compiled Triton on GPU; Pallas interpret mode on CPU (exact, slow).
  """
  return sorted_dispatch(
      tokens, router_weights, expert_ids, w_up, w_down,
      activation=activation, preferred_element_type=preferred_element_type,
      grouped_matmul=gmm_lib.gmm,
  )


BACKENDS: dict[str, MoeBackend] = {
    # Dropless sort + jax.lax.ragged_dot; the default.
    "ragged_dot": reference.moe_dispatch_ragged_dot,
    # Dropless sort + the Pallas grouped matmul (gmm.py).
    "pallas": moe_dispatch_pallas,
    # One-hot dense oracle (every expert on every token); tests/debug only.
    "dense": reference.moe_dispatch_dense,
}


def moe_dispatch(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    backend: str = "ragged_dot",
    preferred_element_type: jax.typing.DTypeLike = jnp.float32,
) -> tuple[Array, Array]:
  """Routed ungated-MLP experts, weighted and summed over each token's slots.

  combined[t] = sum_r router_weights[t, r] * out_{expert_ids[t, r]}(tokens[t])
  with out_e(v) = act(v @ w_up[e]) @ w_down[e]. Matmuls run on operands in
  tokens.dtype with ``preferred_element_type`` accumulation; the hidden
  activation is cast to tokens.dtype before the down projection; the weighted
  sum over slots is done in f32 and returned in tokens.dtype.

  Args:
    tokens: [T, D] activations.
    router_weights: [T, R] float routing weights (already normalised/scaled).
    expert_ids: [T, R] integer expert ids in [0, E).
    w_up: [E, D, F] expert up projections.
    w_down: [E, F, D] expert down projections.
    activation: "relu2" (Nemotron squared ReLU), "silu" or "gelu".
    backend: A key of ``BACKENDS`` (static; pass it as a Python str).
    preferred_element_type: Matmul accumulation dtype.

  Returns:
    combined: [T, D] in tokens.dtype.
    counts: [E] int32 number of (token, slot) assignments per expert.

  Raises:
    ValueError: for an unknown backend or activation, or inconsistent input
      shapes/dtypes.
  """
  try:
    impl = BACKENDS[backend]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown MoE {backend=!r}; known backends: {sorted(BACKENDS)}."
    ) from None
  return impl(
      tokens,
      router_weights,
      expert_ids,
      w_up,
      w_down,
      activation=activation,
      preferred_element_type=preferred_element_type,
  )
