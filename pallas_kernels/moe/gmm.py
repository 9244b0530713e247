"""Grouped matmul (GMM) for routed experts: Pallas Triton kernels + custom_vjp.

Rows of ``lhs`` are sorted by group (expert); group ``g`` owns the contiguous
rows ``[offset[g], offset[g] + group_sizes[g])`` with ``offset`` the exclusive
cumsum of ``group_sizes``. Group sizes are data (known at run time only); all
shapes are static, so one compile serves every routing.

  gmm    out[m] = lhs[m] @ rhs[g(m)]     [M, K] x [E, K, N] -> [M, N]  forward
  gmm_t  out[m] = lhs[m] @ rhs[g(m)].T   [M, N] x [E, K, N] -> [M, K]  d_lhs
  tgmm   out[g] = lhs[g].T @ dy[g]       [M, K] x [M, N] -> [E, K, N]  d_rhs

Semantics follow ``jax.lax.ragged_dot``: rows past ``sum(group_sizes)`` give
zeros, an empty group gives a zero weight gradient, and ``gmm`` is
differentiable w.r.t. ``lhs`` and ``rhs`` (``jax.custom_vjp``: the backward is
one ``gmm_t`` and one ``tgmm``). Products accumulate in f32; outputs are in
``preferred_element_type`` (default: ``lhs.dtype``). The backward runs on
operands in ``lhs.dtype`` (the cotangent is cast to it, as a bf16 autograd
would), so bf16 in gives bf16 gradients.

Kernel scheme (forward and gmm_t), after megablox (jax's TPU GMM): the M axis is
cut into ``block_m`` row tiles; a "visit" is one (group, row tile) pair where
the group has rows in the tile. A tile shared by two groups is visited once
per group and each visit stores only its own rows (masked store), so no two
programs write the same row. Visits are listed by plain jnp code on device
before the kernel (``_visit_metadata``); their number is bounded by
``cdiv(M, block_m) + E`` (each group boundary adds at most one shared tile,
plus one pseudo group that zero-fills rows past the last group), which sizes
the static grid; unused visits exit at once. ``tgmm`` runs one program per
(group, K block, N block) and loops over the group's rows with a run-time trip
count. Rows, K and N need not be multiples of the tiles (masked loads/stores).

Einsum letters: M rows, K contraction, N output width, E groups (experts).

Platforms: ``gmm`` and ``tgmm`` run these Triton kernels on GPU (and in
Triton interpret mode on CPU), and the Mosaic TPU kernels of ``gmm_tpu.py``
(same contract, scalar-prefetched visit tables) when the target is a TPU:
``platform="tpu"``, the current abstract mesh's device (AOT lowering from a
host, ``jax.sharding.use_abstract_mesh``), or ``jax.default_backend()``.

Status: Triton -- verified in interpret mode on CPU and lowered to Triton IR
for an abstract H100 (gmm_test.py); compiled GPU runs, tile tuning and the
benchmark are owed. jax 0.12 warns that Pallas Triton is deprecated in favour
of Mosaic GPU; a Mosaic GPU port is the follow-up if the warning becomes a
removal. TPU -- verified in the Pallas TPU interpreter on CPU and lowered to
Mosaic for an abstract TPU v5e at the Nemotron 3 Nano expert shape
(gmm_tpu_test.py); compiled TPU runs and tile tuning are owed (see
``gmm_tpu.py``).

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
# Imported for its side effect only: it registers a config flag that Pallas
# otherwise registers lazily at the first interpret-mode lowering, which
# changes jax's trace context and makes every jitted caller retrace once
# (jax 0.12).
from jax.experimental.pallas import fuser as _  # pylint: disable=unused-import
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common
from pallas_kernels.moe import gmm_tpu

Array = jax.Array
DTypeLike = jax.typing.DTypeLike


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileSizes:
  """Tile shape and Triton launch options of one kernel (static)."""

  block_m: int = 64  # rows per tile (tgmm: rows per loop step)
  block_n: int = 128  # output columns per program
  block_k: int = 64  # contraction step (tgmm: output rows per program)
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      size = getattr(self, name)
      # Triton's tl.dot needs power-of-two blocks of at least 16.
      if size < 16 or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two >= 16.")
    if self.num_warps < 1 or self.num_stages < 1:
      raise ValueError(
          f"{self.num_warps=} and {self.num_stages=} must be >= 1."
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles of the three kernels; ``block_sizes_for`` picks them per device."""

  gmm: TileSizes = TileSizes()  # forward: lhs @ rhs[g]
  gmm_t: TileSizes = TileSizes()  # d_lhs: dy @ rhs[g].T
  tgmm: TileSizes = TileSizes(block_m=64, block_n=64, block_k=64)  # d_rhs


# Per device kind (``jax.Device.device_kind``). untuned: GPU tuning owed -- the
# values below are common Triton matmul defaults, not measured picks (next:
# sweep with ``benchmarks/moe.py --sweep``; try block_m 128, block_n 128/256,
# 8 warps on H100/H200).
_HOPPER_UNTUNED = BlockSizes(
    gmm=TileSizes(block_m=64, block_n=128, block_k=64, num_stages=4),
    gmm_t=TileSizes(block_m=64, block_n=128, block_k=64, num_stages=4),
    tgmm=TileSizes(block_m=64, block_n=64, block_k=64, num_stages=3),
)
# Tiles to sweep on Hopper (`benchmarks/moe.py --sweep`): (block_m, block_n, block_k, num_warps,
# num_stages). Each compiles for an H100 within its 227 KB of shared memory per block (tests/test_aot.py);
# (128, 256, 64, 8, 3) does not (240 KB), so the 128 x 256 tile has 2 stages.
HOPPER_CANDIDATE_TILES = (
    (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
    (128, 256, 64, 8, 2), (64, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
)
_BLOCK_SIZES_BY_DEVICE_KIND: dict[str, BlockSizes] = {
    "NVIDIA H100 80GB HBM3": _HOPPER_UNTUNED,  # untuned: GPU tuning owed
    "NVIDIA H200": _HOPPER_UNTUNED,  # untuned: GPU tuning owed
}
_DEFAULT_BLOCK_SIZES = BlockSizes()  # untuned: GPU tuning owed.


def block_sizes_for(device_kind: str | None = None) -> BlockSizes:
  """Block sizes for a device kind (default: the abstract mesh's device, AOT, else the first local one)."""
  return common.for_device_kind(_BLOCK_SIZES_BY_DEVICE_KIND, _DEFAULT_BLOCK_SIZES, device_kind)


def _resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret on CPU (no Triton there), compile on GPU (the target: the abstract mesh's device, AOT,
  else the default backend)."""
  backend = common.abstract_platform() or jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend not in ("gpu", "cuda", "rocm"):
    raise NotImplementedError(
        f"The GMM kernel is Pallas Triton (GPU only); {backend=!r}. Pass"
        " interpret=True, or use moe_dispatch(backend='ragged_dot')."
    )
  return interpret


def _tpu_block_sizes(block_sizes) -> gmm_tpu.BlockSizes | None:
  if block_sizes is not None and not isinstance(
      block_sizes, gmm_tpu.BlockSizes
  ):
    raise TypeError(
        "The TPU kernels take gmm_tpu.BlockSizes, got"
        f" {type(block_sizes).__name__}."
    )
  return block_sizes


def _dot_precision(dtype: DTypeLike) -> jax.lax.Precision | None:
  # f32 operands: full-precision dot (no TF32), to match ragged_dot on f32.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------
# Visit metadata (plain jnp, runs on device before the kernel).
# ----------------------------------------------------------------------------


def _visit_metadata(
    group_sizes: Array, num_rows: int, block_m: int
) -> tuple[Array, Array, Array, Array]:
  """Per visit: (group id, row tile, first row, end row), each [V] int32.

  Group id E is the zero-fill pseudo group (rows past the last group); -1
  marks an unused visit. V = cdiv(num_rows, block_m) + E.
  """
  num_groups = group_sizes.shape[0]
  lo, hi = common.group_bounds(group_sizes, num_rows, with_tail=True)  # [E + 1]
  first_tile = lo // block_m
  num_tiles = jnp.where(hi > lo, (hi + block_m - 1) // block_m - first_tile, 0)
  max_visits = pl.cdiv(num_rows, block_m) + num_groups
  visit_start = jnp.cumsum(num_tiles) - num_tiles  # [E + 1] exclusive cumsum
  gid = jnp.repeat(
      jnp.arange(num_groups + 1, dtype=jnp.int32),
      num_tiles,
      total_repeat_length=max_visits,
  )  # [V]
  visit = jnp.arange(max_visits, dtype=jnp.int32)
  used = visit < jnp.sum(num_tiles)
  tile = first_tile[gid] + visit - visit_start[gid]
  return (
      jnp.where(used, gid, -1),
      jnp.where(used, tile, 0),
      jnp.where(used, lo[gid], 0),
      jnp.where(used, hi[gid], 0),
  )


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------


def _gmm_kernel(
    gid_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref,
    *, num_groups, k_dim, n_dim, block_m, block_n, block_k, transpose_rhs,
    precision,
):
  """One (N block, visit): out[rows of the visit, N block]."""
  n_block, visit = pl.program_id(0), pl.program_id(1)
  g, row0 = gid_ref[visit], tile_ref[visit] * block_m
  rows = row0 + jnp.arange(block_m, dtype=jnp.int32)
  row_mask = (rows >= lo_ref[visit]) & (rows < hi_ref[visit])  # [bm]
  n0 = n_block * block_n
  col_mask = n0 + jnp.arange(block_n, dtype=jnp.int32) < n_dim  # [bn]
  out_mask = row_mask[:, None] & col_mask[None, :]  # [bm, bn]
  out_block = out_ref.at[pl.ds(row0, block_m), pl.ds(n0, block_n)]

  @pl.when((g >= 0) & (g < num_groups))
  def _compute():
    def body(kb, acc):
      k0 = kb * block_k
      ks = k0 + jnp.arange(block_k, dtype=jnp.int32)
      k_mask = ks < k_dim  # [bk]
      x = plgpu.load(
          lhs_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
          mask=row_mask[:, None] & k_mask[None, :], other=0.0,
      )  # [bm, bk]
      if transpose_rhs:  # rhs[g] is [N, K] here: x @ w.T
        w = plgpu.load(
            rhs_ref.at[g, pl.ds(n0, block_n), pl.ds(k0, block_k)],
            mask=col_mask[:, None] & k_mask[None, :], other=0.0,
        )  # [bn, bk]
      else:
        w = plgpu.load(
            rhs_ref.at[g, pl.ds(k0, block_k), pl.ds(n0, block_n)],
            mask=k_mask[:, None] & col_mask[None, :], other=0.0,
        )  # [bk, bn]
      return acc + plgpu.dot(x, w, trans_b=transpose_rhs, precision=precision)

    acc = jax.lax.fori_loop(
        0, pl.cdiv(k_dim, block_k), body,
        jnp.zeros((block_m, block_n), jnp.float32),
    )
    plgpu.store(out_block, acc.astype(out_ref.dtype), mask=out_mask)

  @pl.when(g == num_groups)
  def _zero_fill():  # rows past sum(group_sizes): zeros, like ragged_dot
    plgpu.store(
        out_block, jnp.zeros((block_m, block_n), out_ref.dtype), mask=out_mask
    )


def _tgmm_kernel(
    lo_ref, hi_ref, lhs_ref, dy_ref, out_ref,
    *, k_dim, n_dim, block_m, block_n, block_k, precision,
):
  """One (N block, K block, group): out[g, K block, N block]."""
  n_block, k_block, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[g], hi_ref[g]
  ks = k_block * block_k + jnp.arange(block_k, dtype=jnp.int32)
  k_mask = ks < k_dim  # [bk]
  ns = n_block * block_n + jnp.arange(block_n, dtype=jnp.int32)
  n_mask = ns < n_dim  # [bn]

  def body(step, acc):
    row0 = lo + step * block_m
    row_mask = row0 + jnp.arange(block_m, dtype=jnp.int32) < hi  # [bm]
    x = plgpu.load(
        lhs_ref.at[pl.ds(row0, block_m), pl.ds(k_block * block_k, block_k)],
        mask=row_mask[:, None] & k_mask[None, :], other=0.0,
    )  # [bm, bk]
    dy = plgpu.load(
        dy_ref.at[pl.ds(row0, block_m), pl.ds(n_block * block_n, block_n)],
        mask=row_mask[:, None] & n_mask[None, :], other=0.0,
    )  # [bm, bn]
    return acc + plgpu.dot(x, dy, trans_a=True, precision=precision)

  num_steps = jax.lax.div(hi - lo + block_m - 1, block_m)  # 0 for empty groups
  acc = jax.lax.fori_loop(
      0, num_steps, body, jnp.zeros((block_k, block_n), jnp.float32)
  )
  plgpu.store(
      out_ref.at[g, pl.ds(k_block * block_k, block_k),
                 pl.ds(n_block * block_n, block_n)],
      acc.astype(out_ref.dtype),
      mask=k_mask[:, None] & n_mask[None, :],
  )


# ----------------------------------------------------------------------------
# pallas_call wrappers (no autodiff).
# ----------------------------------------------------------------------------


def _gmm_call(
    lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool,
    out_dtype: DTypeLike, tiles: TileSizes, interpret: bool,
) -> Array:
  """[M, K] x [E, K, N] -> [M, N], or (transpose_rhs) [M, N] x .. -> [M, K]."""
  num_rows, k_dim = lhs.shape
  num_groups = rhs.shape[0]
  n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if num_rows == 0 or n_dim == 0:
    return jnp.zeros((num_rows, n_dim), out_dtype)
  gid, tile, lo, hi = _visit_metadata(group_sizes, num_rows, tiles.block_m)
  kernel = functools.partial(
      _gmm_kernel, num_groups=num_groups, k_dim=k_dim, n_dim=n_dim,
      block_m=tiles.block_m, block_n=tiles.block_n, block_k=tiles.block_k,
      transpose_rhs=transpose_rhs, precision=_dot_precision(lhs.dtype),
  )
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_rows, n_dim), out_dtype, lhs),
      # N blocks vary fastest: the programs of one row tile run together and
      # share its lhs tile in L2.
      grid=(pl.cdiv(n_dim, tiles.block_n), gid.shape[0]),
      compiler_params=plgpu.CompilerParams(
          num_warps=tiles.num_warps, num_stages=tiles.num_stages
      ),
      interpret=interpret,
      name="gmm_t" if transpose_rhs else "gmm",
  )(gid, tile, lo, hi, lhs, rhs)


def _tgmm_call(
    lhs: Array, dy: Array, group_sizes: Array, *, out_dtype: DTypeLike,
    tiles: TileSizes, interpret: bool,
) -> Array:
  """[M, K], [M, N] -> [E, K, N] with out[g] = lhs[rows g].T @ dy[rows g]."""
  num_rows, k_dim = lhs.shape
  n_dim = dy.shape[1]
  num_groups = group_sizes.shape[0]
  if num_rows == 0 or k_dim == 0 or n_dim == 0:
    return jnp.zeros((num_groups, k_dim, n_dim), out_dtype)
  lo, hi = common.group_bounds(group_sizes, num_rows)
  kernel = functools.partial(
      _tgmm_kernel, k_dim=k_dim, n_dim=n_dim, block_m=tiles.block_m,
      block_n=tiles.block_n, block_k=tiles.block_k,
      precision=_dot_precision(lhs.dtype),
  )
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_groups, k_dim, n_dim), out_dtype, lhs),
      grid=(pl.cdiv(n_dim, tiles.block_n), pl.cdiv(k_dim, tiles.block_k),
            num_groups),
      compiler_params=plgpu.CompilerParams(
          num_warps=tiles.num_warps, num_stages=tiles.num_stages
      ),
      interpret=interpret,
      name="tgmm",
  )(lo, hi, lhs, dy)


# ----------------------------------------------------------------------------
# Differentiable gmm.
# ----------------------------------------------------------------------------


_gmm = common.differentiable_gmm(_gmm_call, _tgmm_call)


def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    block_sizes: BlockSizes | gmm_tpu.BlockSizes | None = None,
    interpret: gmm_tpu.Interpret | None = None,
    platform: str | None = None,
) -> Array:
  """Grouped matmul, a drop-in for ``jax.lax.ragged_dot`` (2-D lhs, 3-D rhs).

  out[m] = lhs[m] @ rhs[g] for the group g whose rows contain m; rows past
  sum(group_sizes) are zero. Differentiable w.r.t. lhs and rhs.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one weight matrix per group; same dtype as lhs.
    group_sizes: [E] integer rows per group (run-time values; sum <= M).
    preferred_element_type: Output dtype (default lhs.dtype). Products always
      accumulate in f32.
    block_sizes: Tiles (static); default ``block_sizes_for()`` the device.
      The TPU kernels take a ``gmm_tpu.BlockSizes``.
    interpret: Run the kernels in Pallas interpret mode. None: interpret on
      CPU, compile on GPU or TPU (or for an abstract TPU mesh).
    platform: "tpu" for the Mosaic TPU kernels (``gmm_tpu.py``), "gpu" (or
      "cuda", "rocm") for the Triton ones; None picks by the abstract mesh's device, else by
      ``jax.default_backend()`` (see ``_gmm_common.kernel_platform``).

  Returns:
    [M, N] in preferred_element_type (or lhs.dtype).
  """
  if common.kernel_platform(platform) == "tpu":
    return gmm_tpu.gmm(
        lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
        block_sizes=_tpu_block_sizes(block_sizes), interpret=interpret,
    )
  common.validate_gmm(lhs, rhs, group_sizes)
  if block_sizes is None:
    block_sizes = block_sizes_for()
  lhs, rhs, group_sizes = common.match_vma(
      lhs, rhs, group_sizes.astype(jnp.int32)
  )
  return _gmm(
      lhs, rhs, group_sizes, common.out_dtype(lhs, preferred_element_type),
      block_sizes, _resolve_interpret(interpret),
  )


def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    block_sizes: BlockSizes | gmm_tpu.BlockSizes | None = None,
    interpret: gmm_tpu.Interpret | None = None,
    platform: str | None = None,
) -> Array:
  """Transposed grouped matmul: out[g] = lhs[rows g].T @ dy[rows g], [E, K, N].

  The weight gradient of ``gmm``; empty groups give zeros. Not differentiable.
  lhs [M, K] and dy [M, N] share one dtype; output in preferred_element_type
  (default lhs.dtype), accumulated in f32. ``block_sizes``, ``interpret`` and
  ``platform`` as in ``gmm``.
  """
  if common.kernel_platform(platform) == "tpu":
    return gmm_tpu.tgmm(
        lhs, dy, group_sizes, preferred_element_type=preferred_element_type,
        block_sizes=_tpu_block_sizes(block_sizes), interpret=interpret,
    )
  common.validate_tgmm(lhs, dy, group_sizes)
  if block_sizes is None:
    block_sizes = block_sizes_for()
  lhs, dy, group_sizes = common.match_vma(
      lhs, dy, group_sizes.astype(jnp.int32)
  )
  return _tgmm_call(
      lhs, dy, group_sizes,
      out_dtype=common.out_dtype(lhs, preferred_element_type),
      tiles=block_sizes.tgmm, interpret=_resolve_interpret(interpret),
  )
