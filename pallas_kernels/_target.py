"""The device the kernels compile for: an abstract one (AOT) or the default (shared by the kernel packages).

Under `jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=...))`
the abstract device names the target, so that a CPU host can lower (and
compile ahead of time) for a GPU or a TPU; otherwise the first JAX device does.
"""

from typing import Any, Optional, Sequence, TypeVar

import jax

# Platform names of `AbstractDevice` / `jax.default_backend()` -> one name.
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def device() -> Any:
  """The abstract mesh's device if one is set, else `jax.devices()[0]`.

  Either has `device_kind` and `platform`.
  """
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  return abstract if abstract is not None else jax.devices()[0]


def platform() -> str:
  """"gpu", "tpu" or "cpu": the abstract device's platform, else the default."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  name = abstract.platform if abstract is not None else jax.default_backend()
  return _PLATFORM_ALIASES.get(name, name)


T = TypeVar("T")


def lookup(table: Sequence[tuple[str, T]], default: T, dev: Optional[Any] = None) -> T:
  """The first entry of `table` whose key is in `dev.device_kind` (lower case; default: the target device)."""
  kind = (dev or device()).device_kind.lower()
  for key, value in table:
    if key in kind:
      return value
  return default
