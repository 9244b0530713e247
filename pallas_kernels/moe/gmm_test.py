"""Tests for the grouped matmul (gmm.py) and the "pallas" moe_dispatch backend.

Each suite runs compiled on GPU (``GmmTest``; skipped on CPU) and in Pallas
interpret mode on CPU (``GmmInterpretTest``). The forward and both gradients
are checked against ``jax.lax.ragged_dot`` and a dense one-hot reference over
group-size patterns with empty groups, single-row groups, rows past the last
group and row counts that are not a multiple of the tile. Group sizes are run
time values, so one compile per (dtype, shape) serves every pattern.
"""

import functools
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import ops
from pallas_kernels.moe import reference

# The Pallas Triton backend warns that it is deprecated (jax 0.12).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend.*")

# Dtype-keyed tolerances, relative to the reference's max |value|. bf16: the
# output is rounded to bf16 (2^-8 relative) and the backward casts the
# cotangent to bf16 before its two products.
_TOL = {
    jnp.float32: dict(atol=1e-5, rtol=1e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
_MEAN_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 4e-3}  # mean |got - want| / scale

# 16-wide tiles so that small shapes span several tiles with ragged edges.
_SMALL = gmm_lib.TileSizes(block_m=16, block_n=16, block_k=16)
_SMALL_BLOCKS = gmm_lib.BlockSizes(gmm=_SMALL, gmm_t=_SMALL, tgmm=_SMALL)

M, K, N, E = 37, 40, 24, 6  # M, K, N not multiples of the 16-wide tiles
GROUP_PATTERNS = {  # name -> [E] group sizes, sum <= M
    "random": [9, 4, 7, 2, 11, 4],
    "empty_and_single_row": [0, 1, 0, 17, 1, 18],
    "rows_past_last_group": [5, 0, 3, 0, 10, 0],
    "one_group": [0, 0, 37, 0, 0, 0],
    "all_empty": [0, 0, 0, 0, 0, 0],
    "tile_aligned": [16, 0, 16, 5, 0, 0],
    "last_group_only": [0, 0, 0, 0, 0, 37],
}


def _inputs(dtype, seed=0, shape=(M, K, N, E)):
  m, k, n, e = shape
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
  cotangent = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  return lhs, rhs, cotangent


def _dense_reference(lhs, rhs, group_sizes, out_dtype):
  """One-hot oracle: every group's product on every row, then select."""
  rows = jnp.arange(lhs.shape[0])
  ends = jnp.cumsum(group_sizes)
  row_group = jnp.searchsorted(ends, rows, side="right")  # [M]
  one_hot = (row_group[:, None] == jnp.arange(rhs.shape[0])) & (
      rows < ends[-1]
  )[:, None]  # [M, E]
  # Operands upcast to f32 at HIGHEST precision: exact bf16 products.
  all_groups = jnp.einsum(
      "MK,EKN->EMN", lhs.astype(jnp.float32), rhs.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )  # [E, M, N]
  out = jnp.einsum(
      "ME,EMN->MN", one_hot.astype(jnp.float32), all_groups,
      precision=jax.lax.Precision.HIGHEST,
  )
  return out.astype(out_dtype)


def _assert_close(got, want, dtype, err_msg=""):
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  scale = max(float(np.max(np.abs(want))), 1e-6)
  tol = _TOL[dtype]
  np.testing.assert_allclose(
      got, want, atol=tol["atol"] * scale, rtol=tol["rtol"], err_msg=err_msg
  )
  mean_err = float(np.mean(np.abs(got - want))) / scale
  assert mean_err <= _MEAN_TOL[dtype], f"{err_msg}: {mean_err=}"


class GmmTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "cpu" and not self.INTERPRET:
      self.skipTest(
          "compiled Triton kernels need a GPU; GmmInterpretTest covers CPU"
      )

  def _gmm(self, **kwargs):
    return functools.partial(
        gmm_lib.gmm, block_sizes=_SMALL_BLOCKS, interpret=self.INTERPRET,
        **kwargs,
    )

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_forward_and_grads_match_ragged_dot_and_dense(self, dtype):
    lhs, rhs, cotangent = _inputs(dtype)
    ours = self._gmm()

    traces = []

    def vjp_of(fn):
      @jax.jit
      def run(lhs, rhs, group_sizes):
        traces.append(fn)
        out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
        return out, vjp(cotangent.astype(out.dtype))
      return run

    run_ours = vjp_of(ours)
    run_ragged = vjp_of(jax.lax.ragged_dot)
    run_dense = vjp_of(
        lambda a, b, gs: _dense_reference(a, b, gs, a.dtype)
    )
    for name, sizes in GROUP_PATTERNS.items():
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
      # Exact zeros where nothing is computed.
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
        interpret=self.INTERPRET,
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x, g = np.asarray(lhs, np.float64), np.asarray(dy, np.float64)
    want = np.stack([x[a:b].T @ g[a:b] for a, b in zip(offsets, offsets[1:])])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  def test_pallas_backend_matches_dense_oracle(self):
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

    (_, (got, counts)), got_g = run(
        functools.partial(ops.moe_dispatch, backend="pallas")
    )
    (_, (want, _)), want_g = run(reference.moe_dispatch_dense)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"),
                          got_g, want_g):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(
        counts, np.bincount(np.asarray(args[2]).ravel(), minlength=8)
    )
    self.assertEqual(int(counts[1]), 0)  # an empty expert


class GmmInterpretTest(GmmTest):
  INTERPRET = True


def _moe_inputs(num_tokens, num_experts, num_slots, *, seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  d_model, d_hidden = 16, 24
  ids = rng.integers(0, num_experts, (num_tokens, num_slots))
  ids[:, 0] = np.minimum(ids[:, 0], num_experts - 2)  # expert E-1 ~rare
  ids[ids == 1] = 0  # expert 1 empty
  logits = rng.standard_normal((num_tokens, num_slots))
  return (
      jnp.asarray(rng.standard_normal((num_tokens, d_model)), dtype),
      jnp.asarray(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True),
                  jnp.float32),
      jnp.asarray(ids, jnp.int32),
      jnp.asarray(rng.standard_normal((num_experts, d_model, d_hidden)) / 4,
                  dtype),
      jnp.asarray(rng.standard_normal((num_experts, d_hidden, d_model)) / 5,
                  dtype),
  )


class GmmStaticTest(parameterized.TestCase):
  """Checks that need no kernel run."""

  @parameterized.named_parameters(
      ("lhs_rank", (4,), (2, 4, 3), (2,), jnp.float32, r"lhs must be \[M, K\]"),
      ("k_mismatch", (5, 4), (2, 3, 3), (2,), jnp.float32, r"must share K"),
      ("groups", (5, 4), (2, 4, 3), (3,), jnp.float32, r"group_sizes must be"),
      ("dtype", (5, 4), (2, 4, 3), (2,), jnp.int32, r"floating dtype"),
  )
  def test_bad_inputs_raise(self, lhs_shape, rhs_shape, gs_shape, dtype, match):
    with self.assertRaisesRegex(ValueError, match):
      gmm_lib.gmm(
          jnp.zeros(lhs_shape, dtype), jnp.zeros(rhs_shape, dtype),
          jnp.zeros(gs_shape, jnp.int32), interpret=True,
      )

  @parameterized.named_parameters(("gpu", "gpu"), ("tpu", "tpu"))
  def test_tgmm_bad_dtypes_raise(self, platform):
    """As gmm's: float group sizes were truncated and integer operands ran, silently."""
    lhs = jnp.ones((5, 4))
    with self.assertRaisesRegex(ValueError, r"group_sizes must be integer"):
      gmm_lib.tgmm(lhs, lhs, jnp.asarray([2.5, 2.5]), interpret=True, platform=platform)
    with self.assertRaisesRegex(ValueError, r"floating dtype"):
      gmm_lib.tgmm(lhs.astype(jnp.int32), lhs.astype(jnp.int32), jnp.asarray([2, 3]), interpret=True,
                   platform=platform)

  def test_mixed_dtypes_raise(self):
    with self.assertRaisesRegex(ValueError, r"lhs.dtype=.*rhs.dtype="):
      gmm_lib.gmm(jnp.zeros((5, 4), jnp.bfloat16), jnp.zeros((2, 4, 3)),
                  jnp.zeros((2,), jnp.int32), interpret=True)

  @parameterized.parameters("block_m", "block_n", "block_k")
  def test_tile_sizes_validated(self, field):
    with self.assertRaisesRegex(ValueError, f"{field}=24 must be a power"):
      gmm_lib.TileSizes(**{field: 24})

  def test_block_sizes_lookup(self):
    self.assertEqual(gmm_lib.block_sizes_for("cpu"), gmm_lib.BlockSizes())
    h100 = gmm_lib.block_sizes_for("NVIDIA H100 80GB HBM3")
    self.assertIsInstance(h100, gmm_lib.BlockSizes)

  def test_zero_rows(self):
    out = gmm_lib.gmm(jnp.zeros((0, 4)), jnp.ones((2, 4, 3)),
                      jnp.zeros((2,), jnp.int32), interpret=True)
    self.assertEqual(out.shape, (0, 3))

  def test_visit_metadata_bound_and_coverage(self):
    # Every row in [0, M) is covered by exactly one used visit's [lo, hi) and
    # tile; the number of visits fits the static grid.
    rng = np.random.default_rng(0)
    for trial in range(20):
      sizes = rng.integers(0, 9, E) * (rng.random(E) < 0.6)
      sizes[rng.integers(E)] += trial % 3  # a few single rows
      sizes = np.minimum(sizes, M)
      gid, tile, lo, hi = map(np.asarray, gmm_lib._visit_metadata(  # pylint: disable=protected-access
          jnp.asarray(sizes, jnp.int32), M, 16))
      self.assertEqual(gid.shape, (pl_cdiv(M, 16) + E,))
      covered = np.zeros(M, int)
      for g, t, a, b in zip(gid, tile, lo, hi):
        if g < 0:
          continue
        rows = np.arange(t * 16, t * 16 + 16)
        covered[rows[(rows >= a) & (rows < b)]] += 1
      np.testing.assert_array_equal(covered, 1, err_msg=str(sizes))

  def test_lowers_to_triton_for_gpu(self):
    """Lowers forward + backward for an (abstract) H100: Triton IR is built.

    No GPU is needed; PTX compilation and running are not covered.
    """
    try:
      from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      device = mesh_lib.AbstractDevice(
          device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
      )
      abstract_mesh = mesh_lib.AbstractMesh((1,), ("x",),
                                            abstract_device=device)
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e}")
    gpu_blocks = gmm_lib.block_sizes_for("NVIDIA H100 80GB HBM3")

    def loss(lhs, rhs, group_sizes):
      out = gmm_lib._gmm(  # pylint: disable=protected-access
          lhs, rhs, group_sizes, lhs.dtype, gpu_blocks, False
      )
      return out.astype(jnp.float32).sum()

    for dtype in (jnp.bfloat16, jnp.float32):
      args = (jax.ShapeDtypeStruct((1000, 2688), dtype),
              jax.ShapeDtypeStruct((8, 2688, 1856), dtype),
              jax.ShapeDtypeStruct((8,), jnp.int32))
      with jax.sharding.use_abstract_mesh(abstract_mesh):
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(
            lowering_platforms=("cuda",)
        ).as_text()
      # forward, d_lhs (gmm_t) and d_rhs (tgmm)
      self.assertEqual(text.count("@__gpu$xla.gpu.triton("), 3, dtype)


def pl_cdiv(a, b):
  return -(-a // b)


if __name__ == "__main__":
  absltest.main()
