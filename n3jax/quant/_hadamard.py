"""The 16x16 random Hadamard transform (RHT) of the NVFP4 recipe.

`Q = diag(s) @ H16 / 4` with `H16` the Sylvester Hadamard matrix and `s` a +-1 sign vector, applied
to consecutive blocks of 16 along one axis: `y_block = x_block @ Q`. `Q` is orthogonal, so in the
weight-gradient product `dW = X^T dY` (contraction over tokens) transforming both operands along
the token axis leaves the product unchanged, `(X^T Q)(Q^T dY) = X^T dY`, while spreading block
outliers before the 1x16 NVFP4 cast.

Sources: TE `NVFP4QuantizerRef._build_hadamard_matrix` / `_apply_rht` and
`get_wgrad_sign_vector` (`NVIDIA/TransformerEngine: transformer_engine/pytorch/custom_recipes/
reference_nvfp4.py`); RHT only on the wgrad operands (`NVFP4BlockScaling`: "RHT is currently only
applied to column-wise usage so that it can be used for wgrad GEMM",
`transformer_engine/common/recipe/__init__.py`); arXiv 2509.25149 ("Pretraining Large Language
Models with NVFP4"), 16x16 RHT on the inputs of the Wgrad GEMM.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from n3jax.quant import _formats

__all__ = ["RHT_SIZE", "TE_WGRAD_SIGNS", "apply_rht", "hadamard_matrix", "random_signs", "rht_matrix"]

RHT_SIZE = 16

# TE's hard-coded sign vector (`get_wgrad_sign_vector`), for bit-level comparison with TE.
TE_WGRAD_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def hadamard_matrix(n: int = RHT_SIZE) -> np.ndarray:
  """Sylvester Hadamard matrix with +-1 entries (`H @ H.T == n * I`), f32."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard size {n=} must be a power of two")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def random_signs(seed: int, *salt: int, n: int = RHT_SIZE) -> tuple[int, ...]:
  """A +-1 sign vector drawn deterministically from integers (no JAX tracing, no global state)."""
  rng = np.random.default_rng([seed % 2**63, *(s % 2**63 for s in salt)])
  return tuple(int(v) for v in rng.choice(np.array([-1, 1]), size=n))


def rht_matrix(signs: tuple[int, ...]) -> np.ndarray:
  """`diag(signs) @ H / sqrt(n)`: orthogonal, f32 (entries +-1/4 for n=16, exact)."""
  s = np.asarray(signs, np.float32)
  if s.ndim != 1 or not np.all(np.abs(s) == 1):
    raise ValueError(f"RHT signs must be a vector of +-1, got {signs}")
  n = s.shape[0]
  return (s[:, None] * hadamard_matrix(n)) / np.float32(np.sqrt(n))


@functools.partial(jax.jit, static_argnames=("signs", "axis"))
def apply_rht(x: jax.Array, signs: tuple[int, ...], axis: int) -> jax.Array:
  """Applies `Q = rht_matrix(signs)` to blocks of `len(signs)` along `axis` (its size must divide)."""
  q = jnp.asarray(rht_matrix(signs))
  n = q.shape[0]
  axis = _formats.normalize_axis(axis, x.shape, "apply_rht")
  if x.shape[axis] % n:
    raise ValueError(f"RHT axis {axis} of shape {x.shape} must be a multiple of {n}")
  # Blocks split in place ([..., L/n, n, ...]): the axes after `axis` stay minor, no transposed copy (the
  # wgrad operands are blocked along their rows, and a TPU would tile a minor axis of 16 to 128 lanes).
  pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
  blocks = x.astype(jnp.float32).reshape(pre, x.shape[axis] // n, n, post)
  out = jnp.einsum("abjc,ji->abic", blocks, q, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(x.shape)
