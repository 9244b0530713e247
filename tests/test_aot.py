"""Compiling for an H100 or a TPU slice on a host without one (`n3jax.aot`).

The compile tests need the CUDA PJRT plugin (`pip install 'n3jax[aot-gpu]'`) or libtpu (`pip install
'n3jax[aot-tpu]'`) and skip without them; CI has neither and runs only the error checks. They compile
(XLA's whole pipeline for the chip, the Pallas kernels included: Triton and Mosaic GPU through ptxas,
Mosaic TPU through its compiler) but run nothing: speed and numerics on the chip are `benchmarks/`' business.
"""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from n3jax import aot
from pallas_kernels.moe import gmm as gmm_lib



def _has_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


_HAS_PLUGIN = _has_plugin()
needs_plugin = pytest.mark.skipif(not _HAS_PLUGIN, reason="needs the CUDA PJRT plugin: pip install 'n3jax[aot-gpu]'")
_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not _HAS_LIBTPU, reason="needs libtpu: pip install 'n3jax[aot-tpu]'")


def test_unknown_target_is_a_clear_error():
  with pytest.raises(ValueError, match=r"Unknown AOT target 'a100'.*h100"):
    aot.devices("a100", 1)
  with pytest.raises(ValueError, match="split evenly"):
    aot.devices("h100", 6, hosts=4)


@pytest.mark.skipif(_HAS_PLUGIN, reason="checks the error without the plugin")
def test_without_the_plugin_the_error_says_what_to_install():
  with pytest.raises(RuntimeError, match=r"n3jax\[aot-gpu\]"):
    aot.devices("h100", 1)


def _h100_mesh(n=1):
  return jax.sharding.Mesh(aot.devices("h100", n), ("x",))


def _abstract(mesh, *shapes_dtypes):
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes_dtypes]


def _compile(fn, args, mesh, **options):
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile({**aot.compiler_options("h100"), **options})


@needs_plugin
def test_devices_are_h100s_over_hosts():
  devs = aot.devices("h100", 8, hosts=2)
  assert [d.device_kind for d in devs] == ["NVIDIA H100 80GB HBM3"] * 8
  assert sorted({d.process_index for d in devs}) == [0, 1]


@needs_plugin
def test_ssd_triton_kernels_compile_for_h100():
  """The Triton SSD forward and backward at the Nemotron 3 Nano mixer shape (T = 4096, 64 heads)."""
  from pallas_kernels.ssd import ops  # pylint: disable=g-import-not-at-top

  mesh = _h100_mesh()
  b, t, m, p, j, q = 1, 4096, 64, 64, 8, 128
  args = _abstract(mesh, ((b, t, m, p), jnp.bfloat16), ((b, t, m), jnp.float32), ((m,), jnp.float32),
                   ((b, t, j, q), jnp.bfloat16), ((b, t, j, q), jnp.bfloat16), ((m,), jnp.float32),
                   ((m,), jnp.float32), ((b, m, p, q), jnp.float32), ((b, t), jnp.int32))

  def loss(x, dt, a, bb, c, d, dt_bias, h0, doc_ids):
    y, h = ops.ssd(x, dt, a, bb, c, d, dt_bias, initial_state=h0, doc_ids=doc_ids,
                   backend="auto")
    return y.astype(jnp.float32).sum() + h.sum()

  compiled = _compile(jax.value_and_grad(loss, argnums=tuple(range(8))), args, mesh)
  hlo = compiled.as_text()
  assert "__gpu$xla.gpu.triton" in hlo
  assert aot.memory(compiled).peak_gb < 5


@needs_plugin
def test_moe_layer_picks_and_compiles_the_triton_gmm_for_h100():
  """moe_dispatch(backend="auto") on an H100 is the Pallas gmm: fwd + both backward products compile as
  Triton kernels, and the temporaries stay near the activations (ragged_dot expands densely on GPUs)."""
  from pallas_kernels.moe import ops  # pylint: disable=g-import-not-at-top

  mesh = _h100_mesh()
  tokens, experts, top, d, f = 4096, 128, 6, 2688, 1856
  args = _abstract(mesh, ((tokens, d), jnp.bfloat16), ((tokens, top), jnp.float32), ((tokens, top), jnp.int32),
                   ((experts, d, f), jnp.bfloat16), ((experts, f, d), jnp.bfloat16))

  def loss(x, w, ids, up, down):
    out, _ = ops.moe_dispatch(x, w, ids, up, down)
    return out.astype(jnp.float32).sum()

  compiled = _compile(jax.grad(loss, argnums=(0, 3, 4)), args, mesh)
  assert compiled.as_text().count("__gpu$xla.gpu.triton") >= 3
  assert aot.memory(compiled).temp_gb < 10


@needs_plugin
def test_fp8_recipe_gemms_become_cublaslt_fp8():
  """The FP8 recipe's forward, data-gradient and weight-gradient GEMMs are the pattern XLA's GPU compiler
  rewrites to cuBLASLt FP8 GEMMs (`__cublas$lt$matmul$f8`), shown with Triton GEMMs off (without a
  device XLA cannot autotune between the two)."""
  from n3jax.quant import _dot, _recipes  # pylint: disable=g-import-not-at-top

  mesh = _h100_mesh()
  with jax.set_mesh(mesh):  # fp8_backend="auto" feeds FP8 operands to the dot when compiling for a GPU
    recipe = _recipes.gemm_recipe(_recipes.QuantConfig(mode="fp8"))
  assert recipe.native_fp8
  args = _abstract(mesh, ((2, 1024, 2688), jnp.bfloat16), ((2688, 1856), jnp.bfloat16), ((2, 1024, 1856), jnp.float32))

  def loss(x, w, g):
    return (_dot.quantized_einsum("btd,df->btf", x, w, recipe=recipe).astype(jnp.float32) * g).sum()

  compiled = _compile(jax.value_and_grad(loss, argnums=(0, 1)), args, mesh, xla_gpu_enable_triton_gemm=False)
  targets = re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())
  assert targets.count("__cublas$lt$matmul$f8") == 3, targets


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("param_dtype,remat,scan", [("float32", "none", False), ("bfloat16", "none", False),
                                                    ("float32", "full", True)])
def test_plan_matches_xla_for_the_reduced_nano_train_step_on_h100(param_dtype, remat, scan):
  """The memory plan against XLA's buffer assignment for the H100 executable of the training step of the
  reduced Nemotron 3 Nano of shared/bench/ANCHORS.md (MEMEM*E at full width, batch 2 x 4096): within 15%."""
  from n3jax import memory_plan, trainer  # pylint: disable=g-import-not-at-top

  c = trainer.default_config()
  c.model_preset = "nemotron-3-nano-30b-a3b"
  c.model_overrides.update(blocks="MEMEM*E", dtype="bfloat16", param_dtype=param_dtype, remat_policy=remat,
                           scan_layers=scan)
  c.batch_size, c.data.seq_len = 2, 4096
  compiled = trainer.compile_train_step(c, aot.devices("h100", 1), aot.compiler_options("h100"))
  xla = aot.memory(compiled).peak_gb
  plan = memory_plan.estimate(trainer.build_model_config(c), preset="nano-MEMEM*E", layout="data_parallel",
                              mesh={}, batch=2, seq=4096, remat=remat).total_gb
  print(f"{param_dtype} remat={remat} scan={scan}: XLA {xla:.2f} GB, plan {plan:.2f} GB")
  assert abs(plan - xla) < 0.15 * xla


_SSD_SHAPES = {  # benchmarks/ssd.py: (batch, seq, heads, head_dim, state, groups)
    "anchor2_64k": (1, 65536, 64, 64, 128, 8), "anchor3": (8, 4096, 128, 64, 128, 8),
    "super_b1": (1, 8192, 128, 64, 128, 8),
}


@needs_plugin
@pytest.mark.parametrize("name", sorted(_SSD_SHAPES))
def test_ssd_compiles_for_h100_at_benchmark_shapes(name):
  from pallas_kernels.ssd import ops  # pylint: disable=g-import-not-at-top

  b, t, m, p, q, j = _SSD_SHAPES[name]
  mesh = _h100_mesh()
  args = _abstract(mesh, ((b, t, m, p), jnp.bfloat16), ((b, t, m), jnp.float32), ((m,), jnp.float32),
                   ((b, t, j, q), jnp.bfloat16), ((b, t, j, q), jnp.bfloat16), ((m,), jnp.float32), ((m,), jnp.float32))

  def loss(*a):
    y, h = ops.ssd(*a)
    return y.astype(jnp.float32).sum() + h.sum()

  assert "__gpu$xla.gpu.triton" in _compile(jax.value_and_grad(loss, argnums=tuple(range(7))), args, mesh).as_text()


@needs_plugin
def test_flash_attention_compiles_for_h100():
  """The Triton flash-attention forward, dk/dv and dq at the Nemotron 3 Nano / Super attention shape (32
  query heads, 2 kv heads, head dim 128; batch 2 x 4096) compile with their H100 tiling and hold no [T, T]
  scores; a tiling whose pipeline needs more than the 227 KB of shared memory is refused, which shows
  that the Triton kernels themselves were compiled."""
  from pallas_kernels.attention import ops  # pylint: disable=g-import-not-at-top

  mesh = _h100_mesh()
  b, t, n, kvh, h = 2, 4096, 32, 2, 128
  args = _abstract(mesh, ((b, t, n, h), jnp.bfloat16), ((b, t, kvh, h), jnp.bfloat16),
                   ((b, t, kvh, h), jnp.bfloat16), ((b, t), jnp.int32))

  def grad_of(blocks):
    loss = lambda q, k, v, seg: ops.attention(q, k, v, seg, block_sizes=blocks).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))

  compiled = _compile(grad_of(None), args, mesh)
  assert compiled.as_text().count("__gpu$xla.gpu.triton") == 3
  assert aot.memory(compiled).temp_gb < 0.2   # one f32 [B, N, T, T] score tensor would be 4.3 GB
  with pytest.raises(Exception, match="[Ss]hared memory"):
    _compile(grad_of(ops.BlockSizes(block_q=512, block_k=512, num_stages=4)), args, mesh)


def test_programs_per_sm_by_the_h100_limits():
  kernel = lambda regs, smem_kb, threads=128: aot.KernelStats("k", 1, regs, 0, 0, smem_kb * 1024, threads)
  assert kernel(64, 100).programs_per_sm == 2      # 228 KB of shared memory (+ 1 KB reserved each) per SM
  assert kernel(64, 10).programs_per_sm == 8       # 64K registers: 4 warps x 32 threads x 64 per program
  assert kernel(32, 10).programs_per_sm == 16      # 64 warps
  assert kernel(255, 10).programs_per_sm == 2      # 255 -> 256 registers per thread
  assert kernel(154, 176, threads=384).programs_per_sm == 1
  assert kernel(32, 0, threads=32).programs_per_sm == 32   # at most 32 programs


@needs_plugin
def test_mosaic_gpu_kernels_compile_with_ptxas_figures():
  """The Mosaic GPU grouped matmul's three kernels (forward, d_lhs, d_rhs) are compiled by ptxas for
  sm_90a while XLA compiles for a compile-only H100, and `mosaic_gpu_kernels` reads their figures by
  kernel name; a program compiled before (JAX's caches: no kernel compiled) is a clear error."""
  from pallas_kernels.moe import gmm_mgpu  # pylint: disable=g-import-not-at-top

  mesh = _h100_mesh()
  args = _abstract(mesh, ((512, 256), jnp.bfloat16), ((4, 256, 128), jnp.bfloat16), ((4,), jnp.int32))
  loss = lambda lhs, rhs, sizes: gmm_mgpu.gmm(lhs, rhs, sizes).astype(jnp.float32).sum()
  fn = jax.value_and_grad(loss, argnums=(0, 1))
  stats = {k.name: k for k in aot.mosaic_gpu_kernels(lambda: _compile(fn, args, mesh))}
  assert sorted(stats) == ["gmm", "gmm_dlhs", "tgmm"]
  for k in stats.values():
    assert k.compilations == 1 and 0 < k.registers <= 255, k
    assert k.spill_store_bytes >= 0 and k.spill_load_bytes >= 0, k
    assert 0 < k.smem_bytes <= 227 * 1024, k
    assert k.programs_per_sm >= 1 and k.name in k.report()
  # Hopper defaults: forward and d_lhs warp-specialized (a TMA warpgroup and two wgmma ones), d_rhs one.
  assert [stats[n].threads for n in ("gmm", "gmm_dlhs", "tgmm")] == [384, 384, 128]
  with pytest.raises(RuntimeError, match="No Mosaic GPU kernel was compiled"):
    aot.mosaic_gpu_kernels(lambda: _compile(fn, args, mesh))


@needs_plugin
@pytest.mark.parametrize("tiles", [None, *gmm_lib.HOPPER_CANDIDATE_TILES])
def test_gmm_tiles_fit_h100_shared_memory(tiles):
  """The H100 default tiles and every sweep candidate compile (forward, gmm_t, tgmm) at the Nano expert
  shape; XLA rejects a tile whose pipeline stages need more than the 227 KB of shared memory per block."""
  blocks = None
  if tiles is not None:
    bm, bn, bk, warps, stages = tiles
    t = gmm_lib.TileSizes(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
    blocks = gmm_lib.BlockSizes(gmm=t, gmm_t=t, tgmm=t)
  mesh = _h100_mesh()
  args = _abstract(mesh, ((6 * 4096, 2688), jnp.bfloat16), ((128, 2688, 1856), jnp.bfloat16), ((128,), jnp.int32))

  def loss(lhs, rhs, sizes):
    return gmm_lib.gmm(lhs, rhs, sizes, block_sizes=blocks).astype(jnp.float32).sum()

  hlo = _compile(jax.value_and_grad(loss, argnums=(0, 1)), args, mesh).as_text()
  assert hlo.count("__gpu$xla.gpu.triton") == 3


def _release_config(name: str):
  """`configs/<name>.py`'s `get_config()` (the configs folder is not a package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("name,devices", [("nemotron_3_nano_30b", 64), ("nemotron_h_8b", 64), ("gpu_1b_moe", 1),
                                          ("nemotron_3_super_120b", 64)])
def test_shipped_training_configs_fit_h100s(name, devices):
  """The release configs' training step compiled for H100s (8 per host) fits in 80 GB per GPU by XLA's
  count, and `gpu_1b_moe` in the 75% of one H100 that XLA takes by default. (Super: 68.2 GB, see
  configs/nemotron_3_super_120b.py.)"""
  from n3jax import trainer  # pylint: disable=g-import-not-at-top

  compiled = trainer.compile_train_step(_release_config(name), aot.devices("h100", devices, hosts=max(1, devices // 8)),
                                        aot.compiler_options("h100"))
  peak = aot.memory(compiled).peak_gb
  print(f"{name} on {devices} x H100: {aot.memory(compiled).report()}")
  assert peak < (0.75 * 85.0 if devices == 1 else 80.0)


@needs_plugin
def test_train_step_with_the_mosaic_gpu_kernels_compiles_for_h100():
  """The trainer's step with the Mosaic GPU SSD and grouped-matmul kernels (`ssd_backend="pallas_mgpu"`,
  `moe_backend="pallas_mgpu"`) compiles for a compile-only H100: the model is traced for the target (its
  init too), and ptxas compiles every kernel of the forward and the backward."""
  from n3jax import trainer  # pylint: disable=g-import-not-at-top

  c = trainer.default_config()
  c.model_preset = "tiny-moe"
  c.model_overrides.update(dtype="bfloat16", chunk_size=64, ssd_backend="pallas_mgpu", moe_backend="pallas_mgpu")
  c.batch_size, c.data.seq_len = 2, 256
  kernels = aot.mosaic_gpu_kernels(
      lambda: trainer.compile_train_step(c, aot.devices("h100", 1), aot.compiler_options("h100")))
  assert {k.name for k in kernels} == {
      "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan_fwd", "ssd_chunk_state_dout",
      "ssd_state_passing_bwd", "ssd_scan_bwd_dbc", "ssd_scan_bwd_dx", "gmm", "gmm_dlhs", "tgmm"}


def _nano4b_slice(ssd_backend: str = "reference", vocab: int = 4096):
  """Nemotron-3-Nano-4B at full width, 8 layers (4 Mamba, 2 attention), bf16, unrolled: the decoding tests' model."""
  from n3jax.configs import PRESETS, parse_pattern  # pylint: disable=g-import-not-at-top
  return PRESETS["nemotron-3-nano-4b"].replace(blocks=parse_pattern("M*M-M*M-"), vocab_size=vocab, dtype="bfloat16",
                                               param_dtype="bfloat16", scan_layers=False, ssd_backend=ssd_backend)


def _compile_decode_step(target: str, per_layer: bool, batch: int = 8, fuse: bool = False, vocab: int = 4096,
                         cfg=None, row_major: tuple[str, ...] = ()):
  """`inference.decode_sample` of `cfg` (default `_nano4b_slice(vocab=vocab)`), 4096 slots, per-layer weights
  (`fuse`: with the Mamba input projections fused, as generation decodes) -> (compiled, cache bytes, one Mamba
  layer's state bytes). `row_major`: names of params given row-major, as generation places them
  (`inference._engine._rows_contiguous`; else in the device's default layout)."""
  from n3jax import models  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine, _sampling  # pylint: disable=g-import-not-at-top

  cfg = cfg or _nano4b_slice(vocab=vocab)
  max_len = 4096
  mesh = jax.sharding.Mesh(aot.devices(target, 1), ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = lambda f: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), jax.eval_shape(f))
  params = abstract(lambda: (functools.partial(models.fuse_in_proj, cfg) if fuse else (lambda p: p))(
      models.unstack_layers(models.init(cfg, jax.random.key(0)))))
  if row_major:
    from jax.experimental.layout import Format, Layout  # pylint: disable=g-import-not-at-top
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=Format(Layout(tuple(range(a.ndim))), rep))
        if path[-1].key in row_major else a, params)
  cache = abstract(lambda: (models.unstack_cache if per_layer else (lambda c: c))(models.init_cache(cfg, batch, max_len)))
  state = abstract(lambda: {"key": jax.random.key(0), "seen": jnp.zeros((batch, cfg.vocab_size), bool)})
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)
  compiled = _engine.decode_sample.trace(cfg, params, cache, tokens, state, tokens,
                                         sampling=_sampling.SamplingParams()).lower().compile(aot.compiler_options(target))
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  ssm = cache["mamba"][0]["ssm"] if per_layer else cache["mamba"]["ssm"]
  return compiled, nbytes(cache), nbytes(ssm) // (1 if per_layer else ssm.shape[0])


@needs_plugin
def test_decode_step_updates_per_layer_caches_in_place_on_h100():
  """The decoding step with one cache buffer per layer (`models.unstack_cache`, what `inference.prefill`
  makes) writes every state and KV slot where it lies: its temporaries are smaller than one Mamba layer's
  state. With the stacked cache XLA copies layers out of the stacks and back (checked too: far larger)."""
  compiled, cache_bytes, ssm_bytes = _compile_decode_step("h100", per_layer=True)
  temp = compiled.memory_analysis().temp_size_in_bytes
  print(f"cache {cache_bytes / 1e6:.0f} MB, one Mamba state {ssm_bytes / 1e6:.1f} MB: {aot.memory(compiled).report()}")
  assert temp < ssm_bytes
  stacked, _, _ = _compile_decode_step("h100", per_layer=False)
  assert stacked.memory_analysis().temp_size_in_bytes > 4 * ssm_bytes


@needs_plugin
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_projects_with_matrix_products_on_h100(batch):
  """In XLA's H100 compile of the decoding step from generation's layout (per-layer weights, fused Mamba input
  projections), no projection becomes XLA's multiply-and-reduce (which it picks for a one-row product with
  (rows + columns) x depth < 1e7: `nn._common.one_row_as_two`) and no weights are concatenated per step (its dot
  merger joined dt, B and C so at every batch size: `models.fuse_in_proj`; checked on the split layout too)."""
  fused = _compile_decode_step("h100", per_layer=True, batch=batch, fuse=True)[0]
  assert aot.matvec_reductions(fused) == 0 and aot.weight_concatenations(fused) == 0
  split = _compile_decode_step("h100", per_layer=True, batch=batch, fuse=False)[0]
  assert aot.matvec_reductions(split) == 0
  assert aot.weight_concatenations(split) == 4  # one per Mamba layer


def _compile_for_h100_kernels(cfg, batch: int):
  mesh = jax.sharding.Mesh(aot.devices("h100", 1), ("x",))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the kernels' target (else the host's CPU)
    return _compile_decode_step("h100", per_layer=True, batch=batch, fuse=True, cfg=cfg)


@needs_plugin
def test_decode_step_with_the_triton_conv_ssm_kernel_updates_states_in_place_on_h100():
  """With `ssd_backend="pallas"` each Mamba layer's one-token update is the Triton conv + SSM kernel
  (`pallas_kernels.ssd.ops_decode`), which reads and writes its state once: the step's temporaries stay below
  one layer's state and no Mamba state or x conv window is copied (the reference's update-then-readout passes
  three times)."""
  compiled, _, ssm_bytes = _compile_for_h100_kernels(_nano4b_slice("pallas"), batch=64)
  text = compiled.as_text()
  assert text.count('custom_call_target="__gpu$xla.gpu.triton"') == 4  # one per Mamba layer
  assert compiled.memory_analysis().temp_size_in_bytes < ssm_bytes
  assert not re.search(r"= f32\[64,96,80,128\][^ ]* copy\(", text)
  assert not re.search(r"= bf16\[64,3,96,80\][^ ]* copy\(", text)


@needs_plugin
def test_batch_one_decode_step_launches_one_kernel_for_each_mamba_layers_conv_and_ssm_on_h100():
  """At batch 1 a decoding step is bound by its launches as much as by its bytes. In generation's layout the
  conv + SSM kernel reads x, B, C and dt where the fused projection put them and A, D, dt_bias as stored: per
  Mamba layer it replaces the reference's nine kernels (dt's softplus, three conv windows shifted and
  convolved, the SSM update and readout) and the slices and casts that would feed it. Measured on XLA's H100
  compile of Nemotron-3-Nano-4B (`benchmarks/decode_step_aot.py`): 575 -> 386 kernels per step."""
  reference = _compile_for_h100_kernels(_nano4b_slice("reference"), batch=1)[0]
  kernel = _compile_for_h100_kernels(_nano4b_slice("pallas"), batch=1)[0]
  print(f"kernels per step: reference {aot.kernels(reference)}, Triton conv + SSM {aot.kernels(kernel)}")
  assert aot.kernels(kernel) <= aot.kernels(reference) - 8 * 4  # 4 Mamba layers
  calls = re.findall(r"custom-call\(([^)]*)\)[^\n]*custom_call_target=\"__gpu\$xla.gpu.triton\"", kernel.as_text())
  assert len(calls) == 4
  for operands in calls:  # after the keep flags (one f32 cast per step): the projection and the params as they
    keep, *rest = operands.split(",")  # lie, no slice or cast computed for the kernel
    assert any("gemm" in o for o in rest), operands
    assert not any("slice" in o or "convert" in o or "negate" in o for o in rest), operands
  assert len({c.split(",")[0] for c in calls}) == 1  # the keep flags: one cast for all layers


def _nano30b_slice(gather_rows: int = 0, vocab: int = 4096):
  """Nemotron 3 Nano (30B-A3B) at full width, 5 layers (2 Mamba, 2 MoE, 1 attention), bf16, unrolled;
  `moe_gather_max_rows=gather_rows`."""
  from n3jax.configs import PRESETS, parse_pattern  # pylint: disable=g-import-not-at-top
  return PRESETS["nemotron-3-nano-30b-a3b"].replace(blocks=parse_pattern("MEM*E"), vocab_size=vocab, dtype="bfloat16",
                                                    param_dtype="bfloat16", scan_layers=False,
                                                    moe_gather_max_rows=gather_rows)


@needs_plugin
def test_batch_one_moe_decode_step_reads_its_experts_by_id_on_h100():
  """At batch 1 a MoE layer routes 6 rows. Through the sorted dispatch XLA's H100 compile launches about 30
  kernels per layer for them (argsort, counts and offsets, the grouped matmuls' mostly empty grids, un-sort
  and combine); with `moe_gather_max_rows` each row reads its expert's weights by id in one up and one down
  kernel (`pallas_kernels.moe.gathered`), and the combine fuses into the residual add. Nemotron-3-Nano-30B:
  1023 -> 724 kernels per step at batch 1 (`benchmarks/results/2026-12-06-moe-decode-aot.md`)."""
  sorted_, _, _ = _compile_for_h100_kernels(_nano30b_slice(0), batch=1)
  gathered, _, _ = _compile_for_h100_kernels(_nano30b_slice(8), batch=1)
  print(f"kernels per step: sorted {aot.kernels(sorted_)}, gathered {aot.kernels(gathered)}")
  assert aot.kernels(gathered) <= aot.kernels(sorted_) - 2 * 12  # 2 MoE layers
  text = gathered.as_text()
  calls = re.findall(r'custom_call_target="__gpu\$xla.gpu.triton"', text)
  assert len(calls) == 4 and text.count('"gathered_up"') + text.count('"gathered_down"') >= 4, len(calls)
  sorts = lambda c: len(re.findall(r"= [^\n]* sort\(", c.as_text()))
  assert sorts(gathered) == sorts(sorted_) - 2, (sorts(gathered), sorts(sorted_))  # top-k's only, no argsort


@needs_libtpu
def test_moe_decode_step_reads_row_major_expert_weights_where_they_lie_on_a_tpu():
  """A v5e lays Nemotron 3 Nano's [128, 2688, 1856] expert up-projections out with D minor (1856 is no
  multiple of 128), and the Mosaic kernels (the grouped matmul and the gathered-expert kernels) read their
  operands row-major: from the default layout XLA copies both expert weights of every MoE layer, every step
  (0.64 GB each). Placed row-major as generation places them (`inference._engine._rows_contiguous`), they are
  read where they lie."""
  weight_bytes = 128 * 2688 * 1856 * 2
  mesh = jax.sharding.Mesh(aot.devices("tpu:v5e:1x1", 1), ("x",))
  for rows in (0, 8):  # the sorted grouped matmul, the gathered-expert kernels
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      default, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=1, fuse=True,
                                           cfg=_nano30b_slice(rows))
      placed, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=1, fuse=True,
                                          cfg=_nano30b_slice(rows), row_major=("experts_up_proj", "experts_down_proj"))
    print(f"{rows=}: temporaries {default.memory_analysis().temp_size_in_bytes / 1e9:.2f} -> "
          f"{placed.memory_analysis().temp_size_in_bytes / 1e9:.2f} GB")
    assert default.memory_analysis().temp_size_in_bytes > weight_bytes  # the copies this avoids
    assert placed.memory_analysis().temp_size_in_bytes < weight_bytes // 20


@needs_plugin
@pytest.mark.parametrize("batch", [1, 64])
def test_looking_up_tokens_never_gathers_a_vocab_split_table_on_h100s(batch):
  """Decoding embeds one token per row. With the table split over `tensor` (8 H100s), each device looks up
  the rows of its part of the vocabulary and the rows meet in an all-reduce; the table (0.82 GB at the
  Nemotron-3-Nano-4B shape) is never gathered, one token included (XLA turns a one-row gather into a
  dynamic slice, which its partitioner made by gathering the whole table onto every device)."""
  from n3jax import models, sharding  # pylint: disable=g-import-not-at-top
  from n3jax.configs import PRESETS  # pylint: disable=g-import-not-at-top

  cfg = PRESETS["nemotron-3-nano-4b"].replace(dtype="bfloat16", param_dtype="bfloat16")
  mesh = sharding.make_mesh({"tensor": 8}, devices=aot.devices("h100", 8))
  table = sharding.param_shardings(cfg, mesh, "fsdp_tp_ep")["embedder"]["embedding"]
  params = {"embedding": jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16, sharding=table)}
  tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, P()))
  with sharding.use_mesh(mesh, "fsdp_tp_ep"):
    compiled = jax.jit(lambda p, t: models.Embedder(cfg).apply({"params": p}, t)).trace(params, tokens).lower().compile(
        aot.compiler_options("h100"))
  text = compiled.as_text()
  assert "all-gather" not in text and "all-reduce" in text
  assert compiled.memory_analysis().temp_size_in_bytes < cfg.vocab_size * cfg.hidden_size * 2 // 8


_PLAN_ARGS = ("--preset=tiny-moe", "--mesh=data=1", "--seq=64", "--batch=2", "--compile_for=h100")


@needs_plugin
def test_plan_cli_prints_xla_memory_beside_the_estimate(run_cli, capsys):
  assert run_cli("n3jax.plan", *_PLAN_ARGS) == 0
  out = capsys.readouterr().out
  assert "per device: params" in out and "XLA, compiled for 1 x h100 (AOT): arguments" in out


@pytest.mark.skipif(_HAS_PLUGIN, reason="checks the error without the plugin")
def test_plan_cli_compile_without_the_plugin_says_what_to_install(run_cli):
  with pytest.raises(RuntimeError, match=r"n3jax\[aot-gpu\]"):
    run_cli("n3jax.plan", *_PLAN_ARGS)


# ---------------------------------------------------------------------------------------------------
# TPU slices (libtpu)
# ---------------------------------------------------------------------------------------------------
_V5E = "tpu:v5e:2x2"


@pytest.mark.skipif(_HAS_LIBTPU, reason="checks the error without libtpu")
def test_without_libtpu_the_error_says_what_to_install():
  with pytest.raises(RuntimeError, match=r"n3jax\[aot-tpu\]"):
    aot.devices(_V5E, 4)


@needs_libtpu
def test_tpu_topologies():
  assert [d.device_kind for d in aot.devices(_V5E, 4)] == ["TPU v5 lite"] * 4
  with pytest.raises(ValueError, match="has 4 devices, not 8"):
    aot.devices(_V5E, 8)
  with pytest.raises(ValueError, match="v5litepod-4"):
    aot.devices("tpu:v5litepod-4", 4)


def _tpu_compile(fn, args, mesh):
  with jax.set_mesh(mesh):
    return jax.jit(fn).trace(*args).lower().compile()


@needs_libtpu
def test_tpu_kernels_compile_for_v5e():
  """The Mosaic TPU kernels that `backend="auto"` picks on a TPU, forward and backward, compiled by the Mosaic
  TPU compiler for a v5e (VMEM budget included): the SSD scan at the Nemotron 3 Nano mixer shape (documents
  and an initial state), the grouped matmuls of the Nano MoE layer, and splash attention at the Nano
  attention shape."""
  from pallas_kernels.attention import ops as attention_ops  # pylint: disable=g-import-not-at-top
  from pallas_kernels.moe import ops as moe_ops  # pylint: disable=g-import-not-at-top
  from pallas_kernels.ssd import ops as ssd_ops  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(aot.devices(_V5E, 4)[:1], ("x",))
  b, t, m, p, j, q = 1, 4096, 64, 64, 8, 128
  args = _abstract(mesh, ((b, t, m, p), jnp.bfloat16), ((b, t, m), jnp.float32), ((m,), jnp.float32),
                   ((b, t, j, q), jnp.bfloat16), ((b, t, j, q), jnp.bfloat16), ((m,), jnp.float32),
                   ((m,), jnp.float32), ((b, m, p, q), jnp.float32), ((b, t), jnp.int32))

  def ssd_loss(x, dt, a, bb, c, d, dt_bias, h0, doc_ids):
    y, h = ssd_ops.ssd(x, dt, a, bb, c, d, dt_bias, initial_state=h0, doc_ids=doc_ids)
    return y.astype(jnp.float32).sum() + h.sum()

  ssd = _tpu_compile(jax.value_and_grad(ssd_loss, argnums=tuple(range(8))), args, mesh)
  assert ssd.as_text().count("tpu_custom_call") >= 2, "forward and backward kernels"

  tokens, experts, top, d, f = 4096, 128, 6, 2688, 1856
  args = _abstract(mesh, ((tokens, d), jnp.bfloat16), ((tokens, top), jnp.float32), ((tokens, top), jnp.int32),
                   ((experts, d, f), jnp.bfloat16), ((experts, f, d), jnp.bfloat16))
  moe_loss = lambda x, w, ids, up, down: moe_ops.moe_dispatch(x, w, ids, up, down)[0].astype(jnp.float32).sum()
  moe = _tpu_compile(jax.grad(moe_loss, argnums=(0, 3, 4)), args, mesh)
  assert moe.as_text().count("tpu_custom_call") >= 5, "two forward gmms, their d_lhs and d_rhs"

  b, t, n, kvh, h = 1, 4096, 32, 2, 128
  args = _abstract(mesh, ((b, t, n, h), jnp.bfloat16), ((b, t, kvh, h), jnp.bfloat16),
                   ((b, t, kvh, h), jnp.bfloat16), ((b, t), jnp.int32))
  attn_loss = lambda q, k, v, seg: attention_ops.attention(q, k, v, seg).astype(jnp.float32).sum()
  attn = _tpu_compile(jax.value_and_grad(attn_loss, argnums=(0, 1, 2)), args, mesh)
  assert attn.as_text().count("tpu_custom_call") >= 2
  assert aot.memory(attn).temp_gb < 1   # no [T, T] scores


@needs_libtpu
def test_train_step_with_the_tpu_kernels_compiles_for_a_v5e_slice():
  """The trainer's step of the tiny MoE hybrid with the Pallas TPU kernels (SSD scan, grouped matmul, splash
  attention) under FSDP over a 4-chip v5e slice compiles, its kernels per shard."""
  from n3jax import trainer  # pylint: disable=g-import-not-at-top

  c = trainer.default_config()
  c.model_preset = "tiny-moe"
  c.model_overrides.update(dtype="bfloat16", chunk_size=64, ssd_backend="pallas", attention_impl="flash")
  c.mesh, c.axis_rules = dict(data=1, fsdp=4, expert=1, tensor=1), "fsdp"
  c.batch_size, c.data.seq_len = 4, 256
  compiled = trainer.compile_train_step(c, aot.devices(_V5E, 4))
  assert compiled.as_text().count("tpu_custom_call") >= 6
  assert aot.memory(compiled).peak_gb < 1


@needs_libtpu
def test_plan_cli_compiles_for_a_tpu_slice(run_cli, capsys):
  assert run_cli("n3jax.plan", "--preset=tiny-moe", "--mesh=data=4", "--seq=64", "--batch=4",
                 "--compile_for=tpu:v5e:2x2", "--device_gb=16") == 0
  assert "XLA, compiled for 4 x tpu:v5e:2x2 (AOT): arguments" in capsys.readouterr().out


def test_plan_cli_refuses_an_unknown_target(run_cli, capsys):
  assert run_cli("n3jax.plan", "--preset=tiny-moe", "--mesh=data=1", "--compile_for=a100") == 1
  assert "--compile_for must be one of ['h100'] or tpu:<topology>, got 'a100'" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("name", ["nemotron_h_8b", "nemotron_3_nano_30b", "nemotron_3_super_120b"])
def test_shipped_training_configs_fit_a_v5p_64_slice(name):
  """The release configs' training step compiled for a v5p-64 slice (64 chips, 95 GB of HBM each) fits by XLA's
  count (about 10 minutes each on 2 cores; figures in the README)."""
  from n3jax import trainer  # pylint: disable=g-import-not-at-top

  compiled = trainer.compile_train_step(_release_config(name), aot.devices("tpu:v5p:4x4x4", 64),
                                        aot.compiler_options("tpu:v5p:4x4x4"))
  print(f"{name} on a v5p-64 slice: {aot.memory(compiled).report()}")
  assert aot.memory(compiled).peak_gb < 95.0


@needs_libtpu
def test_nvfp4_quantization_takes_no_full_size_temporaries_on_tpu():
  """NVFP4 quantization with stochastic rounding of a tensor sharded over 4 chips of a v5e, blocks along the minor
  axis and along the rows: no temporary near the tensor's size. The draws are a hash of the element index, fused
  and sharded like the tensor. From XLA's `RngBitGenerator` every chip made the whole unsharded tensor of draws
  (0.13 GB of temporaries here), and its Philox words were padded to 128 lanes (689 GB in the Super step)."""
  from n3jax.quant import _nvfp4  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(aot.devices(_V5E, 4), ("x",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
  x = jax.ShapeDtypeStruct((16384, 2048), jnp.float32, sharding=rows)        # 134 MB, 34 MB per chip
  for axis in (-1, 0):
    fn = lambda x, axis=axis: _nvfp4.fake_quant_nvfp4(x, axis=axis, key=jax.random.key(1))
    compiled = _tpu_compile(jax.jit(fn, out_shardings=rows), [x], mesh)
    assert aot.memory(compiled).temp_gb < 0.02, (axis, aot.memory(compiled).report())


@needs_libtpu
def test_one_token_decode_step_reads_the_embedding_table_where_it_lies_on_a_tpu():
  """On one v5e chip the batch-1 decoding step never copies the embedding table. XLA keeps a [131072, 3136]
  bf16 table column-major there (3136 is no multiple of 128), and a gather of two rows or more copies all of
  it into rows first (0.84 GB per token: the two-row lookup `models.Embedder` uses where a mesh splits the
  vocabulary). Off a mesh a one-token lookup stays a one-row dynamic slice."""
  compiled, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=1, fuse=True, vocab=131072)
  assert compiled.memory_analysis().temp_size_in_bytes < 131072 * 3136 * 2 // 10


def _bytes_accessed(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]


@needs_libtpu
def test_decode_step_with_the_mosaic_ssm_kernel_updates_states_in_place_on_a_tpu():
  """On a v5e the jnp update passes over each Mamba layer's f32 state more than twice (update in place, then
  the readout reads the new state again); `ssd_backend="pallas"` runs the Mosaic kernel there, which reads and
  writes it once, in place: one custom call per Mamba layer, temporaries below one layer's state, and in
  XLA's own count of the step's bytes at least one state pass fewer per layer (Nano-4B slice, batch 64)."""
  mesh = jax.sharding.Mesh(aot.devices("tpu:v5e:1x1", 1), ("x",))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    reference, _, ssm_bytes = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=64, fuse=True,
                                                   cfg=_nano4b_slice("reference"))
    kernel, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=64, fuse=True,
                                        cfg=_nano4b_slice("pallas"))
  print(f"bytes accessed: reference {_bytes_accessed(reference) / 1e9:.2f} GB, "
        f"Mosaic {_bytes_accessed(kernel) / 1e9:.2f} GB")
  assert kernel.as_text().count("tpu_custom_call") == 4  # one per Mamba layer
  assert kernel.memory_analysis().temp_size_in_bytes < ssm_bytes
  assert _bytes_accessed(kernel) <= _bytes_accessed(reference) - 4 * ssm_bytes


@needs_libtpu
def test_batch_decode_step_reads_a_row_major_embedding_table_where_it_lies_on_a_tpu():
  """At batch 8 on a v5e the lookup is a gather of 8 rows: from the default (column-major) table XLA copies all
  of it into rows first (0.84 GB per step); from the table as generation places it (row-major,
  `inference._engine._rows_contiguous`; the jitted step compiles for the layout it is given) it reads
  the rows where they lie."""
  table_bytes = 131072 * 3136 * 2
  default, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=8, fuse=True, vocab=131072)
  assert default.memory_analysis().temp_size_in_bytes > table_bytes  # the copy this avoids
  row_major, _, _ = _compile_decode_step("tpu:v5e:1x1", per_layer=True, batch=8, fuse=True, vocab=131072,
                                         row_major=("embedding",))
  assert row_major.memory_analysis().temp_size_in_bytes < table_bytes // 10
