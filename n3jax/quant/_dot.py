"""Quantized two-operand einsum with a `jax.custom_vjp` that quantizes each GEMM's operands.

Every 2-operand einsum `x, w -> y` (activations first, weights second) is mapped onto a batched
matmul `x[g, m, k] @ w[g, k, n]` (g: letters in both operands and the output, e.g. experts; k: the
contracted letters; m / n: the free letters of x / w). The three GEMMs of a linear layer then see
operands quantized as the `GemmRecipe` says, as in TE's `Linear` (`NVIDIA/TransformerEngine`):

  forward   y  = Q(x; k) @ Q(w; k)                    (fprop)
  data grad dx = Q(dy; n) @ Q(w; n)^T                 (dgrad)
  wgt grad  dw = Q(RHT(x); m)^T @ Q(RHT(dy); m)       (wgrad; RHT along tokens, optional)

where `Q(a; axis)` names the contraction axis the blocks run along. Each index of g is its own
tensor with its own per-tensor scale (like TE's grouped GEMMs). Quantized GEMMs are emulated
exactly: the quantized operand is `v * s` with `v` exact in bf16 (an FP8 value, or an E2M1 value
times its E4M3 block scale) and `s` the f32 per-tensor decode scale; the GEMM is
`dot(v_x, v_w, f32 accumulation) * (s_x * s_w)`: exact products, f32 sums, one scale at the end,
which is how the FP8/FP4 tensor-core GEMMs with an `alpha` scale compute.

FP8 `native=True` feeds the FP8-typed operands straight into `jax.lax.dot_general(...,
preferred_element_type=f32)` so that XLA GPU can emit an FP8 GEMM on Hopper (the numbers are the same as
the emulation: products of FP8 values are exact in f32). Compiled for an H100 ahead of time
(`tests/test_aot.py`), forward, dgrad and wgrad each become `__cublas$lt$matmul$f8` (with XLA's Triton
GEMMs off; with them on and no autotuning, Triton FP8 GEMM fusions). XLA's GEMM rewriter also folds the
emulated form (FP8 values converted to BF16, then the dot) into the same FP8 GEMM. Still owed: timing it
on a GPU (`benchmarks/quant.py`). NVFP4 is always emulated (Hopper has no FP4 tensor cores).

Residuals are the unquantized `x`, `w` (as for a plain matmul); the backward re-quantizes them, which
gives the same numbers as saving the forward's quantized copies (round-to-nearest is deterministic).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from n3jax.quant import _fp8
from n3jax.quant import _hadamard
from n3jax.quant import _nvfp4
from n3jax.quant._formats import E4M3, E5M2, FloatFormat

__all__ = ["GemmRecipe", "OperandQuant", "quantized_einsum"]

_KINDS = ("none", "fp8", "nvfp4")


@dataclasses.dataclass(frozen=True)
class OperandQuant:
  """How one GEMM operand is quantized."""
  kind: str = "none"               # "none" | "fp8" | "nvfp4"
  fp8_format: FloatFormat | None = None  # fp8: E4M3 or E5M2 (per-tensor current scaling)
  block_2d: bool = False           # nvfp4: 16x16 blocks over the operand's last two axes
  stochastic: bool = False         # nvfp4: stochastic rounding of the E2M1 values
  rht: bool = False                # 16x16 random Hadamard transform along the contraction axis

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"OperandQuant {self.kind=} must be one of {_KINDS}")
    if self.kind == "fp8" and self.fp8_format not in (E4M3, E5M2):
      got = getattr(self.fp8_format, "name", self.fp8_format)
      raise ValueError(f"OperandQuant kind='fp8' needs fp8_format E4M3 or E5M2, got {got}")
    if self.kind != "fp8" and self.fp8_format is not None:
      raise ValueError(f"OperandQuant fp8_format is for kind='fp8' only, not {self.kind=}")
    if self.kind != "nvfp4" and (self.block_2d or self.stochastic):
      raise ValueError(f"OperandQuant block_2d / stochastic are NVFP4 options, not for {self.kind=}")


_NONE = OperandQuant()
_WGRAD_OPERANDS = ("x_wgrad", "dy_wgrad")
_GRAD_OPERANDS = ("dy_dgrad", "dy_wgrad")


@dataclasses.dataclass(frozen=True)
class GemmRecipe:
  """Operand quantization of the three GEMMs of one linear product (hashable, static)."""
  x_fwd: OperandQuant = _NONE
  w_fwd: OperandQuant = _NONE
  dy_dgrad: OperandQuant = _NONE
  w_dgrad: OperandQuant = _NONE
  x_wgrad: OperandQuant = _NONE
  dy_wgrad: OperandQuant = _NONE
  rht_signs: tuple[int, ...] = _hadamard.TE_WGRAD_SIGNS
  native_fp8: bool = False         # FP8 operands as FP8 dtypes into dot_general (GPU path)

  def __post_init__(self):
    """Options the GEMMs would not honour are errors here, not silently dropped or raised mid-backward: the
    RHT is only applied in the wgrad product, to both of its operands (else it does not cancel, `X^T Q Q^T
    dY = X^T dY`); stochastic rounding only to the gradient operands (the only ones given a key)."""
    names = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), OperandQuant)]
    if bad := [n for n in names if getattr(self, n).rht and n not in _WGRAD_OPERANDS]:
      raise ValueError(f"GemmRecipe: rht is applied only to the wgrad operands {_WGRAD_OPERANDS}, not to {bad}")
    if self.x_wgrad.rht != self.dy_wgrad.rht:
      raise ValueError("RHT must be applied to both wgrad operands or to neither: "
                       f"{self.x_wgrad.rht=} {self.dy_wgrad.rht=}")
    if bad := [n for n in names if getattr(self, n).stochastic and n not in _GRAD_OPERANDS]:
      raise ValueError("GemmRecipe: stochastic rounding is applied only to the gradient operands "
                       f"{_GRAD_OPERANDS}, not to {bad}")
    _hadamard.rht_matrix(self.rht_signs)  # raises unless +-1 entries of a power-of-two length

  @property
  def needs_key(self) -> bool:
    return self.dy_dgrad.stochastic or self.dy_wgrad.stochastic


def _prepare(a: jax.Array, q: OperandQuant, axis: int, key: jax.Array | None,
             native_fp8: bool) -> tuple[jax.Array, jax.Array | None]:
  """Operand `a` [g, r, c] -> (GEMM values, per-group f32 decode scale [g, 1, 1] or None)."""
  if q.kind == "none":
    return a, None
  if q.kind == "fp8":
    t = _fp8.fp8_quantize(a, q.fp8_format, batch_dims=1)
    return (t.values if native_fp8 else t.values.astype(jnp.bfloat16)), t.decode
  v, decode = _nvfp4.nvfp4_scaled_values(a, axis=axis, block_2d=q.block_2d, key=key if q.stochastic else None,
                                         batch_dims=1)
  return v.astype(jnp.bfloat16), decode  # exact: E2M1 x E4M3 products have <= 6 significant bits


def _gemm(dims, a, sa, b, sb) -> jax.Array:
  """`dot_general(a, b)` in f32 accumulation, times the decode scales; f32 result."""
  is_fp8 = lambda t: jnp.dtype(t.dtype).itemsize == 1
  if a.dtype != b.dtype and not (is_fp8(a) and is_fp8(b)):  # FP8 x FP8 (E4M3 x E5M2) goes in as is
    a, b = (t.astype(jnp.bfloat16) if is_fp8(t) else t for t in (a, b))  # exact
    common = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(common), b.astype(common)
  y = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  for s in (sa, sb):
    if s is not None:
      y = y * s
  return y


_FWD = (((2,), (1,)), ((0,), (0,)))     # x[g,m,k] . w[g,k,n] -> [g,m,n]
_DGRAD = (((2,), (2,)), ((0,), (0,)))   # dy[g,m,n] . w[g,k,n] -> [g,m,k]
_WGRAD = (((1,), (1,)), ((0,), (0,)))   # x[g,m,k] . dy[g,m,n] -> [g,k,n]


def _forward(x, w, recipe: GemmRecipe) -> jax.Array:
  vx, sx = _prepare(x, recipe.x_fwd, 2, None, recipe.native_fp8)
  vw, sw = _prepare(w, recipe.w_fwd, 1, None, recipe.native_fp8)
  return _gemm(_FWD, vx, sx, vw, sw)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  extra = -a.shape[1] % multiple
  return jnp.pad(a, ((0, 0), (0, extra), (0, 0))) if extra else a


def _backward(x, w, key, dy, recipe: GemmRecipe) -> tuple[jax.Array, jax.Array]:
  k_dgrad, k_wgrad = jax.random.split(key)
  vdy, sdy = _prepare(dy, recipe.dy_dgrad, 2, k_dgrad, recipe.native_fp8)
  vw, sw = _prepare(w, recipe.w_dgrad, 2, None, recipe.native_fp8)
  dx = _gemm(_DGRAD, vdy, sdy, vw, sw)

  xw, dyw = x, dy
  if recipe.x_wgrad.rht or recipe.dy_wgrad.rht:
    if recipe.x_wgrad.rht != recipe.dy_wgrad.rht:
      raise ValueError("RHT must be applied to both wgrad operands or to neither: "
                       f"{recipe.x_wgrad.rht=} {recipe.dy_wgrad.rht=}")
    # Zero rows added to both operands do not change X^T dY; the RHT needs whole blocks of 16.
    n = len(recipe.rht_signs)
    xw = _hadamard.apply_rht(_pad_rows(x, n), recipe.rht_signs, axis=1)
    dyw = _hadamard.apply_rht(_pad_rows(dy, n), recipe.rht_signs, axis=1)
  vx, sx = _prepare(xw, recipe.x_wgrad, 1, None, recipe.native_fp8)
  vdy, sdy = _prepare(dyw, recipe.dy_wgrad, 1, k_wgrad, recipe.native_fp8)
  dw = _gemm(_WGRAD, vx, sx, vdy, sdy)
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _qmatmul(x: jax.Array, w: jax.Array, key: jax.Array, recipe: GemmRecipe) -> jax.Array:
  """x [g, m, k] @ w [g, k, n] -> f32 [g, m, n] with quantized operands in all three GEMMs."""
  return _forward(x, w, recipe)


def _qmatmul_fwd(x, w, key, recipe):
  return _forward(x, w, recipe), (x, w, key)


def _qmatmul_bwd(recipe, residuals, dy):
  x, w, key = residuals
  dx, dw = _backward(x, w, key, dy, recipe)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How an einsum maps onto x[g, m, k] @ w[g, k, n]."""
  x_perm: tuple[int, ...]
  w_perm: tuple[int, ...]
  gmkn: tuple[int, int, int, int]
  out_shape: tuple[int, ...]   # in the order batch + x-free + w-free
  out_perm: tuple[int, ...]


def _plan(spec: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> _Plan:
  spec = spec.replace(" ", "")
  if "->" not in spec or "." in spec or spec.count(",") != 1:
    raise ValueError(f"Quantized einsum needs an explicit 2-operand spec like 'BTD,DF->BTF', got {spec!r}")
  lhs, out = spec.split("->")
  xs, ws = lhs.split(",")
  for name, letters, shape in (("x", xs, x_shape), ("w", ws, w_shape), ("output", out, None)):
    if len(set(letters)) != len(letters):
      raise ValueError(f"Quantized einsum {spec!r}: repeated letter in the {name} term {letters!r}")
    if shape is not None and len(letters) != len(shape):
      raise ValueError(f"Quantized einsum {spec!r}: {name} term {letters!r} does not match shape {shape}")
  if stray := sorted(set(out) - set(xs) - set(ws)):
    raise ValueError(f"Quantized einsum {spec!r}: output letters {stray} appear in no operand")
  if summed := sorted((set(xs) ^ set(ws)) - set(out)):
    raise ValueError(f"Quantized einsum {spec!r}: letters {summed} are summed within one operand; unsupported")
  size = {**dict(zip(ws, w_shape)), **dict(zip(xs, x_shape))}
  for c in set(xs) & set(ws):
    if x_shape[xs.index(c)] != w_shape[ws.index(c)]:
      raise ValueError(f"Quantized einsum {spec!r}: letter {c!r} has size {x_shape[xs.index(c)]} in x and "
                       f"{w_shape[ws.index(c)]} in w")
  batch = [c for c in xs if c in ws and c in out]
  contract = [c for c in xs if c in ws and c not in out]
  x_free = [c for c in xs if c not in ws]
  w_free = [c for c in ws if c not in xs]
  prod = lambda letters: math.prod(size[c] for c in letters)
  canonical = batch + x_free + w_free
  return _Plan(x_perm=tuple(xs.index(c) for c in batch + x_free + contract),
               w_perm=tuple(ws.index(c) for c in batch + contract + w_free),
               gmkn=(prod(batch), prod(x_free), prod(contract), prod(w_free)),
               out_shape=tuple(size[c] for c in canonical),
               out_perm=tuple(canonical.index(c) for c in out))


@functools.partial(jax.jit, static_argnames=("spec", "recipe", "preferred_element_type"))
def quantized_einsum(spec: str, x: jax.Array, w: jax.Array, *, recipe: GemmRecipe, key: jax.Array | None = None,
                     preferred_element_type=jnp.float32) -> jax.Array:
  """`jnp.einsum(spec, x, w)` whose forward and backward GEMMs see quantized operands (see module doc).

  Args:
    spec: explicit 2-operand spec, activations first and weights second, e.g. "BTD,DF->BTF",
      "BTNH,NHD->BTD", "ETD,EDF->ETF" (E: one tensor, with its own scales, per expert).
    x: activations.
    w: weights (the param array itself; quantization never changes the param tree).
    recipe: operand quantization of the three GEMMs.
    key: PRNG key for stochastic rounding; required when the recipe uses it.
    preferred_element_type: output dtype (None: the promoted input dtype), as for `jnp.einsum`.
  """
  if key is None:
    if recipe.needs_key:
      raise ValueError("This recipe uses stochastic rounding; pass a PRNG key")
    key = jax.random.key(0)
  p = _plan(spec, x.shape, w.shape)
  g, m, k, n = p.gmkn
  x3 = jnp.transpose(x, p.x_perm).reshape(g, m, k)
  w3 = jnp.transpose(w, p.w_perm).reshape(g, k, n)
  y = _qmatmul(x3, w3, key, recipe)
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
  return jnp.transpose(y.reshape(p.out_shape), p.out_perm).astype(out_dtype)
