"""GPU benchmark of the Pallas grouped matmul (gmm) and the MoE layer built on it.

Grouped matmul at the ../shared/bench/ANCHORS.md shape (128 experts, 16384 tokens x top-6 = 98304 rows,
K=2688, N=1856, bf16, random routing) and the Nemotron 3 Nano / Super expert up and down shapes, for:
our kernels (``pallas_kernels.moe.gmm``: Pallas Triton; ``gmm_mgpu``: Pallas Mosaic GPU, wgmma + TMA), ``jax.lax.ragged_dot``, tokamax's ``ragged_dot`` if importable and
``torch._grouped_mm`` if torch with CUDA is importable; forward, and forward+backward (the product plus
d_lhs and d_weights: 3x the forward FLOPs; JAX side via ``value_and_grad`` of ``out.float().sum()``, so the
forward is not dead code). Then the whole routed-expert layer (sort, up gmm, squared ReLU, down gmm,
un-sort, weighted combine) with ``moe_dispatch(backend="pallas" | "pallas_mgpu" | "ragged_dot")``, and the same
layer written with ``torch._grouped_mm``. One JSON line per measurement (median over warm calls, ms), then
a markdown table.

  python benchmarks/moe.py                          # GPU, all shapes
  python benchmarks/moe.py --shapes=anchor_nano_up --sweep   # tile sweep of our kernels (tuning)
  python benchmarks/moe.py --tiny --interpret       # CPU smoke run, numbers meaningless
  python benchmarks/moe.py --decode_batches=1,8,64  # decoding: sorted dispatch vs gathered experts, vs the bound

Absolute times drift between machines: compare ratios from one run. XLA's default ragged_dot on GPU
materialises a dense intermediate and runs out of memory at fwd+bwd on the anchor shape (ANCHORS.md);
errors are reported as rows, not raised.
"""

import dataclasses
import functools
import json
from typing import Callable

import _shapes
import _timing
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.moe import gathered
from pallas_kernels.moe import gmm as gmm_lib
from pallas_kernels.moe import gmm_mgpu
from pallas_kernels.moe import ops

_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes only (CPU smoke run).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run our kernel in Pallas interpret mode (CPU).")
_SHAPES = flags.DEFINE_list("shapes", None, "Subset of shape names to run (default: all).")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also time our gmm forward over a small grid of tiles.")
_SKIP_LAYER = flags.DEFINE_bool("skip_layer", False, "Grouped matmuls only, not the MoE layer.")
_DECODE = flags.DEFINE_list("decode_batches", None, "Only the decoding comparison, at these token counts (e.g. "
                            "1,8,64): the routed experts of a few tokens through the sorted dispatch and the "
                            "gathered-expert kernels (pallas_kernels/moe/gathered.py), forward only.")
_HBM_GBPS = flags.DEFINE_float("hbm_gbps", 3350.0, "HBM bandwidth for the decoding bound (H100 SXM: 3350 GB/s).")


GmmShape, LayerShape = _shapes.GmmShape, _shapes.LayerShape
GMM_SHAPES, LAYER_SHAPES = _shapes.GMM, _shapes.LAYER
TINY_GMM_SHAPES, TINY_LAYER_SHAPES = _shapes.GMM_TINY, _shapes.LAYER_TINY
SWEEP_TILES = gmm_lib.HOPPER_CANDIDATE_TILES  # (block_m, block_n, block_k, num_warps, num_stages)
# Mosaic GPU tiles to sweep: (block_m, block_n, block_k, max_concurrent_steps, grid_block_n, num_compute_wgs).
# Shared memory: stages x (block_m + block_n x wgs) x block_k x 2 B + wgs x block_m x 64 x out bytes, <= 227 KB
# (each lowers for an H100 with an f32 output).
MGPU_SWEEP_TILES = (
    (128, 128, 64, 3, 1, 2), (128, 128, 64, 3, 4, 2), (128, 128, 64, 3, 8, 2), (128, 64, 64, 5, 1, 2),
    (128, 128, 64, 4, 1, 1), (128, 128, 64, 5, 1, 1), (128, 256, 64, 3, 1, 1), (64, 256, 64, 4, 1, 1),
    (128, 128, 64, 4, 4, 1), (256, 128, 64, 3, 1, 1),
)

_ROWS: list[dict] = []


def _emit(**kw):
  _ROWS.append(kw)
  print(json.dumps(kw), flush=True)


_median_ms = _timing.median_ms


def _torch_cuda():
  """torch if it is importable with CUDA and has _grouped_mm, else None (and why)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"torch not importable: {e}"
  if not torch.cuda.is_available():
    return None, "torch has no CUDA device"
  if not hasattr(torch, "_grouped_mm"):
    return None, f"torch {torch.__version__} has no _grouped_mm"
  return torch, None


def _group_sizes(num_groups: int, rows: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)  # random routing, as in the anchor scripts
  return np.bincount(rng.integers(0, num_groups, size=rows), minlength=num_groups).astype(np.int32)


def _gmm_impls(interpret: bool) -> dict[str, Callable]:
  impls = {
      "pallas_gmm": functools.partial(gmm_lib.gmm, interpret=interpret),
      "pallas_mgpu_gmm": functools.partial(gmm_mgpu.gmm, interpret=interpret or None),
      "xla_ragged_dot": jax.lax.ragged_dot,
  }
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    impls["tokamax_ragged_dot"] = tokamax.ragged_dot
  except ImportError as e:
    _emit(what="skip", impl="tokamax_ragged_dot", reason=f"not importable: {e}")
  return impls


def _time_jax_gmm(name, fn, shape_name, shape, lhs, rhs, group_sizes, want, **extra):
  flops = 2 * shape.rows * shape.k * shape.n
  try:
    fwd = jax.jit(fn)
    out = fwd(lhs, rhs, group_sizes)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want))) if want is not None else None
    ms = _median_ms(lambda: fwd(lhs, rhs, group_sizes), _ITERS.value, _WARMUP.value)
    row = dict(what="gmm", shape=shape_name, impl=name, fwd_ms=ms, fwd_tflops=flops / ms / 1e9,
               max_abs_err_vs_pallas=err, **extra)
  except Exception as e:  # pylint: disable=broad-except
    _emit(what="gmm", shape=shape_name, impl=name, error=repr(e)[:300], **extra)
    return None
  if extra:  # tile sweeps: forward only
    _emit(**row)
    return out
  try:
    grad = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, group_sizes).astype(jnp.float32).sum(), (0, 1)))
    ms_fb = _median_ms(lambda: grad(lhs, rhs), max(_ITERS.value // 2, 1), _WARMUP.value)
    row.update(fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3 * flops / ms_fb / 1e9)
  except Exception as e:  # pylint: disable=broad-except
    row.update(fwd_bwd_error=repr(e)[:300])
  _emit(**row)
  return out


def _bench_gmm(shape_name: str, shape: GmmShape, interpret: bool) -> None:
  sizes = _group_sizes(shape.num_groups, shape.rows)
  k1, k2 = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(k1, (shape.rows, shape.k), jnp.bfloat16)
  rhs = jax.random.normal(k2, (shape.num_groups, shape.k, shape.n), jnp.bfloat16) * 0.02
  group_sizes = jnp.asarray(sizes)
  want = None
  for name, fn in _gmm_impls(interpret).items():
    out = _time_jax_gmm(name, fn, shape_name, shape, lhs, rhs, group_sizes, want)
    if name == "pallas_gmm" and out is not None:
      want = out.astype(jnp.float32)
  if _SWEEP.value:
    for bm, bn, bk, warps, stages in SWEEP_TILES:
      tiles = gmm_lib.TileSizes(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
      fn = functools.partial(gmm_lib.gmm, interpret=interpret,
                             block_sizes=gmm_lib.BlockSizes(gmm=tiles, gmm_t=tiles, tgmm=tiles))
      _time_jax_gmm("pallas_gmm", fn, shape_name, shape, lhs, rhs, group_sizes, want, tiles=[bm, bn, bk, warps,
                                                                                              stages])
    for bm, bn, bk, steps, snake, wgs in MGPU_SWEEP_TILES:
      tiles = gmm_mgpu.TileSizes(block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps,
                                 grid_block_n=snake, num_compute_wgs=wgs)
      fn = functools.partial(gmm_mgpu.gmm, interpret=interpret or None,
                             block_sizes=gmm_mgpu.BlockSizes(gmm=tiles, gmm_t=tiles))
      _time_jax_gmm("pallas_mgpu_gmm", fn, shape_name, shape, lhs, rhs, group_sizes, want,
                    tiles=[bm, bn, bk, steps, snake, wgs])
  torch, why = _torch_cuda()
  if torch is None:
    _emit(what="skip", shape=shape_name, impl="torch_grouped_mm", reason=why)
    return
  flops = 2 * shape.rows * shape.k * shape.n
  offs = torch.cumsum(torch.as_tensor(sizes, device="cuda"), 0).to(torch.int32)
  t_lhs = torch.randn(shape.rows, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
  t_rhs = (torch.randn(shape.num_groups, shape.k, shape.n, device="cuda", dtype=torch.bfloat16) * 0.02
           ).requires_grad_(True)
  ms = _timing.torch_median_ms(torch, lambda: torch._grouped_mm(t_lhs, t_rhs, offs=offs), _ITERS.value, _WARMUP.value)

  def fwd_bwd():
    torch._grouped_mm(t_lhs, t_rhs, offs=offs).float().sum().backward()

  ms_fb = _timing.torch_median_ms(torch, fwd_bwd, max(_ITERS.value // 2, 1), _WARMUP.value)
  _emit(what="gmm", shape=shape_name, impl="torch_grouped_mm", fwd_ms=ms, fwd_tflops=flops / ms / 1e9,
        fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3 * flops / ms_fb / 1e9)


def _layer_inputs(shape: LayerShape):
  rng = np.random.default_rng(0)
  scores = rng.random((shape.num_tokens, shape.num_experts), np.float32)
  ids = np.argsort(-scores, axis=1)[:, :shape.top_k].astype(np.int32)  # distinct experts per token
  weights = rng.random((shape.num_tokens, shape.top_k)).astype(np.float32)
  ks = jax.random.split(jax.random.key(1), 3)
  tokens = jax.random.normal(ks[0], (shape.num_tokens, shape.d_in), jnp.bfloat16)
  w_up = jax.random.normal(ks[1], (shape.num_experts, shape.d_in, shape.d_hidden), jnp.bfloat16) * 0.02
  w_down = jax.random.normal(ks[2], (shape.num_experts, shape.d_hidden, shape.d_in), jnp.bfloat16) * 0.02
  return tokens, jnp.asarray(weights), jnp.asarray(ids), w_up, w_down


def _bench_layer(shape_name: str, shape: LayerShape) -> None:
  rows = shape.num_tokens * shape.top_k
  flops = 2 * 2 * rows * shape.d_in * shape.d_hidden  # two grouped matmuls
  args = _layer_inputs(shape)
  want = None
  for backend in ("pallas", "pallas_mgpu", "ragged_dot"):
    fn = functools.partial(ops.moe_dispatch, activation="relu2", backend=backend)
    row = dict(what="moe_layer", shape=shape_name, impl=f"moe_dispatch[{backend}]")
    try:
      fwd = jax.jit(fn)
      out, _ = fwd(*args)
      if want is None:
        want = out.astype(jnp.float32)
      row["max_abs_err_vs_pallas"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)))
      row["fwd_ms"] = ms = _median_ms(lambda: fwd(*args), _ITERS.value, _WARMUP.value)
      row["fwd_tflops"] = flops / ms / 1e9

      def loss(tokens, router_weights, w_up, w_down):
        return fn(tokens, router_weights, args[2], w_up, w_down)[0].astype(jnp.float32).sum()

      grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))
      ms_fb = _median_ms(lambda: grad(args[0], args[1], args[3], args[4]), max(_ITERS.value // 2, 1),
                         _WARMUP.value)
      row.update(fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3 * flops / ms_fb / 1e9)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = repr(e)[:300]
    _emit(**row)

  torch, why = _torch_cuda()
  if torch is None:
    _emit(what="skip", shape=shape_name, impl="torch_grouped_mm_layer", reason=why)
    return
  t = {name: torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda()
       for name, a in zip(("tokens", "weights", "ids", "w_up", "w_down"), args)}
  tokens = t["tokens"].to(torch.bfloat16).requires_grad_(True)
  weights = t["weights"].requires_grad_(True)
  ids = t["ids"].to(torch.int64)
  w_up = t["w_up"].to(torch.bfloat16).requires_grad_(True)
  w_down = t["w_down"].to(torch.bfloat16).requires_grad_(True)

  def torch_moe():  # the same layer: sort, gmm, relu^2, gmm, un-sort, weighted sum over slots
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=shape.num_experts), 0).to(torch.int32)
    x = tokens[order // shape.top_k]
    h = torch.relu(torch._grouped_mm(x, w_up, offs=offs)).square()
    y = torch._grouped_mm(h, w_down, offs=offs).float() * weights.reshape(-1)[order, None]
    out = torch.zeros_like(y).index_copy(0, order, y)
    return out.view(shape.num_tokens, shape.top_k, -1).sum(1).to(torch.bfloat16)

  with torch.no_grad():
    err = float((torch_moe().float().cpu() - torch.from_numpy(np.asarray(want))).abs().max())
    ms = _timing.torch_median_ms(torch, torch_moe, _ITERS.value, _WARMUP.value)

  def fwd_bwd():
    torch_moe().float().sum().backward()

  ms_fb = _timing.torch_median_ms(torch, fwd_bwd, max(_ITERS.value // 2, 1), _WARMUP.value)
  _emit(what="moe_layer", shape=shape_name, impl="torch_grouped_mm_layer", fwd_ms=ms,
        fwd_tflops=flops / ms / 1e9, fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3 * flops / ms_fb / 1e9,
        max_abs_err_vs_pallas=err)


def _bench_decode(shape_name: str, shape: LayerShape, interpret: bool) -> None:
  """A decoding step's routed experts: the sorted dispatch (Triton and Mosaic GPU gmm) against the
  gathered-expert kernels, with the memory-bandwidth bound (the distinct chosen experts' weights read once)."""
  args = _layer_inputs(shape)
  distinct = len(np.unique(np.asarray(args[2])))
  expert_bytes = 2 * shape.d_in * shape.d_hidden * 2  # up + down, bf16
  bound_ms = distinct * expert_bytes / (_HBM_GBPS.value * 1e9) * 1e3
  impls = {f"moe_dispatch[{b}]": functools.partial(ops.moe_dispatch, backend=b) for b in ("pallas", "pallas_mgpu")}
  impls["gathered"] = functools.partial(gathered.gathered_dispatch, interpret=interpret or None)
  want = None
  for name, fn in impls.items():
    row = dict(what="moe_decode", shape=shape_name, impl=name, tokens=shape.num_tokens, distinct_experts=distinct,
               bound_ms=bound_ms)
    try:
      fwd = jax.jit(lambda *a, fn=fn: fn(*a, activation="relu2")[0])
      out = fwd(*args).astype(jnp.float32)
      want = out if want is None else want
      row["max_abs_err_vs_first"] = float(jnp.max(jnp.abs(out - want)))
      row["fwd_ms"] = ms = _median_ms(lambda: fwd(*args), _ITERS.value, _WARMUP.value)
      row["fraction_of_bound"] = bound_ms / ms
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = repr(e)[:300]
    _emit(**row)


def _table() -> str:
  lines = ["| what | shape | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"
  for r in _ROWS:
    if r["what"] not in ("gmm", "moe_layer"):
      continue
    note = r.get("error") or r.get("fwd_bwd_error") or (f"tiles={r['tiles']}" if "tiles" in r else "")
    lines.append(f"| {r['what']} | {r['shape']} | {r['impl']} | {fmt(r.get('fwd_ms'))} | "
                 f"{fmt(r.get('fwd_tflops'))} | {fmt(r.get('fwd_bwd_ms'))} | {fmt(r.get('fwd_bwd_tflops'))} | "
                 f"{note[:80]} |")
  return "\n".join(lines)


def main(argv):
  del argv  # Unused.
  interpret = _INTERPRET.value
  _emit(what="device", jax=jax.__version__, devices=[str(d) for d in jax.devices()],
        device_kind=jax.devices()[0].device_kind, interpret=interpret,
        block_sizes=repr(gmm_lib.block_sizes_for()), mgpu_block_sizes=repr(gmm_mgpu.block_sizes_for()))
  gmm_shapes = TINY_GMM_SHAPES if _TINY.value else GMM_SHAPES
  layer_shapes = TINY_LAYER_SHAPES if _TINY.value else LAYER_SHAPES
  if _SHAPES.value:
    gmm_shapes = {k: v for k, v in gmm_shapes.items() if k in _SHAPES.value}
    layer_shapes = {k: v for k, v in layer_shapes.items() if k in _SHAPES.value}
  if _DECODE.value:
    base = TINY_LAYER_SHAPES["tiny_layer"] if _TINY.value else LAYER_SHAPES["nano_layer"]
    for tokens in map(int, _DECODE.value):
      _bench_decode(f"{'tiny' if _TINY.value else 'nano'}_decode_t{tokens}",
                    dataclasses.replace(base, num_tokens=tokens), interpret)
    return
  for name, shape in gmm_shapes.items():
    _bench_gmm(name, shape, interpret)
  if not _SKIP_LAYER.value:
    for name, shape in layer_shapes.items():
      _bench_layer(name, shape)
  print(_table())


if __name__ == "__main__":
  app.run(main)
