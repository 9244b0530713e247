"""Low-precision numerics of n3jax: FP8 and NVFP4 training recipes. Import from here; `_*.py` is private.

What the model uses:
  quant = QuantConfig(mode="none" | "fp8" | "nvfp4")
  einsum = make_einsum(quant, layer_index=i, num_layers=L, role="mlp")
  y = einsum("BTD,DF->BTF", x, w, preferred_element_type=jnp.float32, step=step)

Primitives (quantize-dequantize with exact rounding, see each module's docstring for the recipe and
its sources): `fp8_quantize` / `fake_quant_fp8` (per-tensor current scaling), `fp8_delayed_quantize`
(delayed scaling with an explicit `DelayedScalingState`), `nvfp4_quantize` / `fake_quant_nvfp4`
(1x16 or 16x16 blocks, RNE or stochastic rounding), `apply_rht` (16x16 random Hadamard transform),
`quantized_einsum` with a `GemmRecipe` (custom_vjp over the forward, dgrad and wgrad GEMMs),
`quantized_ragged_dot` / `make_grouped_matmul` (the same for the routed experts' grouped GEMMs), and
`dequantize_modelopt_fp8` / `dequantize_modelopt_nvfp4` for ModelOpt checkpoint tensors.

Non-finite inputs, everywhere: NaN stays NaN; +-Inf stays +-Inf where the format has an infinity
(E5M2) and becomes NaN where it has none (E4M3, E2M1); scales are computed from finite elements only.
"""

from n3jax.quant._dot import GemmRecipe, OperandQuant, quantized_einsum
from n3jax.quant._formats import E2M1, E4M3, E5M2, FloatFormat, round_to_format
from n3jax.quant._grouped import QuantizedGroupedMatmul, quantized_ragged_dot
from n3jax.quant._fp8 import (DelayedScalingState, Fp8Tensor, fake_quant_fp8, fp8_delayed_quantize, fp8_dequantize,
                              fp8_quantize, init_delayed_scaling, te_scale_from_amax)
from n3jax.quant._hadamard import TE_WGRAD_SIGNS, apply_rht, hadamard_matrix, random_signs, rht_matrix
from n3jax.quant._modelopt import dequantize_modelopt_fp8, dequantize_modelopt_nvfp4, pack_e2m1, unpack_e2m1
from n3jax.quant._nvfp4 import NVFP4Tensor, fake_quant_nvfp4, nvfp4_dequantize, nvfp4_quantize
from n3jax.quant._recipes import (ALWAYS_BF16_ROLES, MODES, ROLES, PlainEinsum, QuantConfig, QuantizedEinsum,
                                  gemm_recipe, make_einsum, make_grouped_matmul)

__all__ = [
    "ALWAYS_BF16_ROLES", "DelayedScalingState", "E2M1", "E4M3", "E5M2", "FloatFormat", "Fp8Tensor", "GemmRecipe",
    "MODES", "NVFP4Tensor", "OperandQuant", "PlainEinsum", "QuantConfig", "QuantizedEinsum", "QuantizedGroupedMatmul",
    "ROLES",
    "TE_WGRAD_SIGNS", "apply_rht", "dequantize_modelopt_fp8", "dequantize_modelopt_nvfp4", "fake_quant_fp8",
    "fake_quant_nvfp4", "fp8_delayed_quantize", "fp8_dequantize", "fp8_quantize", "gemm_recipe", "hadamard_matrix",
    "init_delayed_scaling", "make_einsum", "make_grouped_matmul", "nvfp4_dequantize", "nvfp4_quantize", "pack_e2m1",
    "quantized_einsum", "quantized_ragged_dot", "random_signs", "rht_matrix", "round_to_format", "te_scale_from_amax", "unpack_e2m1",
]
