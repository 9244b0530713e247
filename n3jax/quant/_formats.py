"""Narrow float formats (E4M3, E5M2, E2M1) and exact rounding onto their grids.

`round_to_format` is the one rounding routine of `n3jax.quant`: round-to-nearest-even (RNE) or
stochastic rounding (SR) onto the values a format can hold, saturating at the largest finite value.
It is plain f32 arithmetic (frexp + a power-of-two step), so it is exact, runs on any backend, and
agrees bit-for-bit with the `ml_dtypes` casts `float8_e4m3fn`, `float8_e5m2`, `float4_e2m1fn`
(checked in `tests/test_quant.py`).

Non-finite inputs (the behaviour every quantizer of `n3jax.quant` keeps, see `restore_non_finite`):
NaN stays NaN; +-Inf stays +-Inf in a format that has infinities (E5M2) and becomes NaN in one that
has none (E4M3 `fn`, E2M1 `fn`), which is also what a cast to those dtypes does. Scales are computed
from the finite elements only, so a stray Inf does not wipe out its whole tensor.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["E2M1", "E4M3", "E5M2", "FLOAT32_MAX", "FloatFormat", "check_batch_dims", "finite_amax",
           "normalize_axis", "restore_non_finite", "round_to_format"]

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """A sign-exponent-mantissa format, described by what rounding needs."""
  name: str
  mantissa_bits: int    # stored mantissa bits
  min_exponent: int     # exponent of the smallest normal number (subnormals share its step)
  max_value: float      # largest finite value; rounding saturates here
  has_inf: bool         # whether +-Inf is representable
  dtype: object         # the JAX/ml_dtypes storage dtype

  @property
  def smallest_subnormal(self) -> float:
    return 2.0 ** (self.min_exponent - self.mantissa_bits)


# OCP FP8 formats as used by TE (`Format.E4M3` max 448, `Format.E5M2` max 57344,
# `NVIDIA/TransformerEngine: transformer_engine/common/recipe/__init__.py`) and the NVFP4 element
# type E2M1 (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}).
E4M3 = FloatFormat("e4m3", mantissa_bits=3, min_exponent=-6, max_value=448.0, has_inf=False,
                   dtype=jnp.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", mantissa_bits=2, min_exponent=-14, max_value=57344.0, has_inf=True,
                   dtype=jnp.float8_e5m2)
E2M1 = FloatFormat("e2m1", mantissa_bits=1, min_exponent=0, max_value=6.0, has_inf=False,
                   dtype=jnp.float4_e2m1fn)


@functools.partial(jax.jit, static_argnames=("fmt",))
def round_to_format(x: jax.Array, fmt: FloatFormat, *, uniform: jax.Array | None = None) -> jax.Array:
  """Rounds f32 `x` onto `fmt`'s grid, saturating at `+-fmt.max_value`; returns f32.

  Args:
    x: values to round (any float dtype; computed in f32).
    fmt: the target format.
    uniform: None for round-to-nearest-even. Otherwise U[0, 1) draws of `x`'s shape for stochastic
      rounding: `x` goes to the grid neighbour above with probability (x - lo) / (hi - lo), so the
      result is unbiased and always one of the two neighbours.

  NaN stays NaN; +-Inf saturates to +-max here (quantizers restore it, see `restore_non_finite`).
  """
  x = jnp.asarray(x, jnp.float32)
  a = jnp.minimum(jnp.abs(x), fmt.max_value)            # NaN propagates
  _, e = jnp.frexp(a)                                    # a in [2**(e-1), 2**e)
  exponent = jnp.maximum(e - 1, fmt.min_exponent)        # subnormals share the smallest normal's step
  step = jnp.ldexp(jnp.ones_like(a), exponent - fmt.mantissa_bits)
  t = a / step                                           # exact: division by a power of two
  if uniform is None:
    r = jnp.round(t)                                     # half to even
  else:
    lo = jnp.floor(t)
    r = lo + (uniform < (t - lo)).astype(jnp.float32)
  return jnp.copysign(jnp.minimum(r * step, fmt.max_value), x)


def restore_non_finite(x: jax.Array, q: jax.Array, fmt: FloatFormat) -> jax.Array:
  """Puts `x`'s non-finite elements back into quantized `q` (NaN; +-Inf if `fmt` has it, else NaN)."""
  x = jnp.asarray(x, jnp.float32)
  special = jnp.where(jnp.isinf(x), x, jnp.nan) if fmt.has_inf else jnp.full_like(x, jnp.nan)
  return jnp.where(jnp.isfinite(x), q, special)


def finite_amax(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """max |x| over the finite elements (0 where there are none), f32."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=axis, keepdims=keepdims)


def normalize_axis(axis: int, shape: tuple[int, ...], what: str) -> int:
  """`axis` in [0, ndim), or a ValueError naming `what`: Python's `%` would wrap an out-of-range axis onto
  another one silently (axis 3 of a 2-D tensor became axis 1) and divide by zero for a scalar."""
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"{what}: axis {axis} is out of range for shape {tuple(shape)}")
  return axis % len(shape)


def check_batch_dims(batch_dims: int, shape: tuple[int, ...], what: str) -> None:
  """The leading `batch_dims` axes index separate tensors: at least one axis must remain for each tensor
  (else every element silently became a tensor with its own scale)."""
  if not 0 <= batch_dims < max(len(shape), 1):
    raise ValueError(f"{what}: {batch_dims=} must leave at least one tensor axis of shape {tuple(shape)}")
