"""Blockwise (FlashAttention-2 in XLA) attention against the materialised path: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention.blockwise import blockwise_attention
from pallas_kernels.attention.reference import attention_reference as _dense


def _inputs(b, t, n, kvh, h, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, h),
                                                                       (b, t, n, h)))
  seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)  # packed documents, ids 1..3
  return q, k, v, seg, g


# dtype -> (atol of outputs, atol of gradients): f32 is summation order only; bf16 is one bf16 ulp at the
# inputs' magnitude (the probabilities enter P V and dS K in bf16 on both paths).
_TOL = {jnp.float32: (2e-6, 5e-6), jnp.bfloat16: (2e-2, 4e-2)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,block", [
    ((2, 37, 4, 2, 16), 8),      # T not a multiple of the block, GQA 2 queries per kv head
    ((1, 64, 6, 3, 8), 16),      # several blocks, exact multiple
    ((2, 13, 4, 1, 16), 512),    # shorter than one block (MQA)
    ((1, 48, 2, 2, 8), 16),      # no grouping
])
def test_matches_materialised_attention(shape, block, dtype):
  q, k, v, seg, g = _inputs(*shape, dtype)
  out_tol, grad_tol = _TOL[dtype]
  want = _dense(q, k, v, seg)
  got = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, seg, block=block))(q, k, v)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=out_tol)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
  want_g = jax.grad(loss(lambda q, k, v: _dense(q, k, v, seg)), (0, 1, 2))(q, k, v)
  got_g = jax.jit(jax.grad(loss(lambda q, k, v: blockwise_attention(q, k, v, seg, block=block)), (0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", got_g, want_g):
    assert a.dtype == b.dtype, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=grad_tol, err_msg=name)


def test_documents_do_not_see_each_other():
  q, k, v, _, _ = _inputs(1, 24, 2, 1, 8, jnp.float32)
  seg = jnp.asarray([[1] * 10 + [2] * 14], jnp.int32)
  out = blockwise_attention(q, k, v, seg, block=8)
  changed = blockwise_attention(q, k.at[:, :10].set(0.0), v.at[:, :10].set(5.0), seg, block=8)
  np.testing.assert_array_equal(out[:, 10:], changed[:, 10:])   # document 2 never reads document 1
  assert not np.allclose(out[:, :10], changed[:, :10])


def test_memory_stays_linear_in_the_sequence():
  """The gradient at T = 2048 holds no [T, T] scores: XLA's temporaries stay under one head's f32 score
  matrix (16 MB), where the materialised path needs several of all heads' (4 x 16 MB each)."""
  b, t, n, kvh, h = 1, 2048, 4, 2, 16
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((b, t, n, h), (b, t, kvh, h), (b, t, kvh, h))]
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  scores = b * n * t * t * 4

  def temp_bytes(fn):
    grad = jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), (0, 1, 2))
    return jax.jit(grad).lower(*args, seg).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(lambda q, k, v, s: blockwise_attention(q, k, v, s, block=256)) < scores / n
  assert temp_bytes(_dense) > scores


def test_bad_shapes():
  q, k, v, seg, _ = _inputs(1, 8, 4, 2, 8, jnp.float32)
  with pytest.raises(ValueError, match="N % K == 0"):
    blockwise_attention(q[:, :, :3], k, v, seg)
  with pytest.raises(ValueError, match="segment_ids"):
    blockwise_attention(q, k, v, seg[:, :5])
  with pytest.raises(ValueError, match="block=0"):
    blockwise_attention(q, k, v, seg, block=0)
