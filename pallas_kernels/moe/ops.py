"""Single entry point for routed-expert (MoE) dispatch, with backend selection.

The model calls ``moe_dispatch`` for its routed experts. Implementations live
in ``BACKENDS`` (name -> function, all sharing ``moe_dispatch``'s signature
minus ``backend``); a Pallas grouped-matmul kernel registers itself by adding a
"pallas" entry.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

from typing import Protocol

import jax
import jax.numpy as jnp

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


BACKENDS: dict[str, MoeBackend] = {
    # Dropless sort + jax.lax.ragged_dot; the default.
    "ragged_dot": reference.moe_dispatch_ragged_dot,
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
