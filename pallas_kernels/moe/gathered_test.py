"""Tests for the gathered-expert kernels (gathered.py): a few (token, slot) rows, each through its expert.

Each suite runs compiled on its chip (``GatheredTritonTest`` on a GPU, ``GatheredTpuTest`` on a TPU; skipped
elsewhere) and in the Pallas interpreters on CPU (``*InterpretTest``). Outputs and the gradients of tokens,
router weights and both expert weights are checked against the sorted dispatch on ``jax.lax.ragged_dot``
(``reference.moe_dispatch_ragged_dot``), in f32 and bf16, at widths off the tiles, with experts repeated
across tokens and within none, and for one token (decoding). Routing is run-time data: one compile per shape.
"""

import functools
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gathered
from pallas_kernels.moe import ops
from pallas_kernels.moe import reference

warnings.filterwarnings("ignore", message=".*Pallas Triton backend.*")

# Relative to the reference's max |value|. bf16: the kernels sum in another order than ragged_dot, and each
# slot's output and the activation are rounded to bf16 (2^-8) on both sides; an element next to a rounding
# boundary can round the other way.
_TOL = {jnp.float32: 5e-6, jnp.bfloat16: 1e-2}
_MEAN_TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-3}

T, R, D, F, E = 5, 3, 40, 24, 7  # D and F off the 16-wide tiles and off the TPU's 128 lanes
_SMALL = gathered.BlockSizes(up=gathered.TileSizes(block_n=16, block_k=16),
                             down=gathered.TileSizes(block_n=16, block_k=16))

ROUTINGS = {
    "random": np.random.default_rng(1).integers(0, E, (T, R)),
    "one_expert_for_all": np.stack([np.full(T, 4), np.full(T, 0), np.full(T, 6)], 1),
    "decode_one_token": np.array([[6, 2, 3]]),
}


def _inputs(dtype, num_tokens=T, seed=0, shape=(D, F, E)):
  d, f, e = shape
  rng = np.random.default_rng(seed)
  return dict(
      tokens=jnp.asarray(rng.standard_normal((num_tokens, d)), dtype),
      router_weights=jnp.asarray(rng.dirichlet(np.ones(R), num_tokens), jnp.float32),
      w_up=jnp.asarray(rng.standard_normal((e, d, f)) / np.sqrt(d), dtype),
      w_down=jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype),
  )


def _close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.abs(want).max()), 1e-6)
  err = np.abs(got - want)
  assert err.max() <= _TOL[dtype] * scale, f"{what}: max |err| {err.max()} > {_TOL[dtype]} x {scale}"
  assert err.mean() <= _MEAN_TOL[dtype] * scale, f"{what}: mean |err| {err.mean()} > {_MEAN_TOL[dtype]} x {scale}"


class GatheredTritonTest(parameterized.TestCase):
  INTERPRET = False
  PLATFORM = "gpu"
  BLOCKS = _SMALL

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() != self.PLATFORM:
      self.skipTest(f"compiled kernels need a {self.PLATFORM}; the *InterpretTest suites run the same on CPU")

  def _dispatch(self, *args, **kw):
    return gathered.gathered_dispatch(*args, block_sizes=self.BLOCKS, interpret=self.INTERPRET or None,
                                      platform=self.PLATFORM, **kw)

  @parameterized.product(dtype=(jnp.float32, jnp.bfloat16), routing=tuple(ROUTINGS))
  def test_forward_and_gradients_match_the_sorted_dispatch(self, dtype, routing):
    ids = jnp.asarray(ROUTINGS[routing], jnp.int32)
    x = _inputs(dtype, num_tokens=ids.shape[0])
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((ids.shape[0], D)), jnp.float32)

    def loss(dispatch, tokens, router_weights, w_up, w_down):
      out, counts = dispatch(tokens, router_weights, ids, w_up, w_down)
      return jnp.sum(out.astype(jnp.float32) * cotangent), (out, counts)

    grad = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3), has_aux=True))
    (_, (out, counts)), grads = grad(self._dispatch)(*x.values())
    (_, (want, want_counts)), want_grads = grad(reference.moe_dispatch_ragged_dot)(*x.values())
    self.assertEqual(out.dtype, dtype)
    _close(out, want, dtype, "combined")
    np.testing.assert_array_equal(counts, want_counts)
    for name, g, w in zip(x, grads, want_grads):
      self.assertEqual(g.dtype, w.dtype, name)
      _close(g, w, dtype, f"d_{name}")

  def test_unrounded_slot_outputs_are_the_references(self):
    """`gathered_expert_mlp` returns the f32 down products before rounding (what tensor-parallel shards sum)."""
    ids = jnp.asarray(ROUTINGS["random"], jnp.int32)
    x = _inputs(jnp.bfloat16)
    got = gathered.gathered_expert_mlp(x["tokens"], ids, x["w_up"], x["w_down"], block_sizes=self.BLOCKS,
                                       interpret=self.INTERPRET or None, platform=self.PLATFORM)
    want = reference.gathered_expert_mlp_reference(x["tokens"], ids, x["w_up"], x["w_down"])
    self.assertEqual((got.shape, got.dtype), ((T, R, D), jnp.float32))
    _close(got, want, jnp.float32, "y")  # the same products of bf16 values, summed in f32
    # The F-slices' partial products add up to the whole (tensor parallelism), before rounding.
    halves = [gathered.gathered_expert_mlp(x["tokens"], ids, x["w_up"][..., s], x["w_down"][:, s],
                                           block_sizes=self.BLOCKS, interpret=self.INTERPRET or None,
                                           platform=self.PLATFORM) for s in (slice(0, F // 2), slice(F // 2, F))]
    _close(halves[0] + halves[1], want, jnp.float32, "sum of F halves")

  def test_one_compile_serves_every_routing(self):
    x = _inputs(jnp.float32)
    traces = []

    @jax.jit
    def run(ids):
      traces.append(1)
      return self._dispatch(x["tokens"], x["router_weights"], ids, x["w_up"], x["w_down"])[0]

    for routing in ("random", "one_expert_for_all"):
      want, _ = reference.moe_dispatch_dense(x["tokens"], x["router_weights"], jnp.asarray(ROUTINGS[routing]),
                                             x["w_up"], x["w_down"])
      _close(run(jnp.asarray(ROUTINGS[routing], jnp.int32)), want, jnp.float32, routing)
    self.assertLen(traces, 1)


class GatheredTritonInterpretTest(GatheredTritonTest):
  INTERPRET = True


class GatheredTpuTest(GatheredTritonTest):
  PLATFORM = "tpu"
  BLOCKS = gathered.TpuBlockSizes(up_block_n=128, down_block_n=128)


class GatheredTpuInterpretTest(GatheredTpuTest):
  INTERPRET = True


class GatheredApiTest(parameterized.TestCase):

  def test_reference_matches_the_dense_oracle(self):
    x = _inputs(jnp.float32)
    ids = jnp.asarray(ROUTINGS["random"], jnp.int32)
    y = reference.gathered_expert_mlp_reference(x["tokens"], ids, x["w_up"], x["w_down"])
    got = gathered.combine_slots(y, x["router_weights"], jnp.float32)
    want, _ = reference.moe_dispatch_dense(x["tokens"], x["router_weights"], ids, x["w_up"], x["w_down"])
    _close(got, want, jnp.float32, "combined")

  def test_no_tokens(self):
    x = _inputs(jnp.float32, num_tokens=0)
    out, counts = gathered.gathered_dispatch(x["tokens"], x["router_weights"], jnp.zeros((0, R), jnp.int32),
                                             x["w_up"], x["w_down"])
    self.assertEqual(out.shape, (0, D))
    np.testing.assert_array_equal(counts, np.zeros(E))

  @parameterized.named_parameters(
      ("bad_tokens", dict(tokens=jnp.zeros((T, D + 1))), r"w_up \[E, D, F\] must have D == tokens.shape\[1\]"),
      ("bad_ids", dict(expert_ids=jnp.zeros((T + 1, R), jnp.int32)), r"expert_ids must be \[T, R\]"),
      ("ids_out_of_range", dict(expert_ids=jnp.full((T, R), E, jnp.int32)), r"must lie in \[0, 7\)"),
      ("bf16_accumulation", dict(preferred_element_type=jnp.bfloat16), "accumulate in float32"),
      ("tpu_tiles_on_gpu", dict(block_sizes=gathered.TpuBlockSizes(), platform="gpu"), "take a BlockSizes"),
      ("gpu_tiles_on_tpu", dict(block_sizes=gathered.BlockSizes(), platform="tpu"), "take a TpuBlockSizes"),
      ("unknown_platform", dict(platform="cpu"), "must be 'gpu'"),
      ("unknown_activation", dict(activation="tanh"), "Unknown activation='tanh'"),
  )
  def test_bad_input_is_a_clear_error(self, change, match):
    x = _inputs(jnp.float32)
    args = dict(tokens=x["tokens"], router_weights=x["router_weights"],
                expert_ids=jnp.asarray(ROUTINGS["random"], jnp.int32), w_up=x["w_up"], w_down=x["w_down"])
    kw = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with self.assertRaisesRegex((ValueError, TypeError), match):
      gathered.gathered_dispatch(*args.values(), **kw)

  def test_bad_tiles_are_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, "block_n=48 must be a power of two"):
      gathered.TileSizes(block_n=48)
    with self.assertRaisesRegex(ValueError, "up_block_n=100 must be a positive multiple of 128"):
      gathered.TpuBlockSizes(up_block_n=100)

  def test_compiled_gpu_path_off_a_gpu_is_a_clear_error(self):
    x = _inputs(jnp.float32)
    with self.assertRaisesRegex(NotImplementedError, "Pallas Triton"):
      gathered.gathered_dispatch(x["tokens"], x["router_weights"], jnp.asarray(ROUTINGS["random"], jnp.int32),
                                 x["w_up"], x["w_down"], interpret=False, platform="gpu")

  def test_lowers_for_an_h100_and_a_tpu(self):
    """Forward and backward lower for abstract chips at Nemotron 3 Nano's expert shape: the two Triton
    kernels (the backward is jnp), and the two Mosaic kernels. Compiling (ptxas, Mosaic's passes) is
    tests/test_aot.py's, with the chips' compilers."""
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    args = (jax.ShapeDtypeStruct((1, 2688), jnp.bfloat16), jax.ShapeDtypeStruct((1, 6), jnp.float32),
            jax.ShapeDtypeStruct((1, 6), jnp.int32), jax.ShapeDtypeStruct((128, 2688, 1856), jnp.bfloat16),
            jax.ShapeDtypeStruct((128, 1856, 2688), jnp.bfloat16))

    def loss(tokens, weights, ids, w_up, w_down):
      return gathered.gathered_dispatch(tokens, weights, ids, w_up, w_down)[0].astype(jnp.float32).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3, 4)))
    for kind, platform, marker in (("NVIDIA H100 80GB HBM3", "gpu", "@__gpu$xla.gpu.triton("),
                                   ("TPU v5 lite", "tpu", "tpu_custom_call")):
      device = mesh_lib.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
      with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)):
        text = step.trace(*args).lower(lowering_platforms=("cuda" if platform == "gpu" else "tpu",)).as_text()
      self.assertEqual(text.count(marker), 2, kind)


class DispatchBackendTest(absltest.TestCase):

  def test_moe_dispatch_contract(self):
    """Same signature and results as the `ops.BACKENDS` entries."""
    x = _inputs(jnp.float32)
    ids = jnp.asarray(ROUTINGS["random"], jnp.int32)
    got = gathered.gathered_dispatch(x["tokens"], x["router_weights"], ids, x["w_up"], x["w_down"],
                                     activation="silu", preferred_element_type=jnp.float32)
    want = ops.moe_dispatch(x["tokens"], x["router_weights"], ids, x["w_up"], x["w_down"], activation="silu",
                            backend="ragged_dot")
    _close(got[0], want[0], jnp.float32, "silu")
    np.testing.assert_array_equal(got[1], want[1])


if __name__ == "__main__":
  absltest.main()
