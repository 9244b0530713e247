"""Helpers for Pallas calls inside `jax.shard_map(check_vma=True)` (shared by the kernel packages).

This module imports only jax.
"""

import jax

Array = jax.Array


def match_vma(*arrays: Array) -> tuple[Array, ...]:
  """Casts arrays to vary over the union of their mesh axes (shard_map).

  Inside ``jax.shard_map(check_vma=True)`` a pallas_call must state how its
  outputs vary over the mesh axes; giving all operands one varying set makes
  that the outputs' set, and keeps custom_vjp cotangents typed like the
  primals. Outside shard_map the sets are empty and this is a no-op.
  """
  varying = [jax.typeof(x).mat.varying for x in arrays]
  union = frozenset().union(*varying)
  return tuple(
      jax.lax.pcast(x, tuple(sorted(union - v)), to="varying")
      if union - v else x
      for x, v in zip(arrays, varying)
  )


def out_struct(shape: tuple[int, ...], dtype: jax.typing.DTypeLike, like: Array):
  """ShapeDtypeStruct varying over the same mesh axes as ``like``."""
  return jax.ShapeDtypeStruct(
      shape, dtype,
      manual_axis_type=jax.sharding.ManualAxisType(
          varying=jax.typeof(like).mat.varying
      ),
  )


def vary_like(x: Array, like: Array) -> Array:
  """``x`` cast to vary over ``like``'s mesh axes too (shard_map; a no-op outside it).

  For kernel entry points that drop the ``manual_axis_type`` of their output
  type (Mosaic GPU's ``plgpu.kernel``, jax 0.11 / 0.12): their outputs come
  back typed as equal on every shard.
  """
  missing = jax.typeof(like).mat.varying - jax.typeof(x).mat.varying
  return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
