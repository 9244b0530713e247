"""What ptxas makes of n3jax's Mosaic GPU kernels for an H100, on a host without a GPU.

  JAX_PLATFORMS=cpu python benchmarks/kernel_resources.py              # SSD, gmm and attention, fwd + bwd
  JAX_PLATFORMS=cpu python benchmarks/kernel_resources.py --families=ssd --ssd_shape=super_b1
  JAX_PLATFORMS=cpu python benchmarks/kernel_resources.py --families=attention \
      --attention_blocks=max_concurrent_steps=1     # another tiling: shared memory -> programs per SM

Compiles each kernel family's forward and backward at a benchmark shape for a compile-only H100
(`n3jax.aot`; needs `pip install -e '.[aot-gpu]'`) and prints, per kernel, ptxas's registers per thread,
the bytes it spills to local memory and the shared memory Mosaic GPU allocates (`aot.mosaic_gpu_kernels`).
These are compile-time facts, not speed: a spill costs local-memory traffic in the kernel's inner loop,
and 255 registers (the most a thread may have) with one 128-thread warpgroup per program leave room for
two programs per SM at most. Timings are `benchmarks/ssd.py`, `moe.py` and `attention.py`, on the GPU.
"""

import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: compile-only devices, no GPU probe

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import jax.numpy as jnp

import _shapes  # benchmarks/: run as `python benchmarks/kernel_resources.py`
from n3jax import aot
from pallas_kernels.attention import ops as attention_ops
from pallas_kernels.moe import gmm_mgpu
from pallas_kernels.ssd import ops as ssd_ops

_FAMILIES = flags.DEFINE_list("families", ["ssd", "gmm", "attention"], "Kernel families to compile.")
_SSD_SHAPE = flags.DEFINE_enum("ssd_shape", "nano_b1", list(_shapes.SSD), "benchmarks/ssd.py shape.")
_GMM_SHAPE = flags.DEFINE_enum("gmm_shape", "anchor_nano_up", list(_shapes.GMM), "benchmarks/moe.py shape.")
_ATTENTION_SHAPE = flags.DEFINE_enum("attention_shape", "nano3_b1_8k", list(_shapes.ATTENTION),
                                     "benchmarks/attention.py shape.")
_DOCS = flags.DEFINE_bool("docs", True, "SSD with document ids (packed sequences), as the trainer runs it.")
_SSD_BLOCKS = flags.DEFINE_list("ssd_blocks", [], "Fields of the SSD's MgpuBlockSizes, as name=int (default: H100's).")
_ATTENTION_BLOCKS = flags.DEFINE_list("attention_blocks", [], "Fields of attention's MgpuBlockSizes, as name=int.")


def _blocks(cls, fields: list[str]):
  """The H100 defaults of `cls` (`for_device`) with `fields` (name=int) replaced; None: the defaults."""
  if not fields:
    return None
  try:
    h100 = cls.for_device(aot.devices("h100", 1)[0])
    return dataclasses.replace(h100, **{k: int(v) for k, v in (f.split("=") for f in fields)})
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"{cls.__module__}.{cls.__name__}: bad fields {fields}: {e}") from e


def _ssd(shape_name: str, docs: bool):
  bsz, seqlen, nheads, headdim, dstate, ngroups = _shapes.SSD[shape_name]
  bf16, f32 = jnp.bfloat16, jnp.float32
  shapes = [((bsz, seqlen, nheads, headdim), bf16), ((bsz, seqlen, nheads), f32), ((nheads,), f32),
            ((bsz, seqlen, ngroups, dstate), bf16), ((bsz, seqlen, ngroups, dstate), bf16), ((nheads,), f32),
            ((nheads,), f32), ((bsz, nheads, headdim, dstate), f32)] + ([((bsz, seqlen), jnp.int32)] if docs else [])

  def loss(x, dt, a, b, c, d, dt_bias, h0, *doc_ids):
    y, h = ssd_ops.ssd(x, dt, a, b, c, d, dt_bias, initial_state=h0, doc_ids=doc_ids[0] if docs else None,
                       backend="mosaic_gpu", block_sizes=_blocks(ssd_ops.MgpuBlockSizes, _SSD_BLOCKS.value))
    return y.astype(f32).sum() + h.sum()

  return jax.value_and_grad(loss, argnums=tuple(range(8))), shapes


def _gmm(shape_name: str):
  s = _shapes.GMM[shape_name]
  shapes = [((s.rows, s.k), jnp.bfloat16), ((s.num_groups, s.k, s.n), jnp.bfloat16), ((s.num_groups,), jnp.int32)]

  def loss(lhs, rhs, group_sizes):
    return gmm_mgpu.gmm(lhs, rhs, group_sizes).astype(jnp.float32).sum()

  return jax.value_and_grad(loss, argnums=(0, 1)), shapes


def _attention(shape_name: str):
  b, t, n, k, h = _shapes.ATTENTION[shape_name]
  shapes = [((b, t, n, h), jnp.bfloat16), ((b, t, k, h), jnp.bfloat16), ((b, t, k, h), jnp.bfloat16),
            ((b, t), jnp.int32)]

  def loss(q, kk, v, seg):
    blocks = _blocks(attention_ops.MgpuBlockSizes, _ATTENTION_BLOCKS.value)
    return attention_ops.attention(q, kk, v, seg, backend="mosaic_gpu", block_sizes=blocks).astype(jnp.float32).sum()

  return jax.value_and_grad(loss, argnums=(0, 1, 2)), shapes


def kernel_stats(fn, shapes) -> list[aot.KernelStats]:
  """ptxas's figures of the Mosaic GPU kernels of `fn` compiled for one H100 at `shapes` [(shape, dtype)]."""
  mesh = jax.sharding.Mesh(aot.devices("h100", 1), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]

  def compile_fn():
    with jax.set_mesh(mesh):
      jax.jit(fn).trace(*args).lower().compile(aot.compiler_options("h100"))

  return aot.mosaic_gpu_kernels(compile_fn)


def main(argv):
  del argv
  programs = {
      "ssd": lambda: (_SSD_SHAPE.value, *_ssd(_SSD_SHAPE.value, _DOCS.value)),
      "gmm": lambda: (_GMM_SHAPE.value, *_gmm(_GMM_SHAPE.value)),
      "attention": lambda: (_ATTENTION_SHAPE.value, *_attention(_ATTENTION_SHAPE.value)),
  }
  print(f"# jax {jax.__version__}, compiled for a compile-only H100 (sm_90a): ptxas's figures, not timings")
  for family in _FAMILIES.value:
    if family not in programs:
      raise app.UsageError(f"--families: unknown {family!r}; known: {sorted(programs)}")
    shape_name, fn, shapes = programs[family]()
    print(f"\n{family} @ {shape_name} (forward + backward)")
    for k in sorted(kernel_stats(fn, shapes), key=lambda k: k.name):
      print("  " + k.report())
      print(json.dumps(dict(family=family, shape=shape_name, **vars(k))), flush=True)


if __name__ == "__main__":
  app.run(main)
