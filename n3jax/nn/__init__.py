"""Public n3jax layers. Import from here; `_*.py` files are private."""

from n3jax.nn._attention import Attention
from n3jax.nn._layer import Layer
from n3jax.nn._mamba2 import DECODE_BACKENDS, SSD_BACKENDS, Mamba2Mixer
from n3jax.nn._mlp import MLP
from n3jax.nn._moe import MoE, route
from n3jax.nn._norms import RMSNorm, gated_group_rms_norm

__all__ = ["Attention", "DECODE_BACKENDS", "Layer", "MLP", "Mamba2Mixer", "MoE", "RMSNorm", "SSD_BACKENDS",
           "gated_group_rms_norm", "route"]
