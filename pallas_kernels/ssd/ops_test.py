"""Tests of `ops.ssd` (Pallas kernels + custom VJP) against `ssd_reference`.

`SsdTest` runs the Triton kernels compiled (GPU only), `SsdMosaicTpuTest` the
Mosaic kernels compiled (TPU only); their `*InterpretTest` twins run the same
tests in Pallas interpret mode on CPU. Shapes are tiny on purpose (interpret
mode is slow); `ops.ssd` pads P and Q to the kernels' tiles, so the same
shapes also compile on a GPU; on a TPU, whose chunks are multiples of 128,
lengths and chunk sizes are scaled by 8 (`SCALE`).
`SsdApiTest` also lowers both kernel sets for an abstract H100 / TPU v5e from
the CPU (no accelerator needed) at the Nemotron 3 Nano mixer shape.
"""

import dataclasses
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ops
from pallas_kernels.ssd import ops_tpu
from pallas_kernels.ssd import ops_triton
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


def _doc_ids(batch, seqlen, scale=1):
  """Boundaries on and off chunk edges (chunk 16), one-token docs, reused ids."""
  rows = [
      [0] * 8 + [1] * 8 + [0] * 4 + [2] + [1] * 100,
      [3] * 3 + [7] + [3] * 12 + [0] * 5 + [3] * 100,
  ]
  rows = [np.repeat(r, scale)[:seqlen] for r in rows[:batch]]  # chunk 16 scale
  return jnp.asarray(np.stack(rows), jnp.int32)


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
    return (y, h) + vjp((wy.astype(y.dtype), wh.astype(h.dtype)))

  return run(tuple(inputs[k] for k in _GRAD_ARGS))


def _float64_outputs_and_grads(inputs, **kw):
  """`_outputs_and_grads` of `ssd_reference` in float64 (numpy arrays).

  The reference computes in float32 by design; under x64 its float32 dtype
  constant is patched to float64, which makes every step float64 (checked on
  the outputs' dtypes).
  """
  with jax.enable_x64(True), mock.patch.object(reference, "_F32", jnp.float64):
    inputs = {
        k: None if v is None else jnp.asarray(np.asarray(v, np.float64))
        for k, v in inputs.items()
    }
    out = _outputs_and_grads(reference.ssd_reference, inputs, **kw)
    assert all(v is None or v.dtype == jnp.float64 for v in out), out
    return tuple(None if v is None else np.asarray(v) for v in out)


def _strong_decay_inputs(shape: _Shape, seed=0):
  """float32 inputs with A in [-8, -1], dt in [0, 1] before softplus."""
  inputs = _inputs(shape, jnp.float32, seed)
  rng = np.random.default_rng(seed + 100)
  b, t, m = shape.batch, shape.seqlen, shape.nheads
  inputs["A"] = -jnp.asarray(np.exp(rng.uniform(0.0, np.log(8.0), (m,))),
                             jnp.float32)
  inputs["dt"] = jnp.asarray(rng.uniform(0.0, 1.0, (b, t, m)), jnp.float32)
  return inputs


# Reference results by test method name: the backends' suites share them.
_REFERENCE_CACHE = {}


class SsdTest(parameterized.TestCase):
  BACKEND, PLATFORM = "triton", "gpu"
  INTERPRET = False
  DEFAULT_KW = {}  # ssd kwargs of test_outputs_and_grads_match_reference
  SCALE = 1  # of sequence lengths, chunk sizes and document lengths

  def setUp(self):
    super().setUp()
    if jax.default_backend() != self.PLATFORM and not self.INTERPRET:
      self.skipTest(
          f"compiled backend={self.BACKEND!r} needs a {self.PLATFORM}; its "
          "*InterpretTest twin runs the same tests on CPU"
      )

  def _ssd(self, **kw):
    return functools.partial(
        ops.ssd, backend=self.BACKEND, interpret=self.INTERPRET, **kw
    )

  def _want(self, inputs, **kw):
    """`ssd_reference` outputs and grads, once per test across backends."""
    key = (self._testMethodName, self.SCALE)
    if key not in _REFERENCE_CACHE:
      _REFERENCE_CACHE[key] = _outputs_and_grads(
          reference.ssd_reference, inputs, **kw
      )
    return _REFERENCE_CACHE[key]

  def _block_sizes(self, heads_per_block, block_p=64, pad_multiple=128):
    if self.BACKEND == "mosaic_tpu":
      return ops.TpuBlockSizes(
          heads_per_block=heads_per_block, pad_multiple=pad_multiple
      )
    return ops.BlockSizes(block_p=block_p, heads_per_block=heads_per_block)

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
    seqlen *= self.SCALE
    shape = _Shape(seqlen=seqlen)
    inputs = _inputs(shape, dtype)
    if not use_state:
      inputs["initial_state"] = jnp.zeros_like(inputs["initial_state"])
    kw = dict(
        chunk_size=16 * self.SCALE,
        doc_ids=_doc_ids(shape.batch, seqlen, self.SCALE) if use_docs else None,
    )
    got = _outputs_and_grads(self._ssd(**self.DEFAULT_KW), inputs, **kw)
    want = self._want(inputs, **kw)
    self.assertEqual(got[0].dtype, dtype)
    self.assertEqual(got[1].dtype, jnp.float32)
    self._assert_matches(got, want, dtype)

  def test_tiles_heads_per_block_and_padding(self):
    """2 heads per program, Q = 12 padded to 16, chunk 32.

    Triton: P split in 16-wide tiles. TPU: 2 head blocks per group, P and Q
    padded to multiples of 8 only (blocks span the full P and Q).
    """
    seqlen = 40 * self.SCALE
    shape = _Shape(seqlen=seqlen, nheads=8, headdim=32, dstate=12)
    inputs = _inputs(shape, jnp.float32, seed=1)
    kw = dict(
        chunk_size=32 * self.SCALE,
        doc_ids=_doc_ids(shape.batch, seqlen, self.SCALE),
    )
    block_sizes = self._block_sizes(2, block_p=16, pad_multiple=8)
    got = _outputs_and_grads(self._ssd(block_sizes=block_sizes), inputs, **kw)
    want = self._want(inputs, **kw)
    self._assert_matches(got, want, jnp.float32)

  def test_optional_args_one_group_strong_decay(self):
    """No D / dt_bias, no softplus, dt clipping, J = 1, exp underflow."""
    shape = _Shape(batch=1, seqlen=37 * self.SCALE, ngroups=1, headdim=12)
    inputs = _inputs(shape, jnp.float32, seed=2)
    inputs.update(D=None, dt_bias=None, dt=jnp.abs(inputs["dt"]) * 3.0)
    inputs["A"] = inputs["A"] * 20.0  # exp(dt A) underflows inside a chunk
    kw = dict(
        chunk_size=16 * self.SCALE,
        doc_ids=_doc_ids(1, shape.seqlen, self.SCALE),
        dt_softplus=False,
        dt_min=0.05,
        dt_max=2.5,
    )
    block_sizes = self._block_sizes(4)  # all heads, one program
    got = _outputs_and_grads(self._ssd(block_sizes=block_sizes), inputs, **kw)
    want = self._want(inputs, **kw)
    self._assert_matches(got, want, jnp.float32)

  @parameterized.named_parameters(("plain", False), ("docs", True))
  def test_decay_grads_at_chunk_128_match_float64(self, use_docs):
    """dA, ddt, ddt_bias (and the rest) at chunk 128 under strong decay.

    Against a float64 reference. The gradient of the chunk-local cumsum,
    reverse-cumsummed into that of a = dt A, cancels catastrophically here
    (the Triton backward did that: 1.4e-4 / 1.9e-4 of max|dA| off); the
    kernels now sum da directly. The float32 reference meets the tolerance by
    > 100x, the kernels by ~3x: their floor is W = exp(cum_l - cum_s) from a
    float32 cum of magnitude up to ~1e3. No SCALE: 128 is a compiled TPU
    chunk size too.
    """
    shape = _Shape(batch=1, seqlen=256, nheads=2, headdim=16, dstate=16,
                   ngroups=1)
    inputs = _strong_decay_inputs(shape)
    kw = dict(
        chunk_size=128,
        doc_ids=_doc_ids(1, shape.seqlen, 8) if use_docs else None,
    )
    got = _outputs_and_grads(self._ssd(**self.DEFAULT_KW), inputs, **kw)
    want = _float64_outputs_and_grads(inputs, **kw)
    for name, g, w in zip(_OUT_NAMES, got, want, strict=True):
      g = np.asarray(g, np.float64)
      np.testing.assert_allclose(
          g, w, atol=5e-5 * np.abs(w).max(), rtol=5e-5, err_msg=name
      )


class SsdInterpretTest(SsdTest):
  INTERPRET = True


class SsdMosaicTpuTest(SsdTest):
  BACKEND, PLATFORM = "mosaic_tpu", "tpu"
  SCALE = 8  # compiled TPU chunks are multiples of 128 (lanes)
  # No lane padding of P = 8, Q = 16 (2x faster in interpret mode); the
  # default 128 is covered by test_optional_args_one_group_strong_decay.
  DEFAULT_KW = dict(block_sizes=ops.TpuBlockSizes(pad_multiple=8))


class SsdMosaicTpuInterpretTest(SsdMosaicTpuTest):
  INTERPRET = True
  SCALE = 1

  def test_tpu_simulator(self):
    """The TPU interpreter: NaN-filled uninitialized VMEM, bounds checks.

    A read of the state scratch before its first write, or of an output
    block that the pipeline does not fetch, would show up as NaN here.
    """
    shape = _Shape(batch=1, seqlen=40)
    inputs = _inputs(shape, jnp.bfloat16, seed=3)
    kw = dict(chunk_size=16, doc_ids=_doc_ids(1, shape.seqlen))
    ssd = functools.partial(  # "auto" picks mosaic_tpu for InterpretParams
        ops.ssd,
        interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
        **self.DEFAULT_KW,
    )
    got = _outputs_and_grads(ssd, inputs, **kw)
    want = self._want(inputs, **kw)
    self._assert_matches(got, want, jnp.bfloat16)


def _abstract_mesh(device_kind, platform, num_cores):
  """A 1-device AbstractMesh whose device is `device_kind` (jax private API)."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  device = mesh_lib.AbstractDevice(
      device_kind=device_kind, num_cores=num_cores, platform=platform
  )
  return mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)


_H100 = ("NVIDIA H100 80GB HBM3", "gpu", 132)
_TPU_V5E = ("TPU v5 lite", "tpu", 1)


def _nano_args(with_docs=True):
  """Nemotron 3 Nano mixer at T = 4096 as abstract (unallocated) inputs."""
  b, t, m, p, j, q = 1, 4096, 64, 64, 8, 128
  sds = jax.ShapeDtypeStruct
  args = dict(
      x=sds((b, t, m, p), jnp.bfloat16),
      dt=sds((b, t, m), jnp.float32),
      A=sds((m,), jnp.float32),
      B=sds((b, t, j, q), jnp.bfloat16),
      C=sds((b, t, j, q), jnp.bfloat16),
      D=sds((m,), jnp.float32),
      dt_bias=sds((m,), jnp.float32),
      initial_state=sds((b, m, p, q), jnp.float32),
  )
  if with_docs:
    args["doc_ids"] = sds((b, t), jnp.int32)
  return args


def _lower_value_and_grad(args, platform, compile=False, **kw):  # pylint: disable=redefined-builtin
  """StableHLO text of jit(value_and_grad) of a loss of both ssd outputs.

  With `compile`, also compiles it (needs a compiler for `platform`).
  """
  names = tuple(args)

  def loss(*a):
    a = dict(zip(names, a))
    doc_ids = a.pop("doc_ids", None)
    y, h = ops.ssd(**a, doc_ids=doc_ids, **kw)
    return y.astype(jnp.float32).sum() + h.sum()

  argnums = tuple(i for i, n in enumerate(names) if n != "doc_ids")
  grad = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  lowered = grad.trace(*args.values()).lower(lowering_platforms=(platform,))
  if compile:
    lowered.compile()
  return lowered.as_text()


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
      ("tpu_chunk", dict(backend="mosaic_tpu", chunk_size=12), "multiple of"),
      ("bad_shape", dict(dt=jnp.zeros((1, 8, 3))), "dt must be"),
      ("bad_chunk", dict(chunk_size=0), "chunk_size"),
      ("int_x", dict(backend="triton", chunk_size=16, x=jnp.zeros((1, 8, 4, 8), jnp.int32)), "x must be floating"),
      # Mosaic GPU interpreter options with the other kernels: an AssertionError deep in Pallas before.
      ("gpu_interpreter_triton", dict(backend="triton", chunk_size=16, interpret=plmgpu.InterpretGPUParams()),
       "takes backend='mosaic_gpu'"),
      ("gpu_interpreter_auto", dict(chunk_size=16, interpret=plmgpu.InterpretGPUParams()),
       "takes backend='mosaic_gpu'"),
      ("gpu_interpreter_tpu", dict(backend="mosaic_tpu", chunk_size=16, interpret=plmgpu.InterpretGPUParams()),
       "takes backend='mosaic_gpu'"),
  )
  def test_bad_arguments(self, overrides, match):
    kw = dict(_inputs(_Shape(batch=1, seqlen=8), jnp.float32), interpret=True)
    kw.update(overrides)
    with self.assertRaisesRegex(ValueError, match):
      ops.ssd(**kw)

  @parameterized.parameters(("triton", "gpu"), ("mosaic_tpu", "tpu"))
  def test_compiled_backend_needs_its_platform(self, backend, platform):
    if jax.default_backend() == platform:
      self.skipTest(f"only meaningful without a {platform}")
    inputs = _inputs(_Shape(batch=1, seqlen=8), jnp.float32)
    with self.assertRaisesRegex(ValueError, "interpret=True"):
      ops.ssd(**inputs, chunk_size=128, backend=backend)

  def test_block_sizes_must_match_the_backend(self):
    inputs = _inputs(_Shape(batch=1, seqlen=8), jnp.float32)
    with self.assertRaisesRegex(TypeError, "TpuBlockSizes"):
      ops.ssd(**inputs, chunk_size=16, backend="mosaic_tpu", interpret=True,
              block_sizes=ops.BlockSizes())
    with self.assertRaisesRegex(TypeError, "BlockSizes"):
      ops.ssd(**inputs, chunk_size=16, backend="triton", interpret=True,
              block_sizes=ops.TpuBlockSizes())

  @parameterized.named_parameters(
      # Non-power-of-2 M and P (padded), doc ids, 2 heads per program.
      ("odd_shape", dict(batch=1, seqlen=200, nheads=12, headdim=40,
                         dstate=32), 64, 2),
      ("nemotron_nano", None, 128, 1),
  )
  def test_lowers_to_triton_for_an_abstract_gpu(self, shape, chunk, heads):
    """Pallas -> Triton IR lowering (not ptxas) of all 6 kernels, on CPU.

    Under an abstract H100 mesh the public `ops.ssd(backend="triton")`
    accepts the GPU target and the Triton lowering rule runs; catches ops or
    block shapes the Triton lowering rejects before a GPU sees them.
    """
    try:
      mesh = _abstract_mesh(*_H100)
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    if shape is None:
      args = _nano_args()
    else:
      args = jax.tree.map(
          lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
          _inputs(_Shape(**shape), jnp.bfloat16),
      )
      args["doc_ids"] = jax.ShapeDtypeStruct((1, shape["seqlen"]), jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh):
      text = _lower_value_and_grad(
          args, "cuda", chunk_size=chunk, backend="triton",
          block_sizes=ops.BlockSizes(heads_per_block=heads),
      )
    # Forward 3 kernels; backward recomputes 2 and runs 3 more.
    self.assertEqual(text.count("__gpu$xla.gpu.triton"), 8)
    for name in (
        "ssd_chunk_state_state", "ssd_state_passing", "ssd_chunk_scan_fwd",
        "ssd_chunk_state_dout", "ssd_state_passing_bwd", "ssd_chunk_scan_bwd",
    ):
      self.assertIn(f'name = "{name}"', text)

  @parameterized.named_parameters(
      ("auto_docs", "auto", True),
      ("mosaic_tpu_no_docs", "mosaic_tpu", False),
  )
  def test_lowers_to_mosaic_for_an_abstract_tpu(self, backend, with_docs):
    """Pallas -> Mosaic lowering of the 3 TPU kernels for a TPU v5e, on CPU.

    Runs the Pallas TPU lowering (block-shape rules, Mosaic ops of the
    kernel bodies) at the Nemotron 3 Nano mixer shape; the Mosaic compiler
    itself (layouts, VMEM use) only runs on a TPU.
    """
    try:
      mesh = _abstract_mesh(*_TPU_V5E)
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    with jax.sharding.use_abstract_mesh(mesh):
      self.assertEqual(ops._target.platform(), "tpu")
      text = _lower_value_and_grad(
          _nano_args(with_docs), "tpu", chunk_size=128, backend=backend
      )
    # Forward 1 kernel; backward recomputes the states and runs 1 more.
    self.assertEqual(text.count("@tpu_custom_call("), 3)
    for name in ("ssd_tpu_fwd", "ssd_tpu_states", "ssd_tpu_bwd"):
      self.assertIn(name, text)
    self.assertNotIn("triton", text)

  @absltest.skipIf(
      importlib.util.find_spec("libtpu") is None,
      "needs libtpu at jax's version (`pip install 'n3jax[aot-tpu]'`, no TPU needed) for the Mosaic "
      "compiler; test_lowers_to_mosaic_for_an_abstract_tpu covers lowering",
  )
  def test_compiles_for_tpu_with_libtpu(self):
    """Deviceless AOT compile for TPU v5e / v6e: libtpu's Mosaic compiler.

    Beyond lowering, this runs Mosaic's layout passes and VMEM allocation on
    the three kernels (forward and backward, Nano shape, doc ids; P = 64
    padded to 128 on v5e, unpadded on v6e). It runs in a subprocess because
    libtpu's plugin state is process-wide.
    """
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.experimental import topologies
        from jax.sharding import NamedSharding, PartitionSpec
        from pallas_kernels.ssd import ops, ops_test
        for name, pad in (("v5e:1x1", 128), ("v6e:1x1", 8)):
          topo = topologies.get_topology_desc(name, "tpu")
          mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
          rep = NamedSharding(mesh, PartitionSpec())
          args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep)
                  for k, v in ops_test._nano_args().items()}
          with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            ops_test._lower_value_and_grad(
                args, "tpu", chunk_size=128, backend="mosaic_tpu",
                block_sizes=ops.TpuBlockSizes(pad_multiple=pad), compile=True)
    """)
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        TPU_SKIP_MDS_QUERY="1",  # no GCE metadata server to ask
        TPU_WORKER_HOSTNAMES="localhost",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",  # this process may hold libtpu's lock
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
        text=True, timeout=600, check=False,
    )
    self.assertEqual(done.returncode, 0, done.stderr[-4000:])

  def test_backend_follows_the_abstract_target(self):
    resolve = ops._resolve_backend  # pylint: disable=protected-access
    try:
      tpu, gpu = _abstract_mesh(*_TPU_V5E), _abstract_mesh(*_H100)
    except (ImportError, AttributeError, TypeError) as e:
      self.skipTest(f"jax private AbstractDevice API changed: {e!r}")
    with jax.sharding.use_abstract_mesh(tpu):
      self.assertEqual(resolve("auto", False, 128), "mosaic_tpu")
      self.assertEqual(resolve("auto", False, 64), "reference")
      self.assertEqual(resolve("mosaic_tpu", False, 256), "mosaic_tpu")
      with self.assertRaisesRegex(ValueError, "multiple of 128"):
        resolve("mosaic_tpu", False, 64)
      with self.assertRaisesRegex(ValueError, "target platform is 'tpu'"):
        resolve("triton", False, 128)
      with self.assertRaisesRegex(ValueError, "target platform is 'tpu'"):
        resolve("mosaic_gpu", False, 128, jnp.bfloat16)
      self.assertEqual(
          ops.TpuBlockSizes.for_device(), dict(ops_tpu._DEFAULTS)["tpu v5 lite"]
      )
    with jax.sharding.use_abstract_mesh(gpu):
      self.assertEqual(resolve("auto", False, 128), "triton")
      self.assertEqual(resolve("triton", False, 64), "triton")
      self.assertEqual(resolve("mosaic_gpu", False, 256, jnp.bfloat16), "mosaic_gpu")
      with self.assertRaisesRegex(ValueError, "TF32"):
        resolve("mosaic_gpu", False, 128, jnp.float32)
      with self.assertRaisesRegex(ValueError, "target platform is 'gpu'"):
        resolve("mosaic_tpu", False, 128)
      self.assertEqual(
          ops.BlockSizes.for_device(), dict(ops_triton._DEFAULTS)["h100"]
      )
    if jax.default_backend() == "cpu":
      self.assertEqual(resolve("auto", False, 128), "reference")
      self.assertEqual(resolve("auto", True, 128), "triton")
      self.assertEqual(resolve("mosaic_tpu", True, 16), "mosaic_tpu")
      params = pltpu.InterpretParams()
      self.assertEqual(resolve("auto", params, 16), "mosaic_tpu")
      with self.assertRaisesRegex(ValueError, "not TPU interpret"):
        resolve("triton", params, 16)

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
    ]:
      self.assertEqual(
          ops.BlockSizes.for_device(FakeDevice(kind)),
          dict(ops_triton._DEFAULTS)[key],
      )
    self.assertEqual(
        ops.BlockSizes.for_device(FakeDevice("cpu")), ops.BlockSizes()
    )

    with self.assertRaisesRegex(ValueError, "heads_per_block"):
      ops.TpuBlockSizes(heads_per_block=0)
    with self.assertRaisesRegex(ValueError, "pad_multiple"):
      ops.TpuBlockSizes(pad_multiple=12)
    tpu_defaults = dict(ops_tpu._DEFAULTS)
    for kind, key in [
        ("TPU v5 lite", "tpu v5 lite"),
        ("TPU v5p", "tpu v5"),
        ("TPU v6 lite", "tpu v6"),
        ("TPU v4", "tpu v4"),
    ]:
      self.assertEqual(
          ops.TpuBlockSizes.for_device(FakeDevice(kind)), tpu_defaults[key]
      )
    self.assertEqual(
        ops.TpuBlockSizes.for_device(FakeDevice("cpu")), ops.TpuBlockSizes()
    )


if __name__ == "__main__":
  absltest.main()
