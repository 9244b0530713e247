"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order is that of `transformers` `generate`: the repetition penalty (a logits processor, applied in
greedy decoding too), then temperature, top-k, top-p and min-p (the warpers), then a categorical draw.
All options are static (part of the compiled step), the PRNG key is not: one compile per set of options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SamplingParams", "sampling_params", "sample", "distribution"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  temperature: float = 0.0         # 0: greedy (argmax); else logits / temperature, then a random draw
  top_k: int = 0                   # keep the k most likely tokens, and any tied with the k-th (0: off)
  top_p: float = 1.0               # nucleus: the most likely tokens whose probability reaches top_p (1: off)
  min_p: float = 0.0               # drop tokens below min_p * p(most likely token) (0: off)
  repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019) / HF: logits of seen tokens /p if > 0 else *p
  seed: int = 0                    # of the PRNG key; the same seed and prompts give the same tokens

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"Invalid sampling option: {msg}")
    for name in ("top_k", "seed"):  # Python or NumPy integers, stored as int (the options are compile keys)
      v = getattr(self, name)
      need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), f"{name}={v!r} must be an int")
      object.__setattr__(self, name, int(v))
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
      v = getattr(self, name)
      need(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool),
           f"{name}={v!r} must be a number")
      object.__setattr__(self, name, float(v))
    need(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    need(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 is off)")
    need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
    need(0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]")
    need(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1 is off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


_OPTIONS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(**options: Any) -> SamplingParams:
  """`SamplingParams(**options)`, with one clear error for an option that does not exist."""
  if unknown := sorted(set(options) - set(_OPTIONS)):
    raise ValueError(f"Unknown sampling option(s) {unknown}; known: {list(_OPTIONS)}")
  return SamplingParams(**options)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
  """logits [B, V] f32, seen [B, V] bool (prompt and generated tokens) -> penalised logits."""
  if penalty == 1.0:
    return logits
  return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _warped(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """logits [B, V] f32 (penalised) -> logits / temperature with the tokens the filters drop at -inf, as
  transformers' warpers do: top-k keeps every token at least as likely as the k-th (ties included), top-p
  then the best tokens until their mass reaches top_p (the best one always), min-p those with probability
  >= min_p * p(best)."""
  logits = logits / params.temperature
  vocab = logits.shape[-1]
  if params.top_k and params.top_k < vocab:
    kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]                      # [B, 1]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if params.top_p < 1:
    vals, ids = jax.lax.top_k(logits, vocab)                                 # [B, V] descending
    probs = jax.nn.softmax(vals, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < params.top_p                 # mass of better tokens < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = jnp.where(jnp.zeros(logits.shape, bool).at[rows, ids].set(keep), logits, -jnp.inf)
  if params.min_p > 0:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs >= params.min_p * jnp.max(probs, axis=-1, keepdims=True), logits, -jnp.inf)
  return logits


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] (f32) -> next tokens [B] int32."""
  logits = logits.astype(jnp.float32)
  if seen is not None:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, _warped(logits, params), axis=-1).astype(jnp.int32)


def distribution(logits: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] -> the probabilities [B, V] f32 that `sample` draws from (one-hot of the argmax when
  greedy): the same penalty, temperature and filters. Speculative decoding needs them explicitly."""
  logits = logits.astype(jnp.float32)
  if seen is not None:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(_warped(logits, params), axis=-1)
