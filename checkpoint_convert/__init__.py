"""Hugging Face hub checkpoints <-> n3jax checkpoints (see `_keymap` for the table)."""

from checkpoint_convert._convert import (ConversionError, convert_from_hf, convert_to_hf, hf_to_params,
                                         params_to_hf, read_hf_config, read_hf_tensor_index)
from checkpoint_convert._safetensors import SafetensorsError

__all__ = ["ConversionError", "SafetensorsError", "convert_from_hf", "convert_to_hf", "hf_to_params",
           "params_to_hf", "read_hf_config", "read_hf_tensor_index"]
