"""n3jax checkpoint -> Hugging Face hub layout (sharded safetensors + index + config.json).

  python -m checkpoint_convert.n3jax_to_hf --ckpt /ckpt/nano3 --out /export/nano3-hf
"""

from absl import app, flags

from checkpoint_convert import _convert

_CKPT = flags.DEFINE_string("ckpt", None, "n3jax checkpoint directory (config.json + params/).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the hub layout (must not exist, or be empty).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard, in GiB.")
flags.mark_flags_as_required(["ckpt", "out"])


def main(argv):
  del argv  # Unused.
  cfg = _convert.convert_to_hf(_CKPT.value, _OUT.value, overwrite=_OVERWRITE.value,
                               max_shard_bytes=int(_MAX_SHARD_GB.value * 1024**3))
  print(f"Wrote {_OUT.value}: {cfg.num_hidden_layers} layers, pattern {cfg.pattern}")


if __name__ == "__main__":
  app.run(main)
