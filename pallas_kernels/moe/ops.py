"""Single entry point for routed-expert (MoE) dispatch, with backend selection.

The model calls ``moe_dispatch`` for its routed experts. Implementations live
in ``BACKENDS`` (name -> function, all sharing ``moe_dispatch``'s signature
minus ``backend``): "ragged_dot" (sort + ``jax.lax.ragged_dot``),
"pallas" (the same sort, with the Pallas grouped matmul of ``gmm.py``),
"pallas_mgpu" (the same sort, with the Hopper Mosaic GPU kernels of
``gmm_mgpu.py``: wgmma + TMA, bf16/f16 only) and "dense" (one-hot oracle). "auto" (the default, ``resolve_backend``) is "pallas"
when compiling for a GPU or TPU and "ragged_dot" on CPU: XLA's GPU compiler
expands ``ragged_dot`` into a dense product over every group (at the Nemotron 3
Nano expert shape, 49152 x 2688 rows x 128 experts, 33.8 GB of temporaries for
one forward GEMM, 57 GB with its backward: XLA's memory analysis of the H100
executable, compiled ahead of time with ``n3jax.aot``). ``sorted_dispatch`` and ``expert_mlp`` are the
building blocks shared with ``expert_parallel.py``.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common
from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import gmm_mgpu
from pallas_kernels.moe import reference
from pallas_kernels.moe.reference import GroupedMatmul, combine, expert_mlp, sorted_dispatch

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


# Grouped matmuls that ``sorted_dispatch`` (and expert parallelism) can run on.
GROUPED_MATMULS: dict[str, GroupedMatmul] = {
    "ragged_dot": jax.lax.ragged_dot,
    # Pallas kernels: Triton on GPU, Mosaic on TPU (gmm_tpu.py); on CPU the
    # Triton kernel in interpret mode (slow, exact).
    "pallas": gmm_lib.gmm,
    # Hopper: wgmma + TMA (Mosaic GPU); on CPU its interpreter.
    "pallas_mgpu": gmm_mgpu.gmm,
}


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """``backend`` with "auto" replaced: "pallas" on "gpu" / "tpu", else "ragged_dot".

  platform: default the current abstract mesh's device (AOT), else JAX's
  default backend.
  """
  if backend != "auto":
    return backend
  platform = platform or common.abstract_platform() or jax.default_backend()
  return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "ragged_dot"


def _sorted_dispatch_on(grouped_matmul: GroupedMatmul, doc: str) -> MoeBackend:
  """``sorted_dispatch`` with ``grouped_matmul`` fixed: a ``BACKENDS`` entry."""
  fn = functools.partial(sorted_dispatch, grouped_matmul=grouped_matmul)
  fn.__doc__ = doc
  return fn


moe_dispatch_pallas = _sorted_dispatch_on(
    gmm_lib.gmm,
    """``sorted_dispatch`` on the Pallas grouped matmul (``gmm.gmm``): compiled Triton on GPU, Mosaic on TPU;
    Pallas interpret mode on CPU (exact, slow).""")
moe_dispatch_pallas_mgpu = _sorted_dispatch_on(
    gmm_mgpu.gmm,
    """``sorted_dispatch`` on the Hopper grouped matmul (``gmm_mgpu.gmm``; bf16 / f16 tokens and weights).""")


BACKENDS: dict[str, MoeBackend] = {
    # Dropless sort + jax.lax.ragged_dot (what "auto" picks on CPU).
    "ragged_dot": reference.moe_dispatch_ragged_dot,
    # Dropless sort + the Pallas grouped matmul (gmm.py).
    "pallas": moe_dispatch_pallas,
    # Dropless sort + the Hopper Mosaic GPU grouped matmul (gmm_mgpu.py).
    "pallas_mgpu": moe_dispatch_pallas_mgpu,
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
    backend: str = "auto",
    preferred_element_type: jax.typing.DTypeLike = jnp.float32,
    grouped_matmul: GroupedMatmul | None = None,
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
    backend: A key of ``BACKENDS``, or "auto" (``resolve_backend``); static.
    preferred_element_type: Matmul accumulation dtype.
    grouped_matmul: Overrides the backend's grouped matmul with any function
      of ``GroupedMatmul``'s signature (e.g. a low-precision one that a
      caller builds); the sort/combine stay ``sorted_dispatch``'s. Not with
      backend "dense".

  Returns:
    combined: [T, D] in tokens.dtype.
    counts: [E] int32 number of (token, slot) assignments per expert.

  Raises:
    ValueError: for an unknown backend or activation, or inconsistent input
      shapes/dtypes.
  """
  backend = resolve_backend(backend)
  try:
    impl = BACKENDS[backend]
  except (KeyError, TypeError):
    raise ValueError(
        f"Unknown MoE {backend=!r}; known backends: {sorted(BACKENDS)}."
    ) from None
  if grouped_matmul is not None:
    if backend == "dense":
      raise ValueError("grouped_matmul cannot be combined with backend='dense'")
    return sorted_dispatch(
        tokens, router_weights, expert_ids, w_up, w_down,
        activation=activation, preferred_element_type=preferred_element_type,
        grouped_matmul=grouped_matmul,
    )
  return impl(
      tokens,
      router_weights,
      expert_ids,
      w_up,
      w_down,
      activation=activation,
      preferred_element_type=preferred_element_type,
  )
