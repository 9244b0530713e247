"""The one-token updates of decoding as Pallas (Triton GPU) kernels.

`ssd_decode_step(...)`: the SSD state update, passing over the state twice. A drop-in for
`reference.ssd_decode_step_reference` (same arguments and numbers up to the order of f32 sums) plus `backend`
and `interpret`. Decoding is bound by memory: per token and Mamba layer it reads and writes the f32 state
[B, M, P, Q] (5.3 GB over the 21 Mamba layers of Nemotron-3-Nano-4B at batch 64). The fewest passes are two,
one read and one write; the jnp reference takes three in XLA's H100 compile (update in place, then a
reduction that reads the new state again; fused into one kernel, XLA wrote the new state to a temporary and
copied it: five), and the new-document reset (`keep`) rides in the same kernel rather than a pass of its own.

`conv_ssd_decode_step(...)` / `conv_ssd_decode_step_packed(...)`: the whole one-token core of a Mamba-2 mixer
(dt, the x / B / C conv windows shifted and convolved, the SSD update) in one launch, a drop-in for
`reference.conv_ssd_decode_step_reference`; what the model decodes with (`n3jax.nn.DECODE_BACKENDS`). At
batch 1 a decoding step is bound by its launches as much as by its bytes: in XLA's H100 compile of the
Nemotron-3-Nano-4B step this takes the step from 575 kernels to 386.

Backends (each function):
  "triton"      the Pallas Triton kernels (`kernel_decode.py`): grid (B, M, P / bp), one [bp, Q] block of
                the state per program, updated in place (`input_output_aliases`); Q a power of 2.
  "mosaic_tpu"  the Pallas Mosaic kernel of the SSD update (`kernel_decode.decode_step_kernel_tpu`): grid
                (B, M / bm), a [bm, P, Q] block of the state per step, updated in place. The conv windows
                stay jnp (`reference.conv_decode_windows_reference`): on a TPU the whole step is one program,
                so fusing them saves no launch, while the state is the step's largest tensor: in XLA's v5e
                compile the jnp update reads it, writes it in place and reads it again for y (three passes,
                251 MB each per Mamba layer of Nemotron-3-Nano-4B at batch 64); the kernel takes two.
  "reference"   the jnp reference.
  "auto"        "triton" when the target platform is a GPU (or `interpret` is set) and Q is a power of 2,
                "mosaic_tpu" when it is a TPU, else "reference".

Verified on CPU in interpret mode against the references (`ops_decode_test.py`; the TPU kernel in the TPU
interpreter) and compiled ahead of time for an H100 and a v5e (`tests/test_aot.py`); their speed is owed to
the chips (`benchmarks/ssd_memory_bound.py`, `benchmarks/generate.py --ssd_backend=pallas`).
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _target
from pallas_kernels.ssd import kernel_decode
from pallas_kernels.ssd import reference

_BACKENDS = ("auto", "triton", "mosaic_tpu", "reference")
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of the decode kernels. Triton: `block_p` head-dim rows per program (a power of 2; None: the
  largest power of 2 up to 32 that divides P) and its warps. Mosaic TPU: `block_m` heads per grid step (a
  multiple of 8 that divides M, or M; None: the most whose f32 state block stays within 1 MiB, double-buffered
  in and out well inside a v5e's 16 MiB of scoped VMEM). Placeholders until a GPU / TPU has timed them."""
  block_p: Optional[int] = None
  num_warps: int = 4
  block_m: Optional[int] = None

  def __post_init__(self):
    # Values that no shape can take fail here, by name: 0 was a ZeroDivisionError at the first call and a
    # negative block_m a negative grid.
    if self.block_p is not None and not _power_of_two(self.block_p):
      raise ValueError(f"block_p={self.block_p} must be a power of 2 (or None)")
    if self.block_m is not None and self.block_m < 1:
      raise ValueError(f"block_m={self.block_m} must be >= 1 (or None)")
    if self.num_warps < 1:
      raise ValueError(f"num_warps={self.num_warps} must be >= 1")

  def heads(self, nheads: int, headdim: int, dstate: int) -> int:
    if self.block_m is not None:
      if nheads % self.block_m or (self.block_m % 8 and self.block_m != nheads):
        raise ValueError(f"block_m={self.block_m} must divide M={nheads} and be a multiple of 8 (or M)")
      return self.block_m
    fits = [m for m in range(8, nheads + 1, 8) if nheads % m == 0 and m * headdim * dstate * 4 <= 2**20]
    return max(fits) if fits else (8 if nheads % 8 == 0 else nheads)

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
    if platform == "tpu" and not interpret:
      return "mosaic_tpu"
    return "triton" if (platform == "gpu" or interpret) and _power_of_two(state_size) else "reference"
  if backend == "mosaic_tpu" and not interpret and platform != "tpu":
    raise ValueError(f"backend='mosaic_tpu' compiles for a TPU, but the target platform is {platform!r}; pass "
                     "interpret=True to run it on CPU, or lower under jax.sharding.use_abstract_mesh with a TPU "
                     "AbstractDevice")
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
  dtp = reference._process_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)  # pylint: disable=protected-access
  decay = jnp.exp(dtp * A.astype(_F32))                                   # [B, M]
  keep = jnp.ones((bsz,), _F32) if keep is None else keep.astype(_F32)
  d = jnp.zeros((nheads,), _F32) if D is None else D.astype(_F32)
  if backend == "mosaic_tpu":
    return _ssd_decode_tpu(state, x, dtp, decay, keep, d, B, C, bm=blocks.heads(nheads, headdim, dstate),
                           interpret=interpret)
  bp = blocks.rows(headdim)
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


def _ssd_decode_tpu(state, x, dtp, decay, keep, d, B, C, *, bm: int, interpret: bool):
  """The Mosaic call: grid (B, M / bm); per-head scalars as [., M, 1] columns (a [bm, 1] block), B and C
  whole per row ([J, Q]: a block may span two groups); the state in place."""
  bsz, nheads, headdim = x.shape
  groups, dstate = B.shape[1:]
  column = pl.BlockSpec((None, bm, 1), lambda b, m: (b, m, 0))               # [B, M, 1]
  rows = pl.BlockSpec((None, bm, headdim), lambda b, m: (b, m, 0))          # [B, M, P]
  whole_row = pl.BlockSpec((None, groups, dstate), lambda b, m: (b, 0, 0))   # [B, J, Q]
  state_spec = pl.BlockSpec((None, bm, headdim, dstate), lambda b, m: (b, m, 0, 0))
  return pl.pallas_call(
      functools.partial(kernel_decode.decode_step_kernel_tpu, per_group=nheads // groups, groups=groups),
      grid=(bsz, nheads // bm),
      in_specs=[column, column, pl.BlockSpec((None, 1, 1), lambda b, m: (b, 0, 0)),
                pl.BlockSpec((bm, 1), lambda b, m: (m, 0)), rows, whole_row, whole_row, state_spec],
      out_specs=[rows, state_spec],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, _F32)],
      input_output_aliases={7: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret is True else interpret,
      name="ssd_decode_step",
  )(decay[..., None], dtp[..., None], keep.reshape(bsz, 1, 1), d[:, None], x, B, C, state.astype(_F32))


def conv_ssd_decode_step(
    state: Optional[jax.Array],
    conv_state: tuple[jax.Array, jax.Array, jax.Array],
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    conv_weight: tuple[jax.Array, jax.Array, jax.Array],
    conv_bias: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
    *,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    keep: Optional[jax.Array] = None,
    activation: Optional[str] = "silu",
    block_sizes: Optional[DecodeBlockSizes] = None,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """One token through a Mamba-2 mixer's conv windows and SSM state in one kernel; args and results as
  `reference.conv_ssd_decode_step_reference` (raw, pre-conv x / B / C and dt; `keep` resets the windows
  and the state of rows that start a new document).

  The Triton kernel (`kernel_decode.conv_decode_step_kernel`, grid (B, M, P / bp) as `ssd_decode_step`)
  does in one launch what took nine kernels and three copies per Mamba layer in XLA's H100 compile of the
  jnp path at batch 1 (Nemotron-3-Nano-4B): dt's softplus, the three conv window shifts and convolutions,
  the SSM update. Each program convolves its x channels and its group's B and C (Q channels, recomputed by
  the group's programs from L2-resident windows), updates its state block in place and shifts its x window
  in place; the group's first program writes the shifted B / C windows to fresh buffers. D, dt_bias and A
  are cast to f32 inside. Not differentiable. `conv_ssd_decode_step_packed` takes x, B, C, dt as one array.
  """
  backend = _resolve_backend(backend, interpret, B.shape[-1])
  kw = dict(dt_softplus=dt_softplus, dt_min=dt_min, dt_max=dt_max, keep=keep, activation=activation)
  if backend == "reference":
    return reference.conv_ssd_decode_step_reference(state, conv_state, x, dt, A, B, C, D, dt_bias, conv_weight,
                                                     conv_bias, **kw)
  reference._check_conv_decode_inputs(conv_state, x, B, C, conv_weight, conv_bias, activation)  # pylint: disable=protected-access
  reference._check_decode_inputs(state, x, dt, A, B, C, D, dt_bias, keep)  # pylint: disable=protected-access
  if backend == "mosaic_tpu":
    return _conv_then_tpu_step(state, conv_state, x, dt, A, B, C, D, dt_bias, conv_weight, conv_bias,
                               block_sizes=block_sizes, interpret=interpret, **kw)
  bsz, nheads, headdim = x.shape
  groups, dstate = B.shape[1:]
  per_group = nheads // groups
  bp = (block_sizes or DecodeBlockSizes()).rows(headdim)
  raw = [(x, pl.BlockSpec((None, None, bp), lambda b, m, p: (b, m, p))),                            # [B, M, P]
         (B, pl.BlockSpec((None, None, dstate), lambda b, m, p: (b, m // per_group, 0))),          # [B, J, Q]
         (C, pl.BlockSpec((None, None, dstate), lambda b, m, p: (b, m // per_group, 0))),          # [B, J, Q]
         (dt[..., None], pl.BlockSpec((None, None, 1), lambda b, m, p: (b, m, 0)))]                # [B, M, 1]
  return _conv_decode_call(state, conv_state, raw, A, D, dt_bias, conv_weight, conv_bias, a_is_log=False,
                           y_dtype=x.dtype, block_sizes=block_sizes, interpret=interpret, **kw)


def conv_ssd_decode_step_packed(
    state: Optional[jax.Array],
    conv_state: tuple[jax.Array, jax.Array, jax.Array],
    xbcdt: jax.Array,
    A_log: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    conv_weight: tuple[jax.Array, jax.Array, jax.Array],
    conv_bias: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
    *,
    offset: int = 0,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    keep: Optional[jax.Array] = None,
    activation: Optional[str] = "silu",
    block_sizes: Optional[DecodeBlockSizes] = None,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """`conv_ssd_decode_step` on the new token's raw inputs as the mixer's fused input projection lays them
  out: `xbcdt` [B, N] holds x (M P, head-major), B (J Q), C (J Q) and dt (M) side by side from column `offset`
  (HF's `in_proj` row order; `offset` = M P skips its z), and A is given as the stored `A_log`
  (A = -exp(A_log) in f32). The shapes M, P, J, Q come from the conv windows.

  The kernel reads its pieces where they lie (element-offset blocks), so XLA neither slices the projection
  into four arrays nor computes A, D and dt_bias in f32 in kernels of their own: in the batch-1 decoding
  step of Nemotron-3-Nano-4B on an H100 those were seven small kernels per Mamba layer beside this one.
  """
  win_x, win_b = conv_state[0], conv_state[1]
  if win_x.ndim != 4 or win_b.ndim != 4:
    raise ValueError(f"conv_state must hold x [B, K-1, M, P] and B, C [B, K-1, J, Q] windows, got "
                     f"{[w.shape for w in conv_state]}")
  bsz, _, nheads, headdim = win_x.shape
  groups, dstate = win_b.shape[2:]
  mp, jq = nheads * headdim, groups * dstate
  if xbcdt.ndim != 2 or xbcdt.shape[0] != bsz or not 0 <= offset <= xbcdt.shape[1] - (mp + 2 * jq + nheads):
    raise ValueError(f"xbcdt must be [B, N] with B={bsz} and x, B, C, dt ({mp} + {jq} + {jq} + {nheads} columns) "
                     f"from column offset={offset}, got {xbcdt.shape}")
  piece = lambda start, *shape: jax.lax.slice_in_dim(xbcdt, offset + start, offset + start + math.prod(shape),
                                                      axis=1).reshape(bsz, *shape)
  # The pieces as arrays: for the reference and for the checks (dead code under jit on the kernel's path).
  x, dt = piece(0, nheads, headdim), piece(mp + 2 * jq, nheads)
  B, C = piece(mp, groups, dstate), piece(mp + jq, groups, dstate)
  backend = _resolve_backend(backend, interpret, dstate)
  kw = dict(dt_softplus=dt_softplus, dt_min=dt_min, dt_max=dt_max, keep=keep, activation=activation)
  if backend == "reference":
    return reference.conv_ssd_decode_step_reference(state, conv_state, x, dt, -jnp.exp(A_log.astype(_F32)), B, C, D,
                                                     dt_bias, conv_weight, conv_bias, **kw)
  reference._check_conv_decode_inputs(conv_state, x, B, C, conv_weight, conv_bias, activation)  # pylint: disable=protected-access
  reference._check_decode_inputs(state, x, dt, A_log, B, C, D, dt_bias, keep)  # pylint: disable=protected-access
  if backend == "mosaic_tpu":
    return _conv_then_tpu_step(state, conv_state, x, dt, -jnp.exp(A_log.astype(_F32)), B, C, D, dt_bias,
                               conv_weight, conv_bias, block_sizes=block_sizes, interpret=interpret, **kw)
  per_group = nheads // groups
  bp = (block_sizes or DecodeBlockSizes()).rows(headdim)
  at = lambda start, size, index: (xbcdt, pl.BlockSpec((None, pl.Element(size)),
                                                       lambda b, m, p: (b, offset + start + index(m, p))))
  raw = [at(0, bp, lambda m, p: m * headdim + p * bp),                          # x
         at(mp, dstate, lambda m, p: (m // per_group) * dstate),                # B
         at(mp + jq, dstate, lambda m, p: (m // per_group) * dstate),           # C
         at(mp + 2 * jq, 1, lambda m, p: m)]                                    # dt
  return _conv_decode_call(state, conv_state, raw, A_log, D, dt_bias, conv_weight, conv_bias, a_is_log=True,
                           y_dtype=xbcdt.dtype, block_sizes=block_sizes, interpret=interpret, **kw)


def _conv_then_tpu_step(state, conv_state, x, dt, A, B, C, D, dt_bias, conv_weight, conv_bias, *, keep, activation,
                        block_sizes, interpret, **dt_kw):
  """TPU: the conv windows in jnp (XLA fuses them into the step's one program), then the Mosaic SSD update."""
  (xc, bc, cc), windows = reference.conv_decode_windows_reference(conv_state, x, B, C, conv_weight, conv_bias,
                                                                  keep=keep, activation=activation)
  y, new_state = ssd_decode_step(state, xc, dt, A, bc, cc, D, dt_bias, keep=keep, block_sizes=block_sizes,
                                 backend="mosaic_tpu", interpret=interpret, **dt_kw)
  return y, new_state, windows


def _conv_decode_call(state, conv_state, raw, a, d, dt_bias, conv_weight, conv_bias, *, a_is_log: bool, y_dtype,
                      dt_softplus, dt_min, dt_max, keep, activation, block_sizes, interpret):
  """The Triton call of both entry points; `raw`: (array, BlockSpec) of x, B, C, dt, whose blocks are [bp],
  [Q], [Q], [1]."""
  win_x, win_b = conv_state[0], conv_state[1]
  width = conv_weight[0].shape[0]
  if width < 2:
    raise ValueError(f"conv_ssd_decode_step needs a conv width K >= 2 (a window to shift), got K={width}")
  bsz, _, nheads, headdim = win_x.shape
  groups, dstate = win_b.shape[2:]
  per_group = nheads // groups
  blocks = block_sizes or DecodeBlockSizes()
  bp = blocks.rows(headdim)
  if state is None:
    state = jnp.zeros((bsz, nheads, headdim, dstate), _F32)
  has_bias = conv_bias is not None and all(b is not None for b in conv_bias)
  if conv_bias is not None and not has_bias:
    raise ValueError("conv_bias: give all three of x, B, C, or None")
  group = lambda m: m // per_group
  row_m = pl.BlockSpec((None, 1), lambda b, m, p: (m, 0))                  # [M, 1]
  per_head = lambda v: jnp.zeros((nheads, 1), _F32) if v is None else v[:, None]  # [M] -> [M, 1]
  win_spec = lambda block, index: pl.BlockSpec((None, width - 1, None, block), lambda b, m, p: (b, 0, *index(m, p)))
  in_specs = [
      pl.BlockSpec((None, 1), lambda b, m, p: (b, 0)),                     # keep [B, 1]
      *(spec for _, spec in raw),                                          # x, B, C, dt
      row_m, row_m, row_m,                                                 # A (or A_log), D, dt_bias [M, 1]
      win_spec(bp, lambda m, p: (m, p)),                                   # windows [B, K-1, M, P] / [B, K-1, J, Q]
      win_spec(dstate, lambda m, p: (group(m), 0)),
      win_spec(dstate, lambda m, p: (group(m), 0)),
      pl.BlockSpec((width, None, bp), lambda b, m, p: (0, m, p)),          # conv weights [K, M, P] / [K, J, Q]
      pl.BlockSpec((width, None, dstate), lambda b, m, p: (0, group(m), 0)),
      pl.BlockSpec((width, None, dstate), lambda b, m, p: (0, group(m), 0)),
  ]
  keep_f = jnp.ones((bsz, 1), _F32) if keep is None else keep.astype(_F32)[:, None]
  args = [keep_f, *(v for v, _ in raw), a[:, None], per_head(d), per_head(dt_bias), *conv_state, *conv_weight]
  if has_bias:
    in_specs += [pl.BlockSpec((None, bp), lambda b, m, p: (m, p)),         # conv biases [M, P] / [J, Q]
                 pl.BlockSpec((None, dstate), lambda b, m, p: (group(m), 0)),
                 pl.BlockSpec((None, dstate), lambda b, m, p: (group(m), 0))]
    args += list(conv_bias)
  in_specs.append(pl.BlockSpec((None, None, bp, dstate), lambda b, m, p: (b, m, p, 0)))  # state [B, M, P, Q]
  args.append(state.astype(_F32))
  window_x = 8                                                             # the x window's position in args
  out_specs = [pl.BlockSpec((None, None, bp), lambda b, m, p: (b, m, p)), in_specs[-1], *in_specs[window_x:window_x + 3]]
  out_shape = [jax.ShapeDtypeStruct((bsz, nheads, headdim), y_dtype), jax.ShapeDtypeStruct(state.shape, _F32),
               *(jax.ShapeDtypeStruct(w.shape, w.dtype) for w in conv_state)]
  kernel = functools.partial(kernel_decode.conv_decode_step_kernel, width=width, per_group=per_group,
                             has_bias=has_bias, a_is_log=a_is_log, activation=activation, dt_softplus=dt_softplus,
                             dt_min=float(dt_min), dt_max=float(dt_max))
  y, new_state, new_x, new_b, new_c = pl.pallas_call(
      kernel,
      grid=(bsz, nheads, headdim // bp),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={len(args) - 1: 1, window_x: 2},                # the state and the x window in place
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
      interpret=interpret,
      name="conv_ssd_decode_step",
  )(*args)
  return y, new_state, (new_x, new_b, new_c)
