"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this imports as `_timing`)."""

import statistics
import time
from typing import Callable

import jax


def median_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
  """Median wall time of `fn()` in ms over `iters` calls after `warmup` calls, each waited to completion."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def torch_median_ms(torch, fn: Callable[[], object], iters: int, warmup: int) -> float:
  """Median CUDA-event time of `fn()` in ms over `iters` calls after `warmup` calls (as the anchor scripts)."""
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)
