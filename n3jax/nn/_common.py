"""Shared pieces of the layers: dtype lookup, initialisers, and the einsum alphabet.

Einsum alphabet (repo-wide, one meaning per letter):
  B batch  T seq  S kv-seq  D d_model  F mlp hidden  V vocab  N q-heads  K kv-heads  G q-per-kv
  H head-dim  E experts  R experts/token  M ssm-heads  P ssm-head-dim  Q ssm-state  J ssm-groups
  W conv width  I latent width
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import quant
from n3jax import sharding as shd
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
  """A parameter annotated with logical axis names (see `n3jax.sharding`), as the layer computes with it
  (gathered over the FSDP axis under a mesh: `sharding.gathered_for_compute`)."""
  assert len(shape) == len(axes), (name, shape, axes)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
  return w if module.is_initializing() else shd.gathered_for_compute(w, axes)


@functools.lru_cache(maxsize=None)
def _quant_config(mode: str, at_start: int | None, at_end: int | None) -> quant.QuantConfig:
  return quant.QuantConfig(mode=mode, bf16_layers_at_start=at_start, bf16_layers_at_end=at_end)


def quant_config(cfg: ModelConfig) -> quant.QuantConfig:
  return _quant_config(cfg.quant, cfg.quant_bf16_layers_at_start, cfg.quant_bf16_layers_at_end)


def linear(module: nn.Module, cfg: ModelConfig, role: str, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """A linear product (activations first, weights second) with f32 accumulation, in the numerics of
  `cfg.quant`: the FP8 / NVFP4 recipe's quantized einsum for this layer and role, or the plain einsum
  where the recipe keeps BF16 (`n3jax.quant.make_einsum`). `module.layer_index` (static) places the layer
  in the recipe's BF16 table; stochastic rounding draws from the `quant` RNG stream when one is given."""
  fn = quant.make_einsum(quant_config(cfg), layer_index=getattr(module, "layer_index", None),
                         num_layers=cfg.num_hidden_layers, role=role)
  key = module.make_rng("quant") if cfg.quant != "none" and module.has_rng("quant") else None
  return one_row_as_two(functools.partial(fn, preferred_element_type=jnp.float32, key=key), spec, x, w)


def one_row_as_two(fn, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`fn(spec, x, w)`, an einsum of activations x and weights w; where x holds one row (its axes that w
  lacks all have size 1: the batch-1 decoding step), computed on two rows (the second zero) and cut back.

  XLA's GPU compiler rewrites a product with a vector operand into an elementwise multiply and a reduction
  when (rows + columns) x depth < 1e7 (`GpuAlgebraicSimplifier::ShouldStrengthReduceDotToReduce`). In its H100
  compile of the batch-1 decoding step of Nemotron-3-Nano-4B, that turned every projection narrower than about
  3,000 columns (Mamba's B, C and dt, attention's K and V, the router; under tensor parallelism nearly all of
  them) into a write of the f32 product the size of the weight, then a column reduction over a few thread
  blocks; B and C were worse, their reductions fused into the conv window's concatenation, one thread
  summing 3,136 products per output. With two rows the product stays a matrix product (a Triton GEMM fusion)
  that reads each weight once. The zero row changes nothing in the first, nor any amax the FP8 / NVFP4
  recipes scale by.
  """
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  free = [a for a in lhs if a not in rhs]
  if not free or math.prod(x.shape[lhs.index(a)] for a in free) != 1:
    return fn(spec, x, w)
  axis = lhs.index(free[0])
  x2 = jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)
  return jax.lax.slice_in_dim(fn(spec, x2, w), 0, 1, axis=out.index(free[0]))


def is_quantized_layer(cfg: ModelConfig, layer_index: int) -> bool:
  """Whether the recipe quantizes this layer's linear products (False for BF16-kept layers and mode none)."""
  return quant_config(cfg).is_quantized(layer_index=layer_index, num_layers=cfg.num_hidden_layers,
                                               role="mlp")


def relu2(x: jax.Array) -> jax.Array:
  """Squared ReLU, the activation of every Nemotron MLP and expert (`mlp_hidden_act="relu2"`)."""
  return jnp.square(jax.nn.relu(x))
