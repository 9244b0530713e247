"""Command line of the memory plan (`n3jax.memory_plan`): per-device memory and FLOPs of a training step.

  python -m n3jax.plan --preset nemotron-3-nano-30b-a3b --mesh data=1,fsdp=8,expert=1,tensor=1 \\
      --seq 4096 --batch 8 [--layout fsdp] [--remat full] [--device_gb 80] [--mu_dtype bfloat16] \\
      [--attention_impl blockwise|flash] [--moe_seq_chunks 8] [--loss_chunk 1024]
  python -m n3jax.plan --preset nemotron-3-super-120b-a12b --devices 64 --seq 4096 --batch 64   # recommends
  python -m n3jax.plan ... --compile_for h100   # also compile the step for H100s (n3jax.aot) and print
                                                # XLA's per-device memory beside the estimate
"""

import math

import jax
from absl import app, flags

from n3jax import aot, memory_plan, sharding, trainer
from n3jax.configs import ATTENTION_IMPLS, PRESETS

_PRESET = flags.DEFINE_string("preset", None, "Key of n3jax.PRESETS.")
_MESH = flags.DEFINE_string("mesh", None, "data=..,fsdp=..,expert=..,tensor=.. (missing axes 1; one may be -1 with "
                            "--devices, which the sizes must then fill; omit with --devices to search)")
_DEVICES = flags.DEFINE_integer("devices", None, "Search layouts and meshes over this many devices.")
_LAYOUT = flags.DEFINE_enum("layout", None, list(sharding.AXIS_RULES), "Axis rules (default: from the mesh).")
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (sequences).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots_saveable", "nothing_saveable"], "Remat policy.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Master weight dtype.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_MU_DTYPE = flags.DEFINE_enum("mu_dtype", None, ["float32", "bfloat16"],
                               "AdamW first-moment dtype (default: the param dtype; optimizer.mu_dtype).")
_ATTENTION = flags.DEFINE_enum("attention_impl", "dense", list(ATTENTION_IMPLS),
                               "Training attention (ModelConfig.attention_impl).")
_MOE_CHUNKS = flags.DEFINE_integer("moe_seq_chunks", 1, "Routed experts over this many sequence pieces.")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 0, "Cross-entropy over pieces of this many positions (0: whole).")
_MTP_DEPTHS = flags.DEFINE_integer("mtp_depths", 0, "MTP depths trained (the trainer's mtp_depths; 0: the model's "
                                   "num_nextn_predict_layers).")
_DEVICE_GB = flags.DEFINE_float("device_gb", 80.0, "Memory of one device, GB.")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, f"Also compile the training step for this chip, without one, and print XLA's per-device "
    f"memory (n3jax.aot): {' | '.join(aot.GPU_TARGETS)} (pip install 'n3jax[aot-gpu]') or a TPU slice of the mesh's "
    f"size, e.g. tpu:v5p:2x2x2 (pip install 'n3jax[aot-tpu]').")


def _compile(plan: memory_plan.Plan, target: str) -> str:
  """The trainer's step for `plan` compiled for `target` devices -> XLA's memory line."""
  c = trainer.default_config()
  c.model_preset = plan.preset
  c.model_overrides.update(param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value, remat_policy=plan.remat,
                           attention_impl=_ATTENTION.value, moe_seq_chunks=_MOE_CHUNKS.value)
  c.loss_chunk, c.mtp_depths = _LOSS_CHUNK.value, _MTP_DEPTHS.value
  c.optimizer.mu_dtype = _MU_DTYPE.value or ""
  c.mesh.update(plan.mesh)
  c.axis_rules, c.batch_size, c.data.seq_len = plan.layout, plan.batch, plan.seq
  n = math.prod(plan.mesh.values())
  hosts = n // 8 if n % 8 == 0 and target in aot.GPU_TARGETS else 1  # 8 GPUs per host, as on an HGX node
  compiled = trainer.compile_train_step(c, aot.devices(target, n, hosts=hosts), aot.compiler_options(target))
  mem = aot.memory(compiled)
  return (f"  XLA, compiled for {n} x {target} (AOT): {mem.report()} per device; "
          f"plan / XLA = {plan.total_gb / mem.peak_gb:.2f}")


def main(argv):
  del argv  # Unused.
  if _COMPILE_FOR.value:
    if _COMPILE_FOR.value not in aot.GPU_TARGETS and not _COMPILE_FOR.value.startswith("tpu:"):
      raise app.UsageError(f"--compile_for must be one of {sorted(aot.GPU_TARGETS)} or tpu:<topology>, got "
                           f"{_COMPILE_FOR.value!r}")
    jax.config.update("jax_platforms", "cpu")  # compile-only devices need no accelerator here (n3jax.aot)
  if _PRESET.value not in PRESETS:
    raise app.UsageError(f"--preset must be one of {sorted(PRESETS)}, got {_PRESET.value!r}")
  # Training keeps f32 master weights and computes in bf16, whatever dtype the preset stores.
  cfg = PRESETS[_PRESET.value].replace(param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value,
                                       attention_impl=_ATTENTION.value, moe_seq_chunks=_MOE_CHUNKS.value)
  kw = dict(preset=_PRESET.value, batch=_BATCH.value, seq=_SEQ.value, remat=_REMAT.value, device_gb=_DEVICE_GB.value,
            mu_dtype=_MU_DTYPE.value, loss_chunk=_LOSS_CHUNK.value, mtp_depths=_MTP_DEPTHS.value)
  if _DEVICES.value is not None and _DEVICES.value < 1:
    raise app.UsageError(f"--devices must be >= 1, got {_DEVICES.value}")
  # A bad mesh (its string, its axes, a size that does not divide a param or the batch) is one usage error.
  try:
    if _MESH.value:
      mesh = memory_plan.parse_mesh(_MESH.value, _DEVICES.value)
      plan = memory_plan.estimate(cfg, layout=_LAYOUT.value or memory_plan.default_layout(mesh), mesh=mesh, **kw)
    elif _DEVICES.value:
      plan = memory_plan.recommend(cfg, devices=_DEVICES.value, **kw)
      if plan is None:
        raise ValueError(f"no mesh of {_DEVICES.value} devices (powers of two per axis) splits {_PRESET.value} "
                         f"and a batch of {_BATCH.value}")
      if not plan.fits:
        print(f"No layout fits {_PRESET.value} on {_DEVICES.value} x {_DEVICE_GB.value:.0f} GB; the smallest plan "
              "is:")
    else:
      raise app.UsageError("Give --mesh or --devices")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(plan.report())
  if _COMPILE_FOR.value:
    print(_compile(plan, _COMPILE_FOR.value))


if __name__ == "__main__":
  app.run(main)
