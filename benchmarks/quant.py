"""Step time of a transformer-MLP matmul pair, forward + backward: BF16 vs FP8 (real) vs NVFP4 (emulated).

  python benchmarks/quant.py                 # GPU: Nemotron-H-8B-like MLP, 2 x 4096 tokens
  python benchmarks/quant.py --tiny          # CPU smoke run: checks that every mode executes

The product is `down(relu(up(x))**2)` with x [B, T, D] in bf16 and f32 params cast to bf16, all three
GEMMs of both projections through `n3jax.quant.make_einsum` (`mode=none` is the plain einsum). All
modes run in the same process on the same inputs. FP8 uses the native path (FP8-typed operands into
`dot_general`); on a GPU the script also reports whether XLA emitted cuBLASLt FP8 GEMMs
(`__cublas$lt$matmul$f8` in the optimized HLO). NVFP4 is an exact emulation in bf16 GEMMs plus
quantization passes, so it is expected to be slower than BF16 on Hopper; its time is the price of the
numerics, not a speed claim. Results are printed as a table and written as JSON with `--out`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from n3jax import quant

_TINY = flags.DEFINE_bool("tiny", False, "Small shapes for a CPU smoke run.")
_BATCH = flags.DEFINE_integer("batch", 2, "B")
_SEQ = flags.DEFINE_integer("seq", 4096, "T")
_D_MODEL = flags.DEFINE_integer("d_model", 4096, "D (Nemotron-H 8B: 4096)")
_D_FF = flags.DEFINE_integer("d_ff", 21504, "F (Nemotron-H 8B: 21504)")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per mode.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per mode after compilation.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")

_MODES = (("bf16", quant.QuantConfig()),
          ("fp8_real", quant.QuantConfig(mode="fp8", fp8_backend="native")),
          ("nvfp4_emulated", quant.QuantConfig(mode="nvfp4")))


def _step_fn(cfg: quant.QuantConfig):
  # One quantized layer in the middle of a 4-layer stack, so no BF16-kept layer applies.
  up = quant.make_einsum(cfg, layer_index=2, num_layers=4, role="mlp")
  down = quant.make_einsum(cfg, layer_index=2, num_layers=4, role="mlp")

  def loss(x, w_up, w_down, step):
    h = up("BTD,DF->BTF", x, w_up.astype(jnp.bfloat16), step=step)
    h = jnp.square(jax.nn.relu(h)).astype(jnp.bfloat16)
    y = down("BTF,FD->BTD", h, w_down.astype(jnp.bfloat16), step=step)
    return jnp.mean(y.astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _time_mode(name: str, cfg: quant.QuantConfig, args) -> dict:
  fn = _step_fn(cfg)
  t0 = time.perf_counter()
  compiled = fn.lower(*args, jnp.int32(0)).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text() or ""
  for i in range(_WARMUP.value):
    jax.block_until_ready(compiled(*args, jnp.int32(i)))
  times = []
  for i in range(_STEPS.value):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args, jnp.int32(i)))
    times.append(time.perf_counter() - t)
  return {"mode": name, "compile_s": compile_s, "median_step_ms": 1e3 * statistics.median(times),
          "min_step_ms": 1e3 * min(times), "fp8_cublaslt_gemms": hlo.count("__cublas$lt$matmul$f8")}


def main(argv):
  del argv  # Unused.
  b, t, d, f = (1, 64, 64, 128) if _TINY.value else (_BATCH.value, _SEQ.value, _D_MODEL.value, _D_FF.value)
  kx, ku, kd = jax.random.split(jax.random.key(0), 3)
  args = (jax.random.normal(kx, (b, t, d), jnp.bfloat16),
          jax.random.normal(ku, (d, f), jnp.float32) * d ** -0.5,
          jax.random.normal(kd, (f, d), jnp.float32) * f ** -0.5)
  flops = 3 * 2 * (2 * b * t * d * f)  # fwd + dgrad + wgrad, two projections
  print(f"backend={jax.default_backend()} devices={jax.devices()} B={b} T={t} D={d} F={f}", file=sys.stderr)
  rows = [_time_mode(name, cfg, args) for name, cfg in _MODES]
  base = rows[0]["median_step_ms"]
  print(f"{'mode':<16}{'median ms':>12}{'min ms':>10}{'TFLOP/s':>10}{'vs bf16':>9}{'compile s':>11}{'fp8 GEMMs':>11}")
  for r in rows:
    tflops = flops / (r["median_step_ms"] * 1e-3) / 1e12
    print(f"{r['mode']:<16}{r['median_step_ms']:>12.3f}{r['min_step_ms']:>10.3f}{tflops:>10.2f}"
          f"{base / r['median_step_ms']:>8.2f}x{r['compile_s']:>11.2f}{r['fp8_cublaslt_gemms']:>11}")
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump({"backend": jax.default_backend(), "shape": dict(B=b, T=t, D=d, F=f), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
  app.run(main)
