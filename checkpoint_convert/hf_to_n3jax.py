"""Hugging Face hub checkpoint -> n3jax checkpoint.

  python -m checkpoint_convert.hf_to_n3jax --hf_dir /path/to/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 --out /ckpt/nano3

NVIDIA ModelOpt FP8 / NVFP4 checkpoints (e.g. NVIDIA-Nemotron-3-Nano-30B-A3B-FP8 / -NVFP4) need no flag: they
are recognised by `hf_quant_config.json` or a config.json `quantization_config`, and their weights are
dequantized to the checkpoint's dtype (bf16) on load. The n3jax checkpoint, and any HF export of it, is
unquantized. Covered formats: `checkpoint_convert/_quantized.py`.
"""

from absl import app, flags

from checkpoint_convert import _convert, _quantized

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Directory with config.json and *.safetensors (hub layout); a ModelOpt "
                              "FP8 / NVFP4 checkpoint is detected and dequantized on load.")
_OUT = flags.DEFINE_string("out", None, "Output n3jax checkpoint directory (must not exist, or be empty).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype to record (default: the checkpoint's own dtype).")
flags.mark_flags_as_required(["hf_dir", "out"])


def main(argv):
  del argv  # Unused.
  overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
  cfg = _convert.convert_from_hf(_HF_DIR.value, _OUT.value, overwrite=_OVERWRITE.value, **overrides)
  if quant := _quantized.read_modelopt_config(_HF_DIR.value, _convert.read_hf_config(_HF_DIR.value)):
    print(_quantized.describe(quant))
  print(f"Wrote {_OUT.value}: {cfg.num_hidden_layers} layers, pattern {cfg.pattern}")


if __name__ == "__main__":
  app.run(main)
