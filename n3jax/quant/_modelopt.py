"""Dequantization of NVIDIA ModelOpt "unified HF" FP8 / NVFP4 checkpoint tensors (numpy, host side).

Format, from `NVIDIA/TensorRT-Model-Optimizer` (read at 5a4242fa):
* Tensor names (`modelopt/torch/quantization/utils.py` `quantizer_attr_names`, written by
  `modelopt/torch/export/unified_export_hf.py`): next to `<module>.weight` sit `<module>.weight_scale`,
  `<module>.weight_scale_2` (NVFP4 only) and `<module>.input_scale` (static activation scale).
* FP8 (`quant_algo: FP8`, `modelopt/torch/export/quant_utils.py` `to_quantized_weight`): `weight` is
  float8_e4m3fn `[N, K]` = `weight / weight_scale`; `weight_scale` f32 = amax / 448, per tensor
  (scalar) or per output channel (`[N]` / `[N, 1]`). Dequantized: `weight.f32 * weight_scale`.
* NVFP4 (`quant_algo: NVFP4`, `modelopt/torch/quantization/qtensor/nvfp4_tensor.py` `NVFP4QTensor`):
  `weight` is uint8 `[N, K/2]`, two E2M1 codes per byte, element `2i` in the low nibble and `2i+1` in
  the high nibble; a code is `sign << 3 | index` into (0, 0.5, 1, 1.5, 2, 3, 4, 6). `weight_scale` is
  float8_e4m3fn `[N, K/16]` (per 16-element block of the last axis), `weight_scale_2` f32 = amax /
  (6 * 448). Dequantized: `e2m1 * (weight_scale.f32 * weight_scale_2)`.
* `input_scale` is amax / 448 (FP8) or amax / (6 * 448) (NVFP4) of the calibrated activations; it
  is only needed to run the layer quantized at inference, not to recover the weights.
* The same tensors serve `FP8_PER_CHANNEL_PER_TOKEN` (per-channel `weight_scale`, no `input_scale`),
  `W4A16_NVFP4` (no `input_scale`) and the per-layer algos of `MIXED_PRECISION`.

Not covered: the TensorRT-LLM "swizzled" 1-D uint8 block-scale layout
(`cutlass_fp4_scale_to_modelopt_fp4_scale`, needs tensorrt_llm), FP8 per-block (`FP8_PB_WO`),
MXFP8, NVFP4_AWQ pre-quant scales, and `compressed-tensors` NVFP4 checkpoints (`weight_packed`,
`weight_global_scale`).

`checkpoint_convert/_quantized.py` reads whole checkpoints with these functions: it detects the
quantization (`hf_quant_config.json` / config.json `quantization_config`, `exclude_modules`), checks
every scale's dtype and shape, and dequantizes each weight to the checkpoint's dtype on import.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = ["E2M1_VALUES", "dequantize_modelopt_fp8", "dequantize_modelopt_nvfp4", "pack_e2m1", "unpack_e2m1"]

E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _as_e4m3(a) -> np.ndarray:
  a = np.asarray(a)
  if a.dtype == np.uint8:
    return a.view(ml_dtypes.float8_e4m3fn)
  if a.dtype != ml_dtypes.float8_e4m3fn:
    raise ValueError(f"expected float8_e4m3fn (or its uint8 bits), got dtype {a.dtype}")
  return a


def unpack_e2m1(packed) -> np.ndarray:
  """uint8 `[..., K/2]` -> f32 E2M1 values `[..., K]` (low nibble first)."""
  packed = np.asarray(packed)
  if packed.dtype != np.uint8:
    raise ValueError(f"packed E2M1 must be uint8, got dtype {packed.dtype}")
  codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
  return E2M1_VALUES[codes]


def pack_e2m1(values) -> np.ndarray:
  """f32 E2M1 values `[..., K]` (K even, values on the grid) -> uint8 `[..., K/2]`."""
  values = np.asarray(values, np.float32)
  if values.shape[-1] % 2:
    raise ValueError(f"last axis of {values.shape} must be even to pack two E2M1 values per byte")
  magnitude = np.abs(values)
  index = np.searchsorted(E2M1_VALUES[:8], magnitude)
  if np.any(index > 7) or np.any(E2M1_VALUES[np.minimum(index, 7)] != magnitude):
    raise ValueError("pack_e2m1 needs values on the E2M1 grid +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}")
  codes = (index | (np.signbit(values).astype(np.int64) << 3)).astype(np.uint8)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequantize_modelopt_fp8(weight, weight_scale, dtype=np.float32) -> np.ndarray:
  """ModelOpt FP8 `weight` [..., N, K] (float8_e4m3fn or uint8 bits) and `weight_scale` -> [..., N, K].

  `weight_scale` is a scalar (per tensor), `[..., N]` or `[..., N, 1]` (per output channel).
  """
  w = _as_e4m3(weight).astype(np.float32)
  s = np.asarray(weight_scale, np.float32)
  if s.ndim and s.shape[-1] != 1:
    s = s[..., None]
  try:
    return (w * s).astype(dtype)
  except ValueError as e:
    raise ValueError(f"weight_scale of shape {np.shape(weight_scale)} does not fit weight {w.shape}") from e


def dequantize_modelopt_nvfp4(packed_uint8, block_scales_e4m3, global_scale, dtype=np.float32) -> np.ndarray:
  """ModelOpt NVFP4 `weight` / `weight_scale` / `weight_scale_2` -> f32 `[..., N, K]`.

  Args:
    packed_uint8: `weight`, uint8 `[..., N, K/2]`.
    block_scales_e4m3: `weight_scale`, float8_e4m3fn (or uint8 bits) `[..., N, K/16]`.
    global_scale: `weight_scale_2`, f32 scalar (or `[...]` per stacked tensor).
  """
  values = unpack_e2m1(packed_uint8)
  scales = _as_e4m3(block_scales_e4m3).astype(np.float32)
  k = values.shape[-1]
  if scales.shape != (*values.shape[:-1], k // 16) or k % 16:
    raise ValueError(f"block scales {scales.shape} do not match packed weight {np.shape(packed_uint8)} "
                     f"(K={k} needs [..., {k // 16}] with K a multiple of 16)")
  s2 = np.asarray(global_scale, np.float32)
  per_block = scales * s2.reshape(*s2.shape, *([1] * (scales.ndim - s2.ndim)))
  out = values.reshape(*values.shape[:-1], k // 16, 16) * per_block[..., None]
  return out.reshape(values.shape).astype(dtype)
