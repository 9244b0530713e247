"""Benchmark shapes shared by the scripts of benchmarks/ (which define absl flags, so they do not import
each other)."""

import dataclasses

# SSD mixer (benchmarks/ssd.py) -- name: (batch, seq, heads M, head_dim P, state Q, groups J)
SSD = {
    "anchor1_nano_b2": (2, 8192, 64, 64, 128, 8),  # = Nemotron 3 Nano, batch 2
    "anchor2": (1, 65536, 64, 64, 128, 8),
    "anchor3": (8, 4096, 128, 64, 128, 8),
    "nano_b1": (1, 8192, 64, 64, 128, 8),
    "super_b1": (1, 8192, 128, 64, 128, 8),
    "super_b2": (2, 8192, 128, 64, 128, 8),
}
SSD_TINY = {"tiny": (1, 128, 4, 16, 16, 2)}


@dataclasses.dataclass(frozen=True)
class GmmShape:
  num_groups: int  # E
  rows: int  # M = tokens x top-k
  k: int
  n: int


@dataclasses.dataclass(frozen=True)
class LayerShape:
  num_tokens: int  # T
  num_experts: int  # E
  top_k: int  # R
  d_in: int  # D (LatentMoE: the latent width)
  d_hidden: int  # F


# Grouped matmul and MoE layer (benchmarks/moe.py)
_NANO = LayerShape(num_tokens=16384, num_experts=128, top_k=6, d_in=2688, d_hidden=1856)
_SUPER = LayerShape(num_tokens=16384, num_experts=512, top_k=22, d_in=1024, d_hidden=2688)
GMM = {
    "anchor_nano_up": GmmShape(128, 16384 * 6, 2688, 1856),  # = ANCHORS.md
    "nano_down": GmmShape(128, 16384 * 6, 1856, 2688),
    "super_up": GmmShape(512, 16384 * 22, 1024, 2688),
    "super_down": GmmShape(512, 16384 * 22, 2688, 1024),
}
LAYER = {"nano_layer": _NANO, "super_layer": _SUPER}
GMM_TINY = {"tiny_gmm": GmmShape(8, 100, 48, 40)}
LAYER_TINY = {"tiny_layer": LayerShape(num_tokens=64, num_experts=8, top_k=2, d_in=32, d_hidden=48)}

# Causal GQA attention (benchmarks/attention.py) -- name: (batch, seq, query heads N, kv heads K, head dim H)
ATTENTION = {
    "nano3_b2_4k": (2, 4096, 32, 2, 128),    # Nemotron 3 Nano / Super attention, the train_step.py batch
    "nano3_b1_8k": (1, 8192, 32, 2, 128),
    "super_b1_32k": (1, 32768, 32, 2, 128),  # long context
    "h8b_b1_8k": (1, 8192, 32, 8, 128),      # Nemotron-H 8B
}
ATTENTION_TINY = {"tiny": (1, 64, 4, 2, 16)}
