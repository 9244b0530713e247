"""Tests of `ops.ssd(backend="mosaic_gpu")`, the Hopper (Mosaic GPU) SSD kernels.

`SsdMosaicGpuTest` runs compiled on a Hopper GPU (`benchmarks/gpu_session.sh kernels`); its
`*InterpretTest` twin runs the same tests on CPU in JAX's Mosaic GPU interpreter, which simulates shared
memory, TMA copies, barriers and wgmma. The kernels take bf16 / f16 inputs only, so every comparison
uses the bf16 tolerance of `ops_test._TOL`. `SsdMosaicGpuStaticTest` needs no kernel run: errors, and
lowering for an abstract H100 (Mosaic GPU's layout inference and its shared-memory budget check).
"""

import dataclasses
import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ops
from pallas_kernels.ssd import ops_mgpu
from pallas_kernels.ssd import ops_test
from pallas_kernels.ssd import reference

_Shape = ops_test._Shape  # pylint: disable=protected-access
# P = 40 and Q = 24 are padded to 64; T = 150 is not a multiple of the chunk; two groups of two heads.
_ODD = _Shape(batch=1, seqlen=150, nheads=4, headdim=40, dstate=24, ngroups=2)


def _bf16(inputs, dtype=jnp.bfloat16):
  """x, B, C in `dtype` (what the kernels take); the rest stays float32."""
  return {k: v.astype(dtype) if k in ("x", "B", "C") else v for k, v in inputs.items()}


class SsdMosaicGpuTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and (jax.default_backend() != "gpu" or "H100" not in jax.devices()[0].device_kind
                               and "H200" not in jax.devices()[0].device_kind):
      self.skipTest("compiled backend='mosaic_gpu' needs a Hopper GPU; SsdMosaicGpuInterpretTest runs the "
                    "same tests on CPU")

  def _check(self, inputs, dtype=jnp.bfloat16, block_sizes=None, **kw):
    got = ops_test._outputs_and_grads(  # pylint: disable=protected-access
        functools.partial(ops.ssd, backend="mosaic_gpu", interpret=self.INTERPRET, block_sizes=block_sizes),
        inputs, **kw)
    want = ops_test._outputs_and_grads(reference.ssd_reference, inputs, **kw)  # pylint: disable=protected-access
    self.assertEqual(got[0].dtype, dtype)
    self.assertEqual(got[1].dtype, jnp.float32)
    ops_test.SsdTest._assert_matches(self, got, want, jnp.bfloat16)  # pylint: disable=protected-access

  @parameterized.named_parameters(
      ("plain_f16", 1, False, False, jnp.float16),
      ("batch2_state_docs", 2, True, True, jnp.bfloat16),
  )
  def test_outputs_and_grads_match_reference(self, batch, use_state, use_docs, dtype):
    shape = dataclasses.replace(_ODD, batch=batch)
    inputs = _bf16(ops_test._inputs(shape, jnp.float32), dtype)  # pylint: disable=protected-access
    if not use_state:
      inputs["initial_state"] = jnp.zeros_like(inputs["initial_state"])
    # Documents of 4 x the base pattern: boundaries on and off the 64-token chunk edges.
    docs = ops_test._doc_ids(batch, shape.seqlen, 4) if use_docs else None  # pylint: disable=protected-access
    self._check(inputs, dtype, chunk_size=64, doc_ids=docs)

  def test_chunk_128_strong_decay_no_skip_one_group(self):
    """The Nemotron chunk and state size (L = 128, Q = 128, P = 64), A up to -8, one group, no D / bias."""
    shape = _Shape(batch=1, seqlen=200, nheads=2, headdim=64, dstate=128, ngroups=1)
    inputs = _bf16(ops_test._strong_decay_inputs(shape, seed=5))  # pylint: disable=protected-access
    inputs.update(D=None, dt_bias=None)
    self._check(inputs, chunk_size=128, doc_ids=ops_test._doc_ids(1, shape.seqlen, 8),  # pylint: disable=protected-access
                dt_softplus=False, dt_min=0.01, dt_max=0.9)

  def test_chunk_256_runs_as_128_other_tiling(self):
    """Nano 2's chunk_size = 256 runs 128-token chunks (the same recurrence, re-associated); one head per
    program and 16-column state-passing blocks."""
    self.assertEqual(ops_mgpu.kernel_chunk(256), 128)
    self.assertEqual(ops_mgpu.kernel_chunk(192), 64)
    shape = _Shape(batch=1, seqlen=130, nheads=2, headdim=64, dstate=64, ngroups=1)
    self._check(_bf16(ops_test._inputs(shape, jnp.float32, seed=3)), chunk_size=256,  # pylint: disable=protected-access
                block_sizes=ops.MgpuBlockSizes(heads_per_block=1, state_cols=16, max_concurrent_steps=1))


class SsdMosaicGpuInterpretTest(SsdMosaicGpuTest):
  INTERPRET = True

  def test_no_shared_memory_races(self):
    """The interpreter's race detector sees every TMA copy, barrier and wgmma of the 9 kernels."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    shape = _Shape(batch=1, seqlen=100, nheads=2, headdim=64, dstate=64, ngroups=1)
    inputs = _bf16(ops_test._inputs(shape, jnp.float32, seed=4))  # pylint: disable=protected-access
    fn = functools.partial(ops.ssd, backend="mosaic_gpu", interpret=plgpu.InterpretGPUParams(detect_races=True))
    out = ops_test._outputs_and_grads(  # pylint: disable=protected-access
        fn, inputs, chunk_size=64, doc_ids=ops_test._doc_ids(1, shape.seqlen, 4))  # pylint: disable=protected-access
    jax.block_until_ready(out)
    self.assertFalse(interpret_pallas_call.get_races().races_found)


class SsdMosaicGpuStaticTest(parameterized.TestCase):
  """Checks that need no kernel run."""

  def _ssd(self, dtype=jnp.bfloat16, chunk_size=64, **kw):
    x = jnp.zeros((1, 8, 2, 4), dtype)
    bc = jnp.zeros((1, 8, 1, 4), dtype)
    return ops.ssd(x, jnp.zeros((1, 8, 2)), -jnp.ones(2), bc, bc, None, None, chunk_size=chunk_size,
                   backend="mosaic_gpu", **kw)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, r"bf16 or f16 x.*TF32"):
      self._ssd(jnp.float32, interpret=True)
    with self.assertRaisesRegex(ValueError, r"chunk_size=96.*multiple of 64"):
      self._ssd(chunk_size=96, interpret=True)
    with self.assertRaisesRegex(ValueError, r"compiles for a GPU.*'cpu'"):
      self._ssd()
    with self.assertRaisesRegex(TypeError, r"MgpuBlockSizes"):
      self._ssd(interpret=True, block_sizes=ops.BlockSizes())
    with self.assertRaisesRegex(ValueError, r"max_concurrent_steps=0"):
      ops.MgpuBlockSizes(max_concurrent_steps=0)
    with self.assertRaisesRegex(ValueError, r"state_cols=48"):
      ops.MgpuBlockSizes(state_cols=48)
    with self.assertRaisesRegex(ValueError, r"heads_per_block=0"):
      ops.MgpuBlockSizes(heads_per_block=0)

  def test_auto_never_picks_it_yet(self):
    with jax.sharding.use_abstract_mesh(ops_test._abstract_mesh(*ops_test._H100)):  # pylint: disable=protected-access
      self.assertEqual(ops._resolve_backend("auto", False, 128, jnp.bfloat16), "triton")  # pylint: disable=protected-access

  @parameterized.named_parameters(("docs", True), ("no_docs", False))
  def test_lowers_to_mosaic_gpu_for_an_abstract_h100(self, with_docs):
    """Forward 3 kernels; the backward recomputes 2 and runs 4 more: 9 Mosaic GPU kernels at the
    Nemotron 3 Nano mixer shape (T = 4096, 64 heads of 64, 8 groups, Q = 128, chunk 128)."""
    try:
      mesh = ops_test._abstract_mesh(*ops_test._H100)  # pylint: disable=protected-access
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    args = ops_test._nano_args(with_docs)  # pylint: disable=protected-access
    with jax.sharding.use_abstract_mesh(mesh):
      text = ops_test._lower_value_and_grad(args, "cuda", chunk_size=128, backend="mosaic_gpu")  # pylint: disable=protected-access
    self.assertEqual(text.count("@mosaic_gpu_v2("), 9)
    self.assertNotIn("triton", text)

  def test_lowers_per_shard_inside_shard_map(self):
    """Under a mesh the model runs the scan per batch shard (`n3jax.sharding.per_shard`): the 9 kernels
    lower inside `shard_map` (check_vma on: outputs are typed as varying like their operands)."""
    try:
      device = ops_test._abstract_mesh(*ops_test._H100).abstract_device  # pylint: disable=protected-access
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    mesh = jax.sharding.AbstractMesh((2,), ("x",), abstract_device=device)
    spec = jax.sharding.PartitionSpec
    args = ops_test._nano_args(with_docs=True)  # pylint: disable=protected-access
    rows = spec("x")
    in_specs = {k: spec() if k in ("A", "D", "dt_bias") else rows for k in args}

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(in_specs,), out_specs=spec())
    def loss(a):
      y, h = ops.ssd(**a, chunk_size=128, backend="mosaic_gpu")
      return jax.lax.psum(y.astype(jnp.float32).sum() + h.sum(), "x")

    def on_mesh(v, s):
      shape = (2 * v.shape[0],) + v.shape[1:] if s == rows else v.shape
      return jax.ShapeDtypeStruct(shape, v.dtype, sharding=jax.NamedSharding(mesh, s))

    args = {k: on_mesh(v, in_specs[k]) for k, v in args.items()}
    diff = {k: v for k, v in args.items() if k != "doc_ids"}
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.jit(jax.value_and_grad(lambda d, docs: loss({**d, "doc_ids": docs}))).trace(
          diff, args["doc_ids"]).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("@mosaic_gpu_v2("), 9)

  def test_large_heads_run_64_token_chunks_or_are_refused(self):
    """P = 128 does not fit 128-token programs in an H100's shared memory: it runs 64-token chunks (the
    9 kernels lower; lowering checks the 227 KB budget). P = 256 fits no chunk: a clear error."""
    self.assertEqual(ops_mgpu.kernel_chunk(128, 64, 128), 128)
    self.assertEqual(ops_mgpu.kernel_chunk(128, 128, 128), 64)
    self.assertEqual(ops_mgpu.kernel_chunk(256, 64, 256), 64)
    with self.assertRaisesRegex(ValueError, r"P=256, Q=64.*backend='triton'"):
      ops_mgpu.kernel_chunk(128, 256, 64)
    try:
      mesh = ops_test._abstract_mesh(*ops_test._H100)  # pylint: disable=protected-access
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    shape = _Shape(batch=1, seqlen=256, nheads=2, headdim=128, dstate=128, ngroups=1)
    args = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        _bf16(ops_test._inputs(shape, jnp.float32)))  # pylint: disable=protected-access
    with jax.sharding.use_abstract_mesh(mesh):
      text = ops_test._lower_value_and_grad(args, "cuda", chunk_size=128, backend="mosaic_gpu")  # pylint: disable=protected-access
    self.assertEqual(text.count("@mosaic_gpu_v2("), 9)


if __name__ == "__main__":
  absltest.main()
