"""Tests of `ops_decode.ssd_decode_step` (the Triton decode kernel) against `ssd_decode_step_reference`.

`DecodeTest` runs the kernel compiled (GPU only); `DecodeInterpretTest` runs the same tests in Pallas
interpret mode on CPU. `DecodeApiTest` checks backend selection, bad input, and lowering for an abstract H100
at the Nemotron-3-Nano-4B mixer shape (no accelerator needed).
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ops_decode
from pallas_kernels.ssd.ops_test import _H100, _abstract_mesh  # the abstract H100 of the scan's tests
from pallas_kernels.ssd import reference

# |got - want| <= atol * max|want| + rtol * |want|. The kernel works in f32 like the reference; bf16 outputs
# round once, so they may differ by one bf16 step where the f32 sums differ in their last bits.
_TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _inputs(dtype, *, batch=3, nheads=8, headdim=80, dstate=16, ngroups=2, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape), dt)
  return dict(
      state=normal(batch, nheads, headdim, dstate),
      x=normal(batch, nheads, headdim, dt=dtype),
      dt=normal(batch, nheads, dt=dtype),
      A=-jnp.asarray(rng.uniform(0.5, 4.0, nheads), jnp.float32),
      B=normal(batch, ngroups, dstate, dt=dtype),
      C=normal(batch, ngroups, dstate, dt=dtype),
      D=normal(nheads),
      dt_bias=normal(nheads),
  )


def _close(test, got, want, dtype, name):
  tol = _TOL[dtype]
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  test.assertEqual(got.shape, want.shape, name)
  np.testing.assert_allclose(got, want, atol=tol["atol"] * np.abs(want).max(), rtol=tol["rtol"], err_msg=name)


class DecodeTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if jax.default_backend() != "gpu" and not self.INTERPRET:
      self.skipTest("the compiled Triton decode kernel needs a GPU; DecodeInterpretTest runs the same on CPU")

  def _both(self, inputs, **kw):
    want = reference.ssd_decode_step_reference(*inputs.values(), **kw)
    got = ops_decode.ssd_decode_step(*inputs.values(), backend="triton", interpret=self.INTERPRET, **kw)
    return got, want

  @parameterized.product(dtype=[jnp.float32, jnp.bfloat16], headdim=[80, 64, 6])
  def test_matches_reference(self, dtype, headdim):
    """Nano-4B's P = 80 (blocks of 16), 64 (blocks of 32) and an odd 6 (blocks of 2), f32 and bf16."""
    inputs = _inputs(dtype, headdim=headdim)
    kw = dict(dt_softplus=True, dt_min=0.001, dt_max=10.0)
    (y, h), (y_want, h_want) = self._both(inputs, **kw)
    self.assertEqual(y.dtype, inputs["x"].dtype)
    self.assertEqual(h.dtype, jnp.float32)
    _close(self, y, y_want, dtype, "y")
    _close(self, h, h_want, jnp.float32, "state")

  def test_keep_restarts_rows_from_zero(self):
    """Rows with keep False read a zero state (a new document), however large their old one."""
    inputs = _inputs(jnp.float32)
    inputs["state"] = inputs["state"].at[1].set(1e30)
    keep = jnp.asarray([True, False, True])
    (y, h), (y_want, h_want) = self._both(inputs, keep=keep)
    _close(self, y, y_want, jnp.float32, "y")
    _close(self, h, h_want, jnp.float32, "state")
    fresh = ops_decode.ssd_decode_step(*{**inputs, "state": jnp.zeros_like(inputs["state"])}.values(),
                                       backend="triton", interpret=self.INTERPRET)
    np.testing.assert_array_equal(h[1], fresh[1][1])

  def test_optional_args_and_one_group(self):
    """No D, no dt_bias, no softplus, one B/C group for all heads, no initial state."""
    inputs = _inputs(jnp.float32, ngroups=1)
    inputs.update(D=None, dt_bias=None)
    inputs["dt"] = jnp.abs(inputs["dt"])
    (y, h), (y_want, h_want) = self._both(inputs, dt_softplus=False)
    _close(self, y, y_want, jnp.float32, "y")
    _close(self, h, h_want, jnp.float32, "state")
    got = ops_decode.ssd_decode_step(None, *list(inputs.values())[1:], dt_softplus=False, backend="triton",
                                     interpret=self.INTERPRET)
    want = reference.ssd_decode_step_reference(None, *list(inputs.values())[1:], dt_softplus=False)
    _close(self, got[1], want[1], jnp.float32, "state from zero")

  def test_runs_under_jit_with_the_state_donated(self):
    """The generation step donates the cache; the kernel aliases its state output to that input (that XLA
    then writes no copy is checked on XLA's H100 compile: tests/test_aot.py)."""
    inputs = _inputs(jnp.float32)
    step = jax.jit(lambda *a: ops_decode.ssd_decode_step(*a, backend="triton", interpret=self.INTERPRET),
                   donate_argnums=0)
    want = reference.ssd_decode_step_reference(*inputs.values())
    y, h = step(*inputs.values())
    _close(self, h, want[1], jnp.float32, "state")
    self.assertTrue(inputs["state"].is_deleted())


class DecodeInterpretTest(DecodeTest):
  INTERPRET = True


class DecodeApiTest(parameterized.TestCase):

  def test_auto_picks_the_kernel_on_gpu_only(self):
    resolve = ops_decode._resolve_backend  # pylint: disable=protected-access
    self.assertEqual(resolve("auto", False, 128), "reference")  # CPU
    self.assertEqual(resolve("auto", True, 128), "triton")
    self.assertEqual(resolve("auto", True, 96), "reference")  # Q not a power of 2
    with jax.sharding.use_abstract_mesh(_abstract_mesh(*_H100)):
      self.assertEqual(resolve("auto", False, 128), "triton")
    with self.assertRaisesRegex(ValueError, "target platform is 'cpu'"):
      resolve("triton", False, 128)
    with self.assertRaisesRegex(ValueError, "power of 2"):
      resolve("triton", True, 96)
    with self.assertRaisesRegex(ValueError, "Unknown backend"):
      resolve("mosaic_tpu", False, 128)

  def test_bad_input_is_a_clear_error(self):
    inputs = _inputs(jnp.float32)
    with self.assertRaisesRegex(ValueError, r"keep must be \[B\]"):
      ops_decode.ssd_decode_step(*inputs.values(), keep=jnp.ones((2,), bool), interpret=True)
    with self.assertRaisesRegex(ValueError, "Expected x"):
      ops_decode.ssd_decode_step(*{**inputs, "x": inputs["x"][:, None]}.values(), interpret=True)
    with self.assertRaisesRegex(ValueError, "block_p=24"):
      ops_decode.ssd_decode_step(*inputs.values(), block_sizes=ops_decode.DecodeBlockSizes(block_p=24),
                                 backend="triton", interpret=True)

  def test_lowers_to_one_triton_call_for_an_abstract_h100(self):
    """Nemotron-3-Nano-4B's mixer (M = 96, P = 80, Q = 128, J = 8) at batch 64: one Triton custom call whose
    state output is the donated state input."""
    b, m, p, j, q = 64, 96, 80, 8, 128
    sds = jax.ShapeDtypeStruct
    args = (sds((b, m, p, q), jnp.float32), sds((b, m, p), jnp.bfloat16), sds((b, m), jnp.float32),
            sds((m,), jnp.float32), sds((b, j, q), jnp.bfloat16), sds((b, j, q), jnp.bfloat16),
            sds((m,), jnp.float32), sds((m,), jnp.float32), sds((b,), jnp.bool_))
    step = jax.jit(lambda st, x, dt, a, bb, c, d, dtb, keep: ops_decode.ssd_decode_step(
        st, x, dt, a, bb, c, d, dtb, keep=keep), donate_argnums=0)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(*_H100)):
      text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 1)
    self.assertIn("tf.aliasing_output = 1", text)


if __name__ == "__main__":
  absltest.main()
