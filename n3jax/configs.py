"""`ModelConfig`: the frozen, validated description of a Nemotron hybrid model, and `PRESETS`.

Field names follow `transformers.NemotronHConfig` (5.24) wherever the field exists there, so that
`ModelConfig.from_hf` / `to_hf` are a near-identity; the block pattern is a tuple of `Block` enums
instead of the HF list of strings. Fields n3jax adds (dtypes, layer scan, remat, kernel backends) come
last and are never written to a Hugging Face `config.json`.

Sources for every number: `../shared/spec/ARCHITECTURE.md` §4 (fields) and §5 (released sizes).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import Any

__all__ = ["Block", "ModelConfig", "PRESETS", "param_counts"]


class Block(enum.Enum):
  """One residual layer `h = h + mixer(rms_norm(h))`; the value is the pattern symbol."""
  MAMBA = "M"       # Mamba-2 mixer
  ATTENTION = "*"   # GQA causal attention, no positional encoding
  MLP = "-"         # dense squared-ReLU MLP
  MOE = "E"         # routed experts + one shared expert (optionally LatentMoE)

  @property
  def hf_name(self) -> str:
    return _BLOCK_TO_HF[self]


_BLOCK_TO_HF = {Block.MAMBA: "linear_attention", Block.ATTENTION: "full_attention",
                Block.MLP: "mlp", Block.MOE: "moe"}
# transformers <= 5.10 called Mamba layers "mamba" and attention layers "attention".
_HF_TO_BLOCK = {**{v: k for k, v in _BLOCK_TO_HF.items()}, "mamba": Block.MAMBA, "attention": Block.ATTENTION}

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
ATTENTION_IMPLS = ("dense", "blockwise", "flash")  # training attention (`n3jax.nn.Attention`)


def parse_pattern(pattern: str) -> tuple[Block, ...]:
  """`"M-M*E"` -> blocks. Raises on any symbol that is not a Nemotron block."""
  symbols = {b.value: b for b in Block}
  if unknown := sorted({c for c in pattern if c not in symbols}):
    raise ValueError(
        f"Block pattern {pattern!r} has unknown symbol(s) {unknown}; known: "
        f"{ {s: b.name for s, b in symbols.items()} }")
  return tuple(symbols[c] for c in pattern)


def pattern_string(blocks: tuple[Block, ...]) -> str:
  return "".join(b.value for b in blocks)


def _parse_hf_block_list(names: list[str], field: str) -> tuple[Block, ...]:
  if not isinstance(names, (list, tuple)):
    raise ValueError(f"HF field {field!r} must be a list of layer types, got {type(names).__name__}")
  if unknown := sorted({n for n in names if n not in _HF_TO_BLOCK}):
    raise ValueError(f"HF field {field!r} has unknown layer type(s) {unknown}; known: {sorted(_HF_TO_BLOCK)}")
  return tuple(_HF_TO_BLOCK[n] for n in names)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A Nemotron-H / Nano 2 / Nemotron 3 model. Letters in comments are the einsum alphabet of `n3jax.nn`."""

  # --- Stack ---
  vocab_size: int                             # V
  hidden_size: int                            # D
  blocks: tuple[Block, ...]                   # one per layer, the hybrid pattern
  tie_word_embeddings: bool = False           # all releases: untied `lm_head`
  layer_norm_epsilon: float = 1e-5            # every RMSNorm, gated ones included
  # --- Mamba-2 (d_inner = mamba_num_heads * mamba_head_dim, NOT expand * hidden_size) ---
  mamba_num_heads: int = 0                    # M
  mamba_head_dim: int = 64                    # P
  ssm_state_size: int = 128                   # Q
  n_groups: int = 8                           # J, B/C groups; head m uses group m // (M // J)
  conv_kernel: int = 4                        # K, depthwise causal conv width
  use_conv_bias: bool = True
  use_bias: bool = False                      # bias of in_proj / out_proj
  chunk_size: int = 128                       # L, SSD chunk length
  mamba_hidden_act: str = "silu"
  time_step_min: float = 1e-3                 # dt init range, and the dt clamp floor (HF 5.24)
  time_step_max: float = 0.1
  time_step_floor: float = 1e-4
  time_step_limit: tuple[float, float] = (0.0, math.inf)
  mamba_ssm_cache_dtype: str = "float32"
  # --- Attention (NoPE: no rotary or any positional encoding) ---
  num_attention_heads: int = 0                # N
  num_key_value_heads: int = 0                # K (kv heads); q head n reads kv head n // (N // K)
  head_dim: int = 128                         # H
  max_position_embeddings: int = 4096         # informational only (NoPE)
  # --- Dense MLP: down(relu(up(x))**2) ---
  intermediate_size: int = 0                  # F
  mlp_hidden_act: str = "relu2"
  mlp_bias: bool = False
  # --- MoE ---
  n_routed_experts: int = 0                   # E
  num_experts_per_tok: int = 0                # R
  moe_intermediate_size: int = 0              # F of one routed expert
  moe_shared_expert_intermediate_size: int = 0
  moe_latent_size: int | None = None          # LatentMoE: experts run at this width (Super: 1024)
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = True
  n_group: int = 1                            # group-limited routing: groups of experts
  topk_group: int = 1                         # ... of which this many are kept per token
  n_shared_experts: int = 1                   # carried, not used by the math (always one shared MLP)
  moe_shared_expert_overlap: bool = True      # carried, not used by the math
  # --- Multi-token prediction (Super) ---
  num_nextn_predict_layers: int = 0           # MTP depths D (0 = none)
  mtp_blocks: tuple[Block, ...] = (Block.ATTENTION, Block.MOE)
  # --- Tokens ---
  pad_token_id: int | None = 0
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  # --- Initialisation (random init only) ---
  initializer_range: float = 0.02
  rescale_prenorm_residual: bool = True
  residual_in_fp32: bool = False              # carried; the reference keeps the residual in compute dtype
  # --- n3jax only (never written to HF config.json) ---
  param_dtype: str = "float32"                # storage dtype of freshly initialised params
  dtype: str = "float32"                      # compute dtype; router, softmax, SSM and norms upcast to f32
  scan_layers: bool = False                   # lax.scan over layers (compile time O(1) in depth)
  remat_policy: str = "none"                  # see `_REMAT_POLICIES`
  ssd_backend: str = "reference"              # `pallas_kernels.ssd` implementation
  moe_backend: str = "auto"                   # `pallas_kernels.moe.moe_dispatch` backend ("auto": Pallas gmm on
                                              # GPU/TPU, ragged_dot on CPU; see `pallas_kernels.moe.ops`)
  moe_gather_max_rows: int = 0                # a MoE call with at most this many (token, slot) rows per token
                                              # shard skips the sort: each row runs its expert's weights read by
                                              # id (`pallas_kernels.moe.gathered`; decoding). Kernel backends
                                              # only; 0: never (the default until a GPU has timed both paths)
  moe_ep_exchange: str = "all_to_all"         # expert parallelism token exchange: all_to_all | all_gather
  moe_ep_capacity_factor: float | None = None  # all_to_all: rows an expert shard takes, x its routed rows;
                                              # None: ep x (the worst case, dropless). Rows over it are dropped
                                              # (`expert_parallel_moe`; not yet a training metric)
  attention_impl: str = "dense"               # training attention: dense (materialised [T, T] f32 scores, the HF
                                              # eager path) | blockwise (FlashAttention-2 in XLA, O(T) memory) |
                                              # flash (Pallas kernels: Triton on GPUs, splash on TPUs;
                                              # blockwise on CPU)
  moe_seq_chunks: int = 1                     # routed experts over this many pieces of each sequence in turn
                                              # (rematerialised): dispatch buffers / n, one more expert forward
  quant: str = "none"                         # linear-layer numerics: none | fp8 | nvfp4 (`n3jax.quant` recipes)
  quant_bf16_layers_at_start: int | None = None  # layers the recipe keeps in BF16 (None: the published recipe:
  quant_bf16_layers_at_end: int | None = None    # FP8 2 + 2, NVFP4 0 + 14)
  hf_extra: tuple[tuple[str, str], ...] = ()  # HF fields carried verbatim (key, json) for `to_hf`

  def __post_init__(self):
    # Normalise sequences given as lists so the dataclass stays hashable.
    for name in ("blocks", "mtp_blocks", "time_step_limit"):
      value = getattr(self, name)
      if isinstance(value, str) and name != "time_step_limit":
        value = parse_pattern(value)
      object.__setattr__(self, name, tuple(value))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    self._validate()

  # --- Derived sizes ---
  @property
  def num_hidden_layers(self) -> int:
    return len(self.blocks)

  @property
  def pattern(self) -> str:
    return pattern_string(self.blocks)

  @property
  def d_inner(self) -> int:
    return self.mamba_num_heads * self.mamba_head_dim

  @property
  def conv_dim(self) -> int:
    return self.d_inner + 2 * self.n_groups * self.ssm_state_size

  @property
  def moe_input_size(self) -> int:
    """Width the routed experts see: the latent size for LatentMoE, else hidden_size."""
    return self.moe_latent_size or self.hidden_size

  @property
  def dt_limit(self) -> tuple[float, float]:
    """dt clamp after softplus. transformers 5.24 clamps at `(time_step_min, inf)` in every path
    ("No upper limit"; it ignores `time_step_limit`), Megatron trains with `(0, inf)`; they differ only
    where softplus(dt + dt_bias) < time_step_min. We follow the 5.24 reference, so parity is exact."""
    return (self.time_step_min, math.inf)

  def count(self, block: Block) -> int:
    return sum(b == block for b in self.blocks)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # --- Validation ---
  def _validate(self):
    def need(cond, msg):
      if not cond:
        raise ValueError(f"Invalid ModelConfig: {msg}")
    need(self.blocks, "blocks (the layer pattern) is empty")
    for name in ("blocks", "mtp_blocks"):
      for b in getattr(self, name):
        need(isinstance(b, Block), f"{name} must hold Block values, got {b!r}")
    need(self.vocab_size > 0 and self.hidden_size > 0, f"{self.vocab_size=} and {self.hidden_size=} must be > 0")
    need(self.dtype in _DTYPES and self.param_dtype in _DTYPES,
         f"{self.dtype=} / {self.param_dtype=} must be one of {_DTYPES}")
    need(self.remat_policy in _REMAT_POLICIES, f"{self.remat_policy=} must be one of {_REMAT_POLICIES}")
    need(self.quant in ("none", "fp8", "nvfp4"), f"{self.quant=} must be one of none, fp8, nvfp4")
    for name in ("quant_bf16_layers_at_start", "quant_bf16_layers_at_end"):  # else n3jax.quant raises mid-trace
      v = getattr(self, name)
      need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
           f"{name}={v!r} must be None or an int >= 0")
    need(self.moe_ep_exchange in ("all_to_all", "all_gather"),
         f"{self.moe_ep_exchange=} must be 'all_to_all' or 'all_gather'")
    need(self.moe_ep_capacity_factor is None or (self.moe_ep_capacity_factor > 0
                                                 and self.moe_ep_exchange == "all_to_all"),
         f"{self.moe_ep_capacity_factor=} must be None or > 0, with moe_ep_exchange='all_to_all'")
    need(self.attention_impl in ATTENTION_IMPLS, f"{self.attention_impl=} must be one of {ATTENTION_IMPLS}")
    need(isinstance(self.moe_gather_max_rows, int) and self.moe_gather_max_rows >= 0,
         f"{self.moe_gather_max_rows=} must be an int >= 0")
    need(isinstance(self.moe_seq_chunks, int) and self.moe_seq_chunks >= 1, f"{self.moe_seq_chunks=} must be an int >= 1")
    need(self.layer_norm_epsilon > 0, f"{self.layer_norm_epsilon=} must be > 0")
    used = set(self.blocks) | (set(self.mtp_blocks) if self.num_nextn_predict_layers else set())
    if Block.MAMBA in used:
      need(self.mamba_num_heads > 0 and self.mamba_head_dim > 0 and self.ssm_state_size > 0,
           f"Mamba layers need {self.mamba_num_heads=}, {self.mamba_head_dim=}, {self.ssm_state_size=} > 0")
      need(self.n_groups > 0 and self.mamba_num_heads % self.n_groups == 0,
           f"{self.mamba_num_heads=} must be a multiple of {self.n_groups=}")
      need(self.conv_kernel >= 1 and self.chunk_size >= 1, f"{self.conv_kernel=}, {self.chunk_size=} must be >= 1")
      need(self.mamba_hidden_act == "silu", f"{self.mamba_hidden_act=}: only 'silu' is implemented")
    if Block.ATTENTION in used:
      need(self.num_attention_heads > 0 and self.num_key_value_heads > 0 and self.head_dim > 0,
           f"attention needs {self.num_attention_heads=}, {self.num_key_value_heads=}, {self.head_dim=} > 0")
      need(self.num_attention_heads % self.num_key_value_heads == 0,
           f"{self.num_attention_heads=} must be a multiple of {self.num_key_value_heads=}")
    if Block.MLP in used:
      need(self.intermediate_size > 0, f"MLP layers need {self.intermediate_size=} > 0")
    if Block.MLP in used or Block.MOE in used:
      need(self.mlp_hidden_act == "relu2", f"{self.mlp_hidden_act=}: only 'relu2' is implemented")
    if Block.MOE in used:
      need(self.n_routed_experts > 0 and 0 < self.num_experts_per_tok <= self.n_routed_experts,
           f"{self.num_experts_per_tok=} must be in (0, {self.n_routed_experts=}]")
      need(self.moe_intermediate_size > 0 and self.moe_shared_expert_intermediate_size > 0,
           f"{self.moe_intermediate_size=} and {self.moe_shared_expert_intermediate_size=} must be > 0")
      need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
           f"{self.n_routed_experts=} must be a multiple of {self.n_group=}")
      need(1 <= self.topk_group <= self.n_group, f"{self.topk_group=} must be in [1, {self.n_group=}]")
      need(self.n_group == 1 or self.n_routed_experts // self.n_group >= 2,
           "group-limited routing scores a group by its top-2 experts: need >= 2 experts per group")
      need(self.n_group == 1 or self.num_experts_per_tok <= self.topk_group * self.n_routed_experts // self.n_group,
           f"{self.num_experts_per_tok=} exceeds the experts in the {self.topk_group=} kept groups")
      need(self.moe_latent_size is None or self.moe_latent_size > 0, f"{self.moe_latent_size=} must be > 0")
    need(self.num_nextn_predict_layers >= 0, f"{self.num_nextn_predict_layers=} must be >= 0")
    if self.num_nextn_predict_layers:
      need(self.mtp_blocks, "MTP is on but mtp_blocks is empty")
      need(Block.MAMBA not in self.mtp_blocks, "Mamba blocks inside MTP are not supported")

  # --- Hugging Face config.json ---
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from a `config.json` dict (5.x `layers_block_type` or hub `hybrid_override_pattern`).

    Unknown fields raise one error listing them all. Fields the reference carries but never uses (and the
    generic ones transformers writes) are kept verbatim in `hf_extra` so that `to_hf` writes them back.
    The compute and param dtypes follow the checkpoint's `dtype` (`torch_dtype` in older files) unless
    `overrides` say otherwise.
    """
    hf = dict(hf)
    if hf.get("model_type", "nemotron_h") != "nemotron_h":
      raise ValueError(f"Not a Nemotron-H config: model_type={hf['model_type']!r}")
    for legacy, new in _HF_LEGACY_ALIASES.items():
      if legacy in hf:
        value = hf.pop(legacy)
        if new in hf and _hf_value(new, hf[new]) != _hf_value(new, value):
          # transformers 5.24 silently lets the legacy spelling win here; n3jax refuses to guess.
          raise ValueError(f"HF config sets both {legacy}={value!r} and {new}={hf[new]!r}, which disagree; "
                           "keep one spelling")
        hf.setdefault(new, value)
    # A field config.json leaves out gets transformers' class default, as `from_pretrained` builds it (ModelConfig's
    # own defaults are 0 where a block type does without the field); a null `num_key_value_heads` means one KV
    # head per query head, as in NemotronHConfig.__post_init__.
    for field, value in _HF_DEFAULTS.items():
      hf.setdefault(field, value)
    if hf["num_key_value_heads"] is None:
      hf["num_key_value_heads"] = hf["num_attention_heads"]
    if unknown := sorted(set(hf) - _HF_FIELDS - _HF_BLOCK_FIELDS - _HF_IGNORED_FIELDS):
      raise ValueError(f"Unknown Nemotron-H config field(s): {unknown}. If transformers added them, teach "
                       "n3jax.configs about them (handled, or carried in _HF_IGNORED_FIELDS).")
    kwargs: dict[str, Any] = {f: hf[f] for f in _HF_FIELDS if f in hf}
    # The layer pattern: 5.x list, or the hub string (both present: they must agree).
    kwargs["blocks"] = _hf_blocks(hf, "layers_block_type", "hybrid_override_pattern")
    if kwargs["blocks"] is None:
      raise ValueError("HF config has neither 'layers_block_type' nor 'hybrid_override_pattern'")
    if "num_hidden_layers" in hf and hf["num_hidden_layers"] != len(kwargs["blocks"]):
      raise ValueError(f"HF config: num_hidden_layers={hf['num_hidden_layers']} but the pattern has "
                       f"{len(kwargs['blocks'])} layers")
    if (mtp_blocks := _hf_blocks(hf, "mtp_layers_block_type", "mtp_hybrid_override_pattern")) is not None:
      kwargs["mtp_blocks"] = mtp_blocks
    if "head_dim" not in hf and "attention_head_dim" in hf:
      # Hub-era name. Megatron-Bridge reads `head_dim or attention_head_dim`; transformers 5.24 ignores it and
      # falls back to 128 (harmless for releases, which all use 128). `to_hf` writes `head_dim` explicitly.
      kwargs["head_dim"] = hf["attention_head_dim"]
    if "time_step_limit" in hf:
      kwargs["time_step_limit"] = tuple(_json_float(v) for v in hf["time_step_limit"])
    if hf.get("dtype") and hf.get("torch_dtype") and hf["dtype"] != hf["torch_dtype"]:
      # transformers keeps `dtype` silently; a file saying two things is more likely damaged than meant.
      raise ValueError(f"HF config sets both dtype={hf['dtype']!r} and torch_dtype={hf['torch_dtype']!r}, which "
                       "disagree; keep one")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
      raise ValueError(f"HF config dtype {dtype!r} is not one of {_DTYPES}")
    kwargs["dtype"] = kwargs["param_dtype"] = dtype
    # Carried verbatim, except what `to_hf` always writes itself (dtype, model_type, the default architecture) and
    # `auto_map`: it names the hub's remote code (configuration_nemotron_h.py, ...), which reads the hub-era
    # spellings (`hybrid_override_pattern`, `mamba_n_groups`, ...), not the 5.24 form `to_hf` writes; kept, it
    # sends `trust_remote_code=True` loaders to code that is not there, or that would misread the config.
    extra = {k: v for k, v in hf.items() if k in _HF_IGNORED_FIELDS
             and k not in ("dtype", "torch_dtype", "model_type", "auto_map")
             and not (k == "architectures" and v == _HF_ARCHITECTURES)}
    kwargs["hf_extra"] = tuple(sorted((k, json.dumps(v)) for k, v in extra.items()))
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict transformers 5.24 writes for this model (hub-loadable)."""
    out: dict[str, Any] = {k: json.loads(v) for k, v in self.hf_extra}
    for f in _HF_FIELDS:
      value = getattr(self, f)
      out[f] = list(value) if isinstance(value, tuple) else value
    out["time_step_limit"] = [_json_float_out(v) for v in self.time_step_limit]
    out["layers_block_type"] = [b.hf_name for b in self.blocks]
    out["mtp_layers_block_type"] = [b.hf_name for b in self.mtp_blocks]
    out["dtype"] = self.param_dtype
    out.setdefault("architectures", list(_HF_ARCHITECTURES))
    out["model_type"] = "nemotron_h"
    return dict(sorted(out.items()))

  # --- n3jax's own serialisation (stored beside every checkpoint) ---
  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["blocks"] = self.pattern
    d["mtp_blocks"] = pattern_string(self.mtp_blocks)
    d["time_step_limit"] = [_json_float_out(v) for v in self.time_step_limit]
    d["hf_extra"] = [list(kv) for kv in self.hf_extra]
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    d = json.loads(text)
    if unknown := sorted(set(d) - {f.name for f in dataclasses.fields(cls)}):
      raise ValueError(f"Unknown ModelConfig field(s) in saved config: {unknown}")
    d["time_step_limit"] = tuple(_json_float(v) for v in d.get("time_step_limit", (0.0, math.inf)))
    d["hf_extra"] = tuple(tuple(kv) for kv in d.get("hf_extra", ()))
    return cls(**d)


def _hf_blocks(hf: dict[str, Any], list_field: str, pattern_field: str) -> tuple[Block, ...] | None:
  """The blocks of the 5.x list or the hub pattern string; both present and different is an error (transformers
  5.24 picks one silently: the list for the main stack; for MTP the pattern, when the list is the default)."""
  blocks = _parse_hf_block_list(hf[list_field], list_field) if list_field in hf else None
  if pattern_field not in hf:
    return blocks
  if not isinstance(hf[pattern_field], str):
    raise ValueError(f"HF field {pattern_field!r} must be a pattern string, got {hf[pattern_field]!r}")
  from_pattern = parse_pattern(hf[pattern_field])
  if blocks is not None and blocks != from_pattern:
    raise ValueError(f"HF config sets both {list_field}={hf[list_field]!r} (pattern {pattern_string(blocks)!r}) and "
                     f"{pattern_field}={hf[pattern_field]!r}, which disagree; keep one")
  return from_pattern


def _hf_value(field: str, value: Any) -> Any:
  """`value` of HF `field` in a comparable form (block lists as blocks, time_step_limit as floats)."""
  try:
    if field == "layers_block_type":
      return _parse_hf_block_list(value, field)
    if field == "time_step_limit":
      return tuple(_json_float(v) for v in value)
  except (TypeError, ValueError):
    pass
  return value


def _json_float(v):
  if isinstance(v, dict) and "__float__" in v:
    return float(v["__float__"])
  return float(v)


def _json_float_out(v: float):
  return {"__float__": "Infinity"} if math.isinf(v) and v > 0 else v


_HF_ARCHITECTURES = ["NemotronHForCausalLM"]
# HF fields that map 1:1 onto ModelConfig fields of the same name.
_HF_FIELDS = frozenset({
    "vocab_size", "hidden_size", "tie_word_embeddings", "layer_norm_epsilon",
    "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "use_conv_bias",
    "use_bias", "chunk_size", "mamba_hidden_act", "time_step_min", "time_step_max", "time_step_floor",
    "mamba_ssm_cache_dtype", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "intermediate_size", "mlp_hidden_act", "mlp_bias", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size",
    "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group", "n_shared_experts",
    "moe_shared_expert_overlap", "num_nextn_predict_layers", "pad_token_id", "bos_token_id", "eos_token_id",
    "initializer_range", "rescale_prenorm_residual", "residual_in_fp32",
})
# transformers 5.24 NemotronHConfig's defaults where they differ from ModelConfig's (a test checks them against the
# class): what a config.json that leaves the field out means.
_HF_DEFAULTS = {
    "vocab_size": 131072, "hidden_size": 4096, "mamba_num_heads": 128, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 21504, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 7688, "moe_shared_expert_intermediate_size": 7688,
}
# HF fields handled specially by from_hf / to_hf.
_HF_BLOCK_FIELDS = frozenset({
    "layers_block_type", "hybrid_override_pattern", "mtp_layers_block_type", "mtp_hybrid_override_pattern",
    "num_hidden_layers", "time_step_limit", "attention_head_dim",
})
# Accepted and carried verbatim: unused by the model math (ARCHITECTURE.md §4, §10), or generic
# `PreTrainedConfig` fields transformers writes.
_HF_IGNORED_FIELDS = frozenset({
    "expand", "rope_theta", "partial_rotary_factor", "rms_norm_eps", "norm_eps", "attention_bias",
    "attention_dropout", "hidden_dropout", "sliding_window", "use_mamba_kernels", "mamba_proj_bias",
    "num_logits_to_keep", "output_router_logits", "use_cache", "rope_scaling", "rope_parameters",
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "auto_map", "name_or_path",
    "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "tokenizer_class",
    "sep_token_id", "decoder_start_token_id", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "quantization_config", "kv_channels", "mlp_hidden_size",
    "use_return_dict", "tie_encoder_decoder", "torchscript", "pruned_heads",
})
# Hub-era spellings (transformers NemotronHConfig.__post_init__) -> 5.24 names.
_HF_LEGACY_ALIASES = {
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size", "num_local_experts": "n_routed_experts", "layer_types": "layers_block_type",
}


# ---------------------------------------------------------------------------------------------------
# Parameter counts (analytic; `tests/test_configs.py` checks them against `jax.eval_shape` of the model).
# ---------------------------------------------------------------------------------------------------
def _block_params(cfg: ModelConfig, block: Block) -> tuple[int, int]:
  """(total, active-per-token) parameters of one layer of `block`, its pre-norm included."""
  d = cfg.hidden_size
  if block == Block.MAMBA:
    jq = cfg.n_groups * cfg.ssm_state_size
    n = d * (2 * cfg.d_inner + 2 * jq + cfg.mamba_num_heads) + cfg.conv_kernel * cfg.conv_dim
    n += cfg.conv_dim * cfg.use_conv_bias + 3 * cfg.mamba_num_heads + cfg.d_inner + cfg.d_inner * d
    n += (2 * cfg.d_inner + 2 * jq + cfg.mamba_num_heads + d) * cfg.use_bias
    return n + d, n + d
  if block == Block.ATTENTION:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n = d * (2 * q + 2 * kv)
    return n + d, n + d
  if block == Block.MLP:
    n = 2 * d * cfg.intermediate_size + (cfg.intermediate_size + d) * cfg.mlp_bias
    return n + d, n + d
  e, din = cfg.n_routed_experts, cfg.moe_input_size
  expert = 2 * din * cfg.moe_intermediate_size
  shared = 2 * d * cfg.moe_shared_expert_intermediate_size
  latent = 2 * d * din if cfg.moe_latent_size else 0
  fixed = d * e + e + shared + latent + d  # router, correction bias, shared expert, latent projs, norm
  return fixed + e * expert, fixed + cfg.num_experts_per_tok * expert


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Total and active (per token) parameter counts, with and without the MTP head and embeddings."""
  d, v = cfg.hidden_size, cfg.vocab_size
  layers = [_block_params(cfg, b) for b in cfg.blocks]
  embed = v * d
  head = 0 if cfg.tie_word_embeddings else v * d
  main_total = embed + head + d + sum(t for t, _ in layers)
  main_active = embed + head + d + sum(a for _, a in layers)
  mtp = 0
  if cfg.num_nextn_predict_layers:
    per_depth = 2 * d + 2 * d * d + d + sum(_block_params(cfg, b)[0] for b in cfg.mtp_blocks)
    mtp = cfg.num_nextn_predict_layers * per_depth
  return {
      "total": main_total + mtp,
      "total_without_mtp": main_total,
      "active": main_active,
      "active_without_embeddings": main_active - embed - head,
      "mtp": mtp,
  }


# ---------------------------------------------------------------------------------------------------
# Presets: every released model (ARCHITECTURE.md §5.1) plus tiny ones for tests and the quickstart.
# ---------------------------------------------------------------------------------------------------
_NEMOTRON_H_COMMON = dict(vocab_size=131072, n_groups=8, conv_kernel=4, head_dim=128, num_key_value_heads=8,
                          mamba_head_dim=64, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)


def _dense(pattern: str, **kw) -> ModelConfig:
  return ModelConfig(blocks=parse_pattern(pattern), **{**_NEMOTRON_H_COMMON, **kw})


_H8_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
_NANO3_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*"
                  "EMEMEMEME")

PRESETS: dict[str, ModelConfig] = {
    # Nemotron-H (arXiv 2504.03624). H-4B: Megatron recipe dims; not in the issue list but cheap to carry.
    "nemotron-h-4b": _dense(_H8_PATTERN, hidden_size=3072, mamba_num_heads=112, ssm_state_size=128,
                            num_attention_heads=32, intermediate_size=12288, max_position_embeddings=8192),
    "nemotron-h-8b": _dense(_H8_PATTERN, hidden_size=4096, mamba_num_heads=128, ssm_state_size=128,
                            num_attention_heads=32, intermediate_size=21504, max_position_embeddings=8192),
    "nemotron-h-47b": _dense(
        "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-",
        hidden_size=8192, mamba_num_heads=256, ssm_state_size=256, num_attention_heads=64,
        intermediate_size=30720, max_position_embeddings=8192),
    "nemotron-h-56b": _dense(
        "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*"
        "-M-M-M-M-M*-M-M-M-M-M-",
        hidden_size=8192, mamba_num_heads=256, ssm_state_size=256, num_attention_heads=64,
        intermediate_size=32768, max_position_embeddings=8192),
    # Nemotron Nano 2 (arXiv 2508.14444).
    "nemotron-nano-9b-v2": _dense("M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
                                  hidden_size=4480, mamba_num_heads=128, mamba_head_dim=80, ssm_state_size=128,
                                  num_attention_heads=40, intermediate_size=15680,
                                  max_position_embeddings=131072),
    "nemotron-nano-12b-v2": _dense("M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
                                   hidden_size=5120, mamba_num_heads=128, mamba_head_dim=80, ssm_state_size=128,
                                   num_attention_heads=40, intermediate_size=20480,
                                   max_position_embeddings=131072),
    # Nemotron 3 (Nano 4B is the shape of the generation benchmark in ../shared/bench/ANCHORS.md).
    "nemotron-3-nano-4b": _dense("M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-", hidden_size=3136,
                                 mamba_num_heads=96, mamba_head_dim=80, ssm_state_size=128,
                                 num_attention_heads=40, intermediate_size=12544, chunk_size=256,
                                 max_position_embeddings=262144),
    "nemotron-3-nano-30b-a3b": _dense(
        _NANO3_30B_PATTERN, hidden_size=2688, mamba_num_heads=64, ssm_state_size=128, num_attention_heads=32,
        num_key_value_heads=2, intermediate_size=1856, n_routed_experts=128, num_experts_per_tok=6,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5,
        max_position_embeddings=262144),
    "nemotron-3-super-120b-a12b": _dense(
        _SUPER_PATTERN, hidden_size=4096, mamba_num_heads=128, ssm_state_size=128, num_attention_heads=32,
        num_key_value_heads=2, n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_blocks=(Block.ATTENTION, Block.MOE), eos_token_id=(2, 11),
        max_position_embeddings=262144),
}

_TINY_COMMON = dict(vocab_size=256, hidden_size=64, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                    n_groups=2, chunk_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=2048)
PRESETS.update({
    # Dense hybrid: every block kind except MoE.
    "tiny-dense": ModelConfig(blocks=parse_pattern("M-M*-M-"), intermediate_size=128, **_TINY_COMMON),
    # MoE hybrid with a shared expert and group-limited routing (4 groups, 2 kept).
    "tiny-moe": ModelConfig(blocks=parse_pattern("MEM*EM-E"), intermediate_size=128, n_routed_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32,
                            moe_shared_expert_intermediate_size=64, routed_scaling_factor=2.5, n_group=4,
                            topk_group=2, **_TINY_COMMON),
    # LatentMoE hybrid with one MTP depth, like Nemotron 3 Super.
    "tiny-latent-moe": ModelConfig(blocks=parse_pattern("MEM*EME"), n_routed_experts=8, num_experts_per_tok=3,
                                   moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
                                   moe_latent_size=32, routed_scaling_factor=5.0, num_nextn_predict_layers=1,
                                   **_TINY_COMMON),
})
