"""Routed-expert (MoE) dispatch: `moe_dispatch` with pluggable backends, the Pallas grouped matmul
(`pallas_kernels.moe.gmm.gmm` / `tgmm`: Triton on GPU, Mosaic on TPU via `gmm_tpu`; `gmm_mgpu`: Mosaic GPU
on Hopper), and expert parallelism over a mesh. `BlockSizes` tiles the Triton kernels, `TpuBlockSizes` the
Mosaic TPU ones, `MgpuBlockSizes` the Mosaic GPU ones. For a few rows (decoding), `gathered_dispatch` runs each
(token, slot) row through its expert's weights read by id, no sort (`GatheredBlockSizes`: Triton,
`GatheredTpuBlockSizes`: Mosaic TPU)."""

from pallas_kernels._vma import match_vma
from pallas_kernels.moe.expert_parallel import expert_parallel_moe
from pallas_kernels.moe.gathered import BlockSizes as GatheredBlockSizes
from pallas_kernels.moe.gathered import TpuBlockSizes as GatheredTpuBlockSizes
from pallas_kernels.moe.gathered import gathered_dispatch, gathered_expert_mlp
from pallas_kernels.moe.gmm import BlockSizes, TileSizes
from pallas_kernels.moe.gmm_mgpu import BlockSizes as MgpuBlockSizes
from pallas_kernels.moe.gmm_mgpu import TileSizes as MgpuTileSizes
from pallas_kernels.moe.gmm_tpu import BlockSizes as TpuBlockSizes
from pallas_kernels.moe.gmm_tpu import TileSizes as TpuTileSizes
from pallas_kernels.moe.ops import BACKENDS, GROUPED_MATMULS, moe_dispatch, resolve_backend
from pallas_kernels.moe.reference import ACTIVATIONS, moe_dispatch_dense, moe_dispatch_ragged_dot

__all__ = ["ACTIVATIONS", "BACKENDS", "BlockSizes", "GROUPED_MATMULS", "GatheredBlockSizes",
           "GatheredTpuBlockSizes", "MgpuBlockSizes", "MgpuTileSizes", "TileSizes", "TpuBlockSizes", "TpuTileSizes",
           "expert_parallel_moe", "gathered_dispatch", "gathered_expert_mlp", "match_vma",
           "moe_dispatch", "moe_dispatch_dense", "moe_dispatch_ragged_dot", "resolve_backend"]
