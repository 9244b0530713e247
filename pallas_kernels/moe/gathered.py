"""Routed experts for a few tokens: each (token, slot) row reads its expert's weights by id.

Decoding a MoE model routes a handful of rows (batch x R) per step. The sorted dispatch of ``ops.py`` (argsort
of the ids, per-expert counts and offsets, a grouped matmul whose grid has a column of programs per expert,
un-sort and combine) then costs far more kernel launches than it moves bytes: at Nemotron 3 Nano's shape, about
31 of them per MoE layer at batch 1 in XLA's H100 compile, nearly all for 6 rows. Here each row n = (t, r)
runs its own expert instead, with no sort:

  h[n] = act(tokens[t] @ w_up[ids[n]])          [N, F]   one kernel, grid (N, F blocks)
  y[n] = h[n] @ w_down[ids[n]]                  [N, D]   one kernel, grid (N, D blocks), f32
  combined[t] = sum_r weights[t, r] * round(y[t, r])      (``combine_slots``; XLA fuses it)

The bytes read are the chosen experts' weights, once per row. When the rows of a step outnumber the experts
they reach, the sorted dispatch reads each expert once and wins; the model picks this path only up to
``ModelConfig.moe_gather_max_rows`` rows. Numerics are ``reference.sorted_dispatch``'s: operands in
tokens.dtype, f32 accumulation, the activation on the f32 sum and its result rounded to tokens.dtype, each
slot's output rounded to tokens.dtype before the f32 weighted sum over slots. Only the order of the f32 sums
differs (a kernel's own blocking).

Tensor parallelism (Megatron's for expert MLPs): ``gathered_expert_mlp`` runs on an F-slice of both weights
as it runs on the whole (the up product's columns, the down product's contraction), and returns the down
product unrounded in f32, so that shards' partial sums add up (``psum``) before the rounding.

Kernels: Pallas Triton on GPU (one program per row and block of output columns; a multiply-and-reduce
loop over the contraction, the product too narrow for the tensor cores to matter), Pallas Mosaic on TPU
(the ids scalar-prefetched into SMEM; the BlockSpec index maps pick each row's expert block; the whole
contraction in one block). On CPU: the interpreters. Gradients (``jax.custom_vjp``) are those of the pure-jnp
reference, ``reference.gathered_expert_mlp_reference``: it gathers the rows' weights, which is cheap for the
few rows this path takes.

Einsum letters: T tokens, R slots per token, N = T * R rows, D model width, F expert hidden, E experts.

This module imports only jax (it is part of ``pallas_kernels``).
"""

import dataclasses
import functools
from typing import Callable

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common
from pallas_kernels.moe import reference

Array = jax.Array
DTypeLike = jax.typing.DTypeLike
Interpret = bool | pltpu.InterpretParams


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileSizes:
  """One Triton kernel's tile (static): output columns per program, contraction step, launch options."""

  block_n: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_n", "block_k"):
      size = getattr(self, name)
      if size < 1 or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two.")
    if self.num_warps < 1 or self.num_stages < 1:
      raise ValueError(f"{self.num_warps=} and {self.num_stages=} must be >= 1.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
  """Triton tiles of the up and the down kernels. untuned: GPU tuning owed (``benchmarks/moe.py``).

  Defaults: 64 output columns per program gives 6 x 29 = 174 up programs and 6 x 42 = 252 down programs at
  Nemotron 3 Nano's batch-1 shape (F = 1856, D = 2688), more than an H100's 132 SMs; a [128, 64] bf16 weight
  block is 128-byte rows (coalesced) and 64 f32 registers per thread at 4 warps.
  """

  up: TileSizes = TileSizes()
  down: TileSizes = TileSizes()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuBlockSizes:
  """Mosaic TPU tiles: output columns per grid step (a multiple of 128; the contraction is one block).

  untuned: TPU tuning owed. At 512 columns a bf16 weight block of Nemotron 3 Nano is 2.75 MB (up, K = 2688)
  and 1.9 MB (down, K = 1856), double-buffered well inside the 16 MiB of scoped VMEM of a v5e.
  """

  up_block_n: int = 512
  down_block_n: int = 512

  def __post_init__(self):
    for name in ("up_block_n", "down_block_n"):
      size = getattr(self, name)
      if size <= 0 or size % 128:
        raise ValueError(f"{name}={size} must be a positive multiple of 128.")


def _resolve_interpret(interpret: Interpret | None, platform: str) -> Interpret:
  """None: compile for the target (a GPU for the Triton kernels, a TPU for Mosaic), else interpret.
  True on the TPU path is ``pltpu.InterpretParams()`` (it models the TPU pipeline: NaN-filled buffers, edge
  blocks)."""
  target = common.abstract_platform() or jax.default_backend()
  if interpret is None:
    interpret = not (target == "tpu" if platform == "tpu" else target in ("gpu", "cuda", "rocm"))
  if platform == "tpu" and interpret is True:
    return pltpu.InterpretParams()
  if platform == "gpu" and not interpret and target not in ("gpu", "cuda", "rocm"):
    raise NotImplementedError(f"The gathered-expert kernels are Pallas Triton here; target {target!r}. Pass "
                              "interpret=True, or platform='tpu'.")
  return interpret


# ----------------------------------------------------------------------------
# Triton (GPU).
# ----------------------------------------------------------------------------


def _row_kernel_triton(ids_ref, x_ref, w_ref, out_ref, *, rows_per_input, k_dim, n_dim, block_k, block_n,
                       activation):
  """One (row n, column block): out[n, cols] = act(x[n // rows_per_input] @ w[ids[n]][:, cols])."""
  row, n_block = pl.program_id(0), pl.program_id(1)
  expert, src = ids_ref[row], row // rows_per_input
  n0 = n_block * block_n
  col_mask = n0 + jnp.arange(block_n, dtype=jnp.int32) < n_dim                # [bn]

  def body(kb, acc):
    k0 = kb * block_k
    k_mask = k0 + jnp.arange(block_k, dtype=jnp.int32) < k_dim               # [bk]
    x = plgpu.load(x_ref.at[src, pl.ds(k0, block_k)], mask=k_mask, other=0.0)  # [bk]
    w = plgpu.load(w_ref.at[expert, pl.ds(k0, block_k), pl.ds(n0, block_n)],
                   mask=k_mask[:, None] & col_mask[None, :], other=0.0)      # [bk, bn]
    return acc + x.astype(jnp.float32)[:, None] * w.astype(jnp.float32)

  acc = jax.lax.fori_loop(0, pl.cdiv(k_dim, block_k), body, jnp.zeros((block_k, block_n), jnp.float32))
  out = jnp.sum(acc, axis=0)                                                  # [bn] f32
  if activation is not None:
    out = reference.ACTIVATIONS[activation](out)
  plgpu.store(out_ref.at[row, pl.ds(n0, block_n)], out.astype(out_ref.dtype), mask=col_mask)


def _rows_call_triton(ids, x, w, *, rows_per_input, activation, out_dtype, tiles: TileSizes, interpret):
  """ids [N], x [N / rows_per_input, K], w [E, K, Nout] -> [N, Nout]."""
  num_rows = ids.shape[0]
  _, k_dim, n_dim = w.shape
  kernel = functools.partial(_row_kernel_triton, rows_per_input=rows_per_input, k_dim=k_dim, n_dim=n_dim,
                             block_k=tiles.block_k, block_n=tiles.block_n, activation=activation)
  return pl.pallas_call(
      kernel,
      out_shape=common.out_struct((num_rows, n_dim), out_dtype, x),
      grid=(num_rows, pl.cdiv(n_dim, tiles.block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
      interpret=interpret,
      name="gathered_up" if activation is not None else "gathered_down",
  )(ids, x, w)


# ----------------------------------------------------------------------------
# Mosaic (TPU).
# ----------------------------------------------------------------------------


def _row_kernel_tpu(ids_ref, x_ref, w_ref, out_ref, *, activation, precision):
  """One (row, column block): x [1, K] (the row's input), w [K, bn] (its expert's block) -> out [1, bn]."""
  del ids_ref  # read by the index maps
  out = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32, precision=precision)  # [1, bn]
  if activation is not None:
    out = reference.ACTIVATIONS[activation](out)
  out_ref[...] = out.astype(out_ref.dtype)


def _rows_call_tpu(ids, x, w, *, rows_per_input, activation, out_dtype, block_n, interpret):
  """ids [N], x [N / rows_per_input, K], w [E, K, Nout] -> [N, Nout]. The contraction is one block (a
  full-dimension block needs no (8, 128) alignment); column edge blocks read past the array and Pallas drops
  their writes there."""
  num_rows = ids.shape[0]
  _, k_dim, n_dim = w.shape
  block_n = min(block_n, n_dim)
  itemsize = jnp.dtype(w.dtype).itemsize
  # Double-buffered weight, input and output blocks, plus a margin for Mosaic's own scratch.
  vmem = 2 * (k_dim * block_n * itemsize + k_dim * itemsize + block_n * jnp.dtype(out_dtype).itemsize)
  limit = None if vmem <= 12 * 2**20 else vmem * 5 // 4
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
  out = pl.pallas_call(
      functools.partial(_row_kernel_tpu, activation=activation, precision=precision),
      out_shape=common.out_struct((num_rows, 1, n_dim), out_dtype, x),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(num_rows, pl.cdiv(n_dim, block_n)),
          in_specs=[
              pl.BlockSpec((pl.Squeezed(), 1, k_dim), lambda n, j, ids: (n // rows_per_input, 0, 0)),
              pl.BlockSpec((pl.Squeezed(), k_dim, block_n), lambda n, j, ids: (ids[n], 0, j)),
          ],
          out_specs=pl.BlockSpec((pl.Squeezed(), 1, block_n), lambda n, j, ids: (n, 0, j)),
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=limit),
      cost_estimate=pl.CostEstimate(flops=2 * num_rows * k_dim * n_dim, transcendentals=0,
                                    bytes_accessed=num_rows * k_dim * n_dim * itemsize),
      interpret=interpret,
      name="gathered_up" if activation is not None else "gathered_down",
  )(ids, x[:, None, :], w)
  return out[:, 0, :]


# ----------------------------------------------------------------------------
# The differentiable expert MLP.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _expert_mlp(tokens, expert_ids, w_up, w_down, activation, platform, block_sizes, interpret):
  """[T, D], [T, R], [E, D, F], [E, F, D] -> y [T, R, D] f32 (the down product, unrounded)."""
  num_tokens, num_slots = expert_ids.shape
  dtype = tokens.dtype
  ids = expert_ids.reshape(-1).astype(jnp.int32)                              # [N]
  ids, tokens, w_up, w_down = common.match_vma(ids, tokens, w_up.astype(dtype), w_down.astype(dtype))
  if platform == "tpu":
    call = functools.partial(_rows_call_tpu, interpret=interpret)
    up_kw, down_kw = dict(block_n=block_sizes.up_block_n), dict(block_n=block_sizes.down_block_n)
  else:
    call = functools.partial(_rows_call_triton, interpret=interpret)
    up_kw, down_kw = dict(tiles=block_sizes.up), dict(tiles=block_sizes.down)
  h = call(ids, tokens, w_up, rows_per_input=num_slots, activation=activation, out_dtype=dtype, **up_kw)  # [N, F]
  y = call(ids, h, w_down, rows_per_input=1, activation=None, out_dtype=jnp.float32, **down_kw)          # [N, D]
  return y.reshape(num_tokens, num_slots, -1)


def _expert_mlp_fwd(tokens, expert_ids, w_up, w_down, activation, platform, block_sizes, interpret):
  y = _expert_mlp(tokens, expert_ids, w_up, w_down, activation, platform, block_sizes, interpret)
  return y, (tokens, expert_ids, w_up, w_down)


def _expert_mlp_bwd(activation, platform, block_sizes, interpret, residuals, dy):
  del platform, block_sizes, interpret
  tokens, expert_ids, w_up, w_down = residuals
  _, vjp = jax.vjp(lambda t, u, d: reference.gathered_expert_mlp_reference(t, expert_ids, u, d,
                                                                          activation=activation),
                   tokens, w_up, w_down)
  d_tokens, d_up, d_down = vjp(dy)
  return d_tokens, None, d_up, d_down


_expert_mlp.defvjp(_expert_mlp_fwd, _expert_mlp_bwd)


def gathered_expert_mlp(
    tokens: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    block_sizes: BlockSizes | TpuBlockSizes | None = None,
    interpret: Interpret | None = None,
    platform: str | None = None,
) -> Array:
  """Each slot's expert output, unrounded: y[t, r] = act(tokens[t] @ w_up[e]) @ w_down[e], e = expert_ids[t, r].

  Args:
    tokens: [T, D]; their dtype is the compute dtype (weights are cast to it).
    expert_ids: [T, R] integer ids in [0, E).
    w_up: [E, D, F]; w_down: [E, F, D] (or an F-slice of both: tensor parallelism).
    activation: A key of ``reference.ACTIVATIONS``; applied to the f32 up product, then rounded to
      tokens.dtype.
    block_sizes: ``BlockSizes`` (Triton) or ``TpuBlockSizes`` (Mosaic); default the defaults. untuned.
    interpret: Run in a Pallas interpreter. None: compile for a GPU / TPU target, else interpret.
    platform: "tpu" for the Mosaic kernels, "gpu" ("cuda", "rocm") for the Triton ones; None: the abstract
      mesh's device (AOT), else ``jax.default_backend()`` (CPU: the Triton kernels, interpreted).

  Returns:
    [T, R, D] float32: the down product before it is rounded (sum shards' partials first, then round).
    Differentiable w.r.t. tokens, w_up and w_down.
  """
  reference._validate(tokens, jnp.ones(expert_ids.shape, jnp.float32), expert_ids, w_up, w_down,  # pylint: disable=protected-access
                      activation)
  kind = common.kernel_platform(platform)
  if kind == "tpu":
    block_sizes = TpuBlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, TpuBlockSizes):
      raise TypeError(f"The TPU kernels take a TpuBlockSizes, got {type(block_sizes).__name__}.")
    if tokens.dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"The TPU kernels take float32 or bfloat16 tokens, got {tokens.dtype}.")
  else:
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    if not isinstance(block_sizes, BlockSizes):
      raise TypeError(f"The Triton kernels take a BlockSizes, got {type(block_sizes).__name__}.")
  if 0 in tokens.shape + expert_ids.shape + w_up.shape[1:]:
    return jnp.zeros((*expert_ids.shape, tokens.shape[1]), jnp.float32)
  return _expert_mlp(tokens, expert_ids, w_up, w_down, activation, kind, block_sizes,
                     _resolve_interpret(interpret, kind))


def combine_slots(y: Array, router_weights: Array, dtype: DTypeLike) -> Array:
  """[T, R, D] f32 slot outputs -> [T, D] in dtype: each rounded to dtype, weighted and summed over R in f32
  (``reference.combine``'s numerics, without the un-sort)."""
  y = y.astype(dtype).astype(jnp.float32) * router_weights.astype(jnp.float32)[..., None]  # [T, R, D]
  return jnp.sum(y, axis=1).astype(dtype)                                                   # [T, D]


def gathered_dispatch(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    activation: str = "relu2",
    preferred_element_type: DTypeLike = jnp.float32,
    block_sizes: BlockSizes | TpuBlockSizes | None = None,
    interpret: Interpret | None = None,
    platform: str | None = None,
    partial_sum: Callable[[Array], Array] | None = None,
) -> tuple[Array, Array]:
  """``ops.moe_dispatch``'s contract (combined [T, D] in tokens.dtype, counts [E] int32) on the gathered
  kernels. The kernels accumulate in f32: ``preferred_element_type`` must be float32. ``partial_sum``: tensor
  parallelism, as ``reference.expert_mlp``'s (the weights are an F-slice; it sums the shards' f32 slot outputs
  before they are rounded)."""
  if jnp.dtype(preferred_element_type) != jnp.float32:
    raise ValueError(f"The gathered-expert kernels accumulate in float32; got {preferred_element_type=}.")
  reference._validate(tokens, router_weights, expert_ids, w_up, w_down, activation)  # pylint: disable=protected-access
  y = gathered_expert_mlp(tokens, expert_ids, w_up, w_down, activation=activation, block_sizes=block_sizes,
                          interpret=interpret, platform=platform)             # [T, R, D] f32
  if partial_sum is not None:
    y = partial_sum(y)
  counts = reference._expert_counts(expert_ids, w_up.shape[0])  # pylint: disable=protected-access  # [E]
  return combine_slots(y, router_weights, tokens.dtype), counts
