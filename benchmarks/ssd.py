"""GPU benchmark of the Pallas SSD kernels vs the jnp reference and mamba_ssm.

Ours: the Triton kernels (`backend="triton"`) and, on Hopper, the Mosaic GPU
kernels (`backend="mosaic_gpu"`: wgmma + TMA), each timed in the same run.

For the shapes of ../shared/bench/ANCHORS.md plus the Nemotron 3 Nano / Super
mixer shapes at 8k tokens, prints one JSON line per measurement (median over
warm calls, ms) and a table with the ratios. Inputs follow the anchor scripts:
bf16 x/B/C, fp32 dt/A/D/dt_bias, chunk 128, dt softplus + bias, D skip;
forward+backward = y.float().sum() and its gradients w.r.t. x, dt, B, C.

  python benchmarks/ssd.py --mamba_path=/path/to/state-spaces/mamba
  python benchmarks/ssd.py --tiny --interpret   # CPU smoke run, numbers meaningless

--mamba_path is a checkout of state-spaces/mamba whose mamba_ssm/__init__.py
was emptied (so that no compiled extension is imported; ANCHORS.md); it needs
torch with CUDA and triton. Without it the mamba_ssm column is skipped.
Absolute times drift between machines: compare ratios from one run.
"""

import json
import os
import sys
from typing import Callable, Optional

import _shapes
import _timing
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pallas_kernels.ssd import ops
from pallas_kernels.ssd import reference

_TINY = flags.DEFINE_bool("tiny", False, "One tiny shape (chunk 64) only.")
_INTERPRET = flags.DEFINE_bool(
    "interpret", False, "Run our kernels in Pallas interpret mode (CPU)."
)
_MAMBA_PATH = flags.DEFINE_string(
    "mamba_path", None, "state-spaces/mamba sources (empty mamba_ssm/__init__)."
)
_SHAPES = flags.DEFINE_list(
    "shapes", None, "Subset of shape names to run (default: all)."
)
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first.")
_BACKENDS = flags.DEFINE_list(
    "backends", None,
    "Our backends to time (default: triton, plus mosaic_gpu on Hopper).",
)
_SKIP_REFERENCE = flags.DEFINE_bool(
    "skip_reference", False, "Do not time the jnp reference."
)

SHAPES, TINY_SHAPES = _shapes.SSD, _shapes.SSD_TINY
_CHUNK, _TINY_CHUNK = 128, 64


def _emit(**kw):
  print(json.dumps(kw), flush=True)


_median_ms = _timing.median_ms


def _jax_inputs(shape):
  """Anchor distributions (anchor_jax.py / anchor_torch.py)."""
  bsz, seqlen, nheads, headdim, dstate, ngroups = shape
  ks = jax.random.split(jax.random.key(0), 7)
  return dict(
      x=jax.random.normal(ks[0], (bsz, seqlen, nheads, headdim), jnp.bfloat16),
      dt=jax.random.normal(ks[1], (bsz, seqlen, nheads)) * 0.5 - 2.0,
      A=-jax.random.uniform(ks[2], (nheads,)) * 4.0 - 0.5,
      B=jax.random.normal(ks[3], (bsz, seqlen, ngroups, dstate), jnp.bfloat16),
      C=jax.random.normal(ks[4], (bsz, seqlen, ngroups, dstate), jnp.bfloat16),
      D=jax.random.normal(ks[5], (nheads,)),
      dt_bias=jax.random.normal(ks[6], (nheads,)) * 0.1,
  )


def _time_jax(ssd_fn, inputs, chunk) -> dict[str, float]:
  """fwd and fwd+bwd (grads of x, dt, B, C) medians in ms."""
  fixed = {k: inputs[k] for k in ("A", "D", "dt_bias")}

  def y_of(x, dt, b, c):
    return ssd_fn(x, dt, B=b, C=c, chunk_size=chunk, **fixed)[0]

  fwd = jax.jit(y_of)
  # value_and_grad, not grad: with grad alone XLA drops the forward output
  # kernels, unlike a training step where y feeds the next layer.
  fwd_bwd = jax.jit(
      jax.value_and_grad(
          lambda *a: y_of(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3)
      )
  )
  args = tuple(inputs[k] for k in ("x", "dt", "B", "C"))
  iters, warmup = _ITERS.value, _WARMUP.value
  return dict(
      fwd_ms=_median_ms(lambda: fwd(*args), iters, warmup),
      fwd_bwd_ms=_median_ms(lambda: fwd_bwd(*args), max(iters // 2, 1), warmup),
  )


def _load_mamba() -> Optional[Callable]:
  path = _MAMBA_PATH.value
  if not path:
    print("mamba_ssm: skipped (no --mamba_path)", flush=True)
    return None
  if not os.path.isfile(os.path.join(path, "mamba_ssm", "__init__.py")):
    print(f"mamba_ssm: skipped ({path}/mamba_ssm/__init__.py not found)")
    return None
  sys.path.insert(0, path)
  try:
    import torch  # pylint: disable=g-import-not-at-top

    if not torch.cuda.is_available():
      print("mamba_ssm: skipped (torch sees no CUDA device)", flush=True)
      return None
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"mamba_ssm: skipped ({e!r})", flush=True)
    return None
  return mamba_chunk_scan_combined


def _time_mamba(scan, shape, chunk) -> dict[str, float]:
  """As anchor_torch.py: CUDA-event medians in ms."""
  import torch  # pylint: disable=g-import-not-at-top

  bench = lambda fn, iters: _timing.torch_median_ms(torch, fn, iters, _WARMUP.value)

  bsz, seqlen, nheads, headdim, dstate, ngroups = shape
  dev, bf16 = "cuda", torch.bfloat16
  torch.manual_seed(0)
  x = torch.randn(bsz, seqlen, nheads, headdim, device=dev, dtype=bf16)
  dt = torch.randn(bsz, seqlen, nheads, device=dev) * 0.5 - 2
  a = -torch.rand(nheads, device=dev) * 4 - 0.5
  b = torch.randn(bsz, seqlen, ngroups, dstate, device=dev, dtype=bf16)
  c = torch.randn(bsz, seqlen, ngroups, dstate, device=dev, dtype=bf16)
  d = torch.randn(nheads, device=dev)
  dt_bias = torch.randn(nheads, device=dev) * 0.1
  kw = dict(D=d, dt_bias=dt_bias, dt_softplus=True)
  fwd_ms = bench(lambda: scan(x, dt, a, b, c, chunk, **kw), _ITERS.value)
  leaves = [t.clone().requires_grad_(True) for t in (x, dt, b, c)]

  def fwd_bwd():
    y = scan(leaves[0], leaves[1], a, leaves[2], leaves[3], chunk, **kw)
    y.float().sum().backward()

  fwd_bwd_ms = bench(fwd_bwd, max(_ITERS.value // 2, 1))
  del x, dt, b, c, leaves
  torch.cuda.empty_cache()
  return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms)


def _measure(what, name, shape, fn) -> Optional[dict[str, float]]:
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory
    _emit(what=what, shape=name, error=repr(e)[:300])
    return None
  _emit(what=what, shape=name, dims=shape, **result)
  return result


def _ratio(num, den, key):
  if not num or not den:
    return "-"
  return f"{num[key] / den[key]:.2f}"


def main(argv):
  del argv  # Unused.
  interpret = _INTERPRET.value
  devices = [str(dev) for dev in jax.devices()]
  _emit(what="device", jax=jax.__version__, devices=devices)
  if jax.default_backend() != "gpu" and not interpret:
    print("No GPU: our kernels need --interpret here (numbers meaningless).")
  shapes, chunk = (
      (TINY_SHAPES, _TINY_CHUNK) if _TINY.value else (SHAPES, _CHUNK)
  )
  if _SHAPES.value:
    shapes = {k: v for k, v in shapes.items() if k in _SHAPES.value}
  mamba = _load_mamba()
  backends = _BACKENDS.value or _default_backends(interpret)
  ours_fn = lambda backend: (lambda *a, **kw: ops.ssd(
      *a, **kw, backend=backend, interpret=interpret
  ))
  rows = []
  for name, shape in shapes.items():
    inputs = _jax_inputs(shape)
    ours = {
        backend: _measure(
            f"ours_{backend}", name, shape,
            lambda: _time_jax(ours_fn(backend), inputs, chunk),  # pylint: disable=cell-var-from-loop
        )
        for backend in backends
    }
    ref = None
    if not _SKIP_REFERENCE.value:
      ref = _measure(
          "jnp_reference",
          name,
          shape,
          lambda: _time_jax(reference.ssd_reference, inputs, chunk),
      )
    del inputs
    theirs = None
    if mamba is not None:
      theirs = _measure(
          "mamba_ssm_triton",
          name,
          shape,
          lambda: _time_mamba(mamba, shape, chunk),
      )
    rows.append((name, shape, ours, ref, theirs))

  header = ["shape"]
  for backend in backends:
    header += [f"{backend} fwd", f"{backend} f+b"]
  header += ["ref fwd", "ref f+b", "mamba fwd", "mamba f+b"]
  for backend in backends:
    header += [f"{backend}/mamba fwd", f"{backend}/mamba f+b",
               f"{backend}/ref fwd", f"{backend}/ref f+b"]
  print("\n" + " | ".join(header))
  fmt = lambda r, k: f"{r[k]:.3f}" if r else "-"
  for name, shape, ours, ref, theirs in rows:
    cells = [f"{name} {shape}"]
    for r in (*ours.values(), ref, theirs):
      cells += [fmt(r, "fwd_ms"), fmt(r, "fwd_bwd_ms")]
    for r in ours.values():
      for den in (theirs, ref):
        cells += [_ratio(r, den, "fwd_ms"), _ratio(r, den, "fwd_bwd_ms")]
    print(" | ".join(cells))


def _default_backends(interpret: bool) -> list[str]:
  """triton everywhere; mosaic_gpu where it can run (a Hopper GPU, or interpreted)."""
  kind = jax.devices()[0].device_kind
  hopper = jax.default_backend() == "gpu" and ("H100" in kind or "H200" in kind)
  return ["triton"] + (["mosaic_gpu"] if hopper or interpret else [])


if __name__ == "__main__":
  app.run(main)
