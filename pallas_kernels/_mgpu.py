"""Helpers shared by the Pallas Mosaic GPU (Hopper) kernels of the attention and SSD packages.

Every kernel here runs in warpgroup semantics: one program is a warpgroup (128 threads) that works on
whole register tiles, and `wgmma` reads its operands from shared memory tiles staged by the TMA engine.

  ROWS / COLS      layouts of a vector holding one value per row / per column of a wgmma tile, so that
                   `lax.broadcast_in_dim(v, shape, [0 | 1])` gives a tile in the wgmma layout.
  aligned          a dimension padded to a multiple of 64 (ALIGN).
  iota             an int32 index tile in the wgmma layout (masks).
  matmul           a @ b (+ more products) (shared-memory refs, possibly transposed views) into a fresh
                   f32 tile.
  accumulate       acc + a @ b, in acc's own registers when compiled.
  stage            a register tile written to shared memory for a wgmma to read.
  load / store     one TMA copy gmem -> smem (waited for) / smem -> gmem (not waited for).
  transforms       the tiling + 128-byte swizzle of a 16-bit tile whose minor dimension is a multiple
                   of 64 (what wgmma and the TMA engine expect).
  kernel           `plgpu.kernel` in warpgroup semantics, interpreted on CPU when asked.
"""

from typing import Any

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

F32 = jnp.float32
ROWS = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # one value per column
OPERAND_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# 64 16-bit elements = one 128-byte swizzle row: the alignment of a tile's minor dimension.
ALIGN = 64


def aligned(n: int) -> int:
  """`n` rounded up to a multiple of ALIGN (the padded size of a tile's minor dimension)."""
  return -(-n // ALIGN) * ALIGN


def iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def rows(v, shape):
  """A per-row vector broadcast along the columns of a [R, C] tile."""
  return lax.broadcast_in_dim(v, shape, [0])


def cols(v, shape):
  """A per-column vector broadcast along the rows of a [R, C] tile."""
  return lax.broadcast_in_dim(v, shape, [1])


def matmul(a, b, shape, *more):
  """a @ b (+ a2 @ b2 + ...: `more` = a2, b2, ...) in one fresh f32 accumulator [shape] (a, b: shared-
  memory refs, possibly transposed views). A sum of products is one accumulator, not one each: a live
  [64, N] accumulator holds N / 2 registers per thread of the warpgroup (`n3jax.aot.mosaic_gpu_kernels`).
  """

  def body(acc_ref):
    for lhs, rhs in zip((a, *more[::2]), (b, *more[1::2]), strict=True):
      plgpu.wgmma(acc_ref, lhs, rhs)
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, F32))


def accumulate(acc, a, b, *, in_place: bool):
  """acc + a @ b for an f32 register tile `acc` (a, b: shared-memory refs).

  in_place: the product accumulates into acc's own registers (`pl.run_state` over `plgpu.ACC.init`, as
  JAX's Hopper attention kernel does), one [64, N] tile (N / 2 registers per thread) fewer than adding a
  fresh product. JAX's Mosaic GPU interpreter has no rule for `run_state` (jax 0.11 / 0.12), so an
  interpreted kernel passes False and adds a fresh product: the same sum, the terms added in another order.
  """
  if not in_place:
    return acc + matmul(a, b, acc.shape)

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  return pl.run_state(product)(plgpu.ACC.init(acc))


def stage(value, smem):
  """`value` written to the shared-memory tile `smem` (in its dtype) for a wgmma or a TMA store to read.

  Operands that a kernel computes (probabilities, decay-scaled scores) go through shared memory rather
  than straight from registers: JAX's Mosaic GPU interpreter, which the CPU tests run, takes wgmma
  operands from shared memory only (jax 0.12).
  """
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()  # ordinary stores -> visible to the tensor cores' and the TMA engine's async proxy
  return smem


def load(src, smem, barrier):
  """TMA copy of one tile into shared memory, waited for."""
  plgpu.copy_gmem_to_smem(src, smem, barrier)
  plgpu.barrier_wait(barrier)


def store(smem, value, dst):
  """`value` staged in `smem` and copied to `dst` by TMA (wait with `plgpu.wait_smem_to_gmem`)."""
  stage(value, smem)
  plgpu.copy_smem_to_gmem(smem, dst)


def transforms(dtype) -> tuple:
  """Tiling + 128-byte swizzle of a shared-memory tile whose minor dimension is a multiple of 64 (16-bit)."""
  itemsize = jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128))


def swizzled(shape, dtype):
  """A shared-memory tile of a 16-bit dtype in the wgmma operand form."""
  return plgpu.SMEM(shape, dtype, transforms=transforms(dtype))


def interpret_params(interpret: Any):
  """`interpret` as `plgpu.kernel` takes it: True -> the default Mosaic GPU interpreter."""
  return plgpu.InterpretGPUParams() if interpret is True else (interpret or None)


def kernel(body, out_type, grid, names, scratch, interpret, *, name: str):
  """`body` as a Warpgroup-semantics Mosaic GPU kernel called `name` (its name in profiles and in
  Mosaic GPU's dumps, `n3jax.aot.mosaic_gpu_kernels`)."""
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=names, scratch_types=scratch,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret, kernel_name=name,
  )
