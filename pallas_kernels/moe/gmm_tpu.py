"""Grouped matmul (GMM) for routed experts on TPU: Pallas Mosaic + custom_vjp.

The TPU twin of the Triton kernels in ``gmm.py``, with the same contract and
signatures; ``gmm.gmm`` / ``gmm.tgmm`` dispatch here when the target is a TPU.
Rows of ``lhs`` are sorted by group (expert); group ``g`` owns the rows
``[offset[g], offset[g] + group_sizes[g])``. Group sizes are run-time data;
shapes are static, so one compile serves every routing.

  gmm    out[m] = lhs[m] @ rhs[g(m)]     [M, K] x [E, K, N] -> [M, N]  forward
  gmm_t  out[m] = lhs[m] @ rhs[g(m)].T   [M, N] x [E, K, N] -> [M, K]  d_lhs
  tgmm   out[g] = lhs[g].T @ dy[g]       [M, K] x [M, N] -> [E, K, N]  d_rhs

Semantics follow ``jax.lax.ragged_dot``: rows past ``sum(group_sizes)`` give
zeros, an empty group gives a zero weight gradient. Products accumulate in an
f32 VMEM scratch; outputs are in ``preferred_element_type`` (default
``lhs.dtype``); the backward runs on operands in ``lhs.dtype``.

Kernel scheme (after megablox, jax's TPU GMM; our own code). The row axis is
cut into ``block_m`` tiles and a "visit" is one (group, row tile) pair where
the group has rows in the tile. Plain jnp code lists the visits on device
(``_gmm_visits``, ``_tgmm_visits``); ``pltpu.PrefetchScalarGridSpec`` puts the
tables in SMEM before the grid starts, the BlockSpec index maps read them to
pick each step's blocks, and their count is the grid's dynamic bound.

* gmm / gmm_t: grid (N blocks, visits, K blocks). A row tile shared by two
  groups gets one visit per group; the visits are consecutive and keep the
  same output block index, so Pallas holds the block in VMEM between them
  and writes it back once; each visit merges only its own rows (masked
  select; a visit that owns its whole tile stores plainly). A pseudo group E
  stores zeros on rows past the last group, keeping the previous visit's
  input block indices so that no input DMA is issued for it.
* tgmm: grid (N blocks, K blocks, visits), visits ordered by group. The f32
  accumulator [block_k, block_n] is zeroed at a group's first visit and
  stored to out[g] at its last; an empty group gets one visit that stores
  zeros. Rows of a tile outside the group are zeroed in both operands (tiles
  inside the group skip the mask).
* Ragged edges: M, K and N need not be multiples of the tiles. Edge blocks
  read unspecified values past the array (interpret mode: NaN) and Pallas
  drops writes past it; the last K block of gmm is zeroed past K in both
  operands because K is contracted. A dimension smaller than its tile runs as
  one full-size block.

Einsum letters: M rows, K contraction, N output width, E groups (experts).

Status: verified on CPU only, with no TPU available:
* Pallas TPU interpreter (gmm_tpu_test.py): forward and both gradients vs
  ``jax.lax.ragged_dot`` and a dense one-hot oracle, f32 and bf16, empty and
  single-row groups, rows past the last group, M, K, N off the tiles, and
  the MoE layer (sorted_dispatch) on these kernels. The interpreter models
  the pipeline (input copies on index change, output write-back on index
  change, NaN-filled buffers and edge padding) and rejects non-consecutive
  output revisits.
* Lowering to Mosaic for an abstract "TPU v5 lite" at the Nemotron 3 Nano
  expert shapes, forward + backward, bf16 and f32, and inside shard_map on
  a 2-device abstract mesh.
  Lowering on the host stops at the serialized Mosaic module: Mosaic's own
  passes (layout, VMEM allocation) run inside libtpu at compile time.
Owed (needs a TPU): a compiled run (``GmmTpuTest``), in particular of the
partial edge blocks and the bf16 selects on v5e; that the tiles fit VMEM
(``_vmem_bytes`` is an estimate); tile tuning per device kind and a
benchmark against ``jax.lax.ragged_dot`` / megablox. Known limit: jax 0.12's
interpreters reject the scalar-prefetch index maps inside
``shard_map(check_vma=True)`` (varying tables mixed with grid indices); with
``check_vma=False`` they run, and compiled lowering is unaffected.

This module imports only jax (it is part of ``pallas_kernels``).
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common

Array = jax.Array
DTypeLike = jax.typing.DTypeLike
Interpret = bool | pltpu.InterpretParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileSizes:
  """Tile shape of one Mosaic kernel (static).

  A dimension smaller than its tile runs as one block of its full size.
  """

  block_m: int = 512  # rows per tile (tgmm: rows per contraction step)
  block_k: int = 512  # contraction step (tgmm: output rows per block)
  block_n: int = 1024  # output columns per block

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_n"):
      size = getattr(self, name)
      # Mosaic tiles VMEM in (8, 128) (bf16: (16, 128)) and every tile ends up
      # on the lane axis in one of the kernels (tgmm contracts block_m).
      if size <= 0 or size % 128:
        raise ValueError(f"{name}={size} must be a positive multiple of 128.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles of the three kernels; ``block_sizes_for`` picks them per device."""

  gmm: TileSizes = TileSizes()  # forward: lhs @ rhs[g]
  gmm_t: TileSizes = TileSizes()  # d_lhs: dy @ rhs[g].T
  tgmm: TileSizes = TileSizes()  # d_rhs: lhs[g].T @ dy[g]


# Per device kind (``jax.Device.device_kind``). untuned: TPU tuning owed --
# these are megablox/MaxText-style picks sized to stay under the default
# scoped VMEM (16 MiB on v5e/v5p, 32 MiB on v6e) even for f32 operands (the
# default tiles need ~7 MiB in bf16, ~12 MiB in f32; see
# ``_vmem_bytes``), not measured ones. Next: sweep block_m 256..1024,
# block_k 512/1024 and block_n 512..2048 per kind at the Nano shapes.
_V5_UNTUNED = BlockSizes()
_V6_UNTUNED = BlockSizes(  # 256-wide MXU, 32 MiB default scoped VMEM
    gmm=TileSizes(block_m=512, block_k=1024, block_n=1024),
    gmm_t=TileSizes(block_m=512, block_k=1024, block_n=1024),
    tgmm=TileSizes(block_m=512, block_k=1024, block_n=1024),
)
_BLOCK_SIZES_BY_DEVICE_KIND: dict[str, BlockSizes] = {
    "TPU v4": _V5_UNTUNED,  # untuned: TPU tuning owed
    "TPU v5 lite": _V5_UNTUNED,  # v5e; untuned: TPU tuning owed
    "TPU v5": _V5_UNTUNED,  # v5p (older jax); untuned: TPU tuning owed
    "TPU v5p": _V5_UNTUNED,  # untuned: TPU tuning owed
    "TPU v6 lite": _V6_UNTUNED,  # v6e; untuned: TPU tuning owed
}
_DEFAULT_BLOCK_SIZES = BlockSizes()  # untuned: TPU tuning owed.


def block_sizes_for(device_kind: str | None = None) -> BlockSizes:
  """Block sizes for a device kind (default: the abstract mesh's device, AOT, else the first local one)."""
  return common.for_device_kind(_BLOCK_SIZES_BY_DEVICE_KIND, _DEFAULT_BLOCK_SIZES, device_kind)


def targets_tpu() -> bool:
  """True when jitted code here compiles for a TPU (local or abstract mesh)."""
  return (
      common.abstract_platform() == "tpu" or jax.default_backend() == "tpu"
  )


def _resolve_interpret(interpret: Interpret | None) -> Interpret:
  """Compile (False) or the TPU interpreter (``pltpu.InterpretParams``).

  None: compile when targeting a TPU, else interpret. True means
  ``pltpu.InterpretParams()``: unlike the generic interpreter it models the
  TPU pipeline (input blocks copied only when their index changes, an output
  block written back only when it changes, fresh buffers full of NaN) and
  raises on a non-consecutive revisit of an output block, which is what the
  shared-tile scheme relies on.
  """
  if interpret is None:
    interpret = not targets_tpu()
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def _check_dtypes(operand: DTypeLike, out: DTypeLike) -> None:
  # What the MXU path of these kernels takes (as megablox).
  for name, dtype in (("operand", operand), ("output", out)):
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"TPU gmm needs f32 or bf16, got {name} {dtype=}.")


def _dot_precision(dtype: DTypeLike) -> lax.Precision | None:
  # f32 operands: full-precision MXU passes (fp32 contract precision), to
  # match ragged_dot on f32.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------
# Visit tables (plain jnp, run on device before the kernel).
# ----------------------------------------------------------------------------


def _row_bounds(group_sizes: Array, num_rows: int) -> Array:
  """[E + 2] row bounds: group g is [b[g], b[g+1]); "group" E is the tail."""
  ends = jnp.clip(jnp.cumsum(group_sizes.astype(jnp.int32)), 0, num_rows)
  return jnp.concatenate([
      jnp.zeros((1,), jnp.int32), ends, jnp.full((1,), num_rows, jnp.int32)
  ])


def _repeat_visits(
    counts: Array, first_tile: Array, max_visits: int, num_tiles: int
) -> tuple[Array, Array]:
  """Group id and row tile of each visit, groups in order: two [V] int32."""
  gid = jnp.repeat(
      jnp.arange(counts.shape[0], dtype=jnp.int32), counts,
      total_repeat_length=max_visits,
  )  # [V]; padded with the last group (never run: the grid stops earlier)
  visit_start = jnp.cumsum(counts) - counts  # exclusive cumsum
  visit = jnp.arange(max_visits, dtype=jnp.int32)
  tile = jnp.clip(first_tile[gid] + visit - visit_start[gid], 0, num_tiles - 1)
  return gid, tile


def _gmm_visits(
    group_sizes: Array, num_rows: int, block_m: int
) -> tuple[tuple[Array, ...], Array]:
  """Scalar-prefetch tables of gmm / gmm_t and the number of visits.

  Returns ((bounds [E + 2], gid [V], tile [V], src_gid [V], src_tile [V]),
  num_visits []) with V = cdiv(num_rows, block_m) + E: the E + 1 row ranges
  (groups and the zero-fill tail) cover cdiv(num_rows, block_m) tiles, and
  each of the E inner boundaries adds at most one shared tile. gid E marks a
  zero-fill visit; src_gid / src_tile are the blocks a visit reads (a
  zero-fill visit repeats the last real visit's, so no input DMA is issued).
  """
  num_groups = group_sizes.shape[0]
  num_tiles = pl.cdiv(num_rows, block_m)
  bounds = _row_bounds(group_sizes, num_rows)
  lo, hi = bounds[:-1], bounds[1:]  # [E + 1]
  first_tile = lo // block_m
  counts = jnp.where(hi > lo, pl.cdiv(hi, block_m) - first_tile, 0)
  gid, tile = _repeat_visits(counts, first_tile, num_tiles + num_groups,
                             num_tiles)
  visit = jnp.arange(gid.shape[0], dtype=jnp.int32)
  last_real = lax.cummax(jnp.where(gid < num_groups, visit, -1))  # [V]
  src = jnp.maximum(last_real, 0)
  src_gid = jnp.where(last_real >= 0, gid[src], 0)
  src_tile = jnp.where(last_real >= 0, tile[src], 0)
  return (bounds, gid, tile, src_gid, src_tile), jnp.sum(counts)


def _tgmm_visits(
    group_sizes: Array, num_rows: int, block_m: int
) -> tuple[tuple[Array, ...], Array]:
  """Scalar-prefetch tables of tgmm and the number of visits.

  Returns ((bounds [E + 2], gid [V], tile [V]), num_visits []) with
  V = cdiv(num_rows, block_m) + E. Every group gets at least one visit (an
  empty one stores zeros) on the tile of the visit before it, so that its
  inputs are not fetched again. Rows past the last group are not visited.
  """
  num_groups = group_sizes.shape[0]
  num_tiles = pl.cdiv(num_rows, block_m)
  bounds = _row_bounds(group_sizes, num_rows)
  lo, hi = bounds[:num_groups], bounds[1:num_groups + 1]  # [E]
  nonempty = hi > lo
  first_tile = jnp.where(
      nonempty, lo // block_m, jnp.maximum(lo - 1, 0) // block_m
  )
  counts = jnp.where(nonempty, pl.cdiv(hi, block_m) - lo // block_m, 1)
  gid, tile = _repeat_visits(counts, first_tile, num_tiles + num_groups,
                             num_tiles)
  return (bounds, gid, tile), jnp.sum(counts)


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------


def _keep(x: Array, axis: int, start, lo, hi) -> Array:
  """x where lo <= start + (index along axis) < hi, else 0.

  The select runs in f32 (no bf16 VPU on v5e and older).
  """
  index = start + lax.broadcasted_iota(jnp.int32, x.shape, axis)
  keep = (index >= lo) & (index < hi)
  return jnp.where(keep, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _gmm_kernel(
    bounds_ref, gid_ref, tile_ref, src_gid_ref, src_tile_ref,  # SMEM tables
    lhs_ref, rhs_ref, out_ref, acc_ref,
    *, num_groups, k_rem, transpose_rhs, precision,
):
  """One (N block, visit, K block) step: acc += lhs tile @ rhs[g] block."""
  del src_gid_ref, src_tile_ref  # used by the index maps only
  visit, k_block = pl.program_id(1), pl.program_id(2)
  last_k = pl.num_programs(2) - 1
  g = gid_ref[visit]

  @pl.when(k_block == 0)
  def _zero_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def accumulate(mask_k: bool):
    x = lhs_ref[...]  # [bm, bk]
    w = rhs_ref[...]  # [bk, bn] (transpose_rhs: [bn, bk])
    if mask_k:  # last K block: columns past K hold garbage in both operands
      x = _keep(x, 1, 0, 0, k_rem)
      w = _keep(w, 1 if transpose_rhs else 0, 0, 0, k_rem)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))
    acc_ref[...] += lax.dot_general(
        x, w, (contract, ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )  # [bm, bn]

  is_real = g < num_groups  # else zero-fill: acc stays 0
  if k_rem:
    pl.when(is_real & (k_block == last_k))(lambda: accumulate(True))
    pl.when(is_real & (k_block != last_k))(lambda: accumulate(False))
  else:
    pl.when(is_real)(lambda: accumulate(False))

  block_m, block_n = out_ref.shape
  row0, lo, hi = tile_ref[visit] * block_m, bounds_ref[g], bounds_ref[g + 1]
  whole = (lo <= row0) & (row0 + block_m <= hi)  # the visit owns its tile

  @pl.when((k_block == last_k) & whole)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  @pl.when((k_block == last_k) & jnp.logical_not(whole))
  def _store_rows():  # shared or edge tile: only this visit's rows
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
    mine = (rows >= lo) & (rows < hi)
    out_ref[...] = jnp.where(
        mine, acc_ref[...], out_ref[...].astype(jnp.float32)
    ).astype(out_ref.dtype)


def _tgmm_kernel(
    bounds_ref, gid_ref, tile_ref,  # SMEM tables
    lhs_ref, dy_ref, out_ref, acc_ref, *, precision,
):
  """One (N block, K block, visit) step: acc += lhs tile.T @ dy tile."""
  visit, last = pl.program_id(2), pl.num_programs(2) - 1
  g = gid_ref[visit]
  lo, hi = bounds_ref[g], bounds_ref[g + 1]
  first_visit = (visit == 0) | (gid_ref[jnp.maximum(visit - 1, 0)] != g)
  last_visit = (visit == last) | (gid_ref[jnp.minimum(visit + 1, last)] != g)

  @pl.when(first_visit)
  def _zero_acc():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  block_m = lhs_ref.shape[0]
  row0 = tile_ref[visit] * block_m
  whole = (lo <= row0) & (row0 + block_m <= hi)  # the group owns the tile

  def accumulate(mask_rows: bool):
    x = lhs_ref[...]  # [bm, bk]
    dy = dy_ref[...]  # [bm, bn]
    if mask_rows:  # rows of other groups, or past M (garbage): zero in both
      x = _keep(x, 0, row0, lo, hi)
      dy = _keep(dy, 0, row0, lo, hi)
    acc_ref[...] += lax.dot_general(
        x, dy, (((0,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
    )  # [bm, bk]^T [bm, bn] -> [bk, bn]

  pl.when(whole)(lambda: accumulate(False))
  pl.when((hi > lo) & jnp.logical_not(whole))(lambda: accumulate(True))

  @pl.when(last_visit)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers (no autodiff).
# ----------------------------------------------------------------------------

_DEFAULT_SCOPED_VMEM = 16 * 1024 * 1024  # v5e / v5p default scoped VMEM limit


def _vmem_bytes(
    in_blocks: tuple[tuple[int, int], ...], out_block: tuple[int, int],
    itemsize: int, out_itemsize: int,
) -> int:
  """VMEM of one call: double-buffered blocks + the f32 accumulator."""
  size = lambda block: block[0] * block[1]
  return (2 * sum(map(size, in_blocks)) * itemsize
          + 2 * size(out_block) * out_itemsize + 4 * size(out_block))


def _compiler_params(vmem_bytes: int) -> pltpu.CompilerParams:
  # Raise the scoped VMEM limit only for tiles that need more than the
  # default (a 25% margin for Mosaic's internal scratch).
  limit = None if vmem_bytes <= _DEFAULT_SCOPED_VMEM else vmem_bytes * 5 // 4
  return pltpu.CompilerParams(
      # N blocks are independent (megacore splits them); the visit and K axes
      # carry the accumulator and the shared output tiles.
      dimension_semantics=("parallel", "arbitrary", "arbitrary"),
      vmem_limit_bytes=limit,
  )


def _gmm_call(
    lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool,
    out_dtype: DTypeLike, tiles: TileSizes, interpret: Interpret,
) -> Array:
  """[M, K] x [E, K, N] -> [M, N], or (transpose_rhs) [M, N] x .. -> [M, K]."""
  num_rows, k_dim = lhs.shape
  num_groups = rhs.shape[0]
  n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if 0 in (num_rows, k_dim, n_dim, num_groups):
    return jnp.zeros((num_rows, n_dim), out_dtype)
  block_m = min(tiles.block_m, num_rows)
  block_k = min(tiles.block_k, k_dim)
  block_n = min(tiles.block_n, n_dim)
  tables, num_visits = _gmm_visits(group_sizes, num_rows, block_m)
  last_k = pl.cdiv(k_dim, block_k) - 1

  # Index maps: grid indices (n, v, k), then the SMEM tables. A zero-fill
  # visit reads the blocks of the last step of the last real visit.
  def input_k(k, gid, v):
    return jnp.where(gid[v] < num_groups, k, last_k)

  def lhs_map(n, v, k, bounds, gid, tile, src_gid, src_tile):
    del n, bounds, tile, src_gid
    return src_tile[v], input_k(k, gid, v)

  def rhs_map(n, v, k, bounds, gid, tile, src_gid, src_tile):
    del bounds, tile, src_tile
    k = input_k(k, gid, v)
    return (src_gid[v], n, k) if transpose_rhs else (src_gid[v], k, n)

  def out_map(n, v, k, bounds, gid, tile, src_gid, src_tile):
    del k, bounds, gid, src_gid, src_tile
    return tile[v], n

  rhs_block = (block_n, block_k) if transpose_rhs else (block_k, block_n)
  kernel = functools.partial(
      _gmm_kernel, num_groups=num_groups, k_rem=k_dim % block_k,
      transpose_rhs=transpose_rhs, precision=_dot_precision(lhs.dtype),
  )
  itemsize, out_itemsize = lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize
  max_visits = tables[1].shape[0]
  cost = pl.CostEstimate(
      flops=2 * num_rows * k_dim * n_dim,
      # lhs once per N block, one [K, N] weight per visit, out once.
      bytes_accessed=(num_rows * k_dim * pl.cdiv(n_dim, block_n)
                      + max_visits * k_dim * n_dim) * itemsize
      + num_rows * n_dim * out_itemsize,
      transcendentals=0,
  )
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_rows, n_dim), out_dtype, lhs),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(tables),
          grid=(pl.cdiv(n_dim, block_n), num_visits, last_k + 1),
          in_specs=[
              pl.BlockSpec((block_m, block_k), lhs_map),
              pl.BlockSpec((pl.Squeezed(), *rhs_block), rhs_map),
          ],
          out_specs=pl.BlockSpec((block_m, block_n), out_map),
          scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
      ),
      compiler_params=_compiler_params(_vmem_bytes(
          ((block_m, block_k), rhs_block), (block_m, block_n), itemsize,
          out_itemsize,
      )),
      cost_estimate=cost,
      interpret=interpret,
      name="gmm_t" if transpose_rhs else "gmm",
  )(*tables, lhs, rhs)


def _tgmm_call(
    lhs: Array, dy: Array, group_sizes: Array, *, out_dtype: DTypeLike,
    tiles: TileSizes, interpret: Interpret,
) -> Array:
  """[M, K], [M, N] -> [E, K, N] with out[g] = lhs[rows g].T @ dy[rows g]."""
  num_rows, k_dim = lhs.shape
  n_dim = dy.shape[1]
  num_groups = group_sizes.shape[0]
  if 0 in (num_rows, k_dim, n_dim, num_groups):
    return jnp.zeros((num_groups, k_dim, n_dim), out_dtype)
  block_m = min(tiles.block_m, num_rows)
  block_k = min(tiles.block_k, k_dim)
  block_n = min(tiles.block_n, n_dim)
  tables, num_visits = _tgmm_visits(group_sizes, num_rows, block_m)

  # Index maps: grid indices (n, k, v), then the SMEM tables.
  def lhs_map(n, k, v, bounds, gid, tile):
    del n, bounds, gid
    return tile[v], k

  def dy_map(n, k, v, bounds, gid, tile):
    del k, bounds, gid
    return tile[v], n

  def out_map(n, k, v, bounds, gid, tile):
    del bounds, tile
    return gid[v], k, n

  itemsize, out_itemsize = lhs.dtype.itemsize, jnp.dtype(out_dtype).itemsize
  cost = pl.CostEstimate(
      flops=2 * num_rows * k_dim * n_dim,
      bytes_accessed=(num_rows * k_dim * pl.cdiv(n_dim, block_n)
                      + num_rows * n_dim * pl.cdiv(k_dim, block_k)) * itemsize
      + num_groups * k_dim * n_dim * out_itemsize,
      transcendentals=0,
  )
  return pl.pallas_call(
      functools.partial(_tgmm_kernel, precision=_dot_precision(lhs.dtype)),
      out_shape=common.out_struct(
          (num_groups, k_dim, n_dim), out_dtype, lhs
      ),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(tables),
          grid=(pl.cdiv(n_dim, block_n), pl.cdiv(k_dim, block_k), num_visits),
          in_specs=[
              pl.BlockSpec((block_m, block_k), lhs_map),
              pl.BlockSpec((block_m, block_n), dy_map),
          ],
          out_specs=pl.BlockSpec((pl.Squeezed(), block_k, block_n), out_map),
          scratch_shapes=[pltpu.VMEM((block_k, block_n), jnp.float32)],
      ),
      compiler_params=_compiler_params(_vmem_bytes(
          ((block_m, block_k), (block_m, block_n)), (block_k, block_n),
          itemsize, out_itemsize,
      )),
      cost_estimate=cost,
      interpret=interpret,
      name="tgmm",
  )(*tables, lhs, dy)


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
    block_sizes: BlockSizes | None = None,
    interpret: Interpret | None = None,
) -> Array:
  """Grouped matmul on TPU, a drop-in for ``jax.lax.ragged_dot`` (2-D lhs).

  out[m] = lhs[m] @ rhs[g] for the group g whose rows contain m; rows past
  sum(group_sizes) are zero. Differentiable w.r.t. lhs and rhs.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [E, K, N] one weight matrix per group; same dtype as lhs.
    group_sizes: [E] integer rows per group (run-time values; sum <= M).
    preferred_element_type: Output dtype (default lhs.dtype). Products always
      accumulate in f32.
    block_sizes: Tiles (static); default ``block_sizes_for()`` the device.
    interpret: True or a ``pltpu.InterpretParams`` runs the kernels in the
      Pallas TPU interpreter (True: default params). None: compile when
      targeting a TPU (local backend or abstract mesh), else interpret.

  Returns:
    [M, N] in preferred_element_type (or lhs.dtype).
  """
  common.validate_gmm(lhs, rhs, group_sizes)
  _check_dtypes(lhs.dtype, common.out_dtype(lhs, preferred_element_type))
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
    block_sizes: BlockSizes | None = None,
    interpret: Interpret | None = None,
) -> Array:
  """Transposed grouped matmul on TPU: out[g] = lhs[rows g].T @ dy[rows g].

  [E, K, N], the weight gradient of ``gmm``; empty groups give zeros. Not
  differentiable. lhs [M, K] and dy [M, N] share one dtype; output in
  preferred_element_type (default lhs.dtype), accumulated in f32.
  """
  common.validate_tgmm(lhs, dy, group_sizes)
  _check_dtypes(lhs.dtype, common.out_dtype(lhs, preferred_element_type))
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
