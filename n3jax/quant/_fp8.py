"""FP8 per-tensor scaling: current scaling (TE `Float8CurrentScaling`) and delayed scaling.

Scale convention (TE's): the *encode* scale multiplies before the cast and the *decode* scale
(TE `scale_inv`) multiplies after it,

  encode = fp8_max / amax,   q = cast_fp8(clip(x * encode, +-fp8_max)),   x ~= q * decode,
  decode = 1 / encode  (= amax / fp8_max up to f32 rounding).

`te_scale_from_amax` follows TE `compute_scale_from_amax`
(`NVIDIA/TransformerEngine: transformer_engine/common/recipe/recipe_common.cuh`): amax 0, Inf or NaN
gives encode 1; an encode scale that overflows f32 becomes FLT_MAX. With delayed scaling
(`DelayedScaling` in `transformer_engine/common/recipe/__init__.py`) the encode scale comes from
the max of an amax history window, `(fp8_max / max(history)) / 2**margin`, and the tensor is cast
with the scale computed *before* its own amax is recorded. A window whose max is 0 (the tensor was
all zeros for its whole length, e.g. an expert that received no tokens) keeps the previous scale,
as TE's `amax_and_scale_update` kernel does (`transformer_engine/common/recipe/delayed_scaling.cu`:
`isfinite(amax) && amax > 0` or else `scale = scale_ptr[bid]`); resetting it to 1 would cast the
expert's next small gradients with a scale far from theirs.

Amax ignores non-finite elements; non-finite elements keep the behaviour of `_formats`
(NaN -> NaN; +-Inf -> +-Inf in E5M2, NaN in E4M3).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from n3jax.quant._formats import (FLOAT32_MAX, FloatFormat, check_batch_dims, finite_amax, restore_non_finite,
                                   round_to_format)

__all__ = ["DelayedScalingState", "Fp8Tensor", "fake_quant_fp8", "fp8_delayed_quantize", "fp8_dequantize",
           "fp8_quantize", "init_delayed_scaling", "te_scale_from_amax"]


class Fp8Tensor(NamedTuple):
  """An FP8 tensor: `values` in the fp8 storage dtype, `decode` f32 (broadcastable to `values`)."""
  values: jax.Array
  decode: jax.Array


def te_scale_from_amax(amax: jax.Array, fmt_max: float, margin: int = 0) -> jax.Array:
  """Encode scale `fmt_max / amax / 2**margin` with TE's guards (f32)."""
  amax = jnp.asarray(amax, jnp.float32)
  bad = (amax == 0) | ~jnp.isfinite(amax)
  scale = jnp.float32(fmt_max) / jnp.where(bad, 1.0, amax)
  scale = jnp.where(jnp.isinf(scale), FLOAT32_MAX, scale)
  scale = jnp.where(bad, 1.0, scale)
  return scale / jnp.float32(2.0 ** margin)


def _scaled_values(x: jax.Array, encode: jax.Array, fmt: FloatFormat) -> jax.Array:
  """RNE onto `fmt` of `x * encode` (saturating), with non-finite elements restored; f32."""
  x = jnp.asarray(x, jnp.float32)
  q = round_to_format(jnp.where(jnp.isfinite(x), x, 0.0) * encode, fmt)
  return restore_non_finite(x, q, fmt)


@functools.partial(jax.jit, static_argnames=("fmt", "batch_dims"))
def fp8_quantize(x: jax.Array, fmt: FloatFormat, *, encode: jax.Array | None = None,
                 batch_dims: int = 0) -> Fp8Tensor:
  """Per-tensor FP8 cast. `encode=None` is current scaling (from this tensor's finite amax).

  Args:
    x: the tensor.
    fmt: `E4M3` or `E5M2`.
    encode: an explicit encode scale (delayed scaling), broadcastable to `x`.
    batch_dims: leading axes that index separate tensors (one scale each), e.g. experts.
  """
  check_batch_dims(batch_dims, x.shape, "fp8_quantize")
  if encode is None:
    axes = tuple(range(batch_dims, x.ndim))
    encode = te_scale_from_amax(finite_amax(x, axis=axes, keepdims=True), fmt.max_value)
  values = _scaled_values(x, encode, fmt).astype(fmt.dtype)  # exact: already on the grid
  return Fp8Tensor(values, (1.0 / jnp.asarray(encode, jnp.float32)))


def fp8_dequantize(t: Fp8Tensor, dtype=jnp.float32) -> jax.Array:
  return (t.values.astype(jnp.float32) * t.decode).astype(dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "batch_dims"))
def fake_quant_fp8(x: jax.Array, fmt: FloatFormat, *, encode: jax.Array | None = None,
                   batch_dims: int = 0) -> jax.Array:
  """Quantize-dequantize round trip in f32 (same numbers as `fp8_dequantize(fp8_quantize(...))`)."""
  return fp8_dequantize(fp8_quantize(x, fmt, encode=encode, batch_dims=batch_dims))


class DelayedScalingState(NamedTuple):
  """Carried by the caller between steps (a pytree). `amax_history[0]` is the most recent amax."""
  amax_history: jax.Array  # [L] f32
  encode: jax.Array        # [] f32, the scale the next cast will use


def init_delayed_scaling(history_len: int = 1024) -> DelayedScalingState:
  """TE defaults: `amax_history_len=1024`, initial scale 1."""
  if history_len < 1:
    raise ValueError(f"{history_len=} must be >= 1")
  return DelayedScalingState(jnp.zeros((history_len,), jnp.float32), jnp.ones((), jnp.float32))


@functools.partial(jax.jit, static_argnames=("fmt", "margin"))
def fp8_delayed_quantize(x: jax.Array, state: DelayedScalingState, fmt: FloatFormat, *,
                         margin: int = 0) -> tuple[Fp8Tensor, DelayedScalingState]:
  """Casts with `state.encode`, then records amax(x) and recomputes the scale from max(history).

  Values above what the stale scale allows saturate at `+-fmt.max_value` (as in TE). A history whose
  max is 0 keeps `state.encode` (TE; see the module docstring).
  """
  q = fp8_quantize(x, fmt, encode=state.encode)
  history = jnp.roll(state.amax_history, 1).at[0].set(finite_amax(x))
  amax = jnp.max(history)                                # finite and >= 0: finite_amax ignores NaN/Inf
  encode = jnp.where(amax > 0, te_scale_from_amax(amax, fmt.max_value, margin), state.encode)
  return q, DelayedScalingState(history, encode)
