"""Tests of `ops.ssd` (Pallas kernels + custom VJP) against `ssd_reference`.

`SsdTest` runs the kernels compiled (GPU only); `SsdInterpretTest` runs the
same tests in Pallas interpret mode on CPU. Shapes are tiny on purpose
(interpret mode is slow); P and Q are padded to the 16-wide Triton tiles
inside `ops.ssd`, so the same shapes also compile on a GPU.
"""

import dataclasses
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ops
from pallas_kernels.ssd import reference

_GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")
_OUT_NAMES = ("y", "final_state") + tuple(f"d{n}" for n in _GRAD_ARGS)

# Elementwise |got - want| <= atol * max|want| + rtol * |want|; for bf16 also
# mean|got - want| <= mean * mean|want|. bf16 loses precision because the
# kernels (like mamba_ssm's) feed bf16 operands to the products (decay-scaled
# scores, dt-scaled x, states), where the reference works in float32.
_TOL = {
    jnp.float32: dict(atol=1e-4, rtol=1e-4, mean=None),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2, mean=1e-2),
}


@dataclasses.dataclass(frozen=True)
class _Shape:
  batch: int = 2
  seqlen: int = 24
  nheads: int = 4  # M
  headdim: int = 8  # P
  dstate: int = 16  # Q
  ngroups: int = 2  # J


def _normal(rng, shape, scale=1.0, dtype=jnp.float32):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _inputs(shape: _Shape, dtype, seed=0):
  """bf16 x/B/C like the model; dt, A, D, dt_bias, initial state in f32."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape compiles
  b, t, m, p = shape.batch, shape.seqlen, shape.nheads, shape.headdim
  j, q = shape.ngroups, shape.dstate
  return dict(
      x=_normal(rng, (b, t, m, p), dtype=dtype),
      dt=_normal(rng, (b, t, m), 0.5) - 1.0,
      A=-jnp.asarray(np.exp(rng.uniform(-1.0, 1.0, (m,))), jnp.float32),
      B=_normal(rng, (b, t, j, q), 0.5, dtype),
      C=_normal(rng, (b, t, j, q), 0.5, dtype),
      D=_normal(rng, (m,)),
      dt_bias=_normal(rng, (m,), 0.5),
      initial_state=_normal(rng, (b, m, p, q), 0.5),
  )


def _doc_ids(batch, seqlen):
  """Boundaries on and off chunk edges (chunk 16), one-token docs, reused ids."""
  rows = [
      [0] * 8 + [1] * 8 + [0] * 4 + [2] + [1] * 100,
      [3] * 3 + [7] + [3] * 12 + [0] * 5 + [3] * 100,
  ]
  return jnp.asarray([r[:seqlen] for r in rows[:batch]], jnp.int32)


def _outputs_and_grads(fn, inputs, **kw):
  """(y, final_state, *grads of a weighted sum of both outputs), one jit."""

  @jax.jit
  def run(args):
    def f(*a):
      args_ = dict(zip(_GRAD_ARGS, a))
      h0 = args_.pop("initial_state")
      return fn(**args_, initial_state=h0, **kw)

    (y, h), vjp = jax.vjp(f, *args)
    wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    wh = jnp.sin(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
    return (y, h) + vjp((wy.astype(y.dtype), wh))

  return run(tuple(inputs[k] for k in _GRAD_ARGS))


class SsdTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if jax.default_backend() == "cpu" and not self.INTERPRET:
      self.skipTest(
          "compiled Pallas Triton kernels need a GPU; SsdInterpretTest runs "
          "the same tests on CPU"
      )

  def _ssd(self, **kw):
    return functools.partial(
        ops.ssd, backend="triton", interpret=self.INTERPRET, **kw
    )

  def _assert_matches(self, got, want, dtype, names=_OUT_NAMES):
    tol = _TOL[dtype]
    for name, g, w in zip(names, got, want, strict=True):
      if w is None:
        self.assertIsNone(g, name)
        continue
      g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
      self.assertEqual(g.shape, w.shape, name)
      self.assertTrue(np.all(np.isfinite(g)), name)
      np.testing.assert_allclose(
          g,
          w,
          atol=tol["atol"] * max(np.abs(w).max(), 1e-30),
          rtol=tol["rtol"],
          err_msg=name,
      )
      if tol["mean"] is not None:
        err, scale = np.abs(g - w).mean(), np.abs(w).mean()
        self.assertLessEqual(err, tol["mean"] * scale, name)

  @parameterized.named_parameters(
      ("plain_f32", jnp.float32, 24, False, False),
      ("plain_bf16", jnp.bfloat16, 24, False, False),
      ("state_docs_f32", jnp.float32, 40, True, True),
      ("state_docs_bf16", jnp.bfloat16, 40, True, True),
      ("shorter_than_chunk_f32", jnp.float32, 8, True, True),
      ("docs_only_bf16", jnp.bfloat16, 40, False, True),
  )
  def test_outputs_and_grads_match_reference(
      self, dtype, seqlen, use_state, use_docs
  ):
    shape = _Shape(seqlen=seqlen)
    inputs = _inputs(shape, dtype)
    if not use_state:
      inputs["initial_state"] = jnp.zeros_like(inputs["initial_state"])
    kw = dict(
        chunk_size=16,
        doc_ids=_doc_ids(shape.batch, seqlen) if use_docs else None,
    )
    got = _outputs_and_grads(self._ssd(), inputs, **kw)
    want = _outputs_and_grads(reference.ssd_reference, inputs, **kw)
    self.assertEqual(got[0].dtype, dtype)
    self.assertEqual(got[1].dtype, jnp.float32)
    self._assert_matches(got, want, dtype)

  def test_tiles_heads_per_block_and_padding(self):
    """P split in tiles, 2 heads per program, Q = 12 padded to 16, chunk 32."""
    shape = _Shape(seqlen=40, nheads=8, headdim=32, dstate=12)
    inputs = _inputs(shape, jnp.float32, seed=1)
    kw = dict(chunk_size=32, doc_ids=_doc_ids(shape.batch, shape.seqlen))
    block_sizes = ops.BlockSizes(block_p=16, heads_per_block=2)
    got = _outputs_and_grads(self._ssd(block_sizes=block_sizes), inputs, **kw)
    want = _outputs_and_grads(reference.ssd_reference, inputs, **kw)
    self._assert_matches(got, want, jnp.float32)

  def test_optional_args_one_group_strong_decay(self):
    """No D / dt_bias, no softplus, dt clipping, J = 1, exp underflow."""
    shape = _Shape(batch=1, seqlen=37, ngroups=1, headdim=12)
    inputs = _inputs(shape, jnp.float32, seed=2)
    inputs.update(D=None, dt_bias=None, dt=jnp.abs(inputs["dt"]) * 3.0)
    inputs["A"] = inputs["A"] * 20.0  # exp(dt A) underflows inside a chunk
    kw = dict(
        chunk_size=16,
        doc_ids=_doc_ids(1, shape.seqlen),
        dt_softplus=False,
        dt_min=0.05,
        dt_max=2.5,
    )
    block_sizes = ops.BlockSizes(heads_per_block=4)  # all heads, one program
    got = _outputs_and_grads(self._ssd(block_sizes=block_sizes), inputs, **kw)
    want = _outputs_and_grads(reference.ssd_reference, inputs, **kw)
    self._assert_matches(got, want, jnp.float32)


class SsdInterpretTest(SsdTest):
  INTERPRET = True


class SsdApiTest(parameterized.TestCase):
  """Backend selection, block sizes and input checks (no kernel runs)."""

  def test_auto_backend_on_cpu_is_the_reference(self):
    if jax.default_backend() != "cpu":
      self.skipTest("checks the CPU fallback of backend='auto'")
    inputs = _inputs(_Shape(batch=1, seqlen=5), jnp.float32)
    got = ops.ssd(**inputs, chunk_size=4)  # not a kernel chunk size anyway
    want = reference.ssd_reference(**inputs, chunk_size=4)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  @parameterized.named_parameters(
      ("unknown_backend", dict(backend="cuda"), "Unknown backend"),
      ("chunk_not_pow2", dict(backend="triton", chunk_size=24), "power-of-2"),
      ("chunk_too_small", dict(backend="triton", chunk_size=8), "power-of-2"),
      ("bad_shape", dict(dt=jnp.zeros((1, 8, 3))), "dt must be"),
      ("bad_chunk", dict(chunk_size=0), "chunk_size"),
  )
  def test_bad_arguments(self, overrides, match):
    kw = dict(_inputs(_Shape(batch=1, seqlen=8), jnp.float32), interpret=True)
    kw.update(overrides)
    with self.assertRaisesRegex(ValueError, match):
      ops.ssd(**kw)

  def test_triton_without_interpret_needs_gpu(self):
    if jax.default_backend() == "gpu":
      self.skipTest("only meaningful without a GPU")
    inputs = _inputs(_Shape(batch=1, seqlen=8), jnp.float32)
    with self.assertRaisesRegex(ValueError, "interpret=True"):
      ops.ssd(**inputs, chunk_size=16, backend="triton")

  def test_lowers_to_triton_ir_without_a_gpu(self):
    """Pallas -> Triton IR lowering (not ptxas) of all 6 kernels, on CPU.

    Pretends an H100 is present so that the GPU lowering rule runs; catches
    ops or block shapes the Triton lowering rejects before a GPU sees them.
    Shapes: non-power-of-2 M and P (padded), doc ids, 2 heads per program.
    """
    try:
      from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
      from jax._src.pallas.triton import pallas_call_registration as reg  # pylint: disable=g-import-not-at-top

      h100 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
      patches = [
          mock.patch.object(reg.gpu_info_lib, "get_gpu_info", lambda: h100),
          mock.patch.object(jax, "default_backend", lambda: "gpu"),
      ]
    except (ImportError, AttributeError) as e:
      self.skipTest(f"jax internals moved ({e!r}); the GPU tests cover this")
    shape = _Shape(batch=1, seqlen=200, nheads=12, headdim=40, dstate=32)
    inputs = _inputs(shape, jnp.bfloat16)
    doc_ids = jnp.zeros((1, shape.seqlen), jnp.int32)
    names = tuple(inputs)

    def loss(*args):
      y, h = ops.ssd(
          **dict(zip(names, args)),
          doc_ids=doc_ids,
          chunk_size=64,
          backend="triton",
          block_sizes=ops.BlockSizes(heads_per_block=2),
      )
      return y.astype(jnp.float32).sum() + h.sum()

    grad = jax.jit(
        jax.value_and_grad(loss, argnums=tuple(range(len(names))))
    )
    with patches[0], patches[1]:
      text = (
          grad.trace(*inputs.values())
          .lower(lowering_platforms=("cuda",))
          .as_text()
      )
    # Forward 3 kernels; backward recomputes 2 and runs 3 more.
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 8)
    for name in (
        "ssd_chunk_state_state", "ssd_state_passing", "ssd_chunk_scan_fwd",
        "ssd_chunk_state_dout", "ssd_state_passing_bwd", "ssd_chunk_scan_bwd",
    ):
      self.assertIn(f'name = "{name}"', text)

  def test_block_sizes(self):
    with self.assertRaisesRegex(ValueError, "block_p"):
      ops.BlockSizes(block_p=24)
    with self.assertRaisesRegex(ValueError, "block_p"):
      ops.BlockSizes(block_p=8)
    with self.assertRaisesRegex(ValueError, "heads_per_block"):
      ops.BlockSizes(heads_per_block=0)
    with self.assertRaises(dataclasses.FrozenInstanceError):
      ops.BlockSizes().block_p = 32  # pytype: disable=attribute-error

    @dataclasses.dataclass
    class FakeDevice:
      device_kind: str

    for kind, key in [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("TPU v5 lite", "tpu v5 lite"),
        ("TPU v5p", "tpu v5"),
    ]:
      self.assertEqual(
          ops.BlockSizes.for_device(FakeDevice(kind)), dict(ops._DEFAULTS)[key]
      )
    self.assertEqual(
        ops.BlockSizes.for_device(FakeDevice("cpu")), ops.BlockSizes()
    )


if __name__ == "__main__":
  absltest.main()
