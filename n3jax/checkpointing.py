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


def save_params(directory: str, cfg: ModelConfig, params: Any) -> None:
  """Writes config and params (numpy or jax leaves) under `directory`, which must not exist yet."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  checkpointer.wait_until_finished()


def load_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {CONFIG_FILE} is missing")
  with open(path) as f:
    return ModelConfig.from_json(f.read())


def load_params(directory: str, *, as_numpy: bool = False) -> Any:
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {PARAMS_DIR}/ is missing")
  params = ocp.StandardCheckpointer().restore(path)
  convert = np.asarray if as_numpy else jax.numpy.asarray
  return jax.tree.map(convert, params)


def load(directory: str, **overrides) -> tuple[ModelConfig, Any]:
  """`cfg, params = load(dir)`; `overrides` replace config fields (e.g. `dtype="bfloat16"`)."""
  cfg = load_config(directory)
  if overrides:
    cfg = cfg.replace(**overrides)
  return cfg, load_params(directory)
