"""Tests for the Hopper grouped matmul (gmm_mgpu.py) and the "pallas_mgpu" moe_dispatch backend.

Each suite runs compiled on an H100/H200 (``GmmMgpuTest``; skipped elsewhere)
and in Pallas' Mosaic GPU interpreter on CPU (``GmmMgpuInterpretTest``, which
simulates shared memory, TMA copies, barriers and wgmma). The forward and
both gradients are checked against ``jax.lax.ragged_dot`` and a dense one-hot
reference over group-size patterns with empty groups, single-row groups,
groups that start off the 8-row grid, rows past the last group and M / K / N
that are not multiples of the 64-wide tiles. Group sizes are run-time values,
so one compile per (dtype, shape) serves every pattern.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gmm_mgpu
from pallas_kernels.moe import ops
from pallas_kernels.moe import reference
from pallas_kernels.moe import gmm_test
from pallas_kernels.moe.gmm_test import _assert_close, _dense_reference, _moe_inputs

_H100 = "NVIDIA H100 80GB HBM3"
_TILE = gmm_mgpu.TileSizes(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)
_SMALL_BLOCKS = gmm_mgpu.BlockSizes(gmm=_TILE, gmm_t=_TILE, tgmm=_TILE)
# Warp-specialized forward and d_lhs (64 x 128 output per program), narrower epilogue chunks.
_WS_TILE = gmm_mgpu.TileSizes(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2,
                              num_compute_wgs=2, epi_n=32)
_WS_BLOCKS = gmm_mgpu.BlockSizes(gmm=_WS_TILE, gmm_t=_WS_TILE, tgmm=_TILE)

M, K, N, E = 150, 80, 72, 6  # M, K, N not multiples of the 64-wide tiles
GROUP_PATTERNS = {  # name -> [E] group sizes, sum <= M
    "off_grid_starts": [3, 41, 7, 60, 2, 30],  # starts 0, 3, 44, 51, 111, 113
    "empty_and_single_row": [0, 1, 0, 70, 1, 75],
    "rows_past_last_group": [13, 0, 3, 0, 60, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
    "one_group": [0, 0, 150, 0, 0, 0],
}


def _inputs(dtype, seed=0):
  return gmm_test._inputs(dtype, seed, shape=(M, K, N, E))  # pylint: disable=protected-access


def _on_hopper() -> bool:
  return jax.default_backend() == "gpu" and jax.devices()[0].device_kind in (
      _H100, "NVIDIA H200"
  )


class GmmMgpuTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and not _on_hopper():
      self.skipTest(
          "compiled Mosaic GPU kernels need a Hopper GPU; GmmMgpuInterpretTest"
          " covers CPU"
      )

  def _gmm(self, block_sizes=_SMALL_BLOCKS, **kwargs):
    return functools.partial(
        gmm_mgpu.gmm, block_sizes=block_sizes, interpret=self.INTERPRET or None,
        **kwargs,
    )

  @parameterized.named_parameters(
      ("bf16", jnp.bfloat16, _SMALL_BLOCKS, tuple(GROUP_PATTERNS)),
      # The visits are the same code for both forms: the patterns that exercise the two epilogues.
      ("bf16_warp_specialized", jnp.bfloat16, _WS_BLOCKS,
       ("off_grid_starts", "empty_and_single_row", "rows_past_last_group")),
      ("f16_warp_specialized", jnp.float16, _WS_BLOCKS, ("off_grid_starts",)),
  )
  def test_forward_and_grads_match_ragged_dot_and_dense(self, dtype, blocks, pattern_names):
    lhs, rhs, cotangent = _inputs(dtype)
    traces = []

    def vjp_of(fn):
      @jax.jit
      def run(lhs, rhs, group_sizes):
        traces.append(fn)
        out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
        return out, vjp(cotangent.astype(out.dtype))
      return run

    run_ours = vjp_of(self._gmm(blocks))
    run_ragged = vjp_of(jax.lax.ragged_dot)
    run_dense = vjp_of(lambda a, b, gs: _dense_reference(a, b, gs, a.dtype))
    for name in pattern_names:
      sizes = GROUP_PATTERNS[name]
      group_sizes = jnp.asarray(sizes, jnp.int32)
      out, (d_lhs, d_rhs) = run_ours(lhs, rhs, group_sizes)
      self.assertEqual((out.dtype, d_lhs.dtype, d_rhs.dtype), (dtype,) * 3)
      for ref_name, run_ref in (("ragged_dot", run_ragged),
                                ("dense", run_dense)):
        want, (want_lhs, want_rhs) = run_ref(lhs, rhs, group_sizes)
        for what, g, w in (("out", out, want), ("d_lhs", d_lhs, want_lhs),
                           ("d_rhs", d_rhs, want_rhs)):
          _assert_close(g, w, jnp.bfloat16, f"{name} vs {ref_name}: {what}")
      # Exact zeros where nothing is computed.
      total = sum(sizes)
      np.testing.assert_array_equal(np.asarray(out[total:], np.float32), 0.0)
      np.testing.assert_array_equal(np.asarray(d_lhs[total:], np.float32), 0.0)
      empty = [g for g, s in enumerate(sizes) if s == 0]
      np.testing.assert_array_equal(
          np.asarray(d_rhs[np.asarray(empty, int)], np.float32), 0.0
      )
    self.assertLen(traces, 3)  # one compile each serves every group pattern

  def test_f32_output_and_tgmm_match_exact_products(self):
    """bf16 operands, f32 out: products of bf16 values are exact in f32, so f32-tight."""
    lhs, rhs, dy = _inputs(jnp.bfloat16, seed=1)
    sizes = GROUP_PATTERNS["off_grid_starts"]
    group_sizes = jnp.asarray(sizes, jnp.int32)
    for blocks in (_SMALL_BLOCKS, _WS_BLOCKS):
      out = self._gmm(blocks, preferred_element_type=jnp.float32)(lhs, rhs, group_sizes)
      self.assertEqual(out.dtype, jnp.float32)
      _assert_close(out, _dense_reference(lhs, rhs, group_sizes, jnp.float32),
                    jnp.float32)
    dy = dy.astype(jnp.bfloat16)
    got = gmm_mgpu.tgmm(lhs, dy, group_sizes, preferred_element_type=jnp.float32,
                        block_sizes=_SMALL_BLOCKS, interpret=self.INTERPRET or None)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x, g = np.asarray(lhs, np.float64), np.asarray(dy, np.float64)
    want = np.stack([x[a:b].T @ g[a:b] for a, b in zip(offsets, offsets[1:])])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)

  def test_pallas_mgpu_backend_matches_dense_oracle(self):
    args = _moe_inputs(40, 8, 3, seed=4, dtype=jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(1), (40, 16))

    def run(dispatch):
      def loss(tokens, router_weights, w_up, w_down):
        combined, counts = dispatch(tokens, router_weights, args[2], w_up, w_down)
        return jnp.sum(combined.astype(jnp.float32) * cotangent), (combined, counts)
      return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
          args[0], args[1], args[3], args[4]
      )

    (_, (got, counts)), got_g = run(
        functools.partial(ops.moe_dispatch, backend="pallas_mgpu")
    )
    (_, (want, _)), want_g = run(reference.moe_dispatch_dense)
    _assert_close(got, want, jnp.bfloat16, "combined")
    for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"),
                          got_g, want_g):
      _assert_close(g, w, jnp.bfloat16, name)
    np.testing.assert_array_equal(
        counts, np.bincount(np.asarray(args[2]).ravel(), minlength=8)
    )


class GmmMgpuInterpretTest(GmmMgpuTest):
  INTERPRET = True

  def test_no_shared_memory_races(self):
    """The interpreter's race detector sees every TMA copy, barrier and wgmma (warp-specialized gmm, tgmm)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    lhs, rhs, cotangent = _inputs(jnp.bfloat16, seed=3)
    group_sizes = jnp.asarray(GROUP_PATTERNS["off_grid_starts"], jnp.int32)
    params = plgpu.InterpretGPUParams(detect_races=True)
    fn = functools.partial(gmm_mgpu.gmm, block_sizes=_WS_BLOCKS, interpret=params)
    out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
    jax.block_until_ready((out, vjp(cotangent.astype(out.dtype))))
    self.assertFalse(interpret_pallas_call.get_races().races_found)


class GmmMgpuStaticTest(parameterized.TestCase):
  """Checks that need no kernel run."""

  def test_f32_operands_raise(self):
    with self.assertRaisesRegex(ValueError, r"bf16 or f16 operands.*TF32"):
      gmm_mgpu.gmm(jnp.zeros((5, 64)), jnp.zeros((2, 64, 64)),
                   jnp.zeros((2,), jnp.int32), interpret=True)

  def test_bad_shapes_raise(self):
    with self.assertRaisesRegex(ValueError, r"must share K"):
      gmm_mgpu.gmm(jnp.zeros((5, 64), jnp.bfloat16),
                   jnp.zeros((2, 32, 64), jnp.bfloat16),
                   jnp.zeros((2,), jnp.int32), interpret=True)

  @parameterized.parameters(
      (dict(block_m=96), "block_m=96 must be a power of two >= 64"),
      (dict(block_k=32), "block_k=32 must be a power of two >= 64"),
      (dict(block_n=512), "block_n=512 must be <= 256"),
      (dict(max_concurrent_steps=0), "max_concurrent_steps=0"),
      (dict(num_compute_wgs=3), "num_compute_wgs=3 must be 1 or 2"),
      (dict(num_compute_wgs=2, max_concurrent_steps=1), "warp-specialized.*>= 2"),
      (dict(epi_n=256), r"epi_n=256 must be a power of two in \[8, block_n=128\]"),
  )
  def test_tile_sizes_validated(self, kwargs, match):
    with self.assertRaisesRegex(ValueError, match):
      gmm_mgpu.TileSizes(**kwargs)

  def test_compiled_needs_a_gpu(self):
    with self.assertRaisesRegex(NotImplementedError, "NVIDIA GPUs"):
      gmm_mgpu.gmm(jnp.zeros((5, 64), jnp.bfloat16),
                   jnp.zeros((2, 64, 64), jnp.bfloat16),
                   jnp.zeros((2,), jnp.int32), interpret=False)

  def test_zero_rows(self):
    out = gmm_mgpu.gmm(jnp.zeros((0, 64), jnp.bfloat16),
                       jnp.ones((2, 64, 64), jnp.bfloat16),
                       jnp.zeros((2,), jnp.int32), interpret=True)
    self.assertEqual(out.shape, (0, 64))

  def test_visits_bound_and_coverage(self):
    """Every row in [0, M) is stored by exactly one used visit; tiles start on 8-row boundaries."""
    rng = np.random.default_rng(0)
    for block_m in (64, 128):
      for trial in range(30):
        sizes = rng.integers(0, 40, E) * (rng.random(E) < 0.7)
        sizes[rng.integers(E)] += trial % 3  # a few single rows
        num_rows = int(sizes.sum()) + int(rng.integers(0, 20))
        visits = map(np.asarray, gmm_mgpu._visits(  # pylint: disable=protected-access
            jnp.asarray(sizes, jnp.int32), num_rows, block_m))
        gid, tile_row, offset, rows = visits
        self.assertEqual(gid.shape, (gmm_mgpu.max_visits(num_rows, E, block_m),))
        starts = np.concatenate([[0], np.cumsum(sizes)])
        stored = np.full(num_rows, -2)
        for g, t, o, r in zip(gid, tile_row, offset, rows):
          if g < 0:
            continue
          self.assertEqual(t % 8, 0)
          self.assertTrue(0 <= o and 0 < r and o + r <= block_m)
          self.assertTrue((stored[t + o:t + o + r] == -2).all(), "stored twice")
          stored[t + o:t + o + r] = g
        row_group = np.searchsorted(starts[1:], np.arange(num_rows), side="right")
        np.testing.assert_array_equal(stored, row_group, err_msg=str(sizes))

  def test_lowers_to_mosaic_gpu_for_h100(self):
    """Forward + backward at the Nemotron 3 Nano expert shape lower to 3 Mosaic GPU kernels for an H100.

    With the Hopper defaults (warp-specialized forward and d_lhs) and with one
    warpgroup, bf16 and f32 outputs.

    Mosaic GPU's lowering runs its layout inference and its shared-memory
    budget check (a tiling over 227 KB is refused here); no GPU is needed.
    """
    device = jax.sharding.AbstractDevice(
        device_kind=_H100, num_cores=132, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)

    def loss(lhs, rhs, group_sizes):
      return gmm_mgpu.gmm(lhs, rhs, group_sizes).astype(jnp.float32).sum()

    args = (jax.ShapeDtypeStruct((49152, 2688), jnp.bfloat16),
            jax.ShapeDtypeStruct((128, 2688, 1856), jnp.bfloat16),
            jax.ShapeDtypeStruct((128,), jnp.int32))
    one_wg = gmm_mgpu.BlockSizes()
    self.assertEqual(gmm_mgpu.block_sizes_for(_H100).gmm.num_compute_wgs, 2)
    for blocks, out_dtype in ((None, jnp.bfloat16), (None, jnp.float32), (one_wg, jnp.float32)):
      def loss_with(lhs, rhs, group_sizes, blocks=blocks, out_dtype=out_dtype):
        return gmm_mgpu.gmm(lhs, rhs, group_sizes, block_sizes=blocks,
                            preferred_element_type=out_dtype).astype(jnp.float32).sum()
      with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss_with, argnums=(0, 1))).trace(*args).lower(
            lowering_platforms=("cuda",)
        ).as_text()
      self.assertEqual(text.count("@mosaic_gpu_v2("), 3)  # gmm, gmm_t, tgmm

    # Expert parallelism: the kernels lower per shard inside shard_map (check_vma on).
    mesh2 = jax.sharding.AbstractMesh((2,), ("x",), abstract_device=device)
    spec = jax.sharding.PartitionSpec

    @functools.partial(jax.shard_map, mesh=mesh2,
                       in_specs=(spec("x"), spec(), spec("x")), out_specs=spec())
    def sharded_loss(lhs, rhs, group_sizes):  # per shard: [1, M, K], [E, K, N], [1, E]
      return jax.lax.psum(loss(lhs[0], rhs, group_sizes[0]), "x")

    def on_mesh2(shape, dtype, *axes):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh2, spec(*axes)))

    with jax.sharding.use_abstract_mesh(mesh2):
      text = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1))).trace(
          on_mesh2((2, 1024, 256), jnp.bfloat16, "x"), on_mesh2((8, 256, 384), jnp.bfloat16),
          on_mesh2((2, 8), jnp.int32, "x"),
      ).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("@mosaic_gpu_v2("), 3)

    too_big = gmm_mgpu.TileSizes(block_m=256, block_n=256, block_k=128,
                                 max_concurrent_steps=4)
    with jax.sharding.use_abstract_mesh(mesh), self.assertRaisesRegex(
        Exception, "shared memory"
    ):
      jax.jit(functools.partial(
          gmm_mgpu.gmm, block_sizes=gmm_mgpu.BlockSizes(gmm=too_big)
      )).trace(*args).lower(lowering_platforms=("cuda",))


if __name__ == "__main__":
  absltest.main()
