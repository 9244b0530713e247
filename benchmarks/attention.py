"""GPU benchmark of our Pallas flash-attention kernels (Triton, Mosaic GPU) vs XLA, cuDNN and torch SDPA.

Causal GQA self-attention at the Nemotron attention shapes (head dim 128), bf16, forward and
forward+backward (value_and_grad of the f32 sum w.r.t. q, k, v), one JSON line per measurement (median
ms over warm calls, model TFLOP/s of the causal half) and a table of ratios to torch. Columns:

  triton     `pallas_kernels.attention.attention(backend="triton")`, with packed-document segment ids
  mosaic_gpu `attention(backend="mosaic_gpu")` (Hopper, wgmma + TMA), segment ids; skipped off Hopper
  mgpu_2stage the same with `MgpuBlockSizes(max_concurrent_steps=2)` (H100 default: 3): two programs per SM
  xla        the blockwise XLA backend (FlashAttention-2 as loops of einsums), segment ids
  reference  the materialised [T, T] scores (skipped where they would not fit: --max_dense_gb)
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`: no segment ids
  torch      `torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`: no
             segment ids (torch picks its flash / cuDNN / efficient backend)

  python benchmarks/attention.py                       # on a GPU
  python benchmarks/attention.py --tiny --interpret    # CPU smoke run, numbers meaningless
"""

import json

import _shapes
import _timing
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pallas_kernels.attention import ops

_TINY = flags.DEFINE_bool("tiny", False, "One tiny shape only.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run our kernels in Pallas interpret mode (CPU).")
_SHAPES = flags.DEFINE_list("shapes", None, "Subset of shape names to run (default: all).")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first.")
_MAX_DENSE_GB = flags.DEFINE_float("max_dense_gb", 20.0, "Skip the reference above this many GB of scores.")
_DOCS = flags.DEFINE_integer("docs", 4, "Packed documents per sequence (segment ids of ours).")

SHAPES, TINY_SHAPES = _shapes.ATTENTION, _shapes.ATTENTION_TINY


def _emit(**kw):
  print(json.dumps(kw), flush=True)


def _inputs(shape):
  b, t, n, kvh, h = shape
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, kvh, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, kvh, h), jnp.bfloat16)
  seg = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) * _DOCS.value // t, (b, t))
  return q, k, v, seg


def _flops(shape) -> float:
  """Model FLOPs of the forward, causal half: 2 products of 2 * T * T * H / 2 per head."""
  b, t, n, _, h = shape
  return 2 * 2 * b * n * t * t * h / 2


def _time(fn, args) -> dict[str, float]:
  fwd = jax.jit(fn)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  iters, warmup = _ITERS.value, _WARMUP.value
  return dict(fwd_ms=_timing.median_ms(lambda: fwd(*args), iters, warmup),
              fwd_bwd_ms=_timing.median_ms(lambda: fwd_bwd(*args), max(iters // 2, 1), warmup))


def _time_torch(shape) -> dict[str, float]:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  b, t, n, kvh, h = shape
  torch.manual_seed(0)
  q, k, v = (torch.randn(b, heads, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for heads in (n, kvh, kvh))
  sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
  bench = lambda fn, iters: _timing.torch_median_ms(torch, fn, iters, _WARMUP.value)
  with torch.no_grad():
    fwd_ms = bench(sdpa, _ITERS.value)
  fwd_bwd_ms = bench(lambda: sdpa().float().sum().backward(), max(_ITERS.value // 2, 1))
  return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms)


def _measure(name, shape, impl, run):
  try:
    times = run()
  except Exception as e:  # pylint: disable=broad-except
    _emit(shape=name, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}")
    return None
  flops = _flops(shape)
  _emit(shape=name, impl=impl, **{k: round(v, 4) for k, v in times.items()},
        fwd_tflops=round(flops / times["fwd_ms"] / 1e9, 1),
        fwd_bwd_tflops=round(3.5 * flops / times["fwd_bwd_ms"] / 1e9, 1))
  return times


def main(argv):
  del argv
  shapes = TINY_SHAPES if _TINY.value else SHAPES
  if _SHAPES.value:
    shapes = {k: shapes[k] for k in _SHAPES.value}
  _emit(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
  on_gpu = jax.default_backend() == "gpu"
  rows = []
  for name, shape in shapes.items():
    q, k, v, seg = _inputs(shape)
    attn = lambda backend, **kw: (lambda q, k, v: ops.attention(q, k, v, seg, backend=backend, **kw))
    runs = {
        "triton": lambda: _time(attn("triton", interpret=_INTERPRET.value), (q, k, v)),
        "xla": lambda: _time(attn("xla"), (q, k, v)),
    }
    if _INTERPRET.value or "H100" in jax.devices()[0].device_kind or "H200" in jax.devices()[0].device_kind:
      runs["mosaic_gpu"] = lambda: _time(attn("mosaic_gpu", interpret=_INTERPRET.value), (q, k, v))
      # Two pipeline stages rather than the default three: 93 / 108 KB of shared memory (forward / dq)
      # instead of 125 / 140, so an H100 SM holds two programs (benchmarks/kernel_resources.py).
      two = ops.MgpuBlockSizes(max_concurrent_steps=2)
      runs["mgpu_2stage"] = lambda: _time(attn("mosaic_gpu", interpret=_INTERPRET.value, block_sizes=two),
                                          (q, k, v))
    b, t, n = shape[:3]
    if b * n * t * t * 4 / 1e9 <= _MAX_DENSE_GB.value:
      runs["reference"] = lambda: _time(attn("reference"), (q, k, v))
    if on_gpu:
      cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      runs["cudnn"] = lambda: _time(cudnn, (q, k, v))
      runs["torch"] = lambda: _time_torch(shape)
    result = {impl: _measure(name, shape, impl, run) for impl, run in runs.items()}
    rows.append((name, result))

  print(f"\n{'shape':14s} {'impl':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd/torch':>10s} {'f+b/torch':>10s}")
  for name, result in rows:
    torch_t = result.get("torch")
    for impl, times in result.items():
      if times is None:
        continue
      ratio = lambda key: f"{times[key] / torch_t[key]:10.2f}" if torch_t else f"{'-':>10s}"
      print(f"{name:14s} {impl:10s} {times['fwd_ms']:9.3f} {times['fwd_bwd_ms']:11.3f} {ratio('fwd_ms')} "
            f"{ratio('fwd_bwd_ms')}")


if __name__ == "__main__":
  app.run(main)
