"""`ssd_decode_step(...)`: the one-token SSD update of decoding, as a Pallas kernel that passes over the state twice.

A drop-in for `reference.ssd_decode_step_reference` (same arguments and numbers up to the order of f32 sums)
plus `backend` and `interpret`. Decoding is bound by memory: per token and Mamba layer it reads and writes
the f32 state [B, M, P, Q] (5.3 GB over the 21 Mamba layers of Nemotron-3-Nano-4B at batch 64). The fewest
passes are two, one read and one write; the jnp reference takes three in XLA's H100 compile (update in place,
then a reduction that reads the new state again; fused into one kernel, XLA wrote the new state to a temporary
and copied it: five), and the new-document reset (`keep`) rides in the same kernel rather than a pass of
its own.

Backends:
  "triton"     the Pallas Triton kernel (`kernel_decode.py`): grid (B, M, P / bp), one [bp, Q] block of
               the state per program, updated in place (`input_output_aliases`); Q a power of 2.
  "reference"  `reference.ssd_decode_step_reference`.
  "auto"       "triton" when the target platform is a GPU (or `interpret` is set) and Q is a power of 2,
               else "reference". On TPU the reference stays: XLA fuses its update and readout there
               (a Mosaic TPU kernel is not written).

Verified on CPU in interpret mode against the reference (`ops_decode_test.py`) and compiled for an H100
ahead of time; its speed is owed to the GPU run (`benchmarks/generate.py --ssd_backend=pallas`).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _target
from pallas_kernels.ssd import kernel_decode
from pallas_kernels.ssd import reference

_BACKENDS = ("auto", "triton", "reference")
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of the Triton decode kernel: `block_p` head-dim rows per program (a power of 2; None: the
  largest power of 2 up to 32 that divides P) and its warps. Placeholders until a GPU has timed them."""
  block_p: Optional[int] = None
  num_warps: int = 4

  def rows(self, headdim: int) -> int:
    if self.block_p is not None:
      if self.block_p & (self.block_p - 1) or headdim % self.block_p:
        raise ValueError(f"block_p={self.block_p} must be a power of 2 that divides P={headdim}")
      return self.block_p
    return next(b for b in (32, 16, 8, 4, 2, 1) if headdim % b == 0)


def _power_of_two(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _resolve_backend(backend: str, interpret: bool, state_size: int) -> str:
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown {backend=}; expected one of {_BACKENDS}")
  platform = _target.platform()
  if backend == "auto":
    return "triton" if (platform == "gpu" or interpret) and _power_of_two(state_size) else "reference"
  if backend == "triton":
    if not _power_of_two(state_size):
      raise ValueError(f"backend='triton' needs the state size Q a power of 2, got Q={state_size}")
    if not interpret and platform != "gpu":
      raise ValueError(f"backend='triton' compiles for a GPU, but the target platform is {platform!r}; pass "
                       "interpret=True to run it on CPU, or lower under jax.sharding.use_abstract_mesh with a GPU "
                       "AbstractDevice")
  return backend


def ssd_decode_step(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    *,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    keep: Optional[jax.Array] = None,
    block_sizes: Optional[DecodeBlockSizes] = None,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """One-token SSD update; args and results as `reference.ssd_decode_step_reference` (`keep` [B] bool: rows
  whose state carries on; the others restart from zero). The Triton kernel updates `state` in place when the
  caller donates it. Not differentiable (decoding only)."""
  backend = _resolve_backend(backend, interpret, B.shape[-1])
  if backend == "reference":
    return reference.ssd_decode_step_reference(state, x, dt, A, B, C, D, dt_bias, dt_softplus=dt_softplus,
                                               dt_min=dt_min, dt_max=dt_max, keep=keep)
  reference._check_decode_inputs(state, x, dt, A, B, C, D, dt_bias, keep)  # pylint: disable=protected-access
  bsz, nheads, headdim = x.shape
  dstate = B.shape[-1]
  if state is None:
    state = jnp.zeros((bsz, nheads, headdim, dstate), _F32)
  groups = B.shape[1]
  per_group = nheads // groups
  blocks = block_sizes or DecodeBlockSizes()
  bp = blocks.rows(headdim)
  dtp = reference._process_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)  # pylint: disable=protected-access
  decay = jnp.exp(dtp * A.astype(_F32))                                   # [B, M]
  keep = jnp.ones((bsz,), _F32) if keep is None else keep.astype(_F32)
  d = jnp.zeros((nheads,), _F32) if D is None else D.astype(_F32)
  column = lambda v: v[..., None]                                          # [..] -> [.., 1]: a 1-element block
  scalar_bm = pl.BlockSpec((None, None, 1), lambda b, m, p: (b, m, 0))     # [B, M, 1]
  in_specs = [
      scalar_bm,                                                           # decay
      scalar_bm,                                                           # dt
      pl.BlockSpec((None, 1), lambda b, m, p: (b, 0)),                     # keep [B, 1]
      pl.BlockSpec((None, 1), lambda b, m, p: (m, 0)),                     # D [M, 1]
      pl.BlockSpec((None, None, bp), lambda b, m, p: (b, m, p)),           # x [B, M, P]
      pl.BlockSpec((None, None, dstate), lambda b, m, p: (b, m // per_group, 0)),  # B [B, J, Q]
      pl.BlockSpec((None, None, dstate), lambda b, m, p: (b, m // per_group, 0)),  # C [B, J, Q]
      pl.BlockSpec((None, None, bp, dstate), lambda b, m, p: (b, m, p, 0)),  # state [B, M, P, Q]
  ]
  out_specs = [pl.BlockSpec((None, None, bp), lambda b, m, p: (b, m, p)),
               pl.BlockSpec((None, None, bp, dstate), lambda b, m, p: (b, m, p, 0))]
  y, new_state = pl.pallas_call(
      kernel_decode.decode_step_kernel,
      grid=(bsz, nheads, headdim // bp),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, _F32)],
      input_output_aliases={7: 1},
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="ssd_decode_step",
  )(column(decay), column(dtp), column(keep), column(d), x, B, C, state.astype(_F32))
  return y, new_state
