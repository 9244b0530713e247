"""Hugging Face hub checkpoints <-> n3jax checkpoints (see `_keymap` for the table; `_quantized` for ModelOpt
FP8 / NVFP4 checkpoints, dequantized on import)."""

from checkpoint_convert._convert import (ConversionError, convert_from_hf, convert_to_hf, hf_to_params,
                                         params_to_hf, read_hf_config, read_hf_tensor_index)
from checkpoint_convert._quantized import ModelOptConfig, dequantizing_view, read_modelopt_config
from checkpoint_convert._safetensors import SafetensorsError

__all__ = ["ConversionError", "ModelOptConfig", "SafetensorsError", "convert_from_hf", "convert_to_hf",
           "dequantizing_view", "hf_to_params", "params_to_hf", "read_hf_config", "read_hf_tensor_index",
           "read_modelopt_config"]
