"""Times n3jax's jitted training step (forward, backward, AdamW, expert-bias update) on one device.

The default shape is the PyTorch anchor of `shared/bench/ANCHORS.md` ("A training step as a PyTorch user
runs it today"): Nemotron 3 Nano at full width with the reduced pattern MEMEM*E (3 Mamba, 3 MoE layers of
128 experts top-6, 1 attention; vocab 131072), batch 2 x 4096 tokens, bf16, AdamW. The anchor is a bf16
model with torch AdamW (params, gradients and moments all bf16); it measured 0.220 s/step, 37,178 tokens/s,
~163 model TFLOP/s, 50.2 GiB on one H100. So the default here is bf16 params too: with f32 master params
this step needs 86 GB on an H100 (XLA's memory analysis of the H100 executable, `tests/test_aot.py`), more
than the chip has; bf16 params need 66 GB. The MoE backend defaults to "auto" (the Pallas grouped matmul on
a GPU): `jax.lax.ragged_dot` expands densely there and would need 368 GB of temporaries at this shape.

    python benchmarks/train_step.py                  # the anchor shape (needs a GPU)
    python benchmarks/train_step.py --tiny           # tiny-moe, 2 x 128 tokens: checks the script on CPU
    python benchmarks/train_step.py --remat=full --scan_layers --batch=4
    python benchmarks/train_step.py --ssd_backend=pallas_mgpu --moe_backend=pallas_mgpu --attention_impl=flash

Prints one JSON line per measurement: compile time, median step time, tokens/s, model TFLOP/s
(6 x active matmul params per token, the anchor's convention), MFU where the peak is known, and peak
device memory where the backend reports it.
"""

import json
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from n3jax import _optim
from n3jax import _progress
from n3jax import _train_step
from n3jax import configs
from n3jax import models
from n3jax import trainer

_TINY = flags.DEFINE_bool("tiny", False, "tiny-moe at 2 x 128 tokens, 3 timed steps (a CPU smoke run)")
_PRESET = flags.DEFINE_string("preset", "nemotron-3-nano-30b-a3b", "key of n3jax.configs.PRESETS")
_PATTERN = flags.DEFINE_string("pattern", "MEMEM*E", "block pattern override ('' keeps the preset's)")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 4096, "tokens per sequence")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compiling")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots_saveable", "nothing_saveable"], "remat policy")
_SCAN = flags.DEFINE_bool("scan_layers", False, "lax.scan over layers")
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "micro-batches per step")
_MOE_BACKEND = flags.DEFINE_string("moe_backend", "auto", "pallas_kernels.moe backend")
_SSD_BACKEND = flags.DEFINE_string("ssd_backend", "reference",
                                   "Mamba-2 scan: reference | pallas (Triton on GPU) | pallas_mgpu (Hopper)")
_ATTENTION = flags.DEFINE_string("attention_impl", "dense", "dense | blockwise | flash (Pallas Triton on GPU)")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                                 "master params (and so gradients and AdamW moments): bf16 as the anchor")


def emit(**kw):
  print(json.dumps(kw), flush=True)


def main(argv):
  del argv  # Unused.
  logging.set_verbosity(logging.WARNING)  # JSON lines only, no backend-probing INFO logs
  if _TINY.value:
    preset, pattern, batch, seq, steps, warmup = "tiny-moe", "", 2, 128, 3, 1
  else:
    preset, pattern, batch, seq, steps, warmup = (_PRESET.value, _PATTERN.value, _BATCH.value, _SEQ.value,
                                                  _STEPS.value, _WARMUP.value)
  overrides = dict(dtype="bfloat16", param_dtype=_PARAM_DTYPE.value, remat_policy=_REMAT.value,
                   scan_layers=_SCAN.value, moe_backend=_MOE_BACKEND.value, ssd_backend=_SSD_BACKEND.value,
                   attention_impl=_ATTENTION.value)
  if pattern:
    overrides["blocks"] = pattern
  cfg = configs.PRESETS[preset].replace(**overrides)
  config = trainer.default_config()
  config.batch_size, config.data.seq_len, config.grad_accum_steps = batch, seq, _ACCUM.value
  tx, schedule = _optim.make_optimizer(config.optimizer, 1000)
  device = jax.local_devices()[0]
  emit(what="setup", device=device.device_kind, platform=device.platform, jax=jax.__version__, preset=preset,
       pattern=cfg.pattern, batch=batch, seq=seq, param_dtype=cfg.param_dtype, remat=_REMAT.value,
       scan_layers=_SCAN.value, moe_backend=cfg.moe_backend, ssd_backend=cfg.ssd_backend,
       attention_impl=cfg.attention_impl, grad_accum=_ACCUM.value, params_m=configs.param_counts(cfg)["total"] / 1e6,
       active_params_m=configs.param_counts(cfg)["active"] / 1e6)

  key = jax.random.key(0)
  state = jax.jit(lambda k: _train_step.init_state(models.init(cfg, k), tx, k))(key)
  rng = np.random.default_rng(0)
  batch_arrays = {
      "tokens": rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32),
      "targets": rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32),
      "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
      "loss_mask": np.ones((batch, seq), np.int32),
  }
  batch_arrays = jax.device_put(batch_arrays, device)
  step_fn = jax.jit(_train_step.make_train_step(cfg, config, tx, schedule), donate_argnums=0)
  t = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  emit(what="compile", seconds=round(time.perf_counter() - t, 2))

  for _ in range(warmup):
    state, metrics = compiled(state, batch_arrays)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  sec = statistics.median(times)
  tokens = batch * seq
  flops = _progress.flops_per_token(cfg) * tokens / sec
  peak = _progress.peak_flops(device)
  mem = (device.memory_stats() or {}).get("peak_bytes_in_use") if hasattr(device, "memory_stats") else None
  emit(what="train_step", median_s=round(sec, 4), min_s=round(min(times), 4), tokens_per_s=round(tokens / sec),
       model_tflops=round(flops / 1e12, 2), mfu_pct=round(100 * flops / peak, 1) if peak else None,
       peak_memory_gib=round(mem / 2**30, 2) if mem else None, loss=float(metrics["loss"]),
       finite=bool(jnp.isfinite(metrics["loss"])))


if __name__ == "__main__":
  app.run(main)
