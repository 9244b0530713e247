"""Tiny random `transformers.NemotronHForCausalLM` models built on CPU, and hub-layout checkpoints of them.

Nothing is downloaded: each model is seeded and built from a config dict here, then saved with
`save_pretrained` (transformers 5.24 writes the hub layout: `backbone.*`, per-expert tensors).
"""

from __future__ import annotations

import json
import os

import numpy as np

_COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               mamba_num_heads=8, mamba_head_dim=4, ssm_state_size=8, n_groups=2, chunk_size=8,
               initializer_range=0.2)

HF_CONFIGS = {
    # Dense hybrid: Mamba, attention and MLP layers.
    "dense": dict(layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
                  intermediate_size=48, **_COMMON),
    # MoE hybrid with a shared expert and group-limited routing (4 groups of 2, keep 2).
    "moe": dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "mlp"],
                intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                moe_shared_expert_intermediate_size=40, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                **_COMMON),
    # LatentMoE hybrid (Nemotron 3 Super style), with an MTP config (HF itself ignores MTP weights).
    "latent": dict(layers_block_type=["linear_attention", "moe", "linear_attention", "full_attention", "moe"],
                   n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                   moe_shared_expert_intermediate_size=40, moe_latent_size=16, routed_scaling_factor=5.0,
                   num_nextn_predict_layers=1, mtp_layers_block_type=["full_attention", "moe"], **_COMMON),
}


def build_hf_model(kind: str, seed: int = 0, dtype=None):
  """A seeded random HF model; biases that are zero at init are perturbed so parity sees them."""
  import torch
  from transformers import NemotronHConfig, NemotronHForCausalLM
  torch.manual_seed(seed)
  model = NemotronHForCausalLM(NemotronHConfig(**HF_CONFIGS[kind])).eval()
  with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
      if name.endswith(("e_score_correction_bias", "dt_bias", ".D", "conv1d.bias")):
        tensor.add_(torch.randn_like(tensor) * 0.3)
      if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        tensor.add_(torch.randn_like(tensor) * 0.2)
  if dtype is not None:
    model = model.to(dtype)
  return model


def save_hf_checkpoint(model, path: str, *, with_mtp: bool = False, max_shard_size: str | None = None) -> None:
  """`save_pretrained`, plus random `mtp.*` tensors in the hub layout when asked (HF drops them)."""
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kwargs)
  if with_mtp:
    _add_mtp_tensors(model.config, path)


def _add_mtp_tensors(config, path: str) -> None:
  """Appends one hub-layout MTP module (ARCHITECTURE.md §6) as an extra shard listed in the index."""
  import torch
  from safetensors.torch import save_file
  d, rng = config.hidden_size, torch.Generator().manual_seed(1)
  dtype = torch.float32
  rand = lambda *s: torch.randn(*s, generator=rng, dtype=dtype) * 0.1
  t = {"mtp.layers.0.enorm.weight": rand(d), "mtp.layers.0.hnorm.weight": rand(d),
       "mtp.layers.0.eh_proj.weight": rand(d, 2 * d), "mtp.layers.0.norm.weight": rand(d)}
  nq, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  t.update({"mtp.layers.0.mixer.q_proj.weight": rand(nq * hd, d), "mtp.layers.0.mixer.k_proj.weight": rand(nkv * hd, d),
            "mtp.layers.0.mixer.v_proj.weight": rand(nkv * hd, d), "mtp.layers.0.mixer.o_proj.weight": rand(d, nq * hd)})
  din, f, fs = config.moe_latent_size or d, config.moe_intermediate_size, config.moe_shared_expert_intermediate_size
  t["mtp.layers.1.norm.weight"] = rand(d)
  t["mtp.layers.1.mixer.gate.weight"] = rand(config.n_routed_experts, d)
  t["mtp.layers.1.mixer.gate.e_score_correction_bias"] = rand(config.n_routed_experts)
  for e in range(config.n_routed_experts):
    t[f"mtp.layers.1.mixer.experts.{e}.up_proj.weight"] = rand(f, din)
    t[f"mtp.layers.1.mixer.experts.{e}.down_proj.weight"] = rand(din, f)
  t["mtp.layers.1.mixer.shared_experts.up_proj.weight"] = rand(fs, d)
  t["mtp.layers.1.mixer.shared_experts.down_proj.weight"] = rand(d, fs)
  if config.moe_latent_size:
    t["mtp.layers.1.mixer.fc1_latent_proj.weight"] = rand(din, d)
    t["mtp.layers.1.mixer.fc2_latent_proj.weight"] = rand(d, din)
  t["mtp.layers.1.final_layernorm.weight"] = rand(d)
  save_file(t, os.path.join(path, "mtp.safetensors"), metadata={"format": "pt"})
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as fh:
      index = json.load(fh)
  else:  # single file: write an index covering it and the MTP shard
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
      index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in fh.keys()}}
  index["weight_map"].update({k: "mtp.safetensors" for k in t})
  with open(index_path, "w") as fh:
    json.dump(index, fh)


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)
