"""Causal, segment-masked grouped-query attention, materialised: the reference of the attention kernels.

    s = q k^T / sqrt(H) in f32;  s[t, u] = -inf unless u <= t and seg[u] == seg[t];  o = softmax(s) v

Query head n reads kv head n // G (contiguous groups, HF `repeat_kv`). The [T, S] f32 scores are
materialised (HF's eager path); the probabilities enter the P V product in the value dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention_mask", "attention_reference", "dot_product_attention"]


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
  """[B, T, S] bool: causal and same segment."""
  causal = kv_pos[:, None, :] <= q_pos[:, :, None]
  same = kv_segments[:, None, :] == q_segments[:, :, None]
  return causal & same


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] -> [B,T,N,H]. Softmax in f32 (HF eager path)."""
  b, t, n, h = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, n // kvh, h)  # [B, T, K, G, H]
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(v.dtype)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Causal self-attention within segments: q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] -> [B,T,N,H]."""
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids.shape)
  return dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, pos, pos))
