"""Orbax checkpoints of n3jax models: `DIR/config.json` (the `ModelConfig`) beside `DIR/params/`.

The params tree is the module tree (see `n3jax.models`); the config is saved with the weights so that a
checkpoint never has to be guessed from its shapes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from n3jax.configs import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


# Bytes orbax may have in flight while writing / reading: bounds host memory above one copy of the params.
_CONCURRENT_GB = 0.25


def _host_array(x):
  """A jax array on the host CPU device (zero-copy for aligned numpy), so orbax's concurrency limit applies and
  a GPU/TPU host never stages the weights on the accelerator."""
  return jax.device_put(x, jax.devices("cpu")[0])


def save_params(directory: str, cfg: ModelConfig, params: Any) -> None:
  """Writes config and params (numpy or jax leaves) under `directory`."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=_CONCURRENT_GB)
  ocp.Checkpointer(handler).save(os.path.join(directory, PARAMS_DIR),
                                 args=ocp.args.PyTreeSave(jax.tree.map(_host_array, params)))


def load_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {CONFIG_FILE} is missing")
  with open(path) as f:
    return ModelConfig.from_json(f.read())


def load_params(directory: str, *, as_numpy: bool = False) -> Any:
  """The params tree: jax arrays on the default device, or host numpy arrays with `as_numpy`."""
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {PARAMS_DIR}/ is missing")
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=_CONCURRENT_GB))
  metadata = checkpointer.metadata(path).item_metadata.tree
  restore_type = np.ndarray if as_numpy else jax.Array
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=restore_type), metadata)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load(directory: str, **overrides) -> tuple[ModelConfig, Any]:
  """`cfg, params = load(dir)`; `overrides` replace config fields (e.g. `dtype="bfloat16"`)."""
  cfg = load_config(directory)
  if overrides:
    cfg = cfg.replace(**overrides)
  return cfg, load_params(directory)
