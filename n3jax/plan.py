"""Command line of the memory plan (`n3jax.memory_plan`): per-device memory and FLOPs of a training step.

  python -m n3jax.plan --preset nemotron-3-nano-30b-a3b --mesh data=1,fsdp=8,expert=1,tensor=1 \\
      --seq 4096 --batch 8 [--layout fsdp] [--remat full] [--device_gb 80] [--mu_dtype bfloat16]
  python -m n3jax.plan --preset nemotron-3-super-120b-a12b --devices 64 --seq 4096 --batch 64   # recommends
"""

from absl import app, flags

from n3jax import memory_plan, sharding
from n3jax.configs import PRESETS

_PRESET = flags.DEFINE_string("preset", None, "Key of n3jax.PRESETS.")
_MESH = flags.DEFINE_string("mesh", None, "data=..,fsdp=..,expert=..,tensor=.. (omit with --devices to search)")
_DEVICES = flags.DEFINE_integer("devices", None, "Search layouts and meshes over this many devices.")
_LAYOUT = flags.DEFINE_enum("layout", None, list(sharding.AXIS_RULES), "Axis rules (default: from the mesh).")
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (sequences).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots_saveable", "nothing_saveable"], "Remat policy.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Master weight dtype.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_MU_DTYPE = flags.DEFINE_enum("mu_dtype", None, ["float32", "bfloat16"],
                               "AdamW first-moment dtype (default: the param dtype; optimizer.mu_dtype).")
_DEVICE_GB = flags.DEFINE_float("device_gb", 80.0, "Memory of one device, GB.")


def main(argv):
  del argv  # Unused.
  if _PRESET.value not in PRESETS:
    raise app.UsageError(f"--preset must be one of {sorted(PRESETS)}, got {_PRESET.value!r}")
  # Training keeps f32 master weights and computes in bf16, whatever dtype the preset stores.
  cfg = PRESETS[_PRESET.value].replace(param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value)
  kw = dict(preset=_PRESET.value, batch=_BATCH.value, seq=_SEQ.value, remat=_REMAT.value, device_gb=_DEVICE_GB.value,
            mu_dtype=_MU_DTYPE.value)
  if _MESH.value:
    mesh = {k: int(v) for k, v in (kv.split("=") for kv in _MESH.value.split(","))}
    print(memory_plan.estimate(cfg, layout=_LAYOUT.value or memory_plan.default_layout(mesh), mesh=mesh, **kw).report())
  elif _DEVICES.value:
    plan = memory_plan.recommend(cfg, devices=_DEVICES.value, **kw)
    if not plan.fits:
      print(f"No layout fits {_PRESET.value} on {_DEVICES.value} x {_DEVICE_GB.value:.0f} GB; the smallest plan is:")
    print(plan.report())
  else:
    raise app.UsageError("Give --mesh or --devices")


if __name__ == "__main__":
  app.run(main)
