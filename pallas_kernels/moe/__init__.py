"""Routed-expert (MoE) dispatch: `moe_dispatch` with pluggable backends, the Pallas grouped matmul
(`pallas_kernels.moe.gmm.gmm` / `tgmm`), and expert parallelism over a mesh."""

from pallas_kernels.moe.expert_parallel import expert_parallel_moe
from pallas_kernels.moe.gmm import BlockSizes, TileSizes
from pallas_kernels.moe.ops import BACKENDS, GROUPED_MATMULS, moe_dispatch
from pallas_kernels.moe.reference import ACTIVATIONS, moe_dispatch_dense, moe_dispatch_ragged_dot

__all__ = ["ACTIVATIONS", "BACKENDS", "BlockSizes", "GROUPED_MATMULS", "TileSizes", "expert_parallel_moe",
           "moe_dispatch", "moe_dispatch_dense", "moe_dispatch_ragged_dot"]
