"""`QuantConfig` (the model-wide `none | fp8 | nvfp4` switch) and `make_einsum`, what layers call.

The recipes, with their sources (`../shared/spec/ARCHITECTURE.md` §8):

* FP8 (Nemotron-H, Nemotron Nano 2): Megatron-Bridge `nemotron_h_bf16_with_fp8_current_scaling_mixed`,
  `fp8="hybrid"` (E4M3 forward operands, E5M2 gradients; `NVIDIA/Megatron-LM:
  megatron/core/fp8_utils.py` `get_fp8_recipe`), `fp8_recipe="tensorwise"` = TE
  `Float8CurrentScaling` (per-tensor current scaling), `first_last_layers_bf16=True` with 2 layers
  at the start and 2 at the end kept in BF16.
* NVFP4 (Nemotron 3 Super): Megatron-Bridge `nemotron_3_super_bf16_with_nvfp4_mixed`, TE
  `NVFP4BlockScaling` (`NVIDIA/TransformerEngine: transformer_engine/common/recipe/__init__.py`):
  activations 1x16 blocks, RNE, RHT on the wgrad copy; weights 16x16 blocks, RNE, no RHT; gradients
  1x16 blocks, stochastic rounding, RHT on the wgrad copy. `num_layers_at_end_in_bf16=14`, start 0.
  arXiv 2509.25149 keeps embeddings, the output head, norms and the attention score/value products
  in high precision.

Layer counting follows Megatron-LM `get_fp8_context` / `get_fp4_context` (`megatron/core/
fp8_utils.py`, `fp4_utils.py`): `layer_index` is the 0-based index over all hybrid layers (Mamba,
attention, MLP, MoE each count one); it is BF16 if `index < start` or `index >= num_layers - end`.
Products outside the decoder stack (`layer_index=None`: embedding, LM head, MTP) and the roles in
`QuantConfig.bf16_roles` always run as the plain einsum; so do conv1d, the SSM scan and norms, which
are not einsums through this API at all.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp

from n3jax.quant import _hadamard
from n3jax.quant._dot import GemmRecipe, OperandQuant, quantized_einsum
from n3jax.quant._grouped import QuantizedGroupedMatmul
from n3jax.quant._formats import E4M3, E5M2
from pallas_kernels import _target

__all__ = ["ALWAYS_BF16_ROLES", "MODES", "QuantConfig", "ROLES", "make_einsum", "make_grouped_matmul", "gemm_recipe"]

MODES = ("none", "fp8", "nvfp4")
# Linear products of the model, by role. The first group is quantized (outside BF16 layers).
ROLES = ("attn_proj",     # q/k/v/o projections
         "mamba_proj",    # Mamba-2 in_proj / out_proj
         "mlp",           # dense MLP and MoE shared expert up/down
         "expert",        # routed experts up/down
         "latent_proj",   # LatentMoE fc1/fc2_latent_proj
         "router",        # MoE gate: f32 (HF keeps it in f32)
         "lm_head",       # output head
         "embed",         # embedding (if ever expressed as a product)
         "mtp",           # multi-token-prediction block projections (MLM: MTP layers not in FP4)
         "attn_core")     # attention scores QK^T and probs @ V: not linear layers, never quantized
ALWAYS_BF16_ROLES = frozenset({"router", "lm_head", "embed", "mtp", "attn_core"})

_DEFAULT_BF16_LAYERS = {"none": (0, 0), "fp8": (2, 2), "nvfp4": (0, 14)}
_FP8_FORMATS = ("hybrid", "e4m3")
_FP8_BACKENDS = ("auto", "native", "emulate")
_RHT_SIGNS = ("random", "te")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """Low-precision training recipe. `QuantConfig()` is plain BF16; `QuantConfig(mode="fp8")` and
  `QuantConfig(mode="nvfp4")` are the published Nemotron recipes.

  Frozen and hashable, so it can sit in a frozen model config. `fp8_backend="auto"` feeds FP8-typed
  operands to `dot_general` when compiling for a GPU and emulates with the same numbers elsewhere. On an
  H100 XLA compiles the three GEMMs of each product to real FP8 GEMMs (`tests/test_aot.py`, compiled ahead
  of time: cuBLASLt `__cublas$lt$matmul$f8`, or Triton FP8 GEMM fusions when XLA's autotuner prefers
  them); the speed-up over BF16 is still to be measured on a GPU with `benchmarks/quant.py`.
  """
  mode: str = "none"                       # "none" | "fp8" | "nvfp4"
  bf16_layers_at_start: int | None = None  # None: recipe default (fp8 2, nvfp4 0)
  bf16_layers_at_end: int | None = None    # None: recipe default (fp8 2, nvfp4 14)
  bf16_roles: frozenset[str] = ALWAYS_BF16_ROLES  # roles never quantized
  fp8_format: str = "hybrid"               # "hybrid": E4M3 fwd, E5M2 grads (TE Format.HYBRID); "e4m3": all E4M3
  fp8_backend: str = "auto"                # "auto": native on GPU, emulate elsewhere | "native" | "emulate"
  nvfp4_2d_weights: bool = True            # 16x16 weight blocks (TE disable_2d_quantization=False)
  nvfp4_rht: bool = True                   # RHT on the wgrad operands (TE disable_rht=False)
  nvfp4_stochastic_rounding: bool = True   # SR on gradients (TE disable_stochastic_rounding=False)
  rht_signs: str = "random"                # "random": one vector drawn from `seed`; "te": TE's fixed vector.
                                           # One vector serves every layer, as TE's one fixed vector does (and
                                           # a scan over layers needs the same signs in each layer of a run)
  seed: int = 0                            # root of every SR key and RHT sign vector

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"QuantConfig {self.mode=} must be one of {MODES}")
    for name in ("bf16_layers_at_start", "bf16_layers_at_end"):
      if (v := getattr(self, name)) is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ValueError(f"QuantConfig {name}={v!r} must be None or an int >= 0")
    object.__setattr__(self, "bf16_roles", frozenset(self.bf16_roles))
    if unknown := sorted(self.bf16_roles - set(ROLES)):
      raise ValueError(f"QuantConfig bf16_roles has unknown roles {unknown}; known: {ROLES}")
    for name, allowed in (("fp8_format", _FP8_FORMATS), ("fp8_backend", _FP8_BACKENDS),
                          ("rht_signs", _RHT_SIGNS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"QuantConfig {name}={getattr(self, name)!r} must be one of {allowed}")

  @property
  def bf16_layers(self) -> tuple[int, int]:
    """(layers at the start, layers at the end) kept in BF16."""
    start, end = _DEFAULT_BF16_LAYERS[self.mode]
    return (start if self.bf16_layers_at_start is None else self.bf16_layers_at_start,
            end if self.bf16_layers_at_end is None else self.bf16_layers_at_end)

  def is_quantized(self, *, layer_index: int | None, num_layers: int, role: str) -> bool:
    """Whether `make_einsum` returns a quantized product for this call site."""
    _check_site(layer_index, num_layers, role)
    if self.mode == "none" or layer_index is None or role in self.bf16_roles:
      return False
    start, end = self.bf16_layers
    return start <= layer_index < num_layers - end


def _check_site(layer_index: int | None, num_layers: int, role: str) -> None:
  if role not in ROLES:
    raise ValueError(f"Unknown quantization {role=}; known roles: {ROLES}")
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"{num_layers=} must be an int >= 1")
  if layer_index is not None and not (isinstance(layer_index, int) and 0 <= layer_index < num_layers):
    raise ValueError(f"{layer_index=} must be None or a static int in [0, {num_layers=})")


def gemm_recipe(quant: QuantConfig, *, layer_index: int | None = None) -> GemmRecipe:
  """The operand quantization of the three GEMMs for `quant.mode` (ignores the BF16 tables)."""
  if quant.mode == "none":
    return GemmRecipe()
  if quant.mode == "fp8":
    fwd = OperandQuant("fp8", fp8_format=E4M3)
    grad = OperandQuant("fp8", fp8_format=E5M2 if quant.fp8_format == "hybrid" else E4M3)
    native = quant.fp8_backend == "native" or (quant.fp8_backend == "auto" and _target.platform() == "gpu")
    return GemmRecipe(x_fwd=fwd, w_fwd=fwd, dy_dgrad=grad, w_dgrad=fwd, x_wgrad=fwd, dy_wgrad=grad,
                      native_fp8=native)
  rht, sr, two_d = quant.nvfp4_rht, quant.nvfp4_stochastic_rounding, quant.nvfp4_2d_weights
  if quant.rht_signs == "te":
    signs = _hadamard.TE_WGRAD_SIGNS
  else:
    signs = _hadamard.random_signs(quant.seed)
  return GemmRecipe(
      x_fwd=OperandQuant("nvfp4"),
      w_fwd=OperandQuant("nvfp4", block_2d=two_d),
      dy_dgrad=OperandQuant("nvfp4", stochastic=sr),
      w_dgrad=OperandQuant("nvfp4", block_2d=two_d),   # 2D: the very same quantized weight as forward
      x_wgrad=OperandQuant("nvfp4", rht=rht),
      dy_wgrad=OperandQuant("nvfp4", stochastic=sr, rht=rht),
      rht_signs=signs)


@dataclasses.dataclass(frozen=True)
class PlainEinsum:
  """`jnp.einsum` with the layer calling convention (what BF16-kept products get)."""

  def __call__(self, spec: str, x: jax.Array, w: jax.Array, *, preferred_element_type=jnp.float32,
               precision=None, step=None, key=None) -> jax.Array:
    del step, key  # No randomness in a plain product.
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type, precision=precision)


@dataclasses.dataclass(frozen=True)
class QuantizedEinsum:
  """A quantized product for one call site; `recipe` says what each GEMM operand sees."""
  recipe: GemmRecipe
  seed: int
  site: int  # hash of (layer, role): separates the SR noise of call sites

  def __call__(self, spec: str, x: jax.Array, w: jax.Array, *, preferred_element_type=jnp.float32,
               precision=None, step: int | jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Like `jnp.einsum(spec, x, w, preferred_element_type=...)`, quantized.

    `step` (the training step, may be traced) or an explicit `key` seeds stochastic rounding; pass one
    of them every step, else the SR noise repeats from step to step (each draw stays unbiased).
    `precision` is accepted for signature compatibility and ignored (the GEMMs are low precision).
    """
    del precision
    if key is None:
      key = jax.random.fold_in(jax.random.key(self.seed), self.site)
      key = jax.random.fold_in(key, zlib.crc32(spec.encode()) & 0x7FFFFFFF)
      key = jax.random.fold_in(key, 0 if step is None else step)
    return quantized_einsum(spec, x, w, recipe=self.recipe, key=key, preferred_element_type=preferred_element_type)


def make_einsum(quant: QuantConfig, *, layer_index: int | None, num_layers: int,
                role: str) -> PlainEinsum | QuantizedEinsum:
  """The einsum a layer should use for one linear product.

  Args:
    quant: the model-wide recipe.
    layer_index: 0-based index of the hybrid layer (static int), or None outside the decoder stack.
    num_layers: number of hybrid layers in the stack.
    role: one of `ROLES`.

  Returns:
    `fn(spec, x, w, *, preferred_element_type=jnp.float32, step=None, key=None)` with the contract of
    `jnp.einsum` for 2-operand specs (activations first, weights second). It is the plain einsum
    where the recipe keeps BF16.

  `layer_index` must be static: a `scan` over stacked layers has to be split where
  `quant.is_quantized(...)` changes (e.g. the last 14 layers under NVFP4).
  """
  if not quant.is_quantized(layer_index=layer_index, num_layers=num_layers, role=role):
    return PlainEinsum()
  site = zlib.crc32(f"{layer_index}/{role}".encode()) & 0x7FFFFFFF
  return QuantizedEinsum(gemm_recipe(quant, layer_index=layer_index), quant.seed, site)


def make_grouped_matmul(quant: QuantConfig, *, layer_index: int | None, num_layers: int,
                        key: jax.Array | None = None, backend: str = "auto") -> QuantizedGroupedMatmul | None:
  """The routed experts' grouped matmul (role "expert") for one MoE layer, or None where the recipe
  keeps them in BF16 (the caller then uses its plain grouped matmul).

  Returns a `pallas_kernels.moe.GroupedMatmul` (`fn(lhs [M, K], rhs [E, K, N], group_sizes [E], *,
  preferred_element_type)`) whose three GEMMs per expert follow `gemm_recipe` (see `_grouped.py`).
  `key` seeds stochastic rounding; None derives a fixed key from (seed, layer), so pass a fresh one
  every step when the recipe uses stochastic rounding. backend: the GEMMs' grouped matmul (the model's
  `moe_backend`: "auto" | "pallas" | "ragged_dot").
  """
  if not quant.is_quantized(layer_index=layer_index, num_layers=num_layers, role="expert"):
    return None
  if key is None:
    key = jax.random.fold_in(jax.random.key(quant.seed), zlib.crc32(f"{layer_index}/expert".encode()) & 0x7FFFFFFF)
  return QuantizedGroupedMatmul(gemm_recipe(quant, layer_index=layer_index), key, backend)
