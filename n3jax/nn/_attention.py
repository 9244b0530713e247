"""Grouped-query causal attention with no positional encoding (HF `NemotronHAttention`).

Nemotron-H attention has NoPE: no rotary embedding, no q/k norm, no biases (ARCHITECTURE.md §1.2, §3.2).
Query head n reads kv head n // G (contiguous groups, HF `repeat_kv`). Packed sequences: a token attends
only to earlier tokens with the same segment id. Training and full forwards go through
`pallas_kernels.attention.attention`, whose backend `cfg.attention_impl` picks: "dense" materialises the
[T, T] f32 scores (as HF's eager path); "blockwise" never does (FlashAttention-2 in XLA with its own VJP;
long sequences need it); "flash" runs Pallas kernels (our Triton flash attention on GPUs, JAX's splash
attention on TPUs) and the blockwise form on CPU. Under a mesh each batch and kv-head shard runs on its
own (`shd.per_shard`).

Generation (`kv_cache`): K and V of every token are written into a fixed-size cache at slots
`cache_index + t`, and the queries attend over the filled slots with the same rule (earlier slot, same
segment id), block by block with an online softmax (`cached_attention`), so that memory stays
O(T * block) and the unfilled tail of the cache is never read. NoPE means nothing in the cache depends
on positions: a left-padded batch shares one write index. The cache keeps each kv head's slots together,
[B, K, S, H]: both products of a decoding step are then batched over (B, K) as the cache lies in memory. In
slot-major order ([B, S, K, H]) XLA's GPU compile transposed a copy of every layer's cache for the products on
every step, and copied the stacks whole (at batch 64 and 8k slots: over 100 GB of traffic per step, against
9 GB of keys and values to read).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common
from pallas_kernels.attention import ops as attention_ops


# `cfg.attention_impl` -> `pallas_kernels.attention.attention` backend.
_BACKENDS = {"dense": "reference", "blockwise": "xla", "flash": "auto"}

KV_BLOCK = 256  # keys per online-softmax step of `cached_attention`; caches are a multiple of it

# Running-max start and masked-logit value: finite, so exp(m - m_new) never sees (-inf) - (-inf).
_NEG = -1e30


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_segments: jax.Array,
                     kv_segments: jax.Array, q_start: jax.Array, *, block: int) -> jax.Array:
  """Queries at slots `q_start + t` over a cache, reading only the key blocks up to the last query.

  q [B,T,N,H]; k/v_cache [B,K,S,H] with S % block == 0; q_segments [B,T]; kv_segments [B,S] (slots not
  yet written hold an id no query has); q_start: int32 scalar. Slot s is visible to query t iff
  s <= q_start + t and kv_segments[s] == q_segments[t]; every query sees at least its own slot.
  Online softmax over key blocks in f32 (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022).
  """
  b, t, n, h = q.shape
  kvh, s = k_cache.shape[1], k_cache.shape[2]
  if s % block:
    raise ValueError(f"cache length {s=} must be a multiple of the attention {block=}")
  qg = q.reshape(b, t, kvh, n // kvh, h)                                  # [B, T, K, G, H]
  q_pos = q_start + jnp.arange(t, dtype=jnp.int32)                        # [T]
  n_blocks = (q_start + t + block - 1) // block                           # blocks holding a visible slot

  def body(i, carry):
    m, l, acc = carry                                                     # [B,K,G,T], [B,K,G,T], [B,K,G,T,H]
    start = i * block
    k = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=2)        # [B, K, S', H] (S' = block)
    v = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=2)
    seg = jax.lax.dynamic_slice_in_dim(kv_segments, start, block, axis=1)  # [B, S']
    kv_pos = start + jnp.arange(block, dtype=jnp.int32)
    visible = (kv_pos[None, :] <= q_pos[:, None])[None] & (seg[:, None, :] == q_segments[:, :, None])  # [B,T,S']
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    visible = visible[:, None, None]                                      # [B, 1, 1, T, S']
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, logits, _NEG), axis=-1))
    p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)       # [B, K, G, T, S'] f32
    correction = jnp.exp(m - m_new)                                       # 1 while nothing is visible
    l = l * correction + p.sum(-1)
    acc = acc * correction[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v,
                                                   preferred_element_type=jnp.float32)
    return m_new, l, acc

  g = n // kvh
  init = (jnp.full((b, kvh, g, t), _NEG, jnp.float32), jnp.zeros((b, kvh, g, t), jnp.float32),
          jnp.zeros((b, kvh, g, t, h), jnp.float32))
  if block == s:  # one block: no loop (decoding reads the whole cache in one pass)
    _, l, acc = body(0, init)
  else:
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  out = acc / l[..., None]                                                # [B, K, G, T, H]
  return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(v_cache.dtype)


class Attention(nn.Module):
  """`__call__(x, segment_ids)` -> out [B,T,D]; with `kv_cache` -> (out, updated kv_cache).

  kv_cache: {"k", "v": [B, K, S, H]}; cache_index: int32 scalar, the slot of x[:, 0];
  cache_segment_ids: [B, S] segment id of every slot, x's slots already included.
  """
  cfg: ModelConfig
  kv_block: int = KV_BLOCK
  layer_index: int | None = None  # static, for the low-precision recipe's BF16 table

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array, kv_cache: dict[str, jax.Array] | None = None,
               cache_index: jax.Array | None = None, cache_segment_ids: jax.Array | None = None):
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
    proj = lambda spec, w: _common.linear(self, cfg, "attn_proj", spec, x, w.astype(dtype)).astype(dtype)
    q = proj("BTD,DNH->BTNH", w_q)  # [B, T, N, H]
    k = proj("BTD,DKH->BTKH", w_k)  # [B, T, K, H]
    v = proj("BTD,DKH->BTKH", w_v)  # [B, T, K, H]
    new_cache = None
    if kv_cache is None:
      # Per batch shard and kv-head shard (a Pallas kernel is opaque to XLA's partitioner): query heads are
      # split with their kv heads, so a shard's query head n still reads its kv head n // G.
      heads = P(shd.ACT_BATCH, None, shd.KV_HEADS, None)
      attend = shd.per_shard(functools.partial(attention_ops.attention, backend=_BACKENDS[cfg.attention_impl]),
                             (heads, heads, heads, P(shd.ACT_BATCH, None)), heads)
      o = attend(q, k, v, segment_ids)                                                    # [B, T, N, H]
    else:
      if cache_index is None or cache_segment_ids is None:
        raise ValueError("attention with a kv_cache needs cache_index and cache_segment_ids")
      new_cache = {name: jax.lax.dynamic_update_slice_in_dim(
                       kv_cache[name], jnp.einsum("BTKH->BKTH", val).astype(kv_cache[name].dtype), cache_index, axis=2)
                   for name, val in (("k", k), ("v", v))}                     # [B, K, S, H]
      slots = new_cache["k"].shape[2]
      block = slots if x.shape[1] == 1 else min(self.kv_block, slots)  # decoding: one pass over the cache
      o = cached_attention(q.astype(new_cache["k"].dtype), new_cache["k"], new_cache["v"], segment_ids,
                           cache_segment_ids, cache_index, block=block).astype(dtype)  # [B, T, N, H]
    out = _common.linear(self, cfg, "attn_proj", "BTNH,NHD->BTD", o, w_o.astype(dtype))
    out = out.astype(dtype)  # [B, T, D]
    return out if kv_cache is None else (out, new_cache)
