"""Tests for the Mosaic TPU grouped matmul (gmm_tpu.py) and gmm.py's dispatch.

Mirrors gmm_test.py. Each suite runs compiled on TPU (``GmmTpuTest``; skipped
elsewhere) and in the Pallas TPU interpreter on CPU (``GmmTpuInterpretTest``),
which models the TPU pipeline: input blocks are copied only when their index
changes, an output block is written back only when its index changes, fresh
buffers and edge-block padding are NaN, and a non-consecutive revisit of an
output block raises. The forward and both gradients are checked against
``jax.lax.ragged_dot`` and a dense one-hot reference over group-size patterns
with empty groups, single-row groups, rows past the last group and M, K, N
that are not multiples of the tiles. ``GmmTpuStaticTest`` checks the visit
tables and lowers forward + backward to Mosaic for an abstract TPU v5e at the
Nemotron 3 Nano expert shape (no TPU needed; Mosaic's compile is not covered).
"""

import functools
import unittest

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
import jax.extend  # pylint: disable=unused-import
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import gmm_tpu
from pallas_kernels.moe import reference
# One tolerance table and one dense oracle for both platforms' kernels.
from pallas_kernels.moe.gmm_test import (  # pylint: disable=g-importing-member
    _assert_close, _dense_reference, _moe_inputs,
)

# The smallest legal Mosaic tiles, so that small shapes span several tiles
# with ragged edges and the test tiles also compile on a TPU.
_TILE = gmm_tpu.TileSizes(block_m=128, block_k=128, block_n=128)
_SMALL_BLOCKS = gmm_tpu.BlockSizes(gmm=_TILE, gmm_t=_TILE, tgmm=_TILE)

# M, K, N not multiples of the 128-wide tiles: 3 row tiles (last one 44 rows),
# 2 K blocks (last 72), 2 N blocks (last 8).
M, K, N, E = 300, 200, 136, 6
GROUP_PATTERNS = {  # name -> [E] group sizes, sum <= M
    "random": [70, 31, 55, 12, 90, 30],
    "empty_and_single_row": [0, 1, 0, 150, 1, 140],
    "rows_past_last_group": [40, 0, 30, 0, 100, 0],
    "many_groups_in_one_tile": [3, 1, 2, 0, 1, 293],
    "one_group": [0, 0, 300, 0, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
    "tile_aligned": [128, 0, 128, 5, 0, 0],
    "last_group_only": [0, 0, 0, 0, 0, 300],
}
# bf16 changes dtypes and rounding, not indexing: a subset keeps it fast (the
# TPU interpreter takes ~0.5 s per pattern).
BF16_PATTERNS = ("random", "empty_and_single_row", "many_groups_in_one_tile")

# Abstract TPU for lowering on a host without one.
_V5E = "TPU v5 lite"


def _abstract_tpu_mesh(device_kind: str = _V5E, num_devices: int = 1):
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    device = mesh_lib.AbstractDevice(
        device_kind=device_kind, num_cores=1, platform="tpu"
    )
    return mesh_lib.AbstractMesh(
        (num_devices,), ("x",), abstract_device=device
    )
  except (ImportError, AttributeError, TypeError) as e:
    raise unittest.SkipTest(f"jax private AbstractDevice API changed: {e}")


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
  cotangent = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
  return lhs, rhs, cotangent


class GmmTpuTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "tpu" and not self.INTERPRET:
      self.skipTest(
          "compiled Mosaic kernels need a TPU; GmmTpuInterpretTest covers CPU"
      )

  def _gmm(self, **kwargs):
    # Through the public entry point: platform="tpu" picks gmm_tpu.
    return functools.partial(
        gmm_lib.gmm, block_sizes=_SMALL_BLOCKS, interpret=self.INTERPRET,
        platform="tpu", **kwargs,
    )

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_forward_and_grads_match_ragged_dot_and_dense(self, dtype):
    lhs, rhs, cotangent = _inputs(dtype)
    traces = []

    def vjp_of(fn):
      @jax.jit
      def run(lhs, rhs, group_sizes):
        traces.append(fn)
        out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
        return out, vjp(cotangent.astype(out.dtype))
      return run

    run_ours = vjp_of(self._gmm())
    run_ragged = vjp_of(jax.lax.ragged_dot)
    run_dense = vjp_of(lambda a, b, gs: _dense_reference(a, b, gs, a.dtype))
    for name, sizes in GROUP_PATTERNS.items():
      if dtype == jnp.bfloat16 and name not in BF16_PATTERNS:
        continue
      group_sizes = jnp.asarray(sizes, jnp.int32)
      out, (d_lhs, d_rhs) = run_ours(lhs, rhs, group_sizes)
      self.assertEqual(out.dtype, dtype)
      self.assertEqual(d_lhs.dtype, dtype)
      self.assertEqual(d_rhs.dtype, dtype)
      for ref_name, run_ref in (("ragged_dot", run_ragged),
                                ("dense", run_dense)):
        want, (want_lhs, want_rhs) = run_ref(lhs, rhs, group_sizes)
        for what, g, w in (("out", out, want), ("d_lhs", d_lhs, want_lhs),
                           ("d_rhs", d_rhs, want_rhs)):
          _assert_close(g, w, dtype, f"{name} vs {ref_name}: {what}")
      # Exact zeros where nothing is computed (the interpreter's buffers
      # start as NaN, so a missed row or group would show).
      total = sum(sizes)
      np.testing.assert_array_equal(np.asarray(out[total:], np.float32), 0.0)
      np.testing.assert_array_equal(
          np.asarray(d_lhs[total:], np.float32), 0.0
      )
      empty = [g for g, s in enumerate(sizes) if s == 0]
      np.testing.assert_array_equal(
          np.asarray(d_rhs[np.asarray(empty, int)], np.float32), 0.0
      )
    self.assertLen(traces, 3)  # one compile each serves every group pattern

  def test_preferred_element_type_f32_from_bf16(self):
    lhs, rhs, _ = _inputs(jnp.bfloat16, seed=1)
    group_sizes = jnp.asarray(GROUP_PATTERNS["random"], jnp.int32)
    out = self._gmm(preferred_element_type=jnp.float32)(lhs, rhs, group_sizes)
    self.assertEqual(out.dtype, jnp.float32)
    want = _dense_reference(lhs, rhs, group_sizes, jnp.float32)
    # f32 accumulation of exact bf16 products: f32-tight.
    _assert_close(out, want, jnp.float32)

  def test_tgmm_matches_per_group_products(self):
    lhs, _, dy = _inputs(jnp.float32, seed=2)
    sizes = GROUP_PATTERNS["empty_and_single_row"]
    got = gmm_lib.tgmm(
        lhs, dy, jnp.asarray(sizes, jnp.int32), block_sizes=_SMALL_BLOCKS,
        interpret=self.INTERPRET, platform="tpu",
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x, g = np.asarray(lhs, np.float64), np.asarray(dy, np.float64)
    want = np.stack([x[a:b].T @ g[a:b] for a, b in zip(offsets, offsets[1:])])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  def test_moe_layer_on_tpu_kernels_matches_dense_oracle(self):
    args = _moe_inputs(33, 8, 3, seed=4)
    cotangent = jax.random.normal(jax.random.key(1), (33, 16))

    def run(dispatch):
      def loss(tokens, router_weights, w_up, w_down):
        combined, counts = dispatch(tokens, router_weights, args[2], w_up,
                                    w_down)
        return jnp.sum(combined * cotangent), (combined, counts)
      return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
          args[0], args[1], args[3], args[4]
      )

    (_, (got, _)), got_g = run(functools.partial(
        reference.sorted_dispatch, grouped_matmul=self._gmm()
    ))
    (_, (want, _)), want_g = run(reference.moe_dispatch_dense)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"),
                          got_g, want_g):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


class GmmTpuInterpretTest(GmmTpuTest):
  INTERPRET = True


def _pallas_calls(jaxpr):
  """The pallas_call equations of a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn)
      continue
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
      if isinstance(sub, jax.extend.core.Jaxpr):
        found.extend(_pallas_calls(sub))
  return found


class GmmTpuStaticTest(parameterized.TestCase):
  """Checks that run no kernel."""

  @parameterized.parameters("block_m", "block_k", "block_n")
  def test_tile_sizes_validated(self, field):
    with self.assertRaisesRegex(ValueError, f"{field}=96 must be a positive"):
      gmm_tpu.TileSizes(**{field: 96})

  def test_block_sizes_lookup(self):
    self.assertEqual(gmm_tpu.block_sizes_for("cpu"), gmm_tpu.BlockSizes())
    self.assertIsInstance(gmm_tpu.block_sizes_for(_V5E), gmm_tpu.BlockSizes)
    with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh("TPU v6 lite")):
      self.assertEqual(gmm_tpu.block_sizes_for(),
                       gmm_tpu.block_sizes_for("TPU v6 lite"))

  def test_platform_dispatch(self):
    lhs, rhs = jnp.zeros((8, 4)), jnp.zeros((2, 4, 3))
    group_sizes = jnp.asarray([3, 5], jnp.int32)

    def compiler_params(**kwargs):
      jaxpr = jax.make_jaxpr(
          lambda a, b: gmm_lib.gmm(a, b, group_sizes, **kwargs)
      )(lhs, rhs)
      (eqn,) = _pallas_calls(jaxpr.jaxpr)
      return eqn.params["compiler_params"]

    tpu, gpu = pltpu.CompilerParams, plgpu.CompilerParams
    self.assertIsInstance(compiler_params(platform="tpu", interpret=True), tpu)
    self.assertIsInstance(compiler_params(interpret=True), gpu)  # CPU default
    with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):
      self.assertIsInstance(compiler_params(), tpu)
    with self.assertRaisesRegex(TypeError, "gmm_tpu.BlockSizes"):
      gmm_lib.gmm(lhs, rhs, group_sizes, platform="tpu",
                  block_sizes=gmm_lib.BlockSizes())
    with self.assertRaisesRegex(ValueError, "platform='metal'"):
      gmm_lib.gmm(lhs, rhs, group_sizes, platform="metal")

  def test_unsupported_dtype_raises(self):
    with self.assertRaisesRegex(ValueError, "f32 or bf16"):
      gmm_tpu.gmm(jnp.zeros((8, 4), jnp.float16),
                  jnp.zeros((2, 4, 3), jnp.float16), jnp.zeros((2,), jnp.int32))

  def test_zero_rows(self):
    out = gmm_lib.gmm(jnp.zeros((0, 4)), jnp.ones((2, 4, 3)),
                      jnp.zeros((2,), jnp.int32), platform="tpu")
    self.assertEqual(out.shape, (0, 3))

  def test_visit_tables(self):
    # gmm: every row in [0, M) is stored by exactly one visit; the visits of
    # a row tile are consecutive (an output block is never revisited later);
    # a zero-fill visit reads the blocks of the last real visit. tgmm: each
    # group's visits are consecutive and cover its rows; an empty group gets
    # one visit on the previous visit's tile.
    rng = np.random.default_rng(0)
    block_m, num_tiles = 128, pl_cdiv(M, 128)
    for trial in range(30):
      sizes = rng.integers(0, 90, E) * (rng.random(E) < 0.6)
      sizes[rng.integers(E)] = trial % 3  # a few single rows
      sizes = np.minimum(sizes, M)
      if sizes.sum() > M:
        sizes[-1] = max(0, M - sizes[:-1].sum())
      group_sizes = jnp.asarray(sizes, jnp.int32)
      # pylint: disable-next=protected-access
      tables, count = gmm_tpu._gmm_visits(group_sizes, M, block_m)
      bounds, gid, tile, src_gid, src_tile = map(np.asarray, tables)
      count = int(count)
      self.assertEqual(gid.shape, (num_tiles + E,))
      self.assertLessEqual(count, gid.shape[0])
      covered = np.zeros(M, int)
      for v in range(count):
        rows = np.arange(tile[v] * block_m, (tile[v] + 1) * block_m)
        lo, hi = bounds[gid[v]], bounds[gid[v] + 1]
        covered[rows[(rows >= lo) & (rows < hi)]] += 1
        if gid[v] < E:
          self.assertEqual((src_gid[v], src_tile[v]), (gid[v], tile[v]))
        else:
          real = [u for u in range(v) if gid[u] < E]
          self.assertEqual((src_gid[v], src_tile[v]),
                           (gid[real[-1]], tile[real[-1]]) if real else (0, 0))
      np.testing.assert_array_equal(covered, 1, err_msg=str(sizes))
      self.assertTrue(np.all(np.diff(tile[:count]) >= 0), str(sizes))

      # pylint: disable-next=protected-access
      tables, count = gmm_tpu._tgmm_visits(group_sizes, M, block_m)
      bounds, gid, tile = map(np.asarray, tables)
      gid, tile = gid[:int(count)], tile[:int(count)]
      np.testing.assert_array_equal(np.unique(gid), np.arange(E))
      self.assertTrue(np.all(np.diff(gid) >= 0), str(sizes))
      for g in range(E):
        visited = tile[gid == g]
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
          np.testing.assert_array_equal(
              visited, np.arange(lo // block_m, pl_cdiv(hi, block_m))
          )
        else:
          self.assertLen(visited, 1)
          first = np.flatnonzero(gid == g)[0]
          if first:
            self.assertEqual(visited[0], tile[first - 1])

  @parameterized.product(
      kn=((2688, 1856), (1856, 2688)),  # Nano up and down projections
      dtype=(jnp.bfloat16, jnp.float32),
  )
  def test_lowers_to_mosaic_for_tpu(self, kn, dtype):
    """Forward + backward lower to three Mosaic kernels for an abstract v5e.

    Through the public gmm: the abstract mesh alone selects the TPU kernels
    and compiled (not interpreted) mode. Nemotron 3 Nano expert shape: 8192
    tokens x top-6 rows, 128 experts. Abstract shapes, nothing allocated; no
    TPU needed. Mosaic's compile (libtpu) is tests/test_aot.py::test_tpu_kernels_compile_for_v5e.
    """
    k_dim, n_dim = kn

    def loss(lhs, rhs, group_sizes):
      return gmm_lib.gmm(lhs, rhs, group_sizes).astype(jnp.float32).sum()

    args = (jax.ShapeDtypeStruct((8192 * 6, k_dim), dtype),
            jax.ShapeDtypeStruct((128, k_dim, n_dim), dtype),
            jax.ShapeDtypeStruct((128,), jnp.int32))
    with jax.sharding.use_abstract_mesh(_abstract_tpu_mesh()):
      text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
          *args
      ).lower(lowering_platforms=("tpu",)).as_text()
    # forward (gmm), d_lhs (gmm_t) and d_rhs (tgmm); no interpreter callbacks.
    self.assertEqual(text.count("stablehlo.custom_call @tpu_custom_call("), 3)
    for name in ("gmm", "gmm_t", "tgmm"):
      self.assertEqual(text.count(f'kernel_name = "{name}"'), 1, name)
    self.assertNotIn("callback", text)


  def test_lowers_to_mosaic_inside_shard_map(self):
    """Expert-parallel use: the kernels lower per shard under check_vma."""
    mesh = _abstract_tpu_mesh(num_devices=2)
    spec = jax.sharding.PartitionSpec

    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(spec("x"), spec(), spec("x")),
                       out_specs=spec())
    def loss(lhs, rhs, group_sizes):  # per shard: [1, M, K], [E, K, N], [1, E]
      out = gmm_lib.gmm(lhs[0], rhs, group_sizes[0])
      return jax.lax.psum(out.astype(jnp.float32).sum(), "x")

    def sharded(shape, dtype, *axes):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(
          mesh, spec(*axes)))

    args = (sharded((2, 1024, 256), jnp.bfloat16, "x"),
            sharded((8, 256, 384), jnp.bfloat16),
            sharded((2, 8), jnp.int32, "x"))
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
          *args
      ).lower(lowering_platforms=("tpu",)).as_text()
    self.assertEqual(text.count("stablehlo.custom_call @tpu_custom_call("), 3)


def pl_cdiv(a, b):
  return -(-a // b)


if __name__ == "__main__":
  absltest.main()
