"""Mosaic TPU path of `ops.ssd`: layouts, pallas_calls and the custom VJP.

`ops.ssd(..., backend="mosaic_tpu")` calls `ssd_mosaic_tpu`; kernel bodies are
in `kernel_tpu.py` (its docstring has the math and the fused design):

  jnp     dt = clip(softplus(dt + dt_bias)); a = dt A (cum, its chunk-local
          cumsum, is taken inside the custom_vjp core, whose backward returns
          da directly; see `kernel_tpu.bwd_kernel`);
          pad T to the chunk and P, Q to `pad_multiple`; head-major layouts
          x [B,M,T,P], B/C [B,J,T,Q], token rows [B,M,1,T], states h^T
          [B,M,Q,P]; document rows from doc_ids. Differentiated by JAX
          through the `custom_vjp` core below.
  Pallas  fwd   grid (B, M/H, C), C sequential   y, final (state in VMEM)
Backward (`_core_bwd`):
  Pallas  fwd (emit_y=False)   grid (B, M/H, C)   h_in [B,M,C,Q,P] (recomputed,
          not kept from the forward pass, as in the Triton path)
  Pallas  bwd   grid (B, M/H, C), chunks in reverse, dL/dstate in VMEM:
          dx, ddt, da, dskip, per-head-block dB/dC, dh0
  jnp     sums of dB/dC over head blocks of a group, dD; dt/A/dt_bias
          gradients by autodiff of the prologue.

TPU tiling: the last two block dims are multiples of (8, 128) or the full array
dims. So chunk_size must be a multiple of 128 when compiling (token rows put
the chunk on lanes); interpret mode accepts any multiple of 8.
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _target
from pallas_kernels.ssd import kernel_tpu
from pallas_kernels.ssd import reference

InterpretParams = pltpu.InterpretParams  # `interpret=` for the TPU simulator
_F32 = jnp.float32
LANES = 128  # TPU vreg lanes: compiled chunk sizes are multiples of this.
SUBLANES = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuBlockSizes:
  """Static tiling of the Mosaic TPU SSD kernels (chunk length: chunk_size).

  Attributes:
    heads_per_block: H, heads of one B/C group per grid step (C B^T is
      computed once for them, dB/dC summed in VMEM); clamped to
      gcd(heads_per_block, M // J). More heads per step means fewer steps
      (each costs ~0.35 us of pipeline overhead) and more VMEM.
    pad_multiple: P and Q are zero-padded to a multiple of this. 128 makes
      every x / B / C / state tile lane-dense and every product MXU-shaped;
      8 skips the padding (blocks then span the full P and Q, Mosaic masks
      the partial vregs): less HBM traffic and fewer MXU passes for P = 64;
      both compile (libtpu); which is faster is not yet measured on a TPU.
    vmem_limit_bytes: Mosaic scoped-VMEM limit, None for the default.
  """

  heads_per_block: int = 8
  pad_multiple: int = LANES
  vmem_limit_bytes: Optional[int] = None

  def __post_init__(self):
    if self.heads_per_block < 1:
      raise ValueError(f"{self.heads_per_block=} must be >= 1")
    if self.pad_multiple < SUBLANES or self.pad_multiple % SUBLANES:
      raise ValueError(
          f"{self.pad_multiple=} must be a positive multiple of {SUBLANES}"
      )

  @classmethod
  def for_device(cls, device: Optional[Any] = None) -> "TpuBlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Matched in order against `device_kind.lower()`.
# untuned: TPU tuning owed. No kernel of this file has run on a TPU yet (they
# compile ahead of time with libtpu for v4, v5e, v5p, v6e); these rows are
# placeholders chosen by reasoning (H = 8 heads, one Nemotron-H group,
# about 7 MiB of VMEM per backward step with L = P = Q = 128 in bf16, under
# the 16 MiB default scoped VMEM of v5e). Sweep heads_per_block, pad_multiple
# and vmem_limit_bytes on each generation (benchmarks/ssd.py is GPU-only so
# far; a backend="mosaic_tpu" mode there is owed).
_DEFAULTS: tuple[tuple[str, TpuBlockSizes], ...] = (
    ("tpu7", TpuBlockSizes(heads_per_block=8)),
    ("tpu v6", TpuBlockSizes(heads_per_block=8)),  # v6e (Trillium)
    ("tpu v5 lite", TpuBlockSizes(heads_per_block=8)),  # v5e
    ("tpu v5e", TpuBlockSizes(heads_per_block=8)),
    ("tpu v5", TpuBlockSizes(heads_per_block=8)),  # v5p
    ("tpu v4", TpuBlockSizes(heads_per_block=8)),
)


def check_chunk_size(chunk_size: int, interpret: bool) -> Optional[str]:
  """None if the TPU kernels take `chunk_size`, else why not."""
  if chunk_size % (SUBLANES if interpret else LANES):
    return (
        f"backend='mosaic_tpu' needs a {chunk_size=} that is a multiple of "
        f"{LANES} (TPU lanes; {SUBLANES} in interpret mode)"
    )
  return None


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) configuration of one padded problem."""

  chunk: int  # L
  ngroups: int  # J
  heads: int  # H, divides M // J
  has_docs: bool
  mm_dtype: str  # operand dtype of the in-kernel products
  interpret: Any  # False, True or a pltpu.InterpretParams (hashable)
  vmem_limit_bytes: Optional[int]

  def call(self, body, *, grid, in_specs, out_specs, out_shape, scratch,
           name):
    return pl.pallas_call(
        functools.partial(
            body, has_docs=self.has_docs, mm_dtype=jnp.dtype(self.mm_dtype)
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=self.vmem_limit_bytes,
        ),
        interpret=self.interpret,
        name=name,
    )


@dataclasses.dataclass(frozen=True)
class _Specs:
  """BlockSpecs of grid (b, head block mb, step i); chunk i or C-1-i."""

  tokens: pl.BlockSpec  # [B,M,T,P] -> [H,L,P]
  rows: pl.BlockSpec  # [B,M,1,T] -> [H,1,L]
  group: pl.BlockSpec  # [B,J,T,Q] -> [L,Q]
  state: pl.BlockSpec  # [B,M,Q,P] -> [H,Q,P], one block per (b, mb)
  chunk_state: pl.BlockSpec  # [B,M,C,Q,P] -> [H,Q,P]
  per_block: pl.BlockSpec  # [B,M/H,T,Q] -> [L,Q]
  docs: pl.BlockSpec  # [B,1,T] -> [1,L]
  smem: pl.BlockSpec  # whole [M] array in SMEM


def _specs(cfg, x, dstate, reverse):
  _, nheads, seqlen, headdim = x.shape
  chunk, heads = cfg.chunk, cfg.heads
  nchunks = seqlen // chunk
  per_group = nheads // cfg.ngroups
  ci = (lambda i: nchunks - 1 - i) if reverse else (lambda i: i)
  return _Specs(
      tokens=pl.BlockSpec(
          (None, heads, chunk, headdim), lambda b, m, i: (b, m, ci(i), 0)
      ),
      rows=pl.BlockSpec((None, heads, 1, chunk),
                        lambda b, m, i: (b, m, 0, ci(i))),
      group=pl.BlockSpec(
          (None, None, chunk, dstate),
          lambda b, m, i: (b, m * heads // per_group, ci(i), 0),
      ),
      state=pl.BlockSpec(
          (None, heads, dstate, headdim), lambda b, m, i: (b, m, 0, 0)
      ),
      chunk_state=pl.BlockSpec(
          (None, heads, None, dstate, headdim),
          lambda b, m, i: (b, m, ci(i), 0, 0),
      ),
      per_block=pl.BlockSpec(
          (None, None, chunk, dstate), lambda b, m, i: (b, m, ci(i), 0)
      ),
      docs=pl.BlockSpec((None, 1, chunk), lambda b, m, i: (b, 0, ci(i))),
      smem=pl.BlockSpec(memory_space=pltpu.SMEM),
  )


def _grid(cfg, x):
  bsz, nheads, seqlen, _ = x.shape
  return (bsz, nheads // cfg.heads, seqlen // cfg.chunk)


def _scratch(cfg, h0):
  return [pltpu.VMEM((cfg.heads,) + h0.shape[2:], _F32)]


def _forward(cfg, x, dtp, cum, b, c, d, h0, seg, carry):
  """(y [B,M,T,P] x.dtype, final^T [B,M,Q,P] f32)."""
  sp = _specs(cfg, x, b.shape[-1], reverse=False)
  in_specs = [sp.tokens, sp.rows, sp.rows, sp.group, sp.group, sp.smem,
              sp.state]
  args = [x, dtp, cum, b, c, d, h0]
  if cfg.has_docs:
    in_specs += [sp.docs, sp.docs]
    args += [seg, carry]
  return cfg.call(
      functools.partial(kernel_tpu.fwd_kernel, emit_y=True),
      grid=_grid(cfg, x),
      in_specs=in_specs,
      out_specs=[sp.tokens, sp.state],
      out_shape=[
          jax.ShapeDtypeStruct(x.shape, x.dtype),
          jax.ShapeDtypeStruct(h0.shape, _F32),
      ],
      scratch=_scratch(cfg, h0),
      name="ssd_tpu_fwd",
  )(*args)


def _states(cfg, x, dtp, cum, b, h0, seg, carry):
  """h_in^T [B,M,C,Q,P] f32: the state entering each chunk."""
  sp = _specs(cfg, x, b.shape[-1], reverse=False)
  in_specs = [sp.tokens, sp.rows, sp.rows, sp.group, sp.state]
  args = [x, dtp, cum, b, h0]
  if cfg.has_docs:
    in_specs += [sp.docs, sp.docs]
    args += [seg, carry]
  bsz, nheads, seqlen, _ = x.shape
  shape = (bsz, nheads, seqlen // cfg.chunk) + h0.shape[2:]
  return cfg.call(
      functools.partial(kernel_tpu.fwd_kernel, emit_y=False),
      grid=_grid(cfg, x),
      in_specs=in_specs,
      out_specs=sp.chunk_state,
      out_shape=jax.ShapeDtypeStruct(shape, _F32),
      scratch=_scratch(cfg, h0),
      name="ssd_tpu_states",
  )(*args)


def _backward(cfg, x, dtp, cum, b, c, d, h_in, dfinal, dy, seg, carry):
  """dx, ddt, da, dskip, dB/dC per head block [B,M/H,T,Q], dh0^T."""
  sp = _specs(cfg, x, b.shape[-1], reverse=True)
  in_specs = [sp.tokens, sp.rows, sp.rows, sp.group, sp.group, sp.smem,
              sp.chunk_state, sp.state, sp.tokens]
  args = [x, dtp, cum, b, c, d, h_in, dfinal, dy]
  if cfg.has_docs:
    in_specs += [sp.docs, sp.docs]
    args += [seg, carry]
  grid = _grid(cfg, x)
  bsz, _, seqlen, _ = x.shape
  row = jax.ShapeDtypeStruct(dtp.shape, _F32)
  per_block = jax.ShapeDtypeStruct((bsz, grid[1], seqlen, b.shape[-1]), _F32)
  return cfg.call(
      kernel_tpu.bwd_kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[sp.tokens, sp.rows, sp.rows, sp.rows, sp.per_block,
                 sp.per_block, sp.state],
      out_shape=[
          jax.ShapeDtypeStruct(x.shape, x.dtype),
          row,
          row,
          row,
          per_block,
          per_block,
          jax.ShapeDtypeStruct(dfinal.shape, _F32),
      ],
      scratch=_scratch(cfg, dfinal),
      name="ssd_tpu_bwd",
  )(*args)


# custom_vjp core on padded, chunk-aligned, head-major inputs.


def _chunk_cumsum(cfg, a):
  """[B,M,1,T] -> cum_l = sum of a over the chunk up to l, [B,M,1,T]."""
  bsz, nheads, _, seqlen = a.shape
  a = a.reshape(bsz, nheads, seqlen // cfg.chunk, cfg.chunk)
  return jnp.cumsum(a, axis=-1).reshape(bsz, nheads, 1, seqlen)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  """(y [B,M,T,P] x.dtype, final^T [B,M,Q,P] f32)."""
  return _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry)[0]


def _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  cum = _chunk_cumsum(cfg, a)
  out = _forward(cfg, x, dtp, cum, b, c, d, h0, seg, carry)
  return out, (x, dtp, cum, b, c, d, h0, seg, carry)


def _core_bwd(cfg, residuals, cotangents):
  x, dtp, cum, b, c, d, h0, seg, carry = residuals
  dy, dfinal = cotangents
  h_in = _states(cfg, x, dtp, cum, b, h0, seg, carry)
  dx, ddt, da, dskip, db, dc, dh0 = _backward(
      cfg, x, dtp, cum, b, c, d, h_in, dfinal.astype(_F32),
      dy.astype(x.dtype), seg, carry,
  )
  # [B,M/H,T,Q] per head block -> [B,J,T,Q].
  bsz, nblocks, seqlen, dstate = db.shape
  group_sum = lambda v: v.reshape(
      bsz, cfg.ngroups, nblocks // cfg.ngroups, seqlen, dstate
  ).sum(axis=2)
  return (
      dx,
      ddt,
      da,
      group_sum(db).astype(b.dtype),
      group_sum(dc).astype(c.dtype),
      dskip.sum(axis=(0, 2, 3)).astype(d.dtype),
      dh0,
      None,
      None,
  )


_core.defvjp(_core_fwd, _core_bwd)


# Entry point (called by ops.ssd after argument checks).

_pad_dim = reference._pad_dim  # pylint: disable=protected-access


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def ssd_mosaic_tpu(
    x, dt, A, B, C, D, dt_bias, *, initial_state, doc_ids, chunk_size,
    dt_softplus, dt_min, dt_max, block_sizes: TpuBlockSizes, interpret: Any,
):
  """`ops.ssd` on the Mosaic TPU kernels; arguments already checked."""
  bsz, seqlen, nheads, headdim = x.shape
  ngroups, dstate = B.shape[2:]
  chunk = int(chunk_size)
  padded_t = _round_up(seqlen, chunk)
  padded_p = _round_up(headdim, block_sizes.pad_multiple)
  padded_q = _round_up(dstate, block_sizes.pad_multiple)
  # bf16/f16 inputs: products on those operands (f32 accumulation).
  x_dtype = jnp.dtype(x.dtype)
  cfg = _Config(
      chunk=chunk,
      ngroups=ngroups,
      heads=math.gcd(block_sizes.heads_per_block, nheads // ngroups),
      has_docs=doc_ids is not None,
      mm_dtype=x_dtype.name if x_dtype.itemsize < 4 else "float32",
      interpret=interpret,
      vmem_limit_bytes=block_sizes.vmem_limit_bytes,
  )

  # Prologue (jnp, differentiated by JAX). Padding after dt processing:
  # dt = 0 (decay 1) and x = B = C = 0 change neither y nor the final state.
  dtp = reference._process_dt(  # pylint: disable=protected-access
      dt, dt_bias, dt_softplus, dt_min, dt_max
  )  # [B,T,M] f32
  dtp = jnp.moveaxis(_pad_dim(dtp, 1, padded_t), 1, 2)[:, :, None]  # [B,M,1,T]
  a = dtp * A.astype(_F32)[None, :, None, None]  # [B,M,1,T]
  xh = jnp.swapaxes(_pad_dim(_pad_dim(x, 1, padded_t), 3, padded_p), 1, 2)
  pad_bc = lambda v: jnp.swapaxes(  # [B,T,J,Q] -> [B,J,T,Q]
      _pad_dim(_pad_dim(v, 1, padded_t), 3, padded_q).astype(cfg.mm_dtype),
      1, 2,
  )
  d = jnp.zeros((nheads,), _F32) if D is None else D.astype(_F32)
  if initial_state is None:
    h0 = jnp.zeros((bsz, nheads, padded_q, padded_p), _F32)
  else:  # [B,M,P,Q] -> [B,M,Q,P]
    h0 = jnp.swapaxes(
        _pad_dim(_pad_dim(initial_state.astype(_F32), 2, padded_p), 3,
                 padded_q),
        2, 3,
    )
  seg = carry = None
  if doc_ids is not None:
    segc, carry = reference._chunked_segments(  # pylint: disable=protected-access
        doc_ids, bsz, seqlen, chunk
    )  # [B,C,L] each
    seg = segc.astype(_F32).reshape(bsz, 1, padded_t)  # exact below 2**24
    carry = carry.astype(_F32).reshape(bsz, 1, padded_t)  # [B,1,T]

  y, final = _core(cfg, xh, dtp, a, pad_bc(B), pad_bc(C), d, h0, seg, carry)
  y = jnp.swapaxes(y, 1, 2)[:, :seqlen, :, :headdim]  # [B,T,M,P]
  final = jnp.swapaxes(final, 2, 3)[:, :, :headdim, :dstate]  # [B,M,P,Q]
  return y, final
