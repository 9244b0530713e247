"""`ssd(...)`: the chunked Mamba-2 SSD scan on Pallas kernels, with its VJP.

A drop-in for `reference.ssd_reference` (same signature and semantics, see
that module's docstring for `doc_ids` / `initial_state`) plus `block_sizes`,
`backend` and `interpret`. Backends:

  "triton"      Pallas Triton kernels for NVIDIA GPUs (ops_triton.py +
                kernel.py); `BlockSizes` is its tiling.
  "mosaic_gpu"  Pallas Mosaic GPU kernels for Hopper (ops_mgpu.py +
                kernel_mgpu.py): wgmma on TMA-staged tiles, bf16 / f16
                inputs, chunk a multiple of 64; `MgpuBlockSizes`. Not yet
                picked by "auto" (no GPU has run it).
  "mosaic_tpu"  Pallas Mosaic TPU kernels (ops_tpu.py + kernel_tpu.py): one
                fused kernel per direction that walks the chunks sequentially
                with the state in VMEM; `TpuBlockSizes` is its tiling.
  "reference"   the jnp `reference.ssd_reference`.
  "auto"        by the target platform: the abstract mesh's device when one
                is set (`jax.sharding.use_abstract_mesh`, e.g. for AOT
                lowering on a CPU host), else `jax.default_backend()`.

What is verified, all on CPU hosts (`ops_test.py`): both kernel sets match
the reference, outputs and all gradients, in Pallas interpret mode; both lower
for their hardware (Triton IR for an abstract H100, Mosaic for an abstract TPU
v5e, at the Nemotron 3 Nano mixer shape), which checks block shapes and ops
against the lowering rules; and, where libtpu is installed (no TPU needed),
the Mosaic kernels compile ahead of time with libtpu's Mosaic compiler (done
with libtpu 0.0.50 for TPU v4, v5e, v5p and v6e, P = 64 padded and not). What
is owed: running the Mosaic kernels on a real TPU (numerics of the compiled
kernels, speed), running the Triton kernels on a GPU, and tuning of
`BlockSizes` / `TpuBlockSizes` (their tables are placeholders).

Each backend module's docstring has its pipeline (jnp prologue, Pallas
calls, backward). The Triton path is `ops_triton.ssd_triton`, the Mosaic
TPU one `ops_tpu.ssd_mosaic_tpu`.
"""

from typing import Any, Optional

import jax
from jax.experimental.pallas import mosaic_gpu as plmgpu

from pallas_kernels import _target
from pallas_kernels.ssd import ops_mgpu
from pallas_kernels.ssd import ops_tpu
from pallas_kernels.ssd import ops_triton
from pallas_kernels.ssd import reference

BlockSizes = ops_triton.BlockSizes
TpuBlockSizes = ops_tpu.TpuBlockSizes
MgpuBlockSizes = ops_mgpu.MgpuBlockSizes

_BACKENDS = ("auto", "triton", "mosaic_gpu", "mosaic_tpu", "reference")
_BLOCK_SIZES = {"triton": BlockSizes, "mosaic_gpu": MgpuBlockSizes, "mosaic_tpu": TpuBlockSizes}
_ENTRIES = {"triton": ops_triton.ssd_triton, "mosaic_gpu": ops_mgpu.ssd_mgpu,
            "mosaic_tpu": ops_tpu.ssd_mosaic_tpu}


def _resolve_backend(backend: str, interpret, chunk_size: int, dtype=None) -> str:
  """The backend to run; the target platform is `_target.platform()`."""
  if backend not in _BACKENDS:
    raise ValueError(f"Unknown {backend=}; expected one of {_BACKENDS}")
  platform = _target.platform()
  tpu_interpreter = isinstance(interpret, ops_tpu.InterpretParams)
  # The Mosaic GPU interpreter's options run only the Mosaic GPU kernels; given to the Triton or TPU ones
  # they failed an assertion deep inside Pallas. "auto" never picks "mosaic_gpu" (module docstring).
  if isinstance(interpret, plmgpu.InterpretGPUParams) and backend != "mosaic_gpu":
    raise ValueError(f"interpret={interpret!r} (Mosaic GPU interpreter options) takes backend='mosaic_gpu', "
                     f"got {backend=}")
  triton_problem = ops_triton.check_chunk_size(chunk_size)
  tpu_problem = ops_tpu.check_chunk_size(chunk_size, bool(interpret))
  if backend == "auto":
    if platform == "tpu" or tpu_interpreter:
      return "reference" if tpu_problem else "mosaic_tpu"
    if platform == "gpu" or interpret:
      return "reference" if triton_problem else "triton"
    return "reference"  # CPU
  if backend == "triton":
    if triton_problem:
      raise ValueError(triton_problem)
    if tpu_interpreter:
      raise ValueError(
          "backend='triton' takes interpret=True/False, not TPU "
          f"{interpret=}"
      )
    if not interpret and platform != "gpu":
      raise ValueError(
          "backend='triton' compiles for a GPU, but the target platform is "
          f"{platform!r}; pass interpret=True to run it on CPU, or lower "
          "under jax.sharding.use_abstract_mesh with a GPU AbstractDevice"
      )
  if backend == "mosaic_gpu":
    problem = ops_mgpu.check_chunk_size(chunk_size) or (dtype is not None and ops_mgpu.check_dtype(dtype))
    if problem:
      raise ValueError(problem)
    if tpu_interpreter:
      raise ValueError(f"backend='mosaic_gpu' takes interpret=True/False or plgpu.InterpretGPUParams, "
                       f"not TPU {interpret=}")
    if not interpret and platform != "gpu":
      raise ValueError(
          "backend='mosaic_gpu' compiles for a GPU, but the target platform is "
          f"{platform!r}; pass interpret=True to run it on CPU, or lower "
          "under jax.sharding.use_abstract_mesh with a GPU AbstractDevice"
      )
  if backend == "mosaic_tpu":
    if tpu_problem:
      raise ValueError(tpu_problem)
    if not interpret and platform != "tpu":
      raise ValueError(
          "backend='mosaic_tpu' compiles for a TPU, but the target platform "
          f"is {platform!r}; pass interpret=True to run it on CPU, or lower "
          "under jax.sharding.use_abstract_mesh with a TPU AbstractDevice"
      )
  return backend


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    *,
    initial_state: Optional[jax.Array] = None,
    doc_ids: Optional[jax.Array] = None,
    chunk_size: int = 128,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    block_sizes: Optional[BlockSizes | MgpuBlockSizes | TpuBlockSizes] = None,
    backend: str = "auto",
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
  """Chunked SSD scan; see `reference.ssd_reference` for the math and args.

  Differentiable in x, dt, A, B, C, D, dt_bias and initial_state through a
  `jax.custom_vjp` whose forward and backward are Pallas kernels (module
  docstring). Any T (padded to the chunk internally), any P and Q (padded to
  powers of 2 >= 16 for the Triton tiles, to `TpuBlockSizes.pad_multiple` on
  TPU).

  Args:
    x, dt, A, B, C, D, dt_bias, initial_state, doc_ids, chunk_size,
      dt_softplus, dt_min, dt_max: as in `reference.ssd_reference`.
    block_sizes: Kernel tiling: `BlockSizes` for "triton", `MgpuBlockSizes`
      for "mosaic_gpu", `TpuBlockSizes` for "mosaic_tpu"; default
      `.for_device()` of the one in use.
    backend: "triton" (Pallas Triton kernels; chunk_size a power of 2 >= 16),
      "mosaic_gpu" (Pallas Mosaic GPU kernels for Hopper; bf16 / f16 x,
      chunk_size a multiple of 64),
      "mosaic_tpu" (Pallas Mosaic TPU kernels; chunk_size a multiple of 128,
      of 8 in interpret mode), "reference" (the jnp `ssd_reference`), or
      "auto": "mosaic_tpu" when the target platform is TPU (or `interpret`
      is a `pltpu.InterpretParams`), "triton" when it is GPU or `interpret`
      is True, else "reference"; "auto" also uses "reference" for chunk
      sizes the chosen kernels do not support, which they reject. The target
      platform is the abstract mesh's device if set
      (`jax.sharding.use_abstract_mesh`; lowering for a GPU or TPU from a CPU
      host), else `jax.default_backend()`; "triton" / "mosaic_tpu" without
      `interpret` need it to be GPU / TPU.
    interpret: Run the Pallas kernels in interpret mode on CPU: True (the
      generic Pallas interpreter, both kernel sets), or a
      `jax.experimental.pallas.tpu.InterpretParams` (the TPU simulator:
      NaN-filled uninitialized VMEM, bounds checks; "mosaic_tpu" only), or
      a `plgpu.InterpretGPUParams` (Mosaic GPU interpreter options, e.g.
      race detection; "mosaic_gpu" only).

  Returns:
    y: [B, T, M, P] in x.dtype.
    final_state: [B, M, P, Q] float32.
  """
  reference._check_ssd_inputs(  # pylint: disable=protected-access
      x, dt, A, B, C, D, dt_bias, initial_state, doc_ids
  )
  reference._check_chunk_size(chunk_size)  # pylint: disable=protected-access
  kw = dict(
      initial_state=initial_state,
      doc_ids=doc_ids,
      chunk_size=chunk_size,
      dt_softplus=dt_softplus,
      dt_min=dt_min,
      dt_max=dt_max,
  )
  backend = _resolve_backend(backend, interpret, chunk_size, x.dtype)
  if backend == "reference":
    return reference.ssd_reference(x, dt, A, B, C, D, dt_bias, **kw)
  sizes_type = _BLOCK_SIZES[backend]
  if block_sizes is not None and not isinstance(block_sizes, sizes_type):
    raise TypeError(
        f"backend={backend!r} takes block_sizes of type {sizes_type.__name__},"
        f" got {block_sizes!r}"
    )
  block_sizes = block_sizes or sizes_type.for_device()
  return _ENTRIES[backend](
      x, dt, A, B, C, D, dt_bias, **kw, block_sizes=block_sizes,
      interpret=interpret,
  )
