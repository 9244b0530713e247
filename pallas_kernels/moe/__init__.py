"""Routed-expert (MoE) dispatch: ``moe_dispatch`` with pluggable backends."""

from pallas_kernels.moe.ops import BACKENDS
from pallas_kernels.moe.ops import moe_dispatch
from pallas_kernels.moe.reference import ACTIVATIONS
from pallas_kernels.moe.reference import moe_dispatch_dense
from pallas_kernels.moe.reference import moe_dispatch_ragged_dot
