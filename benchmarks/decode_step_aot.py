"""The decoding step as XLA compiles it for a chip this host may lack (`n3jax.aot`): memory and kernels.

  JAX_PLATFORMS=cpu python benchmarks/decode_step_aot.py                        # H100, Nano-4B, the 4 layouts
  JAX_PLATFORMS=cpu python benchmarks/decode_step_aot.py --target=tpu:v5e:1x1 --batches=64 --prompts=1024
  JAX_PLATFORMS=cpu python benchmarks/decode_step_aot.py --mesh=tensor=8 --layout=fsdp_tp_ep  # 8 H100s

Compiles `inference.decode_sample` (one token per row, sampling included) at the Nemotron-3-Nano-4B shape of
`benchmarks/generate.py` (bf16 weights, random init never materialised: abstract inputs) for each batch and
prompt length, with the weights and the caches stacked per layer kind or split per layer
(`models.unstack_layers`, `models.unstack_cache`). Prints one JSON line per case: XLA's memory analysis (per
device; temporaries are what the step writes besides its outputs: a copy of a weight or a cache layer shows
there), XLA's estimate of the bytes the step reads and writes (`cost_analysis`, not a measurement),
the number of kernels (fusions, custom calls and copies) the step launches, the products XLA turned into
multiply-and-reduce kernels and the concatenations of weights it writes per step (`aot.matvec_reductions`,
`aot.weight_concatenations`). No speed: that needs the chip
(`benchmarks/generate.py`). Needs the CUDA PJRT plugin (`n3jax[aot-gpu]`) or libtpu (`n3jax[aot-tpu]`).
"""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices: no accelerator needed

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_TARGET = flags.DEFINE_string("target", "h100", "n3jax.aot target: h100 or tpu:<topology>.")
_PRESET = flags.DEFINE_string("preset", "nemotron-3-nano-4b", "Key of n3jax.configs.PRESETS.")
_BATCHES = flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
_PROMPTS = flags.DEFINE_list("prompts", ["1024", "8192"], "Prompt lengths (the cache holds prompt + 264 tokens).")
_MESH = flags.DEFINE_string("mesh", None, "Compile for a mesh of --target devices, e.g. tensor=8 (default: one).")
_LAYOUT = flags.DEFINE_string("layout", "fsdp_tp_ep", "With --mesh: the n3jax.sharding layout.")
_SCAN = flags.DEFINE_boolean("scan_layers", False, "lax.scan over the layers (stacked weights and caches; the "
                             "released presets' default) instead of the unrolled step.")
_SSD = flags.DEFINE_string("ssd_backend", None, "ModelConfig.ssd_backend (default: the preset's); \"pallas\": "
                           "the Triton one-token SSM kernel on an H100.")
_GATHER = flags.DEFINE_integer("moe_gather_max_rows", None, "ModelConfig.moe_gather_max_rows (default: the "
                                "preset's): MoE calls with at most this many routed rows per shard read their "
                                "experts by id (pallas_kernels/moe/gathered.py).")
_LAYOUTS = flags.DEFINE_list("layouts", ["fused:per_layer", "per_layer:per_layer", "per_layer:stacked", "stacked:per_layer"],
                             "weights:caches pairs: weights fused (per layer, Mamba input projections joined: what "
                             "n3jax.generate decodes from on one device), per_layer or stacked; caches per_layer or stacked.")


def compile_step(cfg, target: str, batch: int, max_len: int, *, weights: str, per_layer_cache: bool,
                 mesh_shape: dict[str, int] | None = None, layout: str = "fsdp_tp_ep"):
  """-> (compiled step, weight bytes, cache bytes). On one device (`inference.decode_sample`), or on a mesh
  of `mesh_shape` under `layout` (`inference._engine.ShardedSteps`, what `generate(mesh=, layout=)` runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from n3jax import aot, models, sharding  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine, _sampling  # pylint: disable=g-import-not-at-top

  keep = lambda tree: tree
  shapes = lambda f: jax.eval_shape(f)
  layout_of = {"stacked": keep, "per_layer": models.unstack_layers,
               "fused": lambda p: models.fuse_in_proj(cfg, models.unstack_layers(p))}[weights]
  param_shapes = shapes(lambda: layout_of(models.init(cfg, jax.random.key(0))))
  cache_shapes = shapes(lambda: (models.unstack_cache if per_layer_cache else keep)(models.init_cache(cfg, batch, max_len)))
  state_shapes = shapes(lambda: {"key": jax.random.key(0), "seen": jnp.zeros((batch, cfg.vocab_size), bool)})
  place = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
  sampling = _sampling.SamplingParams()
  if mesh_shape:
    mesh = sharding.make_mesh(mesh_shape, devices=aot.devices(target, math.prod(mesh_shape.values())))
    steps = _engine.ShardedSteps(cfg, mesh, layout, batch, max_len, per_layer_cache=per_layer_cache)
    if weights == "fused":
      raise ValueError("a mesh decodes from split projections: --layouts weights per_layer or stacked")
    params = place(param_shapes, sharding.param_shardings(cfg, mesh, layout, per_layer=weights != "stacked"))
    cache = place(cache_shapes, steps.cache_shardings)
    state = place(state_shapes, steps.state_shardings)
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=steps.rows)
    with sharding.use_mesh(mesh, layout):
      lowered = steps._decode_sample.trace(params, cache, tokens, state, tokens, sampling=sampling).lower()  # pylint: disable=protected-access
  else:
    mesh = jax.sharding.Mesh(aot.devices(target, 1), ("x",))
    rep = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                       (param_shapes, cache_shapes, state_shapes))
    params, cache, state = (place(t, s) for t, s in zip((param_shapes, cache_shapes, state_shapes), rep))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=jax.tree.leaves(rep[0])[0])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the target kernels pick (`ssd_backend="pallas"`)
      lowered = _engine.decode_sample.trace(cfg, params, cache, tokens, state, tokens, sampling=sampling).lower()
  compiled = lowered.compile(aot.compiler_options(target))
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return compiled, nbytes(param_shapes), nbytes(cache_shapes)


def _bytes_accessed(compiled) -> float:
  """XLA's own estimate of the bytes the step reads and writes (`cost_analysis`), not a measurement."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost).get("bytes accessed", 0.0)


def main(argv):
  del argv  # Unused.
  from n3jax import aot  # pylint: disable=g-import-not-at-top
  from n3jax.configs import PRESETS  # pylint: disable=g-import-not-at-top

  cfg = PRESETS[_PRESET.value].replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=_SCAN.value)
  if _SSD.value:
    cfg = cfg.replace(ssd_backend=_SSD.value)
  if _GATHER.value is not None:
    cfg = cfg.replace(moe_gather_max_rows=_GATHER.value)
  mesh_shape = ({k: int(v) for k, v in (kv.split("=") for kv in _MESH.value.split(","))} if _MESH.value else None)
  for prompt in map(int, _PROMPTS.value):
    for batch in map(int, _BATCHES.value):
      for layout in _LAYOUTS.value:
        weights, caches = layout.split(":")
        compiled, weight_bytes, cache_bytes = compile_step(
            cfg, _TARGET.value, batch, prompt + 264, weights=weights,
            per_layer_cache=caches == "per_layer", mesh_shape=mesh_shape, layout=_LAYOUT.value)
        m = aot.memory(compiled)
        print(json.dumps(dict(target=_TARGET.value, mesh=_MESH.value, preset=_PRESET.value, scan=_SCAN.value,
                              ssd_backend=cfg.ssd_backend, moe_gather_max_rows=cfg.moe_gather_max_rows, batch=batch, prompt=prompt, weights=weights,
                              caches=caches, weight_gb=round(weight_bytes / 1e9, 3), cache_gb=round(cache_bytes / 1e9, 3),
                              temp_gb=round(m.temp_gb, 3), peak_gb=round(m.peak_gb, 3), kernels=aot.kernels(compiled),
                              xla_bytes_accessed_gb=round(_bytes_accessed(compiled) / 1e9, 3),
                              matvec_reductions=aot.matvec_reductions(compiled),
                              weight_concatenations=aot.weight_concatenations(compiled))),
              flush=True)


if __name__ == "__main__":
  app.run(main)
