"""Ahead-of-time compilation for accelerators this host does not have ("deviceless" AOT).

XLA compiles for a GPU or a TPU without one when it is told what the target is. The executable cannot
run here, but it is the real one: XLA's whole pipeline for that chip (fusion, buffer assignment, the
Pallas Triton / Mosaic kernels compiled), with its memory analysis and optimized HLO. Use it to check
that a training step fits before asking for hardware, or that kernels compile for a chip you lack:

    import jax
    from n3jax import aot, sharding
    mesh = sharding.make_mesh({"fsdp": 8}, devices=aot.devices("h100", 8))
    compiled = jax.jit(step).trace(*args_sharded_over_mesh).lower().compile(aot.compiler_options("h100"))
    print(aot.memory(compiled))

Targets:
  "h100"          NVIDIA H100 SXM 80 GB. Needs the CUDA PJRT plugin (`pip install 'n3jax[aot-gpu]'`) and, on
                  a host without a GPU, `JAX_PLATFORMS=cpu` set before JAX starts (the plugin then registers
                  without probing for a GPU). The chip's description is XLA's own (`_targets/h100_sxm.txtpb`).
  "tpu:<topology>"  a TPU slice as libtpu names it, e.g. "tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v6e:2x2". Needs
                  libtpu at the version that matches jax (`pip install 'n3jax[aot-tpu]'`); the Mosaic TPU
                  compiler then compiles the Pallas TPU kernels (VMEM budget included).

Pass `compiler_options(target)` to `.compile(...)`: XLA's CUB radix sort (argsort, as in MoE routing)
needs a live GPU while compiling, so without one sorts compile to XLA's own sort kernel instead; and
XLA's Triton collective kernels (the one-shot all-reduce, jax 0.12) abort the process with an LLVM error
when compiled for 64 devices (a psum of f32[128] over 64 compile-only H100s does it), so collectives take
the NCCL path. Both barely change the memory analysis.

Mosaic GPU kernels (`pallas_kernels`' `*_mgpu` paths) are compiled to SASS by ptxas inside XLA's compile,
so `mosaic_gpu_kernels(compile)` reads ptxas's report of each one: registers per thread, bytes spilled to
local memory, and the shared memory Mosaic GPU allocates. A spill or a register count that caps occupancy
shows here, before any GPU is lent (`benchmarks/kernel_resources.py`).

What it does not give: speed. XLA does not autotune without a device (GEMMs keep its default choice,
Triton kernels their given block sizes), and nothing runs; timings need the chip (`benchmarks/`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax

__all__ = ["GPU_TARGETS", "KernelStats", "MemoryStats", "compiler_options", "devices", "matvec_reductions", "memory",
           "mosaic_gpu_kernels", "weight_concatenations"]

_TARGET_DIR = pathlib.Path(__file__).parent / "_targets"
GPU_TARGETS = {"h100": "h100_sxm.txtpb"}  # name -> XLA GpuTargetConfigProto (text) in _targets/


def devices(target: str, count: int, *, hosts: int = 1) -> list:
  """`count` compile-only devices of `target` ("h100" or "tpu:<topology>"), split over `hosts` processes.

  They go into `jax.sharding.Mesh` / `sharding.make_mesh(..., devices=)` like real devices; arrays cannot
  live on them, so a program is traced with `jax.ShapeDtypeStruct`s sharded over that mesh.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  if target.startswith("tpu:"):
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to probe: one local host
    try:
      topo = topologies.get_topology_desc(target[len("tpu:"):], platform="tpu")
    except Exception as e:  # no libtpu: RuntimeError / JaxRuntimeError, depending on the state
      if "topology" in str(e).lower() and "invalid" in str(e).lower():
        raise ValueError(f"AOT target {target!r}: {e}") from e
      if importlib.util.find_spec("libtpu") is not None:  # installed, but it did not start
        raise RuntimeError(f"libtpu did not start for {target!r} (another process holding it can share it with "
                           f"ALLOW_MULTIPLE_LIBTPU_LOAD=1): {type(e).__name__}: {e}") from e
      raise RuntimeError(
          f"Compiling for {target!r} without the chip needs libtpu at jax's version (pip install "
          f"'n3jax[aot-tpu]'); got {type(e).__name__}: {e}") from e
    if len(topo.devices) != count:
      raise ValueError(f"TPU topology {target!r} has {len(topo.devices)} devices, not {count}")
    return list(topo.devices)
  if target not in GPU_TARGETS:
    raise ValueError(f"Unknown AOT target {target!r}; known: {sorted(GPU_TARGETS)} or 'tpu:<topology>'")
  if count < 1 or hosts < 1 or count % hosts:
    raise ValueError(f"{count=} devices must split evenly over {hosts=}")
  config = (_TARGET_DIR / GPU_TARGETS[target]).read_text()
  try:
    topo = topologies.get_topology_desc("", platform="cuda", target_config=config,
                                        topology=f"1x{hosts}x{count // hosts}")
  except Exception as e:  # no plugin: KeyError / NotImplementedError / JaxRuntimeError, depending on the state
    raise RuntimeError(
        f"Compiling for {target!r} without the chip needs the CUDA PJRT plugin (pip install 'n3jax[aot-gpu]') "
        f"and, on a host without a GPU, JAX_PLATFORMS=cpu set before JAX starts; got {type(e).__name__}: {e}"
    ) from e
  return list(topo.devices)


def compiler_options(target: str) -> dict[str, object]:
  """XLA options that compiling for `target` without the chip needs (see the module docstring)."""
  if target not in GPU_TARGETS:
    return {}
  return {"xla_gpu_enable_cub_radix_sort": False, "xla_gpu_experimental_use_collective_kernels": ""}


@dataclasses.dataclass(frozen=True)
class MemoryStats:
  """Per-device bytes of a compiled program (XLA's buffer assignment), in GB (1e9 bytes)."""
  arguments_gb: float
  outputs_gb: float
  aliased_gb: float  # outputs that reuse a donated argument's buffer
  temp_gb: float     # everything live only inside the program (activations, gradients, workspaces)

  @property
  def peak_gb(self) -> float:
    """Arguments + outputs not aliased to them + temporaries: what the device must hold at once."""
    return self.arguments_gb + self.outputs_gb - self.aliased_gb + self.temp_gb

  def report(self) -> str:
    return (f"arguments {self.arguments_gb:.2f} GB + outputs {self.outputs_gb:.2f} GB - donated "
            f"{self.aliased_gb:.2f} GB + temporaries {self.temp_gb:.2f} GB = {self.peak_gb:.2f} GB")


def memory(compiled: jax.stages.Compiled) -> MemoryStats:
  """XLA's per-device memory analysis of `compiled`."""
  m = compiled.memory_analysis()
  gb = 1e9
  return MemoryStats(m.argument_size_in_bytes / gb, m.output_size_in_bytes / gb, m.alias_size_in_bytes / gb,
                     m.temp_size_in_bytes / gb)


def _entry(compiled: jax.stages.Compiled) -> str:
  """The text of `compiled`'s ENTRY computation (what runs at the top level: its kernels and copies)."""
  text = compiled.as_text()
  entry = text[text.index("\nENTRY"):]
  return entry[:entry.index("\n}\n")]


def kernels(compiled: jax.stages.Compiled) -> int:
  """Kernels `compiled` launches at the top level: fusions, custom calls (library GEMMs, Pallas kernels) and
  copies of ENTRY (on a GPU, nodes of its command buffer; loops would run theirs many times)."""
  return len(re.findall(r"= [^=]*? (?:fusion|custom-call|copy|copy-start|fusion-start)\(", _entry(compiled)))


def matvec_reductions(compiled: jax.stages.Compiled) -> int:
  """Products of the model that XLA's GPU compiler made an elementwise multiply and a reduction: it does so
  for a product with one row and (rows + columns) x depth < 1e7 (see `nn._common.one_row_as_two`). Counts the
  multiplies named after one of the model's einsums (upper-case specs; the SSM recurrence's own lower-case
  products are meant as such)."""
  return len(set(re.findall(r"%(multiply[\w.]*) = [^\n]*? multiply\([^\n]*op_name=\"[^\"]*/[A-Z,]+->[A-Z]+"
                            r"/dot_general\"", compiled.as_text())))


def weight_concatenations(compiled: jax.stages.Compiled, min_elements: int = 1 << 20) -> int:
  """Kernels of `compiled` that write a concatenation of weights each call (XLA's dot merger joining products
  that share an operand, where the joined weights do not tile): concatenate fusions of params with at least
  `min_elements` outputs (XLA names a jitted function's arguments after their paths: `params__...`)."""
  found = re.findall(r"%[\w.]*concatenate_fusion[\w.]* = \w+\[([\d,]+)\][^ ]* fusion\(([^)]*)\)", _entry(compiled))
  return sum(math.prod(int(d) for d in shape.split(",")) >= min_elements
             and all(a.strip().startswith("%params") for a in args.split(",")) for shape, args in found)


@dataclasses.dataclass(frozen=True)
class KernelStats:
  """ptxas's report of one compiled Mosaic GPU kernel (the largest over its compilations, if several)."""
  name: str
  compilations: int        # how many kernels of this name the program compiled
  registers: int           # per thread (255 at most)
  spill_store_bytes: int   # registers spilled to local memory, per thread
  spill_load_bytes: int
  smem_bytes: int          # dynamic shared memory Mosaic GPU allocates (its scratch: tiles, barriers)
  threads: int             # per program (128 per warpgroup)

  @property
  def programs_per_sm(self) -> int:
    """Programs an H100 SM holds at once (occupancy), by its limits: 228 KB of shared memory (1 KB of it
    reserved per program), 64K registers allocated per warp in units of 256, 64 warps, 32 programs."""
    warps = -(-self.threads // 32)
    by_smem = _H100_SMEM_PER_SM // (self.smem_bytes + _H100_SMEM_RESERVED)
    regs_per_warp = -(-self.registers * 32 // 256) * 256
    by_regs = (_H100_REGS_PER_SM // regs_per_warp) // warps
    return min(by_smem, by_regs, _H100_WARPS_PER_SM // warps, 32)

  def report(self) -> str:
    spills = (f"spills {self.spill_store_bytes} B stored / {self.spill_load_bytes} B loaded"
              if self.spill_store_bytes or self.spill_load_bytes else "no spills")
    return (f"{self.name:<28} x{self.compilations}  {self.threads:3d} threads  {self.registers:3d} registers  "
            f"{spills:<34}  smem {self.smem_bytes / 1024:6.1f} KiB  {self.programs_per_sm} per SM")


_H100_SMEM_PER_SM, _H100_SMEM_RESERVED = 228 * 1024, 1024
_H100_REGS_PER_SM, _H100_WARPS_PER_SM = 65536, 64


_DUMP_ENV = ("MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS", "MOSAIC_GPU_DUMP_RESOURCES", "MOSAIC_GPU_DUMP_TO")


@contextlib.contextmanager
def _mosaic_gpu_dumps(path: str) -> Iterator[None]:
  """Mosaic GPU writes ptxas's report and its resource use of every kernel it compiles under `path`; the
  persistent compilation cache is off, so that every kernel is compiled (and reported) here."""
  saved = {k: os.environ.get(k) for k in _DUMP_ENV}
  cache = jax.config.jax_enable_compilation_cache
  os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1",
                    MOSAIC_GPU_DUMP_TO=path)
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _dump_name(path: pathlib.Path, suffix: str) -> str:
  """`ssd_chunk_state_3.ptxas` -> `ssd_chunk_state` (Mosaic GPU numbers each kernel it dumps)."""
  return re.sub(r"_\d+$", "", path.name.removesuffix(suffix))


def _ptxas_figures(text: str) -> tuple[int, int, int]:
  def figure(pattern):
    m = re.search(pattern, text)
    if m is None:
      raise RuntimeError(f"ptxas's report has no {pattern!r}:\n{text}")
    return int(m.group(1))
  return (figure(r"Used (\d+) registers"), figure(r"(\d+) bytes spill stores"),
          figure(r"(\d+) bytes spill loads"))


def mosaic_gpu_kernels(compile_fn: Callable[[], Any]) -> list[KernelStats]:
  """Runs `compile_fn` (which compiles a program for a GPU, e.g. for compile-only H100s from `devices`) and
  returns ptxas's statistics of every Mosaic GPU kernel it compiled, by kernel name.

  A program compiled earlier in this process may come from JAX's in-memory caches, with no kernel compiled
  again: call this on a program first. Raises if no Mosaic GPU kernel was compiled.
  """
  with tempfile.TemporaryDirectory(prefix="n3jax_mgpu_") as tmp, _mosaic_gpu_dumps(tmp):
    compile_fn()
    dump = pathlib.Path(tmp)
    ptxas = collections.defaultdict(list)
    for f in sorted(dump.glob("*.ptxas")):
      ptx = f.with_suffix(".ptx").read_text(errors="replace")
      threads = re.search(r"\.maxntid (\d+), (\d+), (\d+)", ptx)
      if threads is None:
        raise RuntimeError(f"{f.with_suffix('.ptx').name} declares no .maxntid")
      ptxas[_dump_name(f, ".ptxas")].append(
          (*_ptxas_figures(f.read_text(errors="replace")), math.prod(int(n) for n in threads.groups())))
    smem = collections.defaultdict(int)
    for f in dump.glob("*.resources.txt"):
      m = re.search(r"smem_scratch_bytes=(\d+)", f.read_text())
      if m:
        name = _dump_name(f, ".resources.txt")
        smem[name] = max(smem[name], int(m.group(1)))
  if not ptxas:
    raise RuntimeError("No Mosaic GPU kernel was compiled: compile for a GPU target (aot.devices('h100', n)) "
                       "a program that calls one, not one JAX has compiled before in this process")
  return [KernelStats(name, len(runs), *(max(r[i] for r in runs) for i in range(3)), smem[name],
                      max(r[3] for r in runs)) for name, runs in ptxas.items()]
