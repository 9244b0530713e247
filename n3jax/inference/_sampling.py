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

__all__ = ["SamplingParams", "sampling_params", "sample", "distribution"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  temperature: float = 0.0         # 0: greedy (argmax); else logits / temperature, then a random draw
  top_k: int = 0                   # keep the k most likely tokens (0: off)
  top_p: float = 1.0               # nucleus: the most likely tokens whose probability reaches top_p (1: off)
  min_p: float = 0.0               # drop tokens below min_p * p(most likely token) (0: off)
  repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019) / HF: logits of seen tokens /p if > 0 else *p
  seed: int = 0                    # of the PRNG key; the same seed and prompts give the same tokens

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"Invalid sampling option: {msg}")
    need(self.temperature >= 0, f"{self.temperature=} must be >= 0 (0 is greedy)")
    need(isinstance(self.top_k, int) and self.top_k >= 0, f"{self.top_k=} must be an int >= 0 (0 is off)")
    need(0 < self.top_p <= 1, f"{self.top_p=} must be in (0, 1]")
    need(0 <= self.min_p <= 1, f"{self.min_p=} must be in [0, 1]")
    need(self.repetition_penalty > 0, f"{self.repetition_penalty=} must be > 0 (1 is off)")
    need(isinstance(self.seed, int), f"{self.seed=} must be an int")

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


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] (f32) -> next tokens [B] int32."""
  logits = logits.astype(jnp.float32)
  if seen is not None:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / params.temperature
  if not (params.top_k or params.top_p < 1 or params.min_p > 0):
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  # Filters work on the candidates sorted by logit, best first: the top-k ones, or all of them.
  k = min(params.top_k, logits.shape[-1]) if params.top_k else logits.shape[-1]
  vals, ids = jax.lax.top_k(logits, k)                                       # [B, k] descending
  keep = jnp.ones(vals.shape, bool)
  if params.top_p < 1:
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                              # mass of better candidates
    keep &= before < params.top_p                                            # the best one always stays
  if params.min_p > 0:
    probs = jax.nn.softmax(vals, axis=-1)
    keep &= probs >= params.min_p * probs[:, :1]
  choice = jax.random.categorical(key, jnp.where(keep, vals, -jnp.inf), axis=-1)  # [B] index into k
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def distribution(logits: jax.Array, params: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] -> the probabilities [B, V] f32 that `sample` draws from (one-hot of the argmax when
  greedy): the same penalty, temperature and filters. Speculative decoding needs them explicitly."""
  logits = logits.astype(jnp.float32)
  if seen is not None:
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  logits = logits / params.temperature
  if params.top_k or params.top_p < 1 or params.min_p > 0:
    k = min(params.top_k, logits.shape[-1]) if params.top_k else logits.shape[-1]
    vals, ids = jax.lax.top_k(logits, k)                                     # [B, k] descending
    keep = jnp.ones(vals.shape, bool)
    if params.top_p < 1:
      probs = jax.nn.softmax(vals, axis=-1)
      keep &= jnp.cumsum(probs, axis=-1) - probs < params.top_p
    if params.min_p > 0:
      probs = jax.nn.softmax(vals, axis=-1)
      keep &= probs >= params.min_p * probs[:, :1]
    rows = jnp.arange(logits.shape[0])[:, None]
    kept = jnp.zeros(logits.shape, bool).at[rows, ids].set(keep)             # [B, V]
    logits = jnp.where(kept, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)
