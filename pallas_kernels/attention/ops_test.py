"""`ops.attention`: the Triton and TPU kernels against the reference, outputs and gradients (compiled on
their hardware, in the Pallas interpreter elsewhere); lowering for an abstract H100 (Triton IR) and TPU
v5e (Mosaic); backend selection and input checks."""

import functools

import jax
from jax.experimental.pallas import mosaic_gpu as plmgpu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import ops
from pallas_kernels.attention import reference
from pallas_kernels.attention.blockwise_test import _inputs
from pallas_kernels.ssd.ops_test import _H100, _TPU_V5E, _abstract_mesh

# dtype -> (atol of outputs, atol of gradients), as for the XLA blockwise path: f32 is summation order
# only; bf16 is about one bf16 ulp at the inputs' magnitude (P enters P V and dS K in bf16 on both paths).
_TOL = {jnp.float32: (2e-6, 1e-5), jnp.bfloat16: (2e-2, 4e-2)}
_INTERPRET = jax.default_backend() != "gpu"  # the Triton kernel tests run compiled where they can
_SMALL = ops.BlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _outputs_and_grads(fn, q, k, v, g):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
  return fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,blocks", [
    # (B, T, N, K, H): T not a multiple of the block, G = 2, several query and key blocks.
    ((2, 37, 4, 2, 16), _SMALL),
    # G = 3 (not a power of 2), H = 24 padded to 32, forward and backward blocks of other sizes.
    ((1, 50, 6, 2, 24), ops.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)),
    # Shorter than the default blocks (clamped to the sequence), MQA.
    ((2, 13, 4, 1, 16), None),
])
def test_triton_matches_reference(shape, blocks, dtype):
  _check_against_reference("triton", shape, blocks, dtype, interpret=jax.default_backend() != "gpu")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [
    (2, 200, 4, 2, 16),   # two 128-blocks (the second padded), G = 2
    (1, 37, 6, 1, 16),    # one padded block, MQA
])
def test_tpu_kernel_matches_reference(shape, dtype):
  _check_against_reference("mosaic_tpu", shape, ops.TpuBlockSizes(block=128), dtype,
                           interpret=jax.default_backend() != "tpu")


def test_mosaic_gpu_matches_reference():
  """The Hopper kernels (bf16 only), in JAX's Mosaic GPU interpreter off Hopper: (B, T, N, K, H) with T not
  a multiple of the 64-row blocks (several query and key blocks, padded), G = 4 query heads on one kv head
  (the dk/dv program's loop over heads), H = 40 padded to 64, and 128-wide dk/dv key blocks over 64-wide
  query steps (the first query block of a key block off the diagonal)."""
  kind = jax.devices()[0].device_kind.upper()
  on_hopper = jax.default_backend() == "gpu" and ("H100" in kind or "H200" in kind)
  _check_against_reference("mosaic_gpu", (1, 150, 4, 1, 40), ops.MgpuBlockSizes(block_k_bwd=128), jnp.bfloat16,
                           interpret=not on_hopper)


def _check_against_reference(backend, shape, blocks, dtype, *, interpret):
  q, k, v, seg, g = _inputs(*shape, dtype)
  out_tol, grad_tol = _TOL[dtype]
  kernel = functools.partial(ops.attention, segment_ids=seg, backend=backend, block_sizes=blocks,
                             interpret=interpret)
  got, got_g = _outputs_and_grads(jax.jit(kernel), q, k, v, g)
  with jax.default_matmul_precision("float32"):   # IEEE f32 on a GPU too (its default is TF32), as the kernels
    want, want_g = _outputs_and_grads(functools.partial(reference.attention_reference, segment_ids=seg), q, k, v, g)
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=out_tol)
  for name, a, b in zip("qkv", got_g, want_g):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=grad_tol, err_msg=name)


def test_triton_documents_do_not_see_each_other():
  q, k, v, _, _ = _inputs(1, 40, 2, 1, 16, jnp.float32)
  seg = jnp.asarray([[1] * 21 + [2] * 19], jnp.int32)   # the boundary inside a 16-block
  run = functools.partial(ops.attention, segment_ids=seg, backend="triton", block_sizes=_SMALL,
                          interpret=_INTERPRET)
  out = run(q, k, v)
  changed = run(q, k.at[:, :21].set(0.0), v.at[:, :21].set(5.0))
  np.testing.assert_array_equal(out[:, 21:], changed[:, 21:])
  assert not np.allclose(out[:, :21], changed[:, :21])


def test_auto_backend_off_gpu_is_the_xla_blockwise_path():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the fallback of backend='auto' off GPUs")
  q, k, v, seg, _ = _inputs(1, 20, 2, 1, 8, jnp.float32)
  np.testing.assert_array_equal(ops.attention(q, k, v, seg, xla_block=8),
                                ops.attention(q, k, v, seg, backend="xla", xla_block=8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="cudnn"), "Unknown backend"),
    (dict(backend="xla", block_sizes=ops.BlockSizes()), "do not tile the 'xla' backend"),
    (dict(backend="mosaic_tpu", block_sizes=ops.BlockSizes()), "do not tile the 'mosaic_tpu' backend"),
    (dict(backend="mosaic_gpu"), "bf16 or f16"),
    (dict(q_heads=3), "N % K == 0"),
    (dict(seg_len=5), "segment_ids"),
    (dict(k_dtype=jnp.bfloat16), "share a dtype"),
    # Float ids: the kernels' int32 cast merged 1.0 and 1.5 into one segment, the reference did not.
    (dict(backend="triton", seg_dtype=jnp.float32), "segment_ids must be integer"),
    (dict(qkv_dtype=jnp.int32), "must be floating point"),
    # Mosaic GPU interpreter options: an AssertionError (triton) / TypeError (splash) deep in Pallas before.
    (dict(backend="triton", interpret=plmgpu.InterpretGPUParams()), "takes backend='mosaic_gpu'"),
    (dict(backend="mosaic_tpu", interpret=plmgpu.InterpretGPUParams()), "takes backend='mosaic_gpu'"),
])
def test_bad_arguments(kwargs, match):
  q, k, v, seg, _ = _inputs(1, 8, 4, 2, 16, jnp.float32)
  q = q[:, :, :kwargs.pop("q_heads", 4)]
  seg = seg[:, :kwargs.pop("seg_len", 8)].astype(kwargs.pop("seg_dtype", jnp.int32))
  k = k.astype(kwargs.pop("k_dtype", jnp.float32))
  if "qkv_dtype" in kwargs:
    q, k, v = (x.astype(kwargs["qkv_dtype"]) for x in (q, k, v))
    del kwargs["qkv_dtype"]
  with pytest.raises(ValueError, match=match):
    ops.attention(q, k, v, seg, **{"interpret": True, **kwargs})


@pytest.mark.parametrize("backend,platform", [("triton", "gpu"), ("mosaic_gpu", "gpu"), ("mosaic_tpu", "tpu")])
def test_kernels_need_their_hardware_or_the_interpreter(backend, platform):
  if jax.default_backend() == platform:
    pytest.skip(f"only meaningful without a {platform}")
  q, k, v, seg, _ = _inputs(1, 8, 2, 1, 16, jnp.float32)
  with pytest.raises(ValueError, match="interpret=True"):
    ops.attention(q, k, v, seg, backend=backend)


@pytest.mark.parametrize("tiling,field,value", [(ops.BlockSizes, "block_q", 8), (ops.BlockSizes, "block_k_bwd", 48),
                                                 (ops.BlockSizes, "num_warps", 0), (ops.TpuBlockSizes, "block", 192),
                                                 (ops.MgpuBlockSizes, "block_q", 32),
                                                 (ops.MgpuBlockSizes, "max_concurrent_steps", 0)])
def test_bad_block_sizes(tiling, field, value):
  with pytest.raises(ValueError, match=field):
    tiling(**{field: value})


@pytest.mark.parametrize("t,n,kvh,with_auto", [(4096, 32, 2, True), (200, 12, 4, False)])
def test_lowers_to_triton_for_an_abstract_gpu(t, n, kvh, with_auto):
  """Pallas -> Triton IR lowering of the 3 kernels (forward, dk/dv, dq), on CPU: the Nemotron 3 Super /
  Nano attention shape (32 query heads, 2 kv heads, head dim 128) at T = 4096 through backend="auto", and
  an odd shape (T, G and H padded)."""
  try:
    mesh = _abstract_mesh(*_H100)
  except (ImportError, AttributeError, TypeError) as e:
    pytest.skip(f"jax private AbstractDevice API changed: {e!r}")
  h = 128 if with_auto else 40
  sds = jax.ShapeDtypeStruct
  args = (sds((1, t, n, h), jnp.bfloat16), sds((1, t, kvh, h), jnp.bfloat16), sds((1, t, kvh, h), jnp.bfloat16))
  seg = sds((1, t), jnp.int32)
  backend = "auto" if with_auto else "triton"
  loss = lambda q, k, v, s: ops.attention(q, k, v, s, backend=backend).astype(jnp.float32).sum()
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
  for name in ("flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq"):
    assert f'name = "{name}"' in text


@pytest.mark.parametrize("t,n,kvh,h", [(4096, 32, 2, 128), (200, 12, 4, 40)])
def test_lowers_to_mosaic_gpu_for_an_abstract_h100(t, n, kvh, h):
  """backend="mosaic_gpu": forward, dk/dv and dq lower to 3 Mosaic GPU kernels (layout inference and the
  shared-memory budget included) at the Nemotron 3 Super / Nano attention shape and an odd one."""
  try:
    mesh = _abstract_mesh(*_H100)
  except (ImportError, AttributeError, TypeError) as e:
    pytest.skip(f"jax private AbstractDevice API changed: {e!r}")
  sds = jax.ShapeDtypeStruct
  args = (sds((1, t, n, h), jnp.bfloat16), sds((1, t, kvh, h), jnp.bfloat16), sds((1, t, kvh, h), jnp.bfloat16),
          sds((1, t), jnp.int32))
  loss = lambda q, k, v, s: ops.attention(q, k, v, s, backend="mosaic_gpu").astype(jnp.float32).sum()
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("@mosaic_gpu_v2(") == 3
  assert "triton" not in text


def test_lowers_to_mosaic_for_an_abstract_tpu():
  """backend="auto" under an abstract TPU v5e is the splash kernel: forward, dq and dk/dv lower to Mosaic
  at the Nemotron 3 Nano attention shape (the Mosaic compiler itself, with libtpu:
  tests/test_aot.py::test_tpu_kernels_compile_for_v5e)."""
  try:
    mesh = _abstract_mesh(*_TPU_V5E)
  except (ImportError, AttributeError, TypeError) as e:
    pytest.skip(f"jax private AbstractDevice API changed: {e!r}")
  sds = jax.ShapeDtypeStruct
  b, t, n, kvh, h = 1, 4096, 32, 2, 128
  args = (sds((b, t, n, h), jnp.bfloat16), sds((b, t, kvh, h), jnp.bfloat16), sds((b, t, kvh, h), jnp.bfloat16),
          sds((b, t), jnp.int32))
  loss = lambda q, k, v, s: ops.attention(q, k, v, s).astype(jnp.float32).sum()
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("@tpu_custom_call(") == 3
  assert "triton" not in text
