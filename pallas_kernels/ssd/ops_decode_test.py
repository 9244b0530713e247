"""Tests of the decode kernels against the references: `ops_decode.ssd_decode_step` (the SSM update)
against `ssd_decode_step_reference`, `conv_ssd_decode_step` / `conv_ssd_decode_step_packed` (conv windows + SSM
update) against `conv_ssd_decode_step_reference`.

`DecodeTest` / `ConvDecodeTest` run the Triton kernels compiled (GPU only), `DecodeTpuTest` / `ConvDecodeTpuTest`
the Mosaic TPU kernel (TPU only); their `*InterpretTest` twins run the same tests in the Pallas interpreters on
CPU (the TPU one models the TPU pipeline). `DecodeApiTest` checks backend selection, bad input, and lowering for
an abstract H100 and v5e at the Nemotron-3-Nano-4B mixer shape (no accelerator needed).
"""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ops_decode
from pallas_kernels.ssd.ops_test import _H100, _abstract_mesh  # the abstract chips of the scan's tests
from pallas_kernels.ssd.ops_test import _TPU_V5E as _V5E
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
  BACKEND, PLATFORM = "triton", "gpu"

  def setUp(self):
    super().setUp()
    if jax.default_backend() != self.PLATFORM and not self.INTERPRET:
      self.skipTest(f"the compiled {self.BACKEND} decode kernel needs a {self.PLATFORM}; the *InterpretTest twin "
                    "runs the same on CPU")

  def _both(self, inputs, **kw):
    want = reference.ssd_decode_step_reference(*inputs.values(), **kw)
    got = ops_decode.ssd_decode_step(*inputs.values(), backend=self.BACKEND, interpret=self.INTERPRET, **kw)
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
                                       backend=self.BACKEND, interpret=self.INTERPRET)
    np.testing.assert_array_equal(h[1], fresh[1][1])

  def test_optional_args_and_one_group(self):
    """No D, no dt_bias, no softplus, one B/C group for all heads, no initial state."""
    inputs = _inputs(jnp.float32, ngroups=1)
    inputs.update(D=None, dt_bias=None)
    inputs["dt"] = jnp.abs(inputs["dt"])
    (y, h), (y_want, h_want) = self._both(inputs, dt_softplus=False)
    _close(self, y, y_want, jnp.float32, "y")
    _close(self, h, h_want, jnp.float32, "state")
    got = ops_decode.ssd_decode_step(None, *list(inputs.values())[1:], dt_softplus=False, backend=self.BACKEND,
                                     interpret=self.INTERPRET)
    want = reference.ssd_decode_step_reference(None, *list(inputs.values())[1:], dt_softplus=False)
    _close(self, got[1], want[1], jnp.float32, "state from zero")

  def test_runs_under_jit_with_the_state_donated(self):
    """The generation step donates the cache; the kernel aliases its state output to that input (that XLA
    then writes no copy is checked on XLA's H100 compile: tests/test_aot.py)."""
    inputs = _inputs(jnp.float32)
    step = jax.jit(lambda *a: ops_decode.ssd_decode_step(*a, backend=self.BACKEND, interpret=self.INTERPRET),
                   donate_argnums=0)
    want = reference.ssd_decode_step_reference(*inputs.values())
    y, h = step(*inputs.values())
    _close(self, h, want[1], jnp.float32, "state")
    self.assertTrue(inputs["state"].is_deleted())


class DecodeInterpretTest(DecodeTest):
  INTERPRET = True


class DecodeTpuTest(DecodeTest):
  BACKEND, PLATFORM = "mosaic_tpu", "tpu"


class DecodeTpuInterpretTest(DecodeTpuTest):
  INTERPRET = True


def _conv_inputs(dtype, *, batch=3, nheads=8, headdim=80, dstate=16, ngroups=2, width=4, bias=True, seed=0):
  """Arguments of `conv_ssd_decode_step_reference` (conv windows, raw inputs, weights in `dtype`)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, dt=dtype: jnp.asarray(rng.standard_normal(shape), dt)
  m, p, j, q = nheads, headdim, ngroups, dstate
  return dict(
      state=normal(batch, m, p, q, dt=jnp.float32),
      conv_state=(normal(batch, width - 1, m, p), normal(batch, width - 1, j, q), normal(batch, width - 1, j, q)),
      x=normal(batch, m, p), dt=normal(batch, m),
      A=-jnp.asarray(rng.uniform(0.5, 4.0, m), jnp.float32),
      B=normal(batch, j, q), C=normal(batch, j, q),
      D=normal(m, dt=jnp.float32), dt_bias=normal(m, dt=jnp.float32),
      conv_weight=(normal(width, m, p), normal(width, j, q), normal(width, j, q)),
      conv_bias=(normal(m, p), normal(j, q), normal(j, q)) if bias else None,
  )


def _packed(inputs, z_width=5, tail=3):
  """-> (xbcdt [B, z + MP + 2JQ + M + tail] with x, B, C, dt from column `z_width`, A_log), the layout of the
  mixer's fused projection (z in front; `tail` columns after dt that the kernel must not read)."""
  bsz = inputs["x"].shape[0]
  flat = lambda v: v.reshape(bsz, -1)
  dtype = inputs["x"].dtype
  xbcdt = jnp.concatenate([jnp.full((bsz, z_width), 7, dtype), flat(inputs["x"]), flat(inputs["B"]),
                           flat(inputs["C"]), inputs["dt"], jnp.full((bsz, tail), 7, dtype)], axis=1)
  return xbcdt, jnp.log(-inputs["A"])


class ConvDecodeTest(parameterized.TestCase):
  INTERPRET = False
  BACKEND, PLATFORM = "triton", "gpu"

  def setUp(self):
    super().setUp()
    if jax.default_backend() != self.PLATFORM and not self.INTERPRET:
      self.skipTest(f"the compiled {self.BACKEND} decode kernel needs a {self.PLATFORM}; the *InterpretTest twin "
                    "runs the same on CPU")

  def _check(self, got, want, dtype):
    (y, h, windows), (y_want, h_want, windows_want) = got, want
    self.assertEqual(y.dtype, y_want.dtype)
    self.assertEqual(h.dtype, jnp.float32)
    _close(self, y, y_want, dtype, "y")
    _close(self, h, h_want, jnp.float32, "state")
    for name, w, w_want in zip("xBC", windows, windows_want):
      self.assertEqual(w.dtype, w_want.dtype, name)
      np.testing.assert_array_equal(np.asarray(w, np.float32), np.asarray(w_want, np.float32), err_msg=name)

  @parameterized.product(dtype=[jnp.float32, jnp.bfloat16], headdim=[80, 64, 6], packed=[False, True])
  def test_matches_reference(self, dtype, headdim, packed):
    """P = 80 (Nano-4B, blocks of 16), 64 and 6; f32 and bf16; split or packed inputs; row 1 starts a new
    document (its windows and state read as zeros). The shifted windows are exact."""
    inputs = _conv_inputs(dtype, headdim=headdim)
    keep = jnp.asarray([True, False, True])
    kw = dict(dt_softplus=True, dt_min=0.001, dt_max=10.0, keep=keep)
    want = reference.conv_ssd_decode_step_reference(*inputs.values(), **kw)
    if packed:
      xbcdt, a_log = _packed(inputs)
      got = ops_decode.conv_ssd_decode_step_packed(
          inputs["state"], inputs["conv_state"], xbcdt, a_log, inputs["D"], inputs["dt_bias"],
          inputs["conv_weight"], inputs["conv_bias"], offset=5, backend=self.BACKEND, interpret=self.INTERPRET, **kw)
    else:
      got = ops_decode.conv_ssd_decode_step(*inputs.values(), backend=self.BACKEND, interpret=self.INTERPRET, **kw)
    self._check(got, want, dtype)

  def test_optional_args_one_group_and_width_two(self):
    """No conv bias, D, dt_bias or softplus; no activation; one B/C group for all heads; no state; K = 2."""
    inputs = _conv_inputs(jnp.float32, ngroups=1, width=2, bias=False)
    inputs.update(D=None, dt_bias=None, state=None, dt=jnp.abs(_conv_inputs(jnp.float32)["dt"][:, :8]))
    kw = dict(dt_softplus=False, activation=None)
    want = reference.conv_ssd_decode_step_reference(*inputs.values(), **kw)
    got = ops_decode.conv_ssd_decode_step(*inputs.values(), backend=self.BACKEND, interpret=self.INTERPRET, **kw)
    self._check(got, want, jnp.float32)

  def test_runs_under_jit_with_the_caches_donated(self):
    """The generation step donates the caches: the state and the x window are updated in place."""
    inputs = _conv_inputs(jnp.bfloat16)
    want = reference.conv_ssd_decode_step_reference(*inputs.values())
    step = jax.jit(lambda *a: ops_decode.conv_ssd_decode_step(*a, backend=self.BACKEND, interpret=self.INTERPRET),
                   donate_argnums=(0, 1))
    got = step(*inputs.values())
    self._check(got, want, jnp.bfloat16)
    self.assertTrue(inputs["state"].is_deleted())


class ConvDecodeInterpretTest(ConvDecodeTest):
  INTERPRET = True


class ConvDecodeTpuTest(ConvDecodeTest):
  BACKEND, PLATFORM = "mosaic_tpu", "tpu"


class ConvDecodeTpuInterpretTest(ConvDecodeTpuTest):
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
      resolve("mosaic", False, 128)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(*_V5E)):
      self.assertEqual(resolve("auto", False, 128), "mosaic_tpu")
      self.assertEqual(resolve("auto", False, 96), "mosaic_tpu")  # any Q
    with self.assertRaisesRegex(ValueError, "compiles for a TPU, but the target platform is 'cpu'"):
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

  @parameterized.named_parameters(("h100", _H100, "cuda", "__gpu$xla.gpu.triton"),
                                  ("v5e", _V5E, "tpu", "tpu_custom_call"))
  def test_lowers_to_one_kernel_call_for_an_abstract_chip(self, chip, platform, marker):
    """Nemotron-3-Nano-4B's mixer (M = 96, P = 80, Q = 128, J = 8) at batch 64 for an H100 (the Triton kernel)
    and a v5e (the Mosaic kernel): one custom call whose state output is the donated state input (that the
    chips' compilers take it, in place, is tests/test_aot.py's)."""
    b, m, p, j, q = 64, 96, 80, 8, 128
    sds = jax.ShapeDtypeStruct
    args = (sds((b, m, p, q), jnp.float32), sds((b, m, p), jnp.bfloat16), sds((b, m), jnp.float32),
            sds((m,), jnp.float32), sds((b, j, q), jnp.bfloat16), sds((b, j, q), jnp.bfloat16),
            sds((m,), jnp.float32), sds((m,), jnp.float32), sds((b,), jnp.bool_))
    step = jax.jit(lambda st, x, dt, a, bb, c, d, dtb, keep: ops_decode.ssd_decode_step(
        st, x, dt, a, bb, c, d, dtb, keep=keep), donate_argnums=0)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(*chip)):
      text = step.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    self.assertEqual(text.count(marker), 1)
    self.assertIn("tf.aliasing_output = 1", text)

  def test_tpu_heads_per_step(self):
    heads = lambda m, **kw: ops_decode.DecodeBlockSizes(**kw).heads(m, 80, 128)
    self.assertEqual(heads(96), 24)   # Nano-4B: 24 x 80 x 128 f32 = 0.98 MiB per state block
    self.assertEqual(heads(8), 8)
    self.assertEqual(heads(6), 6)     # fewer than 8 heads: all of them
    self.assertEqual(heads(96, block_m=48), 48)
    with self.assertRaisesRegex(ValueError, "block_m=12 must divide M=96 and be a multiple of 8"):
      heads(96, block_m=12)

  def test_block_sizes_out_of_range_are_errors(self):
    """0 was a ZeroDivisionError at the first call, a negative block_m a negative grid."""
    for field, value in (("block_p", 0), ("block_p", 24), ("block_m", 0), ("block_m", -8), ("num_warps", 0)):
      with self.assertRaisesRegex(ValueError, f"{field}={value} must be"):
        ops_decode.DecodeBlockSizes(**{field: value})

  def test_conv_step_backends_and_bad_input(self):
    inputs = _conv_inputs(jnp.float32)
    want = reference.conv_ssd_decode_step_reference(*inputs.values())
    got = ops_decode.conv_ssd_decode_step(*inputs.values())  # auto on CPU: the reference
    jax.tree.map(np.testing.assert_array_equal, got, want)
    xbcdt, a_log = _packed(inputs)
    packed = lambda **kw: ops_decode.conv_ssd_decode_step_packed(
        inputs["state"], inputs["conv_state"], kw.pop("xbcdt", xbcdt), a_log, inputs["D"], inputs["dt_bias"],
        inputs["conv_weight"], inputs["conv_bias"], **{"offset": 5, **kw})
    want = reference.conv_ssd_decode_step_reference(*{**inputs, "A": -jnp.exp(a_log)}.values())
    jax.tree.map(np.testing.assert_array_equal, packed(), want)  # the reference on the pieces
    with self.assertRaisesRegex(ValueError, "xbcdt must be"):
      packed(offset=9)  # past the end
    with self.assertRaisesRegex(ValueError, "xbcdt must be"):
      packed(xbcdt=xbcdt[:2])
    bad_window = {**inputs, "conv_state": (inputs["conv_state"][0][:, :2], *inputs["conv_state"][1:])}
    with self.assertRaisesRegex(ValueError, "conv state of x must be"):
      ops_decode.conv_ssd_decode_step(*bad_window.values(), backend="triton", interpret=True)
    bad_weight = {**inputs, "conv_weight": (inputs["conv_weight"][0], inputs["conv_weight"][1][:3],
                                           inputs["conv_weight"][2])}
    with self.assertRaisesRegex(ValueError, "differ in width"):
      ops_decode.conv_ssd_decode_step(*bad_weight.values(), backend="triton", interpret=True)
    with self.assertRaisesRegex(ValueError, "conv bias of B must be"):
      ops_decode.conv_ssd_decode_step(*{**inputs, "conv_bias": (inputs["conv_bias"][0], inputs["conv_bias"][0],
                                                               inputs["conv_bias"][2])}.values(), interpret=True)
    with self.assertRaisesRegex(ValueError, "give all three"):
      ops_decode.conv_ssd_decode_step(*{**inputs, "conv_bias": (None, *inputs["conv_bias"][1:])}.values(),
                                      backend="triton", interpret=True)
    with self.assertRaisesRegex(ValueError, "x, B, C. triple"):
      ops_decode.conv_ssd_decode_step(*{**inputs, "conv_state": inputs["conv_state"][0]}.values(), interpret=True)

  def test_conv_step_lowers_to_one_triton_call_for_an_abstract_h100(self):
    """Nemotron-3-Nano-4B's mixer at batch 1 from its fused projection (z | x | B | C | dt): one Triton custom
    call whose state and x window outputs are the donated inputs."""
    b, m, p, j, q, k = 1, 96, 80, 8, 128, 4
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    args = (sds((b, m, p, q), jnp.float32),
            (sds((b, k - 1, m, p), bf), sds((b, k - 1, j, q), bf), sds((b, k - 1, j, q), bf)),
            sds((b, 2 * m * p + 2 * j * q + m), bf), sds((m,), bf), sds((m,), bf), sds((m,), bf),
            (sds((k, m, p), bf), sds((k, j, q), bf), sds((k, j, q), bf)), sds((b,), jnp.bool_))
    step = jax.jit(lambda st, cs, proj, a_log, d, dtb, cw, keep: ops_decode.conv_ssd_decode_step_packed(
        st, cs, proj, a_log, d, dtb, cw, offset=m * p, keep=keep), donate_argnums=(0, 1))
    with jax.sharding.use_abstract_mesh(_abstract_mesh(*_H100)):
      text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 1)
    aliases = re.findall(r"output_operand_alias<output_tuple_indices = \[(\d)\]", text)
    self.assertEqual(sorted(aliases), ["1", "2"])  # the state and the x window, in place


if __name__ == "__main__":
  absltest.main()
