"""Mosaic GPU path of `ops.ssd` (Hopper): tiling, kernel calls and the custom VJP.

Pallas Mosaic GPU is the GPU backend JAX keeps as it deprecates Pallas Triton (jax 0.12); on Hopper it
reaches the tensor cores through `wgmma` on tiles that the TMA engine stages in swizzled shared memory.
Kernel bodies: `kernel_mgpu.py`. The pipeline is the Triton path's (`ops_triton.py`, with the jnp of
`_chunked.py`), one warpgroup per program:

  jnp     dt = clip(softplus(dt + dt_bias)); a = dt A; pad T to the chunk, P and Q to multiples of 64
          (one 128-byte swizzle row of bf16); document masks; cum = chunk-local cumsum of a.
  kernel  chunk_state     grid (B, C, M/H) chunk-end states          [B, M, C P, Q] f32
  kernel  state_passing   grid (B, M, Q/Qb) loop over chunks -> h_in [B, M, C P, Q] (input dtype), final
  kernel  chunk_scan_fwd  grid (B, C, M/H) y = (S o W o dt) x + e o (C h_in^T) + D x, H heads of a
                                           group per program sharing S = C B^T
Backward (chunk_state and state_passing recomputed, as in state-spaces/mamba):
  kernel  chunk_state ("dout")   grid (B, C, M/H) dL/dh_in from y
  kernel  state_passing_bwd      grid (B, M, Q/Qb) reverse loop -> dstates (input dtype), dg, dh0
  kernel  scan_bwd_dbc           grid (B, C, M/H, Q/64)   dB, dC summed over H heads of a group in
                                 shared memory; the per-token decay terms
  kernel  scan_bwd_dx            grid (B, C, M)   dx, d dt, D-skip terms, da
  jnp     dB / dC summed over a group's heads, dD, the carry-decay term of da; dt / A / dt_bias
          gradients by autodiff of the prologue.

The states are laid out [B, M, C P, Q] (chunk c's tile at rows c P), so that a (b, m) program's chunks
form one 2-D array for the TMA engine. bf16 / f16 only (wgmma would run f32 as TF32; f32 runs on the
Triton or reference paths). chunk_size a multiple of 64 (the wgmma M of a warpgroup), run as chunks of
128 or 64 (`kernel_chunk`): the programs' shared memory fits an H100's 227 KB at L = 128 up to P = 64,
Q = 128 (every Nemotron mixer), at L = 64 up to P x Q = 128 x 128 or 64 x 256; larger heads or states
are refused with a ValueError. Verified in JAX's Mosaic GPU interpreter on CPU against the reference,
outputs and gradients, and lowered for an abstract H100 (`ops_mgpu_test.py`). Owed: runs and the
comparison with mamba_ssm's Triton kernels on an H100 (`benchmarks/ssd.py`), then tuning. What to look
at first, by estimate (Nano mixer, batch 2 x 8192, bf16; HBM at ~3 TB/s):
  * the chunk states: [B, M, C P, Q] f32 written by chunk_state and read by state_passing (2 x 0.27 GB),
    plus h_in (0.13 GB in bf16); mamba_ssm moves the same;
  * dB and dC leave scan_bwd_dbc per block of H heads (H = 8: 0.07 GB each), not per head (1.07 GB for
    the two): the kernel sums the group's heads in shared memory, at the price of computing dS once per
    64 columns of Q (twice at Q = 128);
  * every program is one warpgroup working in 64-row blocks of the chunk (elementwise work in [64, 64]
    pieces), which also skips the zero quarter of the causal [L, L] products; two consumer warpgroups
    (as `gmm_mgpu`) are the next step if the profile shows the tensor cores idle;
  * shared memory, not registers, limits the programs per SM: 131 to 226 KB for the chunk kernels
    (`benchmarks/kernel_resources.py`) leave one program (4 warps) per SM, so latency is hidden only by
    the TMA pipelines; state passing (48 KB) runs four;
  * the decay gradient's U (dS o S) product runs as hi + lo (2 x 2 L^3 flops per head); hi alone is
    within the bf16 tolerance if that product shows up in a profile.
"""

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu
from pallas_kernels import _target
from pallas_kernels import _vma
from pallas_kernels.ssd import _chunked
from pallas_kernels.ssd import kernel_mgpu

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class MgpuBlockSizes:
  """Static tiling of the Mosaic GPU SSD kernels.

  The chunk kernels' tiles are fixed by the problem (one head's [L, P], [L, Q] and [P, Q] tiles, P and
  Q padded to multiples of 64).

  Attributes:
    heads_per_block: heads of one B/C group per chunk-state program (which loads the group's B or C
      once), forward chunk-scan program (which computes C B^T once for them) and dB / dC program (which
      sums their gradients); their tiles stream through a pipeline. Clamped to gcd(heads_per_block, M / J).
    state_cols: Q columns of the state per state-passing program (the recurrence is elementwise): at
      32, a 64k-token row of 64 heads runs 256 programs rather than 64.
    max_concurrent_steps: pipeline stages (TMA loads in flight) of the state-passing loops and of the
      forward chunk scan's loop over heads.
  """

  heads_per_block: int = 8
  state_cols: int = 32
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if self.heads_per_block < 1:
      raise ValueError(f"heads_per_block={self.heads_per_block} must be >= 1.")
    if self.state_cols not in (8, 16, 32, 64):
      raise ValueError(f"state_cols={self.state_cols} must be 8, 16, 32 or 64.")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1.")

  @classmethod
  def for_device(cls, device: Optional[Any] = None) -> "MgpuBlockSizes":
    """Defaults by `device.device_kind` (default: the target device)."""
    return _target.lookup(_DEFAULTS, cls(), device)


# Untuned: not yet swept on a GPU with benchmarks/ssd.py.
_DEFAULTS: tuple[tuple[str, MgpuBlockSizes], ...] = (
    ("h200", MgpuBlockSizes(max_concurrent_steps=2)),
    ("h100", MgpuBlockSizes(max_concurrent_steps=2)),
)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) configuration of one padded problem."""

  chunk: int
  ngroups: int  # J
  group_size: int  # heads per B/C group
  heads: int  # heads per chunk-state, forward chunk-scan and dB / dC program; divides group_size
  state_cols: int  # Q columns per state-passing program; divides the padded Q
  has_docs: bool
  max_concurrent_steps: int
  interpret: Any


def _vec(chunk, dtype=_F32):
  return plgpu.SMEM((chunk,), dtype)


def _chunk_vecs(chunk):
  """Shared memory of `kernel_mgpu._Chunk`: dt, cum twice, seg twice, carry."""
  return (_vec(chunk),) * 3 + (_vec(chunk, jnp.int32),) * 2 + (_vec(chunk),)


def _slots(shape, dtype):
  """Two shared-memory buffers of one output tile (`kernel_mgpu._write_slots`); 16-bit tiles of 64
  columns are swizzled (TMA stores read any layout; the swizzle avoids bank conflicts)."""
  if jnp.dtype(dtype) == _F32 or len(shape) == 1 or shape[-1] % _mgpu.ALIGN:
    return plgpu.SMEM((2, *shape), dtype)
  return plgpu.SMEM((2, *shape), dtype, transforms=_mgpu.transforms(dtype))


def _docs(cfg, seg, carry):
  return [seg, carry] if cfg.has_docs else []


def _run(cfg, body, out_type, grid, names, scratch, *args):
  name = "ssd_" + body.func.__name__.removesuffix("_kernel")  # e.g. ssd_chunk_state, ssd_chunk_state_dout
  name += "_dout" if body.keywords.get("mode") == "dout" else ""
  outs = _mgpu.kernel(body, out_type, grid, names, scratch, cfg.interpret, name=name)(*args)
  return jax.tree.map(lambda o: _vma.vary_like(o, args[0]), outs)


def _chunk_state(cfg, lhs, dtp, cum, rhs, seg, carry, *, mode):
  """[B, M, C P, Q] f32: sum_l lhs[l, p] coef_l rhs[l, q] per chunk and head."""
  bsz, seqlen, nheads, headdim = lhs.shape
  dstate = rhs.shape[-1]
  chunk, nchunks, heads = cfg.chunk, seqlen // cfg.chunk, cfg.heads
  body = functools.partial(kernel_mgpu.chunk_state_kernel, mode=mode, has_docs=cfg.has_docs,
                           group_size=cfg.group_size, heads=heads, max_concurrent_steps=cfg.max_concurrent_steps)
  scratch = (_mgpu.swizzled((chunk, dstate), rhs.dtype), _vec(chunk, jnp.int32 if mode == "state" else _F32),
             _slots((headdim, dstate), _F32), plgpu.Barrier(num_barriers=2))
  out = jax.ShapeDtypeStruct((bsz, nheads, nchunks * headdim, dstate), _F32)
  return _run(cfg, body, out, (bsz, nchunks, nheads // heads), ("b", "c", "hb"), scratch,
              lhs, dtp, cum, rhs, *_docs(cfg, seg, carry))


def _state_passing(cfg, states, g, h0, dtypes):
  """(h_in [B, M, C P, Q] in each of `dtypes`..., final [B, M, P, Q] f32)."""
  bsz, nheads, _, dstate = states.shape
  headdim, q_cols = h0.shape[2], cfg.state_cols
  body = functools.partial(kernel_mgpu.state_passing_kernel, nchunks=g.shape[-1],
                           max_concurrent_steps=cfg.max_concurrent_steps)
  out = [jax.ShapeDtypeStruct(states.shape, dtype) for dtype in dtypes]
  out.append(jax.ShapeDtypeStruct(h0.shape, _F32))
  scratch = (plgpu.SMEM((headdim, q_cols), _F32),
             *(_slots((headdim, q_cols), dtype) for dtype in dtypes), plgpu.Barrier(num_barriers=1))
  return _run(cfg, body, tuple(out), (bsz, nheads, dstate // q_cols), ("b", "m", "q"), scratch, states, g, h0)


def _state_passing_bwd(cfg, dh_out, g, h_in, dfinal, dstate_dtype):
  """dstates [B, M, C P, Q] (dstate_dtype), dg [B, M, C] f32, dh0 [B, M, P, Q] f32."""
  bsz, nheads, rows, dstate = dh_out.shape
  headdim, nchunks, q_cols = dfinal.shape[2], g.shape[-1], cfg.state_cols
  body = functools.partial(kernel_mgpu.state_passing_bwd_kernel, nchunks=nchunks,
                           max_concurrent_steps=cfg.max_concurrent_steps)
  nq = dstate // q_cols
  out = (jax.ShapeDtypeStruct(dh_out.shape, dstate_dtype), jax.ShapeDtypeStruct((bsz, nheads, nq, rows), _F32),
         jax.ShapeDtypeStruct(dfinal.shape, _F32))
  scratch = (plgpu.SMEM((headdim, q_cols), _F32), _slots((headdim, q_cols), dstate_dtype),
             _slots((headdim,), _F32), plgpu.Barrier(num_barriers=1))
  dstates, dg_rows, dh0 = _run(cfg, body, out, (bsz, nheads, nq), ("b", "m", "q"), scratch,
                               dh_out, g, h_in, dfinal)
  return dstates, dg_rows.reshape(bsz, nheads, nq, nchunks, headdim).sum(axis=(2, 4)), dh0


def _chunk_scan_fwd(cfg, x, dtp, cum, b, c, d, h_in, seg, carry):
  bsz, seqlen, nheads, headdim = x.shape
  chunk, dstate, heads = cfg.chunk, b.shape[-1], cfg.heads
  body = functools.partial(kernel_mgpu.chunk_scan_fwd_kernel, has_docs=cfg.has_docs,
                           group_size=cfg.group_size, heads=heads, max_concurrent_steps=cfg.max_concurrent_steps)
  scratch = (_mgpu.swizzled((chunk, dstate), b.dtype), plgpu.SMEM((chunk, chunk), _F32),
             _mgpu.swizzled((chunk, chunk), x.dtype), _mgpu.swizzled((chunk, headdim), x.dtype),
             _vec(chunk, jnp.int32), _vec(chunk, jnp.int32), _vec(chunk), plgpu.Barrier(num_barriers=5))
  return _run(cfg, body, jax.ShapeDtypeStruct(x.shape, x.dtype), (bsz, seqlen // chunk, nheads // heads),
              ("b", "c", "hb"), scratch, x, dtp, cum, b, c, d, h_in, *_docs(cfg, seg, carry))


def _scan_bwd_dbc(cfg, x, dtp, cum, b, c, h_in, dstates, dy, seg, carry):
  """db, dc [B, T, M / H, Q] f32 (summed over the H heads of a program), dw_w, de_e [B, M, T] f32."""
  bsz, seqlen, nheads, _ = x.shape
  chunk, dstate, heads = cfg.chunk, b.shape[-1], cfg.heads
  q_cols = _mgpu.ALIGN
  body = functools.partial(kernel_mgpu.scan_bwd_dbc_kernel, has_docs=cfg.has_docs, group_size=cfg.group_size,
                           heads=heads, max_concurrent_steps=cfg.max_concurrent_steps)
  rb = kernel_mgpu._ROW_BLOCK  # pylint: disable=protected-access
  group = _mgpu.swizzled((chunk, q_cols), b.dtype)
  tiles = tuple(_mgpu.swizzled((rb, chunk - r0), x.dtype) for r0 in range(0, chunk, rb))
  scratch = (group, group, *tiles, plgpu.SMEM((chunk, q_cols), _F32), plgpu.SMEM((chunk, q_cols), _F32),
             plgpu.SMEM((2, 2, chunk), _F32), _vec(chunk, jnp.int32), _vec(chunk, jnp.int32), _vec(chunk),
             plgpu.Barrier(num_barriers=5))
  summed = jax.ShapeDtypeStruct((bsz, seqlen, nheads // heads, dstate), _F32)
  partial = jax.ShapeDtypeStruct((dstate // q_cols,) + dtp.shape, _F32)
  db, dc, dw_w, de_e = _run(
      cfg, body, (summed, summed, partial, partial),
      (bsz, seqlen // chunk, nheads // heads, dstate // q_cols), ("b", "c", "hb", "qb"), scratch,
      x, dtp, cum, b, c, h_in, dstates, dy, *_docs(cfg, seg, carry))
  return db, dc, dw_w.sum(axis=0), de_e.sum(axis=0)


def _scan_bwd_dx(cfg, x, dtp, cum, b, c, d, dstates, dy, dw_w, de_e, seg, carry):
  """dx [B, T, M, P], ddt, dskip, da [B, M, T] f32."""
  bsz, seqlen, nheads, headdim = x.shape
  chunk, dstate = cfg.chunk, b.shape[-1]
  body = functools.partial(kernel_mgpu.scan_bwd_dx_kernel, has_docs=cfg.has_docs,
                           group_size=cfg.group_size)
  tokens = _mgpu.swizzled((chunk, headdim), x.dtype)
  group = _mgpu.swizzled((chunk, dstate), b.dtype)
  scratch = (tokens, tokens, group, group, _mgpu.swizzled((headdim, dstate), b.dtype),
             plgpu.SMEM((3, chunk), _F32), _vec(chunk), _vec(chunk), *_chunk_vecs(chunk),
             plgpu.Barrier(num_barriers=7 + kernel_mgpu._Chunk.NUM_VECS))
  vec = jax.ShapeDtypeStruct(dtp.shape, _F32)
  return _run(cfg, body, (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec, vec),
              (bsz, seqlen // chunk, nheads), ("b", "c", "m"), scratch,
              x, dtp, cum, b, c, d, dstates, dy, dw_w, de_e, *_docs(cfg, seg, carry))


def _states_in(cfg, x, dtp, cum, b, h0, seg, carry, dtypes):
  """Forward chunk states and their passing: (g, *h_in in `dtypes`, final)."""
  g = _chunked.carry_decay(cfg.chunk, cum, carry)
  states = _chunk_state(cfg, x, dtp, cum, b, seg, carry, mode="state")
  return (g, *_state_passing(cfg, states, g, h0, dtypes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  """(y [B,T,M,P] x.dtype, final [B,M,P,Q] f32) on padded inputs; a = dt A."""
  return _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry)[0]


def _core_fwd(cfg, x, dtp, a, b, c, d, h0, seg, carry):
  cum = _chunked.chunk_cumsum(cfg.chunk, a)  # [B,M,T]
  _, h_in, final = _states_in(cfg, x, dtp, cum, b, h0, seg, carry, (x.dtype,))
  y = _chunk_scan_fwd(cfg, x, dtp, cum, b, c, d, h_in, seg, carry)
  return (y, final), (x, dtp, cum, b, c, d, h0, seg, carry)


def _core_bwd(cfg, residuals, cotangents):
  x, dtp, cum, b, c, d, h0, seg, carry = residuals
  dy, dfinal = cotangents
  dy = dy.astype(x.dtype)
  g, h_in32, h_in, _ = _states_in(cfg, x, dtp, cum, b, h0, seg, carry, (_F32, x.dtype))
  dh_out = _chunk_state(cfg, dy, dtp, cum, c, seg, carry, mode="dout")
  dstates, dg, dh0 = _state_passing_bwd(cfg, dh_out, g, h_in32, dfinal.astype(_F32), x.dtype)
  db, dc, dw_w, de_e = _scan_bwd_dbc(cfg, x, dtp, cum, b, c, h_in, dstates, dy, seg, carry)
  dx, ddt, dskip, da = _scan_bwd_dx(cfg, x, dtp, cum, b, c, d, dstates, dy, dw_w, de_e, seg, carry)
  return _chunked.core_cotangents(cfg.chunk, cfg.ngroups, dx=dx, ddt=ddt, da=da, dg=dg, g=g, db=db, dc=dc,
                                  dskip=dskip, dh0=dh0, b=b, c=c, d=d)


_ssd_core.defvjp(_core_fwd, _core_bwd)


def check_chunk_size(chunk_size: int) -> Optional[str]:
  """None if the Mosaic GPU kernels take `chunk_size`, else why not."""
  if chunk_size >= _mgpu.ALIGN and chunk_size % _mgpu.ALIGN == 0:
    return None
  return f"backend='mosaic_gpu' needs a {chunk_size=} that is a multiple of {_mgpu.ALIGN}"


def _fits(chunk: int, padded_p: int, padded_q: int) -> bool:
  """Whether every program's shared memory fits an H100's 227 KB (measured by lowering: 128-token chunks
  up to P x Q = 64 x 128; 64-token chunks up to 128 x 128 and 64 x 256)."""
  if chunk == 2 * _mgpu.ALIGN:
    return padded_p <= 64 and padded_q <= 128
  return padded_p <= 128 and padded_q <= 256 and padded_p * padded_q <= 128 * 128


def kernel_chunk(chunk_size: int, headdim: int = 64, dstate: int = 128) -> int:
  """The chunk the kernels run: 128 where `chunk_size` is a multiple of 128 and the tiles fit, else 64.

  Chunking only re-associates the recurrence (y and the states are the same sums in another order), so a
  model configured with 256-token chunks (Nemotron Nano 2) runs 128-token ones, and head or state sizes
  too large for 128-token programs (P = 128, Q = 256) run 64-token ones: the [L, L], [L, P] and [L, Q]
  tiles of one program must fit in an H100's shared memory. Raises ValueError where no chunk fits.
  """
  padded_p, padded_q = _mgpu.aligned(headdim), _mgpu.aligned(dstate)
  for chunk in (2 * _mgpu.ALIGN, _mgpu.ALIGN):
    if chunk_size % chunk == 0 and _fits(chunk, padded_p, padded_q):
      return chunk
  raise ValueError(
      f"backend='mosaic_gpu' takes head_dim x state up to 128 x 128 or 64 x 256 (one program's shared memory "
      f"on an H100), got P={headdim}, Q={dstate}; use backend='triton' or 'reference'")


def check_dtype(dtype) -> Optional[str]:
  """None if the Mosaic GPU kernels take inputs of `dtype`, else why not."""
  if jnp.dtype(dtype) in _mgpu.OPERAND_DTYPES:
    return None
  return (f"backend='mosaic_gpu' takes bf16 or f16 x (wgmma would run {jnp.dtype(dtype).name} as TF32); "
          "use backend='triton' or 'reference' for float32")


def ssd_mgpu(
    x, dt, A, B, C, D, dt_bias, *, initial_state, doc_ids, chunk_size, dt_softplus, dt_min, dt_max,
    block_sizes: MgpuBlockSizes, interpret: Any,
):
  """`ops.ssd` on the Mosaic GPU kernels; arguments already checked (`check_*` included)."""
  _, seqlen, nheads, headdim = x.shape
  ngroups, dstate = B.shape[2:]
  cfg = _Config(
      chunk=kernel_chunk(chunk_size, headdim, dstate), ngroups=ngroups, group_size=nheads // ngroups,
      heads=math.gcd(block_sizes.heads_per_block, nheads // ngroups),
      state_cols=math.gcd(block_sizes.state_cols, _mgpu.aligned(dstate)), has_docs=doc_ids is not None,
      max_concurrent_steps=block_sizes.max_concurrent_steps, interpret=_mgpu.interpret_params(interpret),
  )
  p = _chunked.prologue(
      x, dt, A, B, C, D, dt_bias, initial_state=initial_state, doc_ids=doc_ids, chunk=cfg.chunk,
      padded_p=_mgpu.aligned(headdim), padded_q=_mgpu.aligned(dstate), mm_dtype=x.dtype, dt_softplus=dt_softplus,
      dt_min=dt_min, dt_max=dt_max,
  )
  y, final = _ssd_core(cfg, *p)
  return y[:, :seqlen, :, :headdim], final[:, :, :headdim, :dstate]
