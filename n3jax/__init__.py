"""n3jax: NVIDIA Nemotron hybrid Mamba-2 / attention / MoE language models in JAX and Flax.

The public API (these names stay):
  ModelConfig, PRESETS                 the model description and every released size
  convert_from_hf(hf_dir, out_dir)     hub checkpoint -> n3jax checkpoint
  convert_to_hf(ckpt_dir, out_dir)     n3jax checkpoint -> hub checkpoint
  cfg, params = load(ckpt_dir)
  logits = forward(cfg, params, tokens)    tokens int32 [B, T] -> logits float32 [B, T, V]
  params = init(cfg, key)
  out = generate(ckpt_dir, "prompt", thinking_budget=..., temperature=...)   # see n3jax.inference
"""

from n3jax.checkpointing import load
from n3jax.configs import PRESETS, Block, ModelConfig, param_counts
from n3jax.models import forward, init

__all__ = ["Block", "ModelConfig", "PRESETS", "convert_from_hf", "convert_to_hf", "forward", "generate", "init",
           "load", "param_counts"]


def convert_from_hf(hf_dir: str, out_dir: str, **kwargs) -> ModelConfig:
  """Hub checkpoint directory -> n3jax checkpoint directory. See `checkpoint_convert`."""
  from checkpoint_convert import convert_from_hf as _impl  # lazy: conversion sits above the model
  return _impl(hf_dir, out_dir, **kwargs)


def convert_to_hf(ckpt_dir: str, out_dir: str, **kwargs) -> ModelConfig:
  """n3jax checkpoint directory -> hub checkpoint directory. See `checkpoint_convert`."""
  from checkpoint_convert import convert_to_hf as _impl
  return _impl(ckpt_dir, out_dir, **kwargs)


def generate(model, prompt=None, **kwargs):
  """Text generation from a checkpoint directory (or a (cfg, params) pair). See `n3jax.inference.generate`."""
  from n3jax.inference import generate as _impl  # lazy: generation sits above the model
  return _impl(model, prompt, **kwargs)
