"""Triton path of `ops.ssd`: tiling, pallas_calls and the custom VJP.

`ops.ssd(..., backend="triton")` calls `ssd_triton`; kernel bodies are in
`kernel.py`. Pipeline:

  jnp     dt = clip(softplus(dt + dt_bias)); a = dt A (cum, its chunk-local
          cumsum, is taken inside the custom_vjp core, whose backward returns
          da directly, as on TPU);
          pad T to the chunk, P and Q to powers of 2 (>= 16, Triton dot tiles);
          document index / carry masks from doc_ids. O(B T M), XLA-fused and
          differentiated by JAX through the `custom_vjp` core below.
  Pallas  chunk_state    grid (B, C, M, P/TP)    chunk-end states   [B,C,M,P,Q]
  Pallas  state_passing  grid (B, M, P/TP)       loop over chunks -> h_in, final
  Pallas  chunk_scan     grid (B, C, M/H, P/TP)  y = intra-chunk + C h_in + D x
Backward (`_core_bwd`): chunk_state and state_passing are recomputed (the
[B,C,M,P,Q] states are not kept between forward and backward, as in
state-spaces/mamba), then
  Pallas  chunk_state ("dout")   grid (B, C, M, P/TP)   dL/dh_in from y
  Pallas  state_passing_bwd      grid (B, M, P/TP)      reverse loop -> dstates, dg, dh0
  Pallas  chunk_scan_bwd         grid (B, C, M/H)       dx, ddt, da, dB, dC, dD terms
  jnp     sums of dB/dC over the heads of a group, dD, the carry-decay term of
          da; dt/A/dt_bias gradients by autodiff of the jnp prologue.
The backward returns the gradient of a, not of cum: da_i is summed directly
over the pairs that a_i separates (`kernel.chunk_scan_bwd_kernel`), because
the reverse cumsum of dcum cancels catastrophically under strong decay (it
cost 1e-4 to 2e-3 relative error in dA at chunk 128).
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _target
from pallas_kernels import _triton_tiles
from pallas_kernels.ssd import _chunked
from pallas_kernels.ssd import kernel

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Static tiling of the SSD kernels (the chunk length is `chunk_size`).

  Attributes:
    block_p: P tile of chunk_state, state passing and the forward chunk scan;
      a power of 2 >= 16, clamped to the padded head dim.
    heads_per_block: heads of one B/C group handled by one chunk-scan program
      (forward and backward): C B^T is computed once for them and their dB/dC
      are summed in registers. Clamped to gcd(heads_per_block, M // J).
    num_warps: Triton warps of the forward / state kernels.
    num_warps_bwd: Triton warps of the backward chunk-scan kernel.
    num_stages: Triton software-pipelining stages.
  """

  block_p: int = 64
  heads_per_block: int = 1
  num_warps: int = 4
  num_warps_bwd: int = 8
  num_stages: int = 2

  def __post_init__(self):
    _triton_tiles.check_block_sizes(self, ("block_p",),
                                    ("heads_per_block", "num_warps", "num_warps_bwd", "num_stages"))

  @classmethod
  def for_device(cls, device: Optional[jax.Device] = None) -> "BlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Matched in order against `device_kind.lower()`.
# untuned: GPU tuning owed. These are placeholders chosen by reasoning about
# tile sizes (L = 128, P = 64, Q = 128), not measurements; sweep block_p,
# heads_per_block and warps with benchmarks/ssd.py before trusting them.
# TPU tilings are `TpuBlockSizes` (ops_tpu.py).
_DEFAULTS: tuple[tuple[str, BlockSizes], ...] = (
    ("h200", BlockSizes(block_p=64, heads_per_block=1, num_warps=4)),
    ("h100", BlockSizes(block_p=64, heads_per_block=1, num_warps=4)),
    ("a100", BlockSizes(block_p=32, heads_per_block=1, num_warps=4)),
)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) configuration of one padded problem."""

  chunk: int
  ngroups: int  # J
  block_p: int  # TP, divides the padded P
  heads: int  # H, heads per chunk-scan program; divides M // J
  has_docs: bool
  mm_dtype: str  # operand dtype of the in-kernel products
  interpret: bool
  num_warps: int
  num_warps_bwd: int
  num_stages: int

  def params(self, bwd: bool = False):
    warps = self.num_warps_bwd if bwd else self.num_warps
    return plgpu.CompilerParams(num_warps=warps, num_stages=self.num_stages)


# pallas_call wrappers. Layouts: x/dy [B,T,M,P], dt/cum [B,M,T] f32,
# b/c [B,T,J,Q], states [B,C,M,P,Q] f32, seg/carry [B,T]; T, P, Q padded.


def _call(cfg, body, grid, in_specs, out_specs, out_shape, name, bwd=False):
  return pl.pallas_call(
      body,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=cfg.params(bwd),
      interpret=cfg.interpret,
      name=name,
  )


def _chunk_state(cfg, lhs, dtp, cum, rhs, doc, *, mode):
  """[B,C,M,P,Q] f32: sum_l lhs[l,p] coef_l rhs[l,q] per chunk and head."""
  bsz, seqlen, nheads, headdim = lhs.shape
  dstate = rhs.shape[-1]
  chunk, tp = cfg.chunk, cfg.block_p
  per_group = nheads // cfg.ngroups
  nchunks = seqlen // chunk
  in_specs = [
      pl.BlockSpec((None, chunk, 1, tp), lambda b, c, m, p: (b, c, m, p)),
      pl.BlockSpec((None, 1, chunk), lambda b, c, m, p: (b, m, c)),
      pl.BlockSpec((None, 1, chunk), lambda b, c, m, p: (b, m, c)),
      pl.BlockSpec((None, chunk, None, dstate),
                   lambda b, c, m, p: (b, c, m // per_group, 0)),
  ]
  args = [lhs, dtp, cum, rhs]
  if cfg.has_docs:
    in_specs.append(pl.BlockSpec((None, chunk), lambda b, c, m, p: (b, c)))
    args.append(doc)
  body = functools.partial(
      kernel.chunk_state_kernel, mode=mode, has_docs=cfg.has_docs,
      mm_dtype=jnp.dtype(cfg.mm_dtype),
  )
  return _call(
      cfg, body,
      grid=(bsz, nchunks, nheads, headdim // tp),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, 1, tp, dstate),
                             lambda b, c, m, p: (b, c, m, p, 0)),
      out_shape=jax.ShapeDtypeStruct((bsz, nchunks, nheads, headdim, dstate),
                                     _F32),
      name=f"ssd_chunk_state_{mode}",
  )(*args)


def _passing_specs(cfg, nchunks, dstate):
  tp = cfg.block_p
  chunks = pl.BlockSpec((None, nchunks, None, tp, dstate),
                        lambda b, m, p: (b, 0, m, p, 0))
  decay = pl.BlockSpec((None, None, nchunks), lambda b, m, p: (b, m, 0))
  state = pl.BlockSpec((None, None, tp, dstate), lambda b, m, p: (b, m, p, 0))
  return chunks, decay, state


def _state_passing(cfg, states, g, h0):
  """h_in [B,C,M,P,Q] (state entering each chunk) and final [B,M,P,Q]."""
  bsz, nchunks, nheads, headdim, dstate = states.shape
  chunks, decay, state = _passing_specs(cfg, nchunks, dstate)
  return _call(
      cfg,
      kernel.state_passing_kernel,
      grid=(bsz, nheads, headdim // cfg.block_p),
      in_specs=[chunks, decay, state],
      out_specs=[chunks, state],
      out_shape=[jax.ShapeDtypeStruct(states.shape, _F32),
                 jax.ShapeDtypeStruct(h0.shape, _F32)],
      name="ssd_state_passing",
  )(states, g, h0)


def _state_passing_bwd(cfg, dh_out, g, h_in, dfinal):
  """dstates [B,C,M,P,Q], dg [B,M,C], dh0 [B,M,P,Q]."""
  bsz, nchunks, nheads, headdim, dstate = dh_out.shape
  chunks, decay, state = _passing_specs(cfg, nchunks, dstate)
  nblocks = headdim // cfg.block_p
  dstates, dg, dh0 = _call(
      cfg,
      kernel.state_passing_bwd_kernel,
      grid=(bsz, nheads, nblocks),
      in_specs=[chunks, decay, chunks, state],
      out_specs=[
          chunks,
          pl.BlockSpec((None, None, None, nchunks),
                       lambda b, m, p: (b, m, p, 0)),
          state,
      ],
      out_shape=[jax.ShapeDtypeStruct(dh_out.shape, _F32),
                 jax.ShapeDtypeStruct((bsz, nheads, nblocks, nchunks), _F32),
                 jax.ShapeDtypeStruct(dfinal.shape, _F32)],
      name="ssd_state_passing_bwd",
  )(dh_out, g, h_in, dfinal)
  return dstates, dg.sum(axis=2), dh0


def _scan_specs(cfg, nheads, dstate, tp, with_p_grid):
  """BlockSpecs shared by the forward and backward chunk-scan kernels."""
  chunk, heads = cfg.chunk, cfg.heads
  per_group = nheads // cfg.ngroups
  if with_p_grid:  # grid (b, c, mb, p)
    ix = lambda f: (lambda b, c, mb, p: f(b, c, mb, p))
  else:  # grid (b, c, mb); the P block index is 0
    ix = lambda f: (lambda b, c, mb: f(b, c, mb, 0))
  tokens = pl.BlockSpec((None, chunk, heads, tp),
                        ix(lambda b, c, mb, p: (b, c, mb, p)))
  per_head = pl.BlockSpec((None, heads, chunk),
                          ix(lambda b, c, mb, p: (b, mb, c)))
  group = pl.BlockSpec(
      (None, chunk, None, dstate),
      ix(lambda b, c, mb, p: (b, c, mb * heads // per_group, 0)),
  )
  skip = pl.BlockSpec((nheads,), ix(lambda b, c, mb, p: (0,)))
  states = pl.BlockSpec(
      (None, None, heads, tp, dstate), ix(lambda b, c, mb, p: (b, c, mb, p, 0))
  )
  docs = pl.BlockSpec((None, chunk), ix(lambda b, c, mb, p: (b, c)))
  return tokens, per_head, group, skip, states, docs


def _chunk_scan_fwd(cfg, x, dtp, cum, b, c, d, h_in, seg, carry):
  bsz, seqlen, nheads, headdim = x.shape
  dstate = b.shape[-1]
  tokens, per_head, group, skip, states, docs = _scan_specs(
      cfg, nheads, dstate, cfg.block_p, with_p_grid=True
  )
  in_specs = [tokens, per_head, per_head, group, group, skip, states]
  args = [x, dtp, cum, b, c, d, h_in]
  if cfg.has_docs:
    in_specs += [docs, docs]
    args += [seg, carry]
  body = functools.partial(
      kernel.chunk_scan_fwd_kernel, heads=cfg.heads, has_docs=cfg.has_docs,
      mm_dtype=jnp.dtype(cfg.mm_dtype),
  )
  return _call(
      cfg, body,
      grid=(bsz, seqlen // cfg.chunk, nheads // cfg.heads,
            headdim // cfg.block_p),
      in_specs=in_specs,
      out_specs=tokens,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      name="ssd_chunk_scan_fwd",
  )(*args)


def _chunk_scan_bwd(cfg, x, dtp, cum, b, c, d, h_in, dstates, dy, seg, carry):
  bsz, seqlen, nheads, headdim = x.shape
  dstate = b.shape[-1]
  tokens, per_head, group, skip, states, docs = _scan_specs(
      cfg, nheads, dstate, headdim, with_p_grid=False
  )
  in_specs = [tokens, per_head, per_head, group, group, skip, states, states]
  in_specs.append(tokens)
  args = [x, dtp, cum, b, c, d, h_in, dstates, dy]
  if cfg.has_docs:
    in_specs += [docs, docs]
    args += [seg, carry]
  nblocks = nheads // cfg.heads
  per_block = pl.BlockSpec((None, cfg.chunk, None, dstate),
                           lambda b_, c_, mb: (b_, c_, mb, 0))
  vec = jax.ShapeDtypeStruct(dtp.shape, _F32)
  grouped = jax.ShapeDtypeStruct((bsz, seqlen, nblocks, dstate), _F32)
  body = functools.partial(
      kernel.chunk_scan_bwd_kernel, heads=cfg.heads, has_docs=cfg.has_docs,
      mm_dtype=jnp.dtype(cfg.mm_dtype),
  )
  return _call(
      cfg, body,
      grid=(bsz, seqlen // cfg.chunk, nblocks),
      in_specs=in_specs,
      out_specs=[tokens, per_head, per_head, per_head, per_block, per_block],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] + [vec] * 3
      + [grouped] * 2,
      name="ssd_chunk_scan_bwd",
      bwd=True,
  )(*args)


# custom_vjp core on padded, chunk-aligned inputs.


def _states_in(cfg, x, dtp, cum, b, h0, seg, carry):
  """Forward steps 2 + 3: (g, h_in, final)."""
  g = _chunked.carry_decay(cfg.chunk, cum, carry)
  states = _chunk_state(cfg, x, dtp, cum, b, seg, mode="state")
  h_in, final = _state_passing(cfg, states, g, h0)
  return g, h_in, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  """(y [B,T,M,P] x.dtype, final [B,M,P,Q] f32) on padded inputs; a = dt A."""
  return _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry)[0]


def _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  cum = _chunked.chunk_cumsum(cfg.chunk, a)  # [B,M,T]
  _, h_in, final = _states_in(cfg, x, dtp, cum, b, h0, seg, carry)
  y = _chunk_scan_fwd(cfg, x, dtp, cum, b, c, d, h_in, seg, carry)
  return (y, final), (x, dtp, cum, b, c, d, h0, seg, carry)


def _core_bwd(cfg, residuals, cotangents):
  x, dtp, cum, b, c, d, h0, seg, carry = residuals
  dy, dfinal = cotangents
  dy = dy.astype(x.dtype)
  g, h_in, _ = _states_in(cfg, x, dtp, cum, b, h0, seg, carry)
  dh_out = _chunk_state(cfg, dy, dtp, cum, c, carry, mode="dout")
  dstates, dg, dh0 = _state_passing_bwd(
      cfg, dh_out, g, h_in, dfinal.astype(_F32)
  )
  dx, ddt, da, dskip, db, dc = _chunk_scan_bwd(
      cfg, x, dtp, cum, b, c, d, h_in, dstates, dy, seg, carry
  )
  return _chunked.core_cotangents(cfg.chunk, cfg.ngroups, dx=dx, ddt=ddt, da=da, dg=dg, g=g, db=db, dc=dc,
                                  dskip=dskip, dh0=dh0, b=b, c=c, d=d)


_ssd_core.defvjp(_core_fwd, _core_bwd)


def check_chunk_size(chunk_size: int) -> Optional[str]:
  """None if the Triton kernels take `chunk_size`, else why not."""
  if _triton_tiles.is_tile(chunk_size):
    return None
  return f"backend='triton' needs a power-of-2 {chunk_size=} >= {_triton_tiles.MIN_TILE}"


# Entry point (called by ops.ssd after argument checks).

def ssd_triton(
    x, dt, A, B, C, D, dt_bias, *, initial_state, doc_ids, chunk_size,
    dt_softplus, dt_min, dt_max, block_sizes: BlockSizes, interpret: Any,
):
  """`ops.ssd` on the Triton kernels; arguments already checked."""
  bsz, seqlen, nheads, headdim = x.shape
  ngroups, dstate = B.shape[2:]
  chunk = int(chunk_size)
  padded_p, padded_q = _triton_tiles.tile(headdim), _triton_tiles.tile(dstate)
  heads = math.gcd(block_sizes.heads_per_block, nheads // ngroups)
  # bf16/f16 inputs: products on those operands (f32 accumulation), like mamba.
  x_dtype = jnp.dtype(x.dtype)
  mm_dtype = x_dtype.name if x_dtype.itemsize < 4 else "float32"
  cfg = _Config(
      chunk=chunk,
      ngroups=ngroups,
      block_p=min(block_sizes.block_p, padded_p),
      heads=heads,
      has_docs=doc_ids is not None,
      mm_dtype=mm_dtype,
      interpret=interpret,
      num_warps=block_sizes.num_warps,
      num_warps_bwd=block_sizes.num_warps_bwd,
      num_stages=block_sizes.num_stages,
  )

  p = _chunked.prologue(
      x, dt, A, B, C, D, dt_bias, initial_state=initial_state, doc_ids=doc_ids, chunk=chunk,
      padded_p=padded_p, padded_q=padded_q, mm_dtype=mm_dtype, dt_softplus=dt_softplus,
      dt_min=dt_min, dt_max=dt_max,
  )
  y, final = _ssd_core(cfg, *p)
  return y[:, :seqlen, :, :headdim], final[:, :, :headdim, :dstate]
