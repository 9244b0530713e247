"""Logical axis names and the rules tables that map them onto mesh axes.

Modules say *what* an axis is (`nn.with_logical_partitioning(init, (EMBED, MLP))`); only this file says
*where* it goes. A new layout is a new named entry in `AXIS_RULES`, never an `if` in a layer.
Mesh axes: `data`, `fsdp`, `expert`, `tensor`.
"""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["AXIS_RULES", "MESH_AXES", "logical_to_mesh"]

# --- Parameter axes ---
LAYERS = "layers"              # stacked layers of one block type (scan axis); never sharded
VOCAB = "vocab"
EMBED = "embed"                # d_model
MLP = "mlp"                    # dense / shared-expert hidden
HEADS = "heads"                # attention query heads
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
SSM_HEADS = "ssm_heads"        # Mamba heads (d_inner = heads x head_dim is split by heads)
SSM_HEAD_DIM = "ssm_head_dim"
SSM_GROUPS = "ssm_groups"      # B/C groups
SSM_STATE = "ssm_state"
CONV_WIDTH = "conv_width"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"      # routed expert hidden
LATENT = "latent"              # LatentMoE width
NORM = "norm"                  # 1-D norm scales and small vectors (replicated)

# --- Activation axes ---
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Each layout: (logical name, mesh axis or tuple of mesh axes or None). Unlisted names are replicated.
AXIS_RULES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    "data_parallel": (
        (ACT_BATCH, ("data", "fsdp", "expert")),
    ),
    "fsdp": (
        (ACT_BATCH, ("data", "fsdp", "expert")),
        (EMBED, "fsdp"),
    ),
    "fsdp_ep": (
        (ACT_BATCH, ("data", "fsdp", "expert")),
        (EMBED, "fsdp"),
        (EXPERT, "expert"),
    ),
    "fsdp_tp_ep": (
        (ACT_BATCH, ("data", "fsdp", "expert")),
        (EMBED, "fsdp"),
        (EXPERT, "expert"),
        (VOCAB, "tensor"), (MLP, "tensor"), (EXPERT_MLP, "tensor"), (HEADS, "tensor"), (KV_HEADS, "tensor"),
        (SSM_HEADS, "tensor"), (SSM_GROUPS, "tensor"), (ACT_HEADS, "tensor"), (ACT_VOCAB, "tensor"),
    ),
}


def logical_to_mesh(logical_axes, rules_name: str):
  """Maps a pytree of logical `PartitionSpec`s to mesh `PartitionSpec`s under a named layout."""
  if rules_name not in AXIS_RULES:
    raise ValueError(f"Unknown axis rules {rules_name!r}; known: {sorted(AXIS_RULES)}")
  return nn.logical_to_mesh(logical_axes, AXIS_RULES[rules_name])


def with_logical_constraint(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding hint; a no-op outside a mesh + rules context."""
  return nn.with_logical_constraint(x, axes)
