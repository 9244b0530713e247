"""GPU benchmark: the jnp decode update and causal conv1d of the Mamba-2 mixer are memory-bound.

Issue #3 keeps two pieces of the mixer in jnp (XLA-fused) rather than Pallas: the causal conv1d over a
sequence (`causal_conv1d_reference`) and its one-token update (`causal_conv1d_update_reference`). A kernel
can only beat XLA there if XLA leaves bandwidth unused. The one-token SSD state update is timed both ways: the
jnp `ssd_decode_step_reference` (three passes over the state in XLA's H100 compile) and the Triton kernel of
`ops_decode` (two), each with the state donated as in decoding; and the whole one-token core of a decoding
Mamba layer (three conv windows shifted and convolved, dt, the SSM update) as the jnp reference and as the
Triton conv + SSM kernel reading the fused projection (`conv_ssd_decode_step_packed`: one launch). For each, at the Nemotron 3 Nano mixer shape (64 heads of 64, state 128, 8 groups,
conv channels 4096 + 2 x 8 x 128 = 6144, kernel 4), this prints one JSON line with:

  ms               median wall time of the jitted call
  bytes            the bytes the op must move at least (inputs read once, outputs written once)
  flops            its arithmetic
  intensity        flops / bytes (an H100's ridge point is ~300 flop/byte for bf16 tensor cores and
                   ~20 for f32 CUDA cores: far below either, an op cannot be compute-bound)
  gbps             bytes / time
  of_peak          gbps / the device's HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s)

  python benchmarks/ssd_memory_bound.py            # on the GPU
  python benchmarks/ssd_memory_bound.py --tiny     # CPU smoke run, numbers meaningless

"of_peak" near 1 (with large-enough sizes: batch 64 for the decode updates) is the evidence that jnp is
fine; a small "of_peak" at small sizes is launch latency, which a Pallas kernel does not remove either.
"""

import json

import _timing
from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from pallas_kernels.ssd import ops_decode
from pallas_kernels.ssd import reference

_TINY = flags.DEFINE_bool("tiny", False, "Tiny shapes only (CPU smoke run).")
_ITERS = flags.DEFINE_integer("iters", 50, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed calls first.")

# Nemotron 3 Nano mixer: heads M, head dim P, state Q, groups J, conv kernel K.
_M, _P, _Q, _J, _K = 64, 64, 128, 8, 4
_CHANNELS = _M * _P + 2 * _J * _Q
_HBM_TBPS = {"h100": 3.35, "h200": 4.8}


def _peak_tbps() -> float | None:
  kind = jax.devices()[0].device_kind.lower()
  return next((v for k, v in _HBM_TBPS.items() if k in kind), None)


def _emit(what, dims, ms, nbytes, flops):
  peak = _peak_tbps()
  gbps = nbytes / (ms * 1e-3) / 1e9
  print(json.dumps(dict(what=what, dims=dims, ms=round(ms, 4), bytes=nbytes, flops=flops,
                        intensity=round(flops / nbytes, 3), gbps=round(gbps, 1),
                        of_peak=None if peak is None else round(gbps / (peak * 1e3), 3))), flush=True)


def _time(fn, *args) -> float:
  jitted = jax.jit(fn)
  return _timing.median_ms(lambda: jitted(*args), _ITERS.value, _WARMUP.value)


def _time_donated(step, state, *args) -> float:
  """Median ms of `state = step(state, *args)` with the state donated, as the decoding step runs it (the cache
  is donated, so an op may update the state where it lies; without donation XLA would first copy it)."""
  jitted = jax.jit(step, donate_argnums=0)
  box = [state]

  def call():
    box[0] = jitted(box[0], *args)
    return box[0]

  return _timing.median_ms(call, _ITERS.value, _WARMUP.value)


def _decode_step(batch: int, m: int, p: int, q: int, j: int):
  """The jnp reference and the Triton kernel (`ops_decode`, GPU only; interpreted with --tiny), the state donated."""
  ks = jax.random.split(jax.random.key(0), 5)
  state = jax.random.normal(ks[0], (batch, m, p, q), jnp.float32)
  x = jax.random.normal(ks[1], (batch, m, p), jnp.bfloat16)
  dt = jax.random.normal(ks[2], (batch, m), jnp.float32)
  b, c = (jax.random.normal(k, (batch, j, q), jnp.bfloat16) for k in ks[3:5])
  a, d, dt_bias = -jnp.ones((m,)), jnp.ones((m,)), jnp.zeros((m,))
  # The f32 state is read and written once; x, y, B, C, dt are negligible but counted.
  nbytes = 2 * state.size * 4 + 2 * x.size * 2 + 2 * b.size * 2 + dt.size * 4
  flops = state.size * 5  # decay, outer-product add (2), C contraction (2)
  dims = dict(batch=batch, heads=m, head_dim=p, state=q, groups=j)
  variants = [("ssd_decode_step", dict(backend="reference"))]
  if jax.default_backend() == "gpu" or _TINY.value:
    variants.append(("ssd_decode_step_triton", dict(backend="triton", interpret=jax.default_backend() != "gpu")))
  for what, kw in variants:
    step = lambda s, x_, dt_, b_, c_, kw=kw: ops_decode.ssd_decode_step(s, x_, dt_, a, b_, c_, d, dt_bias, **kw)[1]
    ms = _time_donated(step, jnp.copy(state), x, dt, b, c)
    _emit(what, dims, ms, nbytes, flops)


def _conv_decode_step(batch: int, m: int, p: int, q: int, j: int, k: int):
  """The conv windows + SSM update of one decoding Mamba layer from its fused projection (z | x | B | C | dt):
  the jnp reference and the Triton kernel (`conv_ssd_decode_step_packed`), the state and windows donated."""
  ks = jax.random.split(jax.random.key(3), 8)
  state = jax.random.normal(ks[0], (batch, m, p, q), jnp.float32)
  windows = (jax.random.normal(ks[1], (batch, k - 1, m, p), jnp.bfloat16),
             jax.random.normal(ks[2], (batch, k - 1, j, q), jnp.bfloat16),
             jax.random.normal(ks[3], (batch, k - 1, j, q), jnp.bfloat16))
  proj = jax.random.normal(ks[4], (batch, 2 * m * p + 2 * j * q + m), jnp.bfloat16)
  weights = (jax.random.normal(ks[5], (k, m, p), jnp.bfloat16), jax.random.normal(ks[6], (k, j, q), jnp.bfloat16),
             jax.random.normal(ks[7], (k, j, q), jnp.bfloat16))
  a_log, d, dt_bias = jnp.zeros((m,)), jnp.ones((m,)), jnp.zeros((m,))
  # The f32 state read and written once, the windows read and written, the projection's x, B, C, dt read once,
  # y written once; weights are negligible but counted.
  nbytes = (2 * state.size * 4 + 2 * sum(w.size for w in windows) * 2 + (m * p + 2 * j * q + m) * batch * 2
            + batch * m * p * 2 + sum(w.size for w in weights) * 2)
  flops = state.size * 5 + batch * (m * p + 2 * j * q) * (2 * k + 4)
  dims = dict(batch=batch, heads=m, head_dim=p, state=q, groups=j, kernel=k)
  variants = [("conv_ssd_decode_step", dict(backend="reference"))]
  if jax.default_backend() == "gpu" or _TINY.value:
    variants.append(("conv_ssd_decode_step_triton", dict(backend="triton", interpret=jax.default_backend() != "gpu")))
  for what, kw in variants:
    def step(carry, proj_, kw=kw):
      st, wins = carry
      _, st, wins = ops_decode.conv_ssd_decode_step_packed(st, wins, proj_, a_log, d, dt_bias, weights,
                                                           offset=m * p, **kw)
      return st, wins
    ms = _time_donated(step, (jnp.copy(state), tuple(jnp.copy(w) for w in windows)), proj)
    _emit(what, dims, ms, nbytes, flops)


def _conv(batch: int, seq: int, channels: int, k: int):
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (batch, seq, channels), jnp.bfloat16)
  w = jax.random.normal(ks[1], (k, channels), jnp.float32)
  bias = jax.random.normal(ks[2], (channels,), jnp.float32)
  ms = _time(lambda x_: reference.causal_conv1d_reference(x_, w, bias)[0], x)
  nbytes = 2 * x.size * 2 + w.size * 4
  flops = x.size * (2 * k + 5)  # taps, bias, silu
  _emit("causal_conv1d", dict(batch=batch, seq=seq, channels=channels, kernel=k), ms, nbytes, flops)


def _conv_update(batch: int, channels: int, k: int):
  ks = jax.random.split(jax.random.key(2), 3)
  conv_state = jax.random.normal(ks[0], (batch, k - 1, channels), jnp.bfloat16)
  x = jax.random.normal(ks[1], (batch, channels), jnp.bfloat16)
  w = jax.random.normal(ks[2], (k, channels), jnp.float32)
  ms = _time(lambda s, x_: reference.causal_conv1d_update_reference(s, x_, w), conv_state, x)
  nbytes = 2 * conv_state.size * 2 + 2 * x.size * 2 + w.size * 4
  flops = x.size * (2 * k + 4)
  _emit("causal_conv1d_update", dict(batch=batch, channels=channels, kernel=k), ms, nbytes, flops)


def main(argv):
  del argv  # Unused.
  print(json.dumps(dict(what="device", jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                        hbm_tbps=_peak_tbps())), flush=True)
  if _TINY.value:
    _decode_step(2, 4, 16, 16, 2)
    _conv_decode_step(2, 4, 16, 16, 2, _K)
    _conv(1, 64, 64, _K)
    _conv_update(2, 64, _K)
    return
  for batch in (1, 8, 64):
    _decode_step(batch, _M, _P, _Q, _J)
  for batch in (1, 8, 64):
    _conv_decode_step(batch, _M, _P, _Q, _J, _K)
  for batch, seq in ((1, 8192), (2, 8192)):
    _conv(batch, seq, _CHANNELS, _K)
  for batch in (1, 8, 64):
    _conv_update(batch, _CHANNELS, _K)


if __name__ == "__main__":
  app.run(main)
