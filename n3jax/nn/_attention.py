"""Grouped-query causal attention with no positional encoding (HF `NemotronHAttention`).

Nemotron-H attention has NoPE: no rotary embedding, no q/k norm, no biases (ARCHITECTURE.md §1.2, §3.2).
Query head n reads kv head n // G (contiguous groups, HF `repeat_kv`). Packed sequences: a token attends
only to earlier tokens with the same segment id.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common


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


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:  # x: [B, T, D]
    cfg, d = self.cfg, x.shape[-1]
    n, kvh, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    init = _common.dense_init(cfg)
    w_q = _common.param(self, "q_proj", init, (d, n, h), (shd.EMBED, shd.HEADS, shd.HEAD_DIM), pdtype)
    w_k = _common.param(self, "k_proj", init, (d, kvh, h), (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM), pdtype)
    w_v = _common.param(self, "v_proj", init, (d, kvh, h), (shd.EMBED, shd.KV_HEADS, shd.HEAD_DIM), pdtype)
    w_o = _common.param(self, "o_proj", _common.out_proj_init(cfg), (n, h, d), (shd.HEADS, shd.HEAD_DIM, shd.EMBED),
                        pdtype)
    x = x.astype(dtype)
    q = jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    k = jnp.einsum("BTD,DKH->BTKH", x, w_k.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    v = jnp.einsum("BTD,DKH->BTKH", x, w_v.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), segment_ids.shape)
    o = dot_product_attention(q, k, v, attention_mask(segment_ids, segment_ids, pos, pos))  # [B, T, N, H]
    out = jnp.einsum("BTNH,NHD->BTD", o, w_o.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)  # [B, T, D]
