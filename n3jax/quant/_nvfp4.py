"""NVFP4: E2M1 values, one E4M3 decode scale per 16-element block, one f32 scale per tensor.

Follows TE's reference quantizer `NVFP4QuantizerRef._quantize_blockwise_reference`
(`NVIDIA/TransformerEngine: transformer_engine/pytorch/custom_recipes/reference_nvfp4.py`), written
anew in jnp. For a tensor with (finite) amax `A` and a block with amax `a`:

  global_encode = min(448 * 6 / A, FLT_MAX), or 1 if that is 0;   global_decode = 1 / global_encode
  block_decode  = e4m3_rne(min(a * (global_encode * f32(1/6)), 448))      # the stored E4M3 scale
  block_encode  = min(1 / (block_decode * global_decode), FLT_MAX)
  q             = e2m1(clip(x * block_encode, -6, 6))                       # RNE, or SR for gradients
  x ~= q * block_decode * global_decode

Blocks are 1x16 along the contraction axis (activations, gradients) or 16x16 over the last two axes
(weights: the same quantized weight then serves the forward and the data-gradient products). Axes
are zero-padded to a multiple of 16 for the blocking (zeros do not change any amax). A block whose
E4M3 scale underflows to 0 (a block amax far below the tensor amax) dequantizes to exact zeros, as do
all-zero blocks and all-zero tensors; nothing produces NaN except NaN/Inf inputs, which stay NaN in
their own element (E2M1 has neither NaN nor Inf; scales ignore non-finite elements).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from n3jax.quant._formats import E2M1, E4M3, FLOAT32_MAX, finite_amax, restore_non_finite, round_to_format
from pallas_kernels import _target

__all__ = ["BLOCK", "NVFP4Tensor", "fake_quant_nvfp4", "nvfp4_dequantize", "nvfp4_quantize"]

BLOCK = 16
_F4_MAX, _F8_MAX = 6.0, 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Tensor:
  """An NVFP4 tensor in unpacked form.

  `values` are the E2M1 values (f32, the tensor's shape); `block_scales` the E4M3 decode scales
  (f32 holding E4M3 values) in blocked layout: `[..., nb]` for 1x16 blocks along `axis` (moved
  last), `[..., R/16, C/16]` for 16x16 blocks over the last two axes; `global_decode` the f32
  per-tensor decode scale, shape `[*batch, 1, ...]`.
  """
  values: jax.Array
  block_scales: jax.Array
  global_decode: jax.Array
  axis: int = dataclasses.field(default=-1, metadata=dict(static=True))
  block_2d: bool = dataclasses.field(default=False, metadata=dict(static=True))


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _blocks(x: jax.Array, axis: int, block_2d: bool) -> jax.Array:
  """1D: `[..., nb, 16]` (axis moved last); 2D: `[..., R/16, 16, C/16, 16]`; zero padded."""
  if block_2d:
    x = _pad_axis(_pad_axis(x, -1, BLOCK), -2, BLOCK)
    r, c = x.shape[-2:]
    return x.reshape(*x.shape[:-2], r // BLOCK, BLOCK, c // BLOCK, BLOCK)
  x = _pad_axis(jnp.moveaxis(x, axis, -1), -1, BLOCK)
  return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _unblock(xb: jax.Array, shape: tuple[int, ...], axis: int, block_2d: bool) -> jax.Array:
  """Inverse of `_blocks` for a tensor of `shape` (drops the padding)."""
  if block_2d:
    full = xb.reshape(*xb.shape[:-4], xb.shape[-4] * BLOCK, xb.shape[-2] * BLOCK)
    return full[..., : shape[-2], : shape[-1]]
  full = xb.reshape(*xb.shape[:-2], xb.shape[-2] * BLOCK)[..., : shape[axis]]
  return jnp.moveaxis(full, -1, axis)


def global_encode_from_amax(amax: jax.Array) -> jax.Array:
  """Per-tensor encode scale `448 * 6 / amax` (f32; amax 0 -> FLT_MAX, never 0)."""
  encode = jnp.minimum(jnp.float32(_F8_MAX * _F4_MAX) / jnp.asarray(amax, jnp.float32), FLOAT32_MAX)
  return jnp.where(encode == 0, 1.0, encode)


def _global_scales(x: jax.Array, batch_dims: int) -> tuple[jax.Array, jax.Array]:
  encode = global_encode_from_amax(finite_amax(x, axis=tuple(range(batch_dims, x.ndim)), keepdims=True))
  return encode, 1.0 / encode


def _quantize_blocks(x: jax.Array, *, axis: int, block_2d: bool, key: jax.Array | None,
                     batch_dims: int, global_amax: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(E2M1 values, E4M3 block decode scales, global decode), values/scales in blocked layout.

  `global_amax` (broadcastable to `x`, constant within each block) replaces the per-tensor amax: rows
  of one array that belong to different tensors (the token groups of a grouped GEMM) each get their
  own global scale. The returned global decode then has `global_amax`'s shape."""
  x = jnp.asarray(x, jnp.float32)
  if block_2d and x.ndim - batch_dims < 2:
    raise ValueError(f"16x16 blocks need 2 non-batch axes, got shape {x.shape} with {batch_dims=}")
  xb = _blocks(jnp.where(jnp.isfinite(x), x, 0.0), axis, block_2d)
  block_axes = (-3, -1) if block_2d else (-1,)
  if global_amax is not None:
    global_encode = global_encode_from_amax(global_amax)
    global_decode = 1.0 / global_encode
    # Blocked like x; padding blocks (encode 0 from the zero padding) get 1, they hold only zeros.
    ge = jnp.max(_blocks(jnp.broadcast_to(global_encode, x.shape), axis, block_2d), axis=block_axes,
                 keepdims=True)
    ge = jnp.where(ge == 0, 1.0, ge)
    gd = 1.0 / ge
  elif block_2d:
    global_encode, global_decode = _global_scales(x, batch_dims)
    gd = global_decode[..., None, None]
    ge = global_encode[..., None, None]
  else:
    global_encode, global_decode = _global_scales(x, batch_dims)
    gd = jnp.expand_dims(jnp.moveaxis(global_decode, axis, -1), -1)
    ge = jnp.expand_dims(jnp.moveaxis(global_encode, axis, -1), -1)
  block_amax = jnp.max(jnp.abs(xb), axis=block_axes, keepdims=True)
  # TE folds 1/6 into the global multiplier and keeps the last reciprocal exact.
  decode = jnp.minimum(block_amax * (ge * jnp.float32(1.0 / _F4_MAX)), FLOAT32_MAX)
  decode = round_to_format(jnp.minimum(decode, _F8_MAX), E4M3)
  encode = jnp.minimum(1.0 / (decode * gd), FLOAT32_MAX)                      # decode 0 -> FLT_MAX
  uniform = None if key is None else _uniform(key, xb.shape)
  q = round_to_format(jnp.clip(xb * encode, -_F4_MAX, _F4_MAX), E2M1, uniform=uniform)
  return q, decode, global_decode


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """U[0, 1) f32 draws for stochastic rounding: 24 random bits from XLA's `RngBitGenerator`, Philox (on a
  TPU target, the TPU's own generator: Philox's [N, 4] words would take 32x the bytes there).

  Deterministic in `key` (any JAX PRNG key) for a given backend; it compiles much faster than
  threefry-based `jax.random.uniform` on CPU (one HLO op instead of an unrolled hash).
  """
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = data.reshape(-1).astype(jnp.uint32)
  seed = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]
  if seed.shape[0] < 4:
    seed = jnp.pad(seed, (0, 4 - seed.shape[0]))
  on_tpu = _target.platform() == "tpu"  # the compile target (an abstract mesh's device, else the default)
  # XLA expands Philox into [N, 4] words, which a TPU pads to 128 lanes (32x the bytes); its own generator
  # (RNG_DEFAULT) makes the bits in place.
  algorithm = jax.lax.RandomAlgorithm.RNG_DEFAULT if on_tpu else jax.lax.RandomAlgorithm.RNG_PHILOX
  _, bits = jax.lax.rng_bit_generator(seed, shape, dtype=jnp.uint32, algorithm=algorithm)
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


@functools.partial(jax.jit, static_argnames=("axis", "block_2d", "batch_dims"))
def nvfp4_quantize(x: jax.Array, *, axis: int = -1, block_2d: bool = False, key: jax.Array | None = None,
                   batch_dims: int = 0) -> NVFP4Tensor:
  """NVFP4 cast of `x` (one tensor per index of the `batch_dims` leading axes).

  Args:
    x: the tensor.
    axis: the block axis for 1x16 blocks (the contraction axis of the product it feeds).
    block_2d: 16x16 blocks over the last two axes instead (weights).
    key: None for round-to-nearest-even; a PRNG key for stochastic rounding (gradients).
    batch_dims: leading axes indexing separate tensors (e.g. experts), each with its own global scale.
  """
  axis = axis % x.ndim
  if axis < batch_dims and not block_2d:
    raise ValueError(f"block {axis=} must not be one of the {batch_dims=} leading batch axes")
  q, decode, global_decode = _quantize_blocks(x, axis=axis, block_2d=block_2d, key=key, batch_dims=batch_dims)
  values = restore_non_finite(x, _unblock(q, x.shape, axis, block_2d), E2M1)
  scales = decode[..., 0, :, 0] if block_2d else decode[..., 0]
  return NVFP4Tensor(values, scales, global_decode, axis=axis, block_2d=block_2d)


def nvfp4_scaled_values(x: jax.Array, *, axis: int, block_2d: bool, key: jax.Array | None,
                        batch_dims: int, global_amax: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(`q * block_decode` in `x`'s shape, f32, exact in bf16; global decode) for the GEMM emulation.

  `global_amax`: see `_quantize_blocks` (per-row tensors of a grouped GEMM)."""
  axis = axis % x.ndim
  q, decode, global_decode = _quantize_blocks(x, axis=axis, block_2d=block_2d, key=key, batch_dims=batch_dims,
                                              global_amax=global_amax)
  return restore_non_finite(x, _unblock(q * decode, x.shape, axis, block_2d), E2M1), global_decode


@functools.partial(jax.jit, static_argnames=("dtype",))
def nvfp4_dequantize(t: NVFP4Tensor, dtype=jnp.float32) -> jax.Array:
  if t.block_2d:
    s = jnp.repeat(jnp.repeat(t.block_scales, BLOCK, axis=-2), BLOCK, axis=-1)
    s = s[..., : t.values.shape[-2], : t.values.shape[-1]]
  else:
    s = jnp.repeat(t.block_scales, BLOCK, axis=-1)[..., : t.values.shape[t.axis]]
    s = jnp.moveaxis(s, -1, t.axis)
  return (t.values * s * t.global_decode).astype(dtype)


@functools.partial(jax.jit, static_argnames=("axis", "block_2d", "batch_dims"))
def fake_quant_nvfp4(x: jax.Array, *, axis: int = -1, block_2d: bool = False, key: jax.Array | None = None,
                     batch_dims: int = 0) -> jax.Array:
  """Quantize-dequantize round trip in f32 (`(q * block_decode) * global_decode`)."""
  v, global_decode = nvfp4_scaled_values(x, axis=axis, block_2d=block_2d, key=key, batch_dims=batch_dims)
  return v * global_decode
