"""Checks, platform and shard_map helpers of the MoE kernels (gmm.py, gmm_tpu.py, gathered.py).

Private: import ``gmm.gmm`` / ``gmm.tgmm``. This module imports only jax.
"""

import functools
from typing import TypeVar

import jax
import jax.numpy as jnp

from pallas_kernels._vma import match_vma, out_struct, vary_like  # pylint: disable=unused-import (used as common.*)

Array = jax.Array
DTypeLike = jax.typing.DTypeLike
T = TypeVar("T")


def validate_gmm(lhs: Array, rhs: Array, group_sizes: Array) -> None:
  """Raises ValueError unless lhs [M, K], rhs [E, K, N], group_sizes [E] fit."""
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(
        f"lhs must be [M, K] and rhs [E, K, N], got {lhs.shape=}, {rhs.shape=}."
    )
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(
        f"lhs [M, K] and rhs [E, K, N] must share K, got {lhs.shape=},"
        f" {rhs.shape=}."
    )
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(
        f"group_sizes must be [E] = [{rhs.shape[0]}] for {rhs.shape=}, got"
        f" {group_sizes.shape=}."
    )
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype=}.")
  if not (jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == rhs.dtype):
    raise ValueError(
        f"lhs and rhs must share one floating dtype, got {lhs.dtype=},"
        f" {rhs.dtype=}."
    )


def validate_tgmm(lhs: Array, dy: Array, group_sizes: Array) -> None:
  """Raises ValueError unless lhs [M, K], dy [M, N], group_sizes [E] fit."""
  if lhs.ndim != 2 or dy.ndim != 2 or lhs.shape[0] != dy.shape[0]:
    raise ValueError(
        f"lhs must be [M, K] and dy [M, N], got {lhs.shape=}, {dy.shape=}."
    )
  if group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be [E], got {group_sizes.shape=}.")
  # As validate_gmm: float group sizes were truncated to int32 and integer operands ran, silently.
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integer, got {group_sizes.dtype=}.")
  if not (jnp.issubdtype(lhs.dtype, jnp.floating) and lhs.dtype == dy.dtype):
    raise ValueError(
        f"lhs and dy must share one floating dtype, got {lhs.dtype=},"
        f" {dy.dtype=}."
    )


def group_bounds(
    group_sizes: Array, num_rows: int, *, with_tail: bool = False
) -> tuple[Array, Array]:
  """First and end row of each group, clipped to [0, num_rows]: [E] each.

  with_tail: one more, [E + 1], the pseudo group of the rows past
  sum(group_sizes), [sum, num_rows) (the kernels zero-fill it).
  """
  ends = jnp.clip(jnp.cumsum(group_sizes.astype(jnp.int32)), 0, num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  if with_tail:
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
  return starts, ends


def out_dtype(lhs: Array, preferred_element_type: DTypeLike | None):
  return jnp.dtype(
      lhs.dtype if preferred_element_type is None else preferred_element_type
  )


def abstract_platform() -> str | None:
  """Platform of the current abstract mesh's device (AOT lowering), if set."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return None if device is None else device.platform


def kernel_platform(platform: str | None) -> str:
  """"tpu" (the Mosaic kernels) or "gpu" (the Triton kernels; their interpreter on CPU).

  Explicit ``platform``, else the current abstract mesh's device (AOT
  lowering), else ``jax.default_backend()``; anything but TPU takes the Triton
  path (interpret mode on CPU).
  """
  if platform is None:
    platform = abstract_platform() or jax.default_backend()
  elif platform not in ("gpu", "cuda", "rocm", "tpu"):
    raise ValueError(f"{platform=!r} must be 'gpu' ('cuda', 'rocm'), 'tpu'"
                     " or None.")
  return "tpu" if platform == "tpu" else "gpu"


def abstract_device_kind() -> str | None:
  """device_kind of the current abstract mesh's device, if set."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return None if device is None else device.device_kind


def for_device_kind(table: dict[str, T], default: T, device_kind: str | None) -> T:
  """``table[device_kind]``, else ``default``; device_kind None: the abstract mesh's device (AOT), else the first local one."""
  if device_kind is None:
    device_kind = abstract_device_kind() or jax.devices()[0].device_kind
  return table.get(device_kind, default)


def differentiable_gmm(gmm_call, tgmm_call):
  """The grouped matmul of one backend's kernels with its ``jax.custom_vjp``.

  ``gmm_call(lhs, rhs, group_sizes, *, transpose_rhs, out_dtype, tiles,
  interpret)`` and ``tgmm_call(lhs, dy, group_sizes, *, out_dtype, tiles,
  interpret)`` are the kernels; ``block_sizes`` has ``gmm``, ``gmm_t`` and
  ``tgmm`` tiles. Backward: d_lhs = dy @ rhs^T per group (``gmm`` with the
  weights transposed), d_rhs = lhs^T @ dy per group (``tgmm``), both on
  operands in lhs.dtype.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
  def gmm(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret):
    return gmm_call(
        lhs, rhs, group_sizes, transpose_rhs=False, out_dtype=out_dtype,
        tiles=block_sizes.gmm, interpret=interpret,
    )

  def fwd(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret):
    out = gmm(lhs, rhs, group_sizes, out_dtype, block_sizes, interpret)
    return out, (lhs, rhs, group_sizes)

  def bwd(out_dtype, block_sizes, interpret, residuals, d_out):
    del out_dtype
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)  # [M, N] backward operands in lhs.dtype
    d_lhs = gmm_call(  # [M, N] x [E, K, N]^T -> [M, K]
        d_out, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype,
        tiles=block_sizes.gmm_t, interpret=interpret,
    )
    d_rhs = tgmm_call(  # [M, K]^T x [M, N] per group -> [E, K, N]
        lhs, d_out, group_sizes, out_dtype=rhs.dtype, tiles=block_sizes.tgmm,
        interpret=interpret,
    )
    return d_lhs, d_rhs, None

  gmm.defvjp(fwd, bwd)
  return gmm
