"""Quantized grouped matmul for the routed experts: `jax.lax.ragged_dot` whose three GEMMs see the recipe.

The experts' products run on tokens sorted by expert: `y[M, N] = x[M, K] @ w[g(m), K, N]` with the
rows of group `e` (`group_sizes[e]` consecutive rows) multiplied by expert `e`. As in TE's
`GroupedLinear` (`NVIDIA/TransformerEngine: transformer_engine/pytorch/module/grouped_linear.py`),
each expert's slice of the activations is its own tensor with its own per-tensor scale, and each
expert's weight is its own tensor:

  forward   y_e  = Q(x_e; K) @ Q(w_e; K)                      (fprop, 1x16 blocks along K)
  data grad dx_e = Q(dy_e; N) @ Q(w_e; N)^T                   (dgrad)
  wgt grad  dw_e = Q(RHT(x_e); M)^T @ Q(RHT(dy_e); M)         (wgrad, blocks along the tokens)

the same operand quantization as `quantized_einsum` (`_dot.py`), so a grouped product equals the
per-expert loop of `quantized_einsum("MK,KN->MN", x_e, w_e)` exactly (tests/test_quant.py). The
wgrad operands are blocked along the tokens, where 16-row blocks and the 16-point RHT must not mix
two experts: they are laid out with every group zero-padded to a multiple of 16 rows (Megatron pads
expert splits the same way for FP8/FP4, `moe_router_padding_for_quantization`; zero rows change
neither an amax nor `X^T dY`). Rows past `sum(group_sizes)` (the slack of a static buffer) give zero
outputs and zero gradients.

FP8 operands go into the GEMMs as bf16 (exact) in every backend: `ragged_dot` has no FP8-typed path.

The three GEMMs run on `backend` (`pallas_kernels.moe.resolve_backend`; "auto" by default): our Pallas
grouped matmul (`gmm` forward and dgrad, `tgmm` wgrad) when compiling for a GPU or TPU, `ragged_dot` on
CPU. XLA's GPU compiler expands `ragged_dot` densely over the experts: at Super's per-device expert shape
(64 local experts, 180224 rows, K 1024, N 2688) one quantized GEMM's fwd + bwd held 124 GB (FP8) and
87 GB (NVFP4) of temporaries in XLA's memory analysis of the H100 executable (`n3jax.aot`).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp

from n3jax.quant import _dot
from n3jax.quant import _fp8
from n3jax.quant import _hadamard
from n3jax.quant import _nvfp4
from n3jax.quant._dot import GemmRecipe, OperandQuant
from n3jax.quant._formats import finite_amax
import pallas_kernels.moe as moe
from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import match_vma

__all__ = ["QuantizedGroupedMatmul", "quantized_ragged_dot"]

_BLOCK = _nvfp4.BLOCK
# out[g, k, n] = sum over the rows m of group g of x[m, k] dy[m, n] (ragged contracting dimension).
_WGRAD_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (0,)), ((), ())), lhs_ragged_dimensions=[1], rhs_group_dimensions=[])


def _row_groups(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """(group of each row [M] in [0, E], E for rows past the groups; first row of each group [E])."""
  ends = jnp.cumsum(group_sizes)
  gid = jnp.searchsorted(ends, jnp.arange(rows), side="right").astype(jnp.int32)
  return gid, ends - group_sizes


def _group_amax(a: jax.Array, gid: jax.Array, num_groups: int) -> jax.Array:
  """Finite amax of the rows of each group, [E + 1] f32 (0 for empty groups; slot E: rows past them)."""
  per_row = finite_amax(a, axis=1)                                               # [M]
  return jnp.maximum(jax.ops.segment_max(per_row, gid, num_segments=num_groups + 1), 0.0)


def _prepare_rows(a: jax.Array, q: OperandQuant, axis: int, gid: jax.Array, num_groups: int,
                  key: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Row-grouped operand `a` [M, C] -> (GEMM values, per-group f32 decode scale [E + 1] or None).

  `axis` is the block axis (1: along C for the fprop/dgrad operands; 0: along the rows for wgrad,
  which needs the 16-aligned layout of `_aligned`)."""
  if q.kind == "none":
    return a, None
  amax = _group_amax(a, gid, num_groups)                                        # [E + 1]
  if q.kind == "fp8":
    encode = _fp8.te_scale_from_amax(amax, q.fp8_format.max_value)              # [E + 1]
    t = _fp8.fp8_quantize(a, q.fp8_format, encode=encode[gid][:, None])
    return t.values.astype(jnp.bfloat16), 1.0 / encode
  v, _ = _nvfp4.nvfp4_scaled_values(a, axis=axis, block_2d=False, key=key if q.stochastic else None,
                                    batch_dims=0, global_amax=amax[gid][:, None])
  return v.astype(jnp.bfloat16), 1.0 / _nvfp4.global_encode_from_amax(amax)


def _scale_rows(y: jax.Array, gid: jax.Array, *decodes: jax.Array | None) -> jax.Array:
  """`y` [M, C] times each per-group decode scale ([E] or [E + 1]) of its row's group, in turn (as
  `quantized_einsum` applies them, so the products round the same way)."""
  for d in decodes:
    if d is not None:
      y = y * jnp.take(d, gid, mode="clip")[:, None]  # rows past the groups (gid E) are zero anyway
  return y


def _same_dtype(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  common = jnp.promote_types(a.dtype, b.dtype)
  return a.astype(common), b.astype(common)


def _aligned(a: jax.Array, gid: jax.Array, starts: jax.Array, group_sizes: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rows re-laid with each group zero-padded to a multiple of 16: (rows [M16, C], sizes [E], groups [M16]).

  M16 = round_up(M + E * 15, 16) is a static bound; rows past the groups are dropped."""
  rows, e = a.shape[0], group_sizes.shape[0]
  padded_sizes = -(-group_sizes // _BLOCK) * _BLOCK                              # [E]
  padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
  total = -(-(rows + e * (_BLOCK - 1)) // _BLOCK) * _BLOCK
  g = jnp.minimum(gid, e - 1)
  dest = jnp.where(gid < e, padded_starts[g] + jnp.arange(rows) - starts[g], total)
  out = jnp.zeros((total, a.shape[1]), a.dtype).at[dest].set(a, mode="drop")
  return out, padded_sizes.astype(group_sizes.dtype), _row_groups(padded_sizes, total)[0]


def _gemm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, backend: str) -> jax.Array:
  """[M, K] x [E, K, N] (grouped) -> f32 [M, N] on `backend` (see the module docstring)."""
  lhs, rhs = _same_dtype(lhs, rhs)
  if moe.resolve_backend(backend) == "pallas":
    return gmm_lib.gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)


def _wgrad_gemm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, backend: str) -> jax.Array:
  """x [M, K], dy [M, N] -> f32 [E, K, N]: x[rows e].T @ dy[rows e] per group, on `backend`."""
  x, dy = _same_dtype(x, dy)
  if moe.resolve_backend(backend) == "pallas":
    return gmm_lib.tgmm(x, dy, group_sizes, preferred_element_type=jnp.float32)
  return jax.lax.ragged_dot_general(x.T, dy, group_sizes, _WGRAD_DIMS, preferred_element_type=jnp.float32)


def _forward(x, w, group_sizes, recipe: GemmRecipe, backend: str) -> jax.Array:
  e = w.shape[0]
  gid, _ = _row_groups(group_sizes, x.shape[0])
  vx, sx = _prepare_rows(x, recipe.x_fwd, 1, gid, e, None)
  vw, sw = _dot._prepare(w, recipe.w_fwd, 1, None, False)  # pylint: disable=protected-access
  y = _gemm(vx, vw, group_sizes, backend)
  return _scale_rows(y, gid, sx, None if sw is None else sw.reshape(e))


def _backward(x, w, group_sizes, key, dy, recipe: GemmRecipe, backend: str) -> tuple[jax.Array, jax.Array]:
  e = w.shape[0]
  k_dgrad, k_wgrad = jax.random.split(key)
  gid, starts = _row_groups(group_sizes, x.shape[0])
  vdy, sdy = _prepare_rows(dy, recipe.dy_dgrad, 1, gid, e, k_dgrad)
  vw, sw = _dot._prepare(w, recipe.w_dgrad, 2, None, False)  # pylint: disable=protected-access
  dx = _gemm(vdy, jnp.swapaxes(vw, 1, 2), group_sizes, backend)
  dx = _scale_rows(dx, gid, sdy, None if sw is None else sw.reshape(e))

  xw, dyw, sizes, gw = x, dy, group_sizes, gid
  blocked = recipe.x_wgrad.kind == "nvfp4" or recipe.dy_wgrad.kind == "nvfp4"
  if blocked or recipe.x_wgrad.rht or recipe.dy_wgrad.rht:
    xw, sizes, gw = _aligned(x, gid, starts, group_sizes)
    dyw = _aligned(dy, gid, starts, group_sizes)[0]
  if recipe.x_wgrad.rht or recipe.dy_wgrad.rht:
    if recipe.x_wgrad.rht != recipe.dy_wgrad.rht:
      raise ValueError("RHT must be applied to both wgrad operands or to neither: "
                       f"{recipe.x_wgrad.rht=} {recipe.dy_wgrad.rht=}")
    xw = _hadamard.apply_rht(xw, recipe.rht_signs, axis=0)
    dyw = _hadamard.apply_rht(dyw, recipe.rht_signs, axis=0)
  vx, sx = _prepare_rows(xw, recipe.x_wgrad, 0, gw, e, None)
  vdy, sdy = _prepare_rows(dyw, recipe.dy_wgrad, 0, gw, e, k_wgrad)
  dw = _wgrad_gemm(vx, vdy, sizes, backend)                                     # [E, K, N]
  for s in (sx, sdy):
    if s is not None:
      dw = dw * s[:e, None, None]
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _qragged(x, w, group_sizes, key, recipe: GemmRecipe, backend: str) -> jax.Array:
  return _forward(x, w, group_sizes, recipe, backend)


def _qragged_fwd(x, w, group_sizes, key, recipe, backend):
  return _forward(x, w, group_sizes, recipe, backend), (x, w, group_sizes, key)


def _qragged_bwd(recipe, backend, residuals, dy):
  x, w, group_sizes, key = residuals
  dx, dw = _backward(x, w, group_sizes, key, dy.astype(jnp.float32), recipe, backend)
  return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_qragged.defvjp(_qragged_fwd, _qragged_bwd)


def quantized_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, recipe: GemmRecipe,
                         key: jax.Array | None = None, preferred_element_type=None, backend: str = "auto"
                         ) -> jax.Array:
  """`jax.lax.ragged_dot(lhs [M, K], rhs [E, K, N], group_sizes [E])` with quantized GEMM operands.

  Args:
    lhs: rows sorted by group (expert).
    rhs: one weight per group.
    group_sizes: rows per group; rows past their sum get zeros.
    recipe: operand quantization of the three GEMMs (see `n3jax.quant.gemm_recipe`).
    key: PRNG key for stochastic rounding; required when the recipe uses it.
    preferred_element_type: output dtype (None: the promoted input dtype).
    backend: the GEMMs' grouped matmul, "auto" | "pallas" | "ragged_dot" (module docstring).
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],) or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"quantized_ragged_dot needs lhs [M, K], rhs [E, K, N], group_sizes [E]; got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  if key is None:
    if recipe.needs_key:
      raise ValueError("This recipe uses stochastic rounding; pass a PRNG key")
    key = jax.random.key(0)
  # Inside shard_map the weights may vary over fewer mesh axes than the rows (experts split over `expert`,
  # tokens over `fsdp` too): give both one set, so the custom VJP's weight gradient is typed like its
  # primal and the reduction over the other axes is the transpose of this cast (as for a plain dot).
  lhs, rhs = match_vma(lhs, rhs)
  y = _qragged(lhs, rhs, group_sizes.astype(jnp.int32), key, recipe, backend)
  return y.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


@dataclasses.dataclass(frozen=True)
class QuantizedGroupedMatmul:
  """A `GroupedMatmul` (`pallas_kernels.moe`) for one expert layer: `quantized_ragged_dot` with its key.

  One instance serves both products of the layer (`moe_dispatch` calls it for the up and the down
  projection). Each call folds its weight's `(K, N)` into the key: the stochastic-rounding draws are a
  function of the key and the element index only (`_nvfp4._uniform`), so with one key the two gradients
  were rounded with the same draws wherever their indices overlap (correlated rounding errors). Up
  `[E, D, F]` and down `[E, F, D]` differ unless D == F.
  """
  recipe: GemmRecipe
  key: jax.Array | None = None
  backend: str = "auto"

  def __call__(self, lhs, rhs, group_sizes, *, preferred_element_type=None):
    key = self.key
    if key is not None and jnp.ndim(rhs) == 3:
      key = jax.random.fold_in(key, zlib.crc32(f"{rhs.shape[1]}x{rhs.shape[2]}".encode()) & 0x7FFFFFFF)
    return quantized_ragged_dot(lhs, rhs, group_sizes, recipe=self.recipe, key=key,
                                preferred_element_type=preferred_element_type, backend=self.backend)
