"""Shared pieces of the layers: dtype lookup, initialisers, and the einsum alphabet.

Einsum alphabet (repo-wide, one meaning per letter):
  B batch  T seq  S kv-seq  D d_model  F mlp hidden  V vocab  N q-heads  K kv-heads  G q-per-kv
  H head-dim  E experts  R experts/token  M ssm-heads  P ssm-head-dim  Q ssm-state  J ssm-groups
  W conv width  I latent width
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax.configs import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
  return _DTYPES[name]


def dense_init(cfg: ModelConfig) -> nn.initializers.Initializer:
  return nn.initializers.normal(cfg.initializer_range)


def out_proj_init(cfg: ModelConfig) -> nn.initializers.Initializer:
  """Output projections of residual branches: std / sqrt(2 * layers) (GPT-2 / Megatron scheme)."""
  if not cfg.rescale_prenorm_residual:
    return dense_init(cfg)
  return nn.initializers.normal(cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))


def param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...],
          dtype) -> jax.Array:
  """A parameter annotated with logical axis names (see `n3jax.sharding`)."""
  assert len(shape) == len(axes), (name, shape, axes)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU, the activation of every Nemotron MLP and expert (`mlp_hidden_act="relu2"`)."""
  return jnp.square(jax.nn.relu(x))
