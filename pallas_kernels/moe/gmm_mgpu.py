"""Grouped matmul (GMM) on Hopper: Pallas Mosaic GPU kernels (wgmma + TMA) + custom_vjp.

The same contract as ``gmm.py`` (``jax.lax.ragged_dot`` semantics, rows sorted
by group, run-time group sizes, rows past ``sum(group_sizes)`` zero, empty
groups give zero weight gradients), for bf16 / f16 operands:

  gmm    out[m] = lhs[m] @ rhs[g(m)]     [M, K] x [E, K, N] -> [M, N]  forward
  gmm_t  out[m] = lhs[m] @ rhs[g(m)].T   [M, N] x [E, K, N] -> [M, K]  d_lhs
  tgmm   out[g] = lhs[g].T @ dy[g]       [M, K] x [M, N] -> [E, K, N]  d_rhs

Why a second GPU kernel: jax 0.12 deprecates the Pallas Triton backend of
``gmm.py`` in favour of Mosaic GPU, and Mosaic GPU reaches Hopper's tensor
cores through ``wgmma`` with operands staged by the TMA engine in swizzled
shared memory, several K steps in flight (``emit_pipeline``), and lets a
producer warpgroup feed two consumer warpgroups (``num_compute_wgs=2``, the
Hopper default: ``emit_pipeline_warp_specialized``, as in jax's Hopper
matmul).

Kernel scheme (gmm, gmm_t). A persistent grid (one program per SM) walks
(visit, N tile) pairs in a planar snake. A visit is ``block_m`` rows of ONE
group (``_visits``), its tiles starting at the group's first row rounded down
to a multiple of 8 (a TMA load into the (8, 128-byte) tiled, swizzled shared
memory that ``wgmma`` reads must start on an 8-row boundary), not at
multiples of ``block_m``. A group of s rows costs ``cdiv(s + 7, block_m)``
tiles at most: about ``block_m / 2`` wasted rows per group, where global
tile alignment (megablox, ``gmm.py``) computes every boundary tile once per
group sharing it. Rows of the neighbouring groups that a tile loads are
computed and never stored: the epilogue writes the visit's rows with a
ladder of TMA stores of 2**i rows from untiled shared memory (the number of
rows is data; a TMA box is static), one store for a full tile. The tail past
``sum(group_sizes)`` is a pseudo group whose visits store zeros.

Kernel scheme (tgmm). The persistent grid walks (group, K tile, N tile);
each program contracts the group's rows in ``block_m`` steps from the
group's first row rounded down to 8 (dynamic trip count; an empty group
stores zeros). In the first and last steps, the lhs rows outside the group
are zeroed in shared memory before the ``wgmma`` (the neighbouring groups'
rows must not leak into this gradient).

Edges. M, N and K need not be multiples of the tiles: TMA zero-fills loads
outside the arrays and clips stores, so the last N / K tiles are partial.
Operands must be 16-bit (``wgmma`` would run f32 as TF32; f32 stays on the
exact Triton kernel, ``gmm.py``).

Einsum letters: M rows, K contraction, N output width, E groups (experts).

Status: verified in Pallas' Mosaic GPU interpreter on CPU (``gmm_mgpu_test.py``:
outputs and both gradients vs ``ragged_dot``, empty / single-row / ragged
groups, edges, race detection) and lowered to Mosaic GPU for an abstract H100
at the Nemotron 3 Nano expert shape, alone and per shard inside ``shard_map``
(expert parallelism; the interpreter itself does not run under a multi-device
``shard_map``, jax 0.12: its shared-memory model is per process). Compiled GPU runs, tile tuning and the
benchmark against ``torch._grouped_mm`` (``benchmarks/moe.py``) are owed; until
then ``moe_backend="pallas"`` (Triton) stays the GPU default and this kernel is
``moe_backend="pallas_mgpu"``.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common

Array = jax.Array
DTypeLike = jax.typing.DTypeLike
Interpret = bool | plgpu.InterpretGPUParams

_OPERAND_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CPU_INTERPRET_SMS = 4  # programs of the persistent grid in the CPU interpreter


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileSizes:
  """Tile shape and pipeline depth of one kernel (static).

  gmm / gmm_t: ``block_m`` rows x ``block_n`` output columns per compute
  warpgroup, ``block_k`` contraction per pipeline step. tgmm: ``block_k`` x
  ``block_n`` output tile of ``out[g]``, ``block_m`` rows contracted per step
  (one warpgroup).

  ``num_compute_wgs=2`` (gmm / gmm_t; tgmm ignores it) is the warp-specialized form of
  jax's Hopper matmul: a producer warpgroup issues the TMA loads and two
  consumer warpgroups each multiply the shared lhs tile by their half of a
  ``block_m`` x 2 ``block_n`` output tile, so loads, ``wgmma`` and the
  epilogue of one warpgroup overlap the other's. Shared memory per program:
  stages x (block_m + block_n x compute warpgroups) x block_k x 2 B for the
  operands + compute warpgroups x block_m x ``epi_n`` x the output's bytes
  for the epilogue (Hopper: 227 KB).
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64  # 64 bf16 = 128 bytes: one 128-byte swizzle row
  max_concurrent_steps: int = 4  # pipeline stages (TMA loads in flight)
  grid_block_n: int = 1  # planar-snake width of the persistent tile walk
  num_compute_wgs: int = 1  # 1: one warpgroup, no producer; 2: warp-specialized
  epi_n: int = 64  # output columns per epilogue store (shared-memory staging)

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      size = getattr(self, name)
      # wgmma: M a multiple of 64 per warpgroup; K steps of 16 bytes x 8 rows;
      # the store ladder needs block_m a power of two.
      if size < 64 or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two >= 64.")
    if self.block_n > 256:
      raise ValueError(f"block_n={self.block_n} must be <= 256 (wgmma N).")
    if self.max_concurrent_steps < 1 or self.grid_block_n < 1:
      raise ValueError(
          f"{self.max_concurrent_steps=} and {self.grid_block_n=} must be >= 1."
      )
    if self.num_compute_wgs not in (1, 2):
      raise ValueError(f"num_compute_wgs={self.num_compute_wgs} must be 1 or 2.")
    if self.num_compute_wgs == 2 and self.max_concurrent_steps < 2:
      raise ValueError("A warp-specialized pipeline needs max_concurrent_steps >= 2.")
    if self.epi_n < 8 or self.epi_n & (self.epi_n - 1) or self.epi_n > self.block_n:
      raise ValueError(
          f"epi_n={self.epi_n} must be a power of two in [8, block_n={self.block_n}]."
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Tiles of the three kernels; ``block_sizes_for`` picks them per device."""

  gmm: TileSizes = TileSizes()  # forward: lhs @ rhs[g]
  gmm_t: TileSizes = TileSizes()  # d_lhs: dy @ rhs[g].T
  tgmm: TileSizes = TileSizes()  # d_rhs: block_k x block_n of out[g]


# Per device kind. untuned: GPU tuning owed -- the Hopper values follow jax's
# Hopper matmul example (warp-specialized, 128 x 256 output per program, 64-wide
# bf16 K steps; 3 stages so that an f32 output's epilogue fits: 3 x (128 + 256)
# x 64 x 2 B + 2 x 128 x 64 x 4 B = 208 KB of the 227 KB shared memory), not
# measured picks (next: ``benchmarks/moe.py --sweep``, which times
# ``MGPU_SWEEP_TILES``).
_HOPPER_GMM = TileSizes(block_m=128, block_n=128, block_k=64,
                        max_concurrent_steps=3, num_compute_wgs=2)
_HOPPER_UNTUNED = BlockSizes(
    gmm=_HOPPER_GMM,
    gmm_t=_HOPPER_GMM,
    # out[g] tiles of 128 x 128, 64 rows contracted per step.
    tgmm=TileSizes(block_m=64, block_n=128, block_k=128, max_concurrent_steps=4),
)
_BLOCK_SIZES_BY_DEVICE_KIND: dict[str, BlockSizes] = {
    "NVIDIA H100 80GB HBM3": _HOPPER_UNTUNED,  # untuned: GPU tuning owed
    "NVIDIA H200": _HOPPER_UNTUNED,  # untuned: GPU tuning owed
}
_DEFAULT_BLOCK_SIZES = BlockSizes()  # untuned: GPU tuning owed.


def block_sizes_for(device_kind: str | None = None) -> BlockSizes:
  """Block sizes for a device kind (default: the abstract mesh's device, AOT, else the first local one)."""
  return common.for_device_kind(_BLOCK_SIZES_BY_DEVICE_KIND, _DEFAULT_BLOCK_SIZES, device_kind)


def _resolve_interpret(interpret: Interpret | None) -> Interpret:
  """None -> Mosaic GPU interpreter on CPU, compiled on GPU (the abstract mesh's device when lowering AOT)."""
  backend = common.abstract_platform() or jax.default_backend()
  if interpret is None:
    interpret = backend == "cpu"
  if interpret is True:
    return plgpu.InterpretGPUParams()
  if not interpret and backend not in ("gpu", "cuda"):
    raise NotImplementedError(
        f"The Mosaic GPU grouped matmul runs on NVIDIA GPUs; {backend=!r}."
        " Pass interpret=True, or use moe_dispatch(backend='pallas')."
    )
  return interpret


def _num_sms(interpret: Interpret) -> int:
  """Programs of the persistent grid: the target's SM count (132 on an H100 SXM)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None and device.num_cores:
    return device.num_cores
  if interpret:
    return _CPU_INTERPRET_SMS
  return jax.devices()[0].core_count


def _check_operands(*operands: Array) -> None:
  for x in operands:
    if x.dtype not in _OPERAND_DTYPES:
      raise ValueError(
          "The Mosaic GPU grouped matmul takes bf16 or f16 operands (wgmma"
          f" would run {x.dtype} as TF32); got {x.dtype}. Use the Triton"
          " kernel (moe_dispatch backend 'pallas') for exact f32."
      )


def _smem_transforms(minor: int, dtype: DTypeLike) -> tuple:
  """Tiling + swizzle of a shared-memory tile whose minor dimension is ``minor`` elements."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (
      plgpu.TilingTransform((8, swizzle // itemsize)),
      plgpu.SwizzleTransform(swizzle),
  )


# ----------------------------------------------------------------------------
# Visit metadata (plain jnp, runs on device before the kernel).
# ----------------------------------------------------------------------------


_ROW_ALIGN = 8  # rows of one shared-memory tile: TMA loads start on a multiple


def max_visits(num_rows: int, num_groups: int, block_m: int) -> int:
  """Static bound on the visits of ``num_rows`` rows in ``num_groups`` groups + the tail.

  Each of the E + 1 (pseudo) groups takes cdiv(s + 7, block_m) <= (s + 6 +
  block_m) / block_m tiles; summed: (num_rows + (E + 1)(block_m + 6)) / block_m.
  """
  return (num_rows + (num_groups + 1) * (block_m + _ROW_ALIGN - 2)) // block_m


def _visits(
    group_sizes: Array, num_rows: int, block_m: int
) -> tuple[Array, Array, Array, Array]:
  """Per visit: (group id, tile row, first stored row in the tile, rows stored), each [V] int32.

  Visit j of group g loads rows [t, t + block_m) with t = align8(start_g) +
  j * block_m and stores the rows of g among them. Group id E is the
  zero-fill pseudo group (rows past the last group), -1 an unused visit;
  V = ``max_visits``.
  """
  num_groups = group_sizes.shape[0]
  lo, hi = common.group_bounds(group_sizes, num_rows, with_tail=True)  # [E + 1]
  tile0 = lo - lo % _ROW_ALIGN  # [E + 1]
  num_tiles = jnp.where(hi > lo, (hi - tile0 + block_m - 1) // block_m, 0)
  num_visits = max_visits(num_rows, num_groups, block_m)
  first_visit = jnp.cumsum(num_tiles) - num_tiles  # [E + 1]
  gid = jnp.repeat(
      jnp.arange(num_groups + 1, dtype=jnp.int32), num_tiles,
      total_repeat_length=num_visits,
  )  # [V]
  visit = jnp.arange(num_visits, dtype=jnp.int32)
  used = visit < jnp.sum(num_tiles)
  tile_row = tile0[gid] + (visit - first_visit[gid]) * block_m
  first = jnp.maximum(lo[gid], tile_row)
  rows = jnp.minimum(hi[gid], tile_row + block_m) - first
  return (
      jnp.where(used, gid, -1),
      jnp.where(used, tile_row, 0),
      jnp.where(used, first - tile_row, 0),
      jnp.where(used, rows, 0),
  )


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------


def _store_rows(
    acc: Array, o_smem, out_gmem, tile_row, offset, rows, col0, *, n_dim: int
):
  """out_gmem[tile_row + offset + i, col0 + j] = acc[offset + i, j] for i < rows, by TMA.

  ``acc`` [block_m, block_n] goes out in column chunks of ``o_smem``'s width
  (untiled shared memory: any row offset); chunks past ``n_dim`` are
  skipped. A TMA box is static and ``rows`` (<= block_m) is data: one store
  per chunk for a full tile, else one store of 2**i rows per set bit of
  ``rows`` (the row ladder). Returns with the stores in flight; the next use
  of ``o_smem`` waits for them.
  """
  block_m, block_n = acc.shape
  epi_n = o_smem.shape[1]
  for c in range(block_n // epi_n):
    cols = pl.ds(col0 + c * epi_n, epi_n)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem free again

    @pl.when(col0 + c * epi_n < n_dim)
    def _chunk(c=c, cols=cols):
      o_smem[...] = acc[:, c * epi_n:(c + 1) * epi_n].astype(o_smem.dtype)
      plgpu.commit_smem()

      @pl.when(rows == block_m)
      def _full():
        plgpu.copy_smem_to_gmem(
            o_smem, out_gmem.at[pl.ds(tile_row, block_m), cols]
        )

      @pl.when(rows < block_m)
      def _ladder():
        start = offset
        for bit in reversed(range(int(math.log2(block_m)))):
          size = 1 << bit

          @pl.when(rows & size != 0)
          def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(start, size)],
                out_gmem.at[pl.ds(tile_row + start, size), cols],
            )

          start = start + (rows & size)


def _rhs_block(tiles: TileSizes, width: int, transpose_rhs: bool):
  """Shape of one pipeline step's rhs tile: [width, K step] of rhs[g] = [N, K] (gmm_t), else [K step, width]."""
  return (width, tiles.block_k) if transpose_rhs else (tiles.block_k, width)


def _gmm_body(
    gid_gmem, tile_row_gmem, offset_gmem, rows_gmem, lhs_gmem, rhs_gmem,
    out_gmem,
    *, num_visits, num_groups, k_dim, n_dim, tiles, transpose_rhs,
):
  """Persistent program (one warpgroup): every (visit, N tile) pair of this SM."""
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  grid_n = pl.cdiv(n_dim, bn)
  dtype = lhs_gmem.dtype
  rhs_block = _rhs_block(tiles, bn, transpose_rhs)

  def mma(acc_ref):
    def step(_, x_smem, w_smem):
      plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0)) if transpose_rhs else w_smem)
    return step

  @functools.partial(
      pl.run_scoped, o_smem=plgpu.SMEM((bm, tiles.epi_n), out_gmem.dtype)
  )
  def _scope(o_smem):
    @plgpu.nd_loop((num_visits * grid_n,), collective_axes="sm")
    def _tile(loop_info: plgpu.NDLoopInfo):
      visit, n_tile = plgpu.planar_snake(
          loop_info.index[0], (num_visits, grid_n), 1, tiles.grid_block_n
      )
      g, rows = gid_gmem[visit], rows_gmem[visit]
      tile_row = pl.multiple_of(tile_row_gmem[visit], _ROW_ALIGN)

      @pl.when(g >= 0)
      def _visit():
        def acc_scope(acc_ref):
          @pl.when(g < num_groups)  # the pseudo group E keeps the zero accumulator
          def _():
            plgpu.emit_pipeline(
                mma(acc_ref),
                grid=(pl.cdiv(k_dim, bk),),
                in_specs=[
                    plgpu.BlockSpec(
                        (bm, bk), lambda k: (0, k),
                        transforms=_smem_transforms(bk, dtype), delay_release=1,
                    ),
                    plgpu.BlockSpec(
                        rhs_block,
                        (lambda k: (n_tile, k)) if transpose_rhs else (lambda k: (k, n_tile)),
                        transforms=_smem_transforms(rhs_block[1], dtype),
                        delay_release=1,
                    ),
                ],
                max_concurrent_steps=tiles.max_concurrent_steps,
            )(lhs_gmem.at[pl.ds(tile_row, bm)], rhs_gmem.at[g])

          return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))
        _store_rows(acc, o_smem, out_gmem, tile_row, offset_gmem[visit], rows,
                    n_tile * bn, n_dim=n_dim)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _gmm_ws_body(
    gid_gmem, tile_row_gmem, offset_gmem, rows_gmem, lhs_gmem, rhs_gmem,
    out_gmem,
    *, num_visits, num_groups, k_dim, n_dim, tiles, transpose_rhs,
):
  """Persistent warp-specialized program: warpgroups 0, 1 compute, 2 loads.

  Each (visit, N tile) is ``block_m`` x 2 ``block_n``: the producer streams
  the lhs tile and the 2 ``block_n``-wide rhs tile, each consumer multiplies
  the lhs tile by its half and stores its own columns.
  """
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  cta_n = 2 * bn
  grid_n = pl.cdiv(n_dim, cta_n)
  dtype = lhs_gmem.dtype
  rhs_block = _rhs_block(tiles, cta_n, transpose_rhs)

  def pipeline(body, compute_context, n_tile=0):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(pl.cdiv(k_dim, bk),),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((bm, bk), lambda k: (0, k),
                            transforms=_smem_transforms(bk, dtype)),
            plgpu.BlockSpec(  # this tile's 2 block_n output columns of rhs[g]
                rhs_block,
                (lambda k: (n_tile, k)) if transpose_rhs else (lambda k: (k, n_tile)),
                transforms=_smem_transforms(rhs_block[1], dtype),
            ),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=tiles.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocations=pipeline(ignore, ignore).get_allocations(
          lhs_gmem.at[pl.ds(0, bm)], rhs_gmem.at[0]
      ),
      o_smem=plgpu.SMEM((2, bm, tiles.epi_n), out_gmem.dtype),
      collective_axes="wg",
  )
  def _scope(allocations, o_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((num_visits * grid_n,), collective_axes="sm")
    def _tile(loop_info: plgpu.NDLoopInfo):
      visit, n_tile = plgpu.planar_snake(
          loop_info.index[0], (num_visits, grid_n), 1, tiles.grid_block_n
      )
      g, rows = gid_gmem[visit], rows_gmem[visit]
      tile_row = pl.multiple_of(tile_row_gmem[visit], _ROW_ALIGN)
      col0 = n_tile * cta_n + wg * bn  # this consumer's first output column

      def store(acc):
        _store_rows(acc, o_smem.at[wg], out_gmem, tile_row, offset_gmem[visit],
                    rows, col0, n_dim=n_dim)

      @pl.when((g >= 0) & (g < num_groups))
      def _compute():
        def compute_context(eval_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
          def _(acc_ref):
            eval_pipeline(acc_ref)
            store(acc_ref[...])

        def step(_, x_smem, w_smem, acc_ref):
          half = pl.ds(wg * bn, bn)
          w = w_smem.at[half].transpose((1, 0)) if transpose_rhs else w_smem.at[:, half]
          plgpu.wgmma(acc_ref, x_smem, w)
          plgpu.wgmma_wait(0)  # the step's buffers go back to the producer
          return acc_ref

        pipeline(step, compute_context, n_tile)(
            lhs_gmem.at[pl.ds(tile_row, bm)], rhs_gmem.at[g],
            allocations=allocations,
        )

      @pl.when((g == num_groups) & (wg < 2))
      def _zero_fill():  # rows past sum(group_sizes)
        store(jnp.zeros((bm, bn), jnp.float32))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _tgmm_body(
    lo_gmem, hi_gmem, lhs_gmem, dy_gmem, out_gmem,
    *, num_groups, num_rows, k_dim, n_dim, tiles,
):
  """Persistent program: every (group, K tile, N tile) of out[g] of this SM."""
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  grid_k, grid_n = pl.cdiv(k_dim, bk), pl.cdiv(n_dim, bn)
  dtype = lhs_gmem.dtype

  @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
  def _tile(loop_info: plgpu.NDLoopInfo):
    g = loop_info.index[0]
    k_tile, n_tile = plgpu.planar_snake(
        loop_info.index[1], (grid_k, grid_n), 1, tiles.grid_block_n
    )
    lo, hi = lo_gmem[g], hi_gmem[g]
    row0 = pl.multiple_of(lo - lax.rem(lo, _ROW_ALIGN), _ROW_ALIGN)
    num_steps = jnp.where(hi > lo, lax.div(hi - row0 + bm - 1, bm), 0)

    def acc_scope(acc_ref):
      def step(idx, x_smem, dy_smem):
        (s,) = idx

        @pl.when((s == 0) | (s == num_steps - 1))
        def _mask_other_groups():  # lhs rows outside [lo, hi): zero
          x = x_smem[...]
          row = row0 + s * bm + plgpu.layout_cast(
              lax.broadcasted_iota(jnp.int32, (bm, bk), 0), plgpu.Layout.WGMMA
          )
          keep = ((row >= lo) & (row < hi)).astype(x.dtype)
          x_smem[...] = x * keep
          plgpu.commit_smem()

        plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_smem)  # [bk, bm] @ [bm, bn]

      @pl.when(num_steps > 0)
      def _():
        plgpu.emit_pipeline(
            step,
            grid=(num_steps,),
            in_specs=[
                plgpu.BlockSpec(
                    (bm, bk), lambda s: (s, k_tile),
                    transforms=_smem_transforms(bk, dtype), delay_release=1,
                ),
                plgpu.BlockSpec(
                    (bm, bn), lambda s: (s, n_tile),
                    transforms=_smem_transforms(bn, dtype), delay_release=1,
                ),
            ],
            max_concurrent_steps=tiles.max_concurrent_steps,
        )(lhs_gmem.at[pl.ds(row0, num_rows)], dy_gmem.at[pl.ds(row0, num_rows)])

      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))

    @functools.partial(
        pl.run_scoped,
        o_smem=plgpu.SMEM(
            (bk, bn), out_gmem.dtype,
            transforms=_smem_transforms(bn, out_gmem.dtype),
        ),
    )
    def _(o_smem):
      o_smem[...] = acc.astype(out_gmem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          o_smem,
          out_gmem.at[g, pl.ds(k_tile * bk, bk), pl.ds(n_tile * bn, bn)],
      )
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# ----------------------------------------------------------------------------
# Kernel calls (no autodiff).
# ----------------------------------------------------------------------------


def _pad_rows(x: Array, rows: int) -> Array:
  """x with zero rows appended up to ``rows`` (a TMA box may not exceed the array)."""
  return x if x.shape[0] >= rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _kernel(body, out_shape, out_dtype, like, interpret, name, num_threads=None):
  """The persistent Mosaic GPU kernel ``name`` (one program per SM); its output varies over ``like``'s mesh
  axes."""
  call = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(_num_sms(interpret),),
      grid_names=("sm",),
      num_threads=num_threads,
      thread_name=None if num_threads is None else "wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup
      ),
      interpret=interpret or None,
      kernel_name=name,
  )
  return lambda *args: common.vary_like(call(*args), like)


def _gmm_call(
    lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool,
    out_dtype: DTypeLike, tiles: TileSizes, interpret: Interpret,
) -> Array:
  """[M, K] x [E, K, N] -> [M, N], or (transpose_rhs) [M, N] x .. -> [M, K]."""
  num_rows, k_dim = lhs.shape
  num_groups = rhs.shape[0]
  n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if num_rows == 0 or n_dim == 0 or k_dim == 0:
    return jnp.zeros((num_rows, n_dim), out_dtype)
  _check_operands(lhs, rhs)
  visits = _visits(group_sizes, num_rows, tiles.block_m)
  padded = max(num_rows, tiles.block_m)
  warp_specialized = tiles.num_compute_wgs == 2
  body = functools.partial(
      _gmm_ws_body if warp_specialized else _gmm_body,
      num_visits=visits[0].shape[0], num_groups=num_groups, k_dim=k_dim,
      n_dim=n_dim, tiles=tiles, transpose_rhs=transpose_rhs,
  )
  out = _kernel(
      body, (padded, n_dim), out_dtype, lhs, interpret,
      "gmm_dlhs" if transpose_rhs else "gmm",
      num_threads=3 if warp_specialized else None,
  )(*visits, _pad_rows(lhs, padded), rhs)
  return out[:num_rows]


def _tgmm_call(
    lhs: Array, dy: Array, group_sizes: Array, *, out_dtype: DTypeLike,
    tiles: TileSizes, interpret: Interpret,
) -> Array:
  """[M, K], [M, N] -> [E, K, N] with out[g] = lhs[rows g].T @ dy[rows g]."""
  num_rows, k_dim = lhs.shape
  n_dim = dy.shape[1]
  num_groups = group_sizes.shape[0]
  if num_rows == 0 or k_dim == 0 or n_dim == 0:
    return jnp.zeros((num_groups, k_dim, n_dim), out_dtype)
  _check_operands(lhs, dy)
  lo, hi = common.group_bounds(group_sizes, num_rows)
  padded = max(num_rows, tiles.block_m)
  body = functools.partial(
      _tgmm_body, num_groups=num_groups, num_rows=padded, k_dim=k_dim,
      n_dim=n_dim, tiles=tiles,
  )
  return _kernel(
      body, (num_groups, k_dim, n_dim), out_dtype, lhs, interpret, "tgmm"
  )(lo, hi, _pad_rows(lhs, padded), _pad_rows(dy, padded))


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
  """Grouped matmul on Hopper's tensor cores, a drop-in for ``jax.lax.ragged_dot`` (2-D lhs, 3-D rhs).

  out[m] = lhs[m] @ rhs[g] for the group g whose rows contain m; rows past
  sum(group_sizes) are zero. Differentiable w.r.t. lhs and rhs (backward:
  the ``gmm_t`` and ``tgmm`` kernels).

  Args:
    lhs: [M, K] bf16 / f16 rows sorted by group.
    rhs: [E, K, N] one weight matrix per group; same dtype as lhs.
    group_sizes: [E] integer rows per group (run-time values; sum <= M).
    preferred_element_type: Output dtype (default lhs.dtype). Products
      accumulate in f32.
    block_sizes: Tiles (static); default ``block_sizes_for()`` the device.
    interpret: Run in Pallas' Mosaic GPU interpreter (True or an
      ``InterpretGPUParams``). None: the interpreter on CPU, compiled on GPU.

  Returns:
    [M, N] in preferred_element_type (or lhs.dtype).
  """
  common.validate_gmm(lhs, rhs, group_sizes)
  _check_operands(lhs)
  lhs, rhs, group_sizes = common.match_vma(
      lhs, rhs, group_sizes.astype(jnp.int32)
  )
  return _gmm(
      lhs, rhs, group_sizes, common.out_dtype(lhs, preferred_element_type),
      block_sizes or block_sizes_for(), _resolve_interpret(interpret),
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
  """Transposed grouped matmul: out[g] = lhs[rows g].T @ dy[rows g], [E, K, N].

  The weight gradient of ``gmm``; empty groups give zeros. Not
  differentiable. lhs [M, K] and dy [M, N] share one 16-bit dtype; output in
  preferred_element_type (default lhs.dtype), accumulated in f32.
  ``block_sizes`` and ``interpret`` as in ``gmm``.
  """
  common.validate_tgmm(lhs, dy, group_sizes)
  _check_operands(lhs)
  lhs, dy, group_sizes = common.match_vma(
      lhs, dy, group_sizes.astype(jnp.int32)
  )
  return _tgmm_call(
      lhs, dy, group_sizes,
      out_dtype=common.out_dtype(lhs, preferred_element_type),
      tiles=(block_sizes or block_sizes_for()).tgmm,
      interpret=_resolve_interpret(interpret),
  )
