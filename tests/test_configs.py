"""ModelConfig validation, HF config round trips, and preset parameter counts (no memory used)."""

import json
import math

import jax
import numpy as np
import pytest

from n3jax import models
from n3jax.configs import _HF_DEFAULTS, _HF_FIELDS, PRESETS, Block, ModelConfig, param_counts

# ARCHITECTURE.md §5.2 totals (billions, 2 decimals) and the exact Super BF16 checkpoint count (§5.3).
SPEC_TOTALS_B = {
    "nemotron-h-8b": 8.10, "nemotron-h-47b": 46.79, "nemotron-h-56b": 56.32, "nemotron-nano-9b-v2": 8.89,
    "nemotron-nano-12b-v2": 12.31, "nemotron-3-nano-30b-a3b": 31.58,
}
SUPER_ELEMENTS = 123_611_033_088


def _eval_shape_count(cfg: ModelConfig) -> int:
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(SPEC_TOTALS_B))
def test_released_preset_totals_match_spec(name):
  cfg = PRESETS[name]
  total = _eval_shape_count(cfg)
  assert total == param_counts(cfg)["total"]
  assert round(total / 1e9, 2) == SPEC_TOTALS_B[name]


def test_super_total_is_exactly_the_bf16_checkpoint():
  cfg = PRESETS["nemotron-3-super-120b-a12b"]
  assert _eval_shape_count(cfg) == SUPER_ELEMENTS == param_counts(cfg)["total"]
  counts = param_counts(cfg)
  # Reported (not from the spec): routed top-22 of 512 experts -> about 12B active.
  assert 11e9 < counts["active_without_embeddings"] < 13e9 < counts["total_without_mtp"]


def test_active_counts():
  nano = param_counts(PRESETS["nemotron-3-nano-30b-a3b"])
  assert 3.0e9 < nano["active"] < 4.0e9  # "A3B"
  dense = param_counts(PRESETS["nemotron-h-8b"])
  assert dense["active"] == dense["total"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_and_axes_agree(name):
  cfg = PRESETS[name]
  axes = models.logical_axes(cfg)
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                        jax.tree.leaves(shapes)):
    assert len(spec) == leaf.ndim
  assert _eval_shape_count(cfg) == param_counts(cfg)["total"]


def test_released_presets_scan_layers():
  for name, cfg in PRESETS.items():
    if not name.startswith("tiny"):
      assert cfg.scan_layers, name  # big presets compile without unrolling their layers


# --- HF config.json ---
HF_524 = {  # as transformers 5.24 `save_pretrained` writes it
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "chunk_size": 8, "conv_kernel": 4, "dtype": "bfloat16", "eos_token_id": 2, "expand": 2, "head_dim": 8,
    "hidden_dropout": 0.0, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 48,
    "layer_norm_epsilon": 1e-05, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
    "mamba_head_dim": 8, "mamba_hidden_act": "silu", "mamba_num_heads": 4, "mamba_proj_bias": False,
    "mamba_ssm_cache_dtype": "float32", "max_position_embeddings": 4096, "mlp_bias": False, "mlp_hidden_act": "relu2",
    "model_type": "nemotron_h", "moe_intermediate_size": 24, "moe_latent_size": 16,
    "moe_shared_expert_intermediate_size": 40, "moe_shared_expert_overlap": True,
    "mtp_layers_block_type": ["full_attention", "moe"], "n_group": 1, "n_groups": 2, "n_routed_experts": 4,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 2,
    "num_key_value_heads": 2, "num_logits_to_keep": 1, "num_nextn_predict_layers": 1, "output_router_logits": False,
    "pad_token_id": 0, "rescale_prenorm_residual": True, "residual_in_fp32": False, "routed_scaling_factor": 1.0,
    "sliding_window": None, "ssm_state_size": 16, "tie_word_embeddings": False, "time_step_floor": 0.0001,
    "time_step_limit": [0.0, {"__float__": "Infinity"}], "time_step_max": 0.1, "time_step_min": 0.001,
    "topk_group": 1, "transformers_version": "5.24.0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "use_mamba_kernels": True, "vocab_size": 64,
}

HUB_LEGACY = {  # hub-era spelling: pattern string, mamba_* aliases, attention_head_dim, unused RoPE fields
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "num_hidden_layers": 4, "hidden_size": 32,
    "vocab_size": 64, "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 16, "mamba_n_groups": 2,
    "mamba_d_conv": 4, "mamba_chunk_size": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "attention_head_dim": 8, "intermediate_size": 48, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 24, "moe_shared_expert_intermediate_size": 40, "rope_theta": 10000,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "mamba_dt_limit": [0.0, 1e9],
    "mtp_hybrid_override_pattern": "*E", "transformers_version": "4.55.4",
}


def test_from_hf_to_hf_round_trips_524_config():
  cfg = ModelConfig.from_hf(HF_524)
  assert cfg.blocks == (Block.MAMBA, Block.MOE, Block.ATTENTION, Block.MLP)
  assert cfg.dtype == cfg.param_dtype == "bfloat16"  # computes in the checkpoint's dtype
  assert math.isinf(cfg.time_step_limit[1])
  assert json.dumps(cfg.to_hf(), sort_keys=True) == json.dumps(HF_524, sort_keys=True)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_legacy_hub_config_is_read_and_written_in_524_form():
  cfg = ModelConfig.from_hf(HUB_LEGACY)
  assert cfg.pattern == "M*-E" and cfg.n_groups == 2 and cfg.head_dim == 8 and cfg.chunk_size == 8
  assert cfg.mtp_blocks == (Block.ATTENTION, Block.MOE) and cfg.time_step_limit == (0.0, 1e9)
  out = cfg.to_hf()
  assert out["rope_theta"] == 10000 and out["partial_rotary_factor"] == 0.5  # carried, unused
  assert out["layers_block_type"] == ["linear_attention", "full_attention", "mlp", "moe"]
  assert ModelConfig.from_hf(out) == cfg


def test_to_hf_loads_in_transformers_with_same_values(tmp_path):
  transformers = pytest.importorskip("transformers")

  def load(d, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(d))
    return transformers.NemotronHConfig.from_pretrained(str(tmp_path / name))

  for i, source in enumerate((HF_524, HUB_LEGACY)):
    theirs = load(source, f"theirs{i}")
    mine = load(ModelConfig.from_hf(source).to_hf(), f"mine{i}")
    for field in ("layers_block_type", "mtp_layers_block_type", "n_groups", "conv_kernel", "chunk_size",
                  "hidden_size", "num_hidden_layers", "time_step_limit", "moe_latent_size"):
      assert getattr(mine, field) == getattr(theirs, field), field
    # transformers 5.24 ignores the hub-era `attention_head_dim` (it falls back to head_dim=128); Megatron-Bridge
    # and n3jax read it, and `to_hf` writes an explicit `head_dim`, so the exported config is the right one.
    assert mine.head_dim == 8
    assert theirs.head_dim == (8 if "head_dim" in source else 128)


@pytest.mark.parametrize("change", [
    dict(num_key_value_heads=..., num_attention_heads=16),    # missing: transformers' 8
    dict(mamba_num_heads=...), dict(intermediate_size=...), dict(n_routed_experts=..., num_experts_per_tok=...),
    dict(moe_intermediate_size=..., moe_shared_expert_intermediate_size=...), dict(vocab_size=..., hidden_size=...),
], ids=lambda c: ",".join(f"{k}={'missing' if v is ... else v}" for k, v in c.items()))
def test_fields_left_out_mean_what_transformers_reads(change, tmp_path):
  transformers = pytest.importorskip("transformers")
  d = {k: v for k, v in {**HF_524, **change}.items() if v is not ...}
  (tmp_path / "config.json").write_text(json.dumps(d))
  theirs, mine = transformers.NemotronHConfig.from_pretrained(str(tmp_path)), ModelConfig.from_hf(d)
  for field in sorted(_HF_FIELDS):
    want = getattr(theirs, field)
    assert getattr(mine, field) == (tuple(want) if isinstance(want, list) else want), field


def test_null_kv_heads_means_one_per_query_head():
  # The hub-era remote code and NemotronHConfig.__post_init__ read null so; transformers 5.24's strict dataclass
  # check refuses it before __post_init__ runs.
  assert ModelConfig.from_hf({**HF_524, "num_key_value_heads": None}).num_key_value_heads == 4


def test_hf_defaults_table_is_transformers():
  transformers = pytest.importorskip("transformers")
  defaults = transformers.NemotronHConfig()
  assert {f: getattr(defaults, f) for f in _HF_DEFAULTS} == _HF_DEFAULTS


def test_export_drops_the_hub_remote_code_map(tmp_path):
  hub = {**HUB_LEGACY, "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                                    "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}}
  out = ModelConfig.from_hf(hub).to_hf()
  assert "auto_map" not in out and ModelConfig.from_hf(out) == ModelConfig.from_hf(HUB_LEGACY)
  transformers = pytest.importorskip("transformers")
  (tmp_path / "config.json").write_text(json.dumps(out))
  # With the map kept, this looked for configuration_nemotron_h.py in tmp_path.
  loaded = transformers.AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=True)
  assert type(loaded) is transformers.NemotronHConfig and loaded.layers_block_type == out["layers_block_type"]


def test_dtype_spellings_that_disagree():
  assert ModelConfig.from_hf({**HF_524, "torch_dtype": "bfloat16"}).dtype == "bfloat16"  # the same: fine
  with pytest.raises(ValueError, match=r"dtype='bfloat16' and torch_dtype='float32', which disagree"):
    ModelConfig.from_hf({**HF_524, "torch_dtype": "float32"})


def test_unknown_hf_fields_are_listed():
  with pytest.raises(ValueError, match=r"Unknown Nemotron-H config field\(s\): \['bogus_a', 'bogus_b'\]"):
    ModelConfig.from_hf({**HF_524, "bogus_b": 1, "bogus_a": 2})


def test_unknown_pattern_symbol():
  with pytest.raises(ValueError, match=r"unknown symbol\(s\) \['X'\]"):
    ModelConfig.from_hf({**HUB_LEGACY, "hybrid_override_pattern": "M*X-", "num_hidden_layers": 4})
  with pytest.raises(ValueError, match="unknown layer type"):
    ModelConfig.from_hf({**HF_524, "layers_block_type": ["linear_attention", "gdn"]})


def test_wrong_model_type_and_layer_count():
  with pytest.raises(ValueError, match="model_type='llama'"):
    ModelConfig.from_hf({**HF_524, "model_type": "llama"})
  with pytest.raises(ValueError, match="num_hidden_layers=5 but the pattern has 4"):
    ModelConfig.from_hf({**HUB_LEGACY, "num_hidden_layers": 5})


@pytest.mark.parametrize("change,match", [
    (dict(mamba_num_heads=6, n_groups=4), "multiple of self.n_groups"),
    (dict(num_attention_heads=3), "multiple of self.num_key_value_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "multiple of self.n_group"),
    (dict(dtype="int8"), "dtype"),
    (dict(blocks=()), "empty"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(moe_ep_capacity_factor=0.0), "moe_ep_capacity_factor"),
    (dict(moe_ep_capacity_factor=2.0, moe_ep_exchange="all_gather"), "moe_ep_capacity_factor"),
])
def test_invalid_configs_fail_at_construction(change, match):
  with pytest.raises(ValueError, match=match):
    PRESETS["tiny-moe"].replace(**change)


def test_unknown_field_in_saved_n3jax_config():
  text = json.loads(PRESETS["tiny-dense"].to_json())
  text["not_a_field"] = 1
  with pytest.raises(ValueError, match="not_a_field"):
    ModelConfig.from_json(json.dumps(text))


def test_presets_are_hashable_and_frozen():
  cfg = PRESETS["tiny-dense"]
  hash(cfg)
  with pytest.raises(Exception):
    cfg.hidden_size = 3  # type: ignore[misc]
  assert np.isclose(cfg.dt_limit[0], cfg.time_step_min)
