"""Generation speed at Nemotron-3-Nano-4B shape (random weights, bf16): prefill and decode tokens/s.

  python benchmarks/generate.py            # accelerator: batch 1, 8, 64 x prompt 1024, 8192, and the HF anchor
  python benchmarks/generate.py --tiny     # CPU smoke run: tiny-dense preset, short prompts

Prints one JSON line per (batch, prompt): prefill tokens/s (the whole prompt, chunked prefill included),
decode tokens/s (`--new_tokens` compiled steps, greedy, sampling included, one host sync at the end), and
for batch 1 the memory-bandwidth bound of decoding: weight bytes / HBM bandwidth (reading every weight once
per token; of a MoE model's routed experts, the R of E that one token reaches). When torch with CUDA is importable, the HF anchor `../shared/bench/anchor_hf_generate.py`
(ANCHORS.md, "Generation as a PyTorch user runs it today") runs first, in a subprocess, before JAX takes
the GPU memory, so both figures come from the same machine and call. Compare ratios, not absolute numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_PRESET = flags.DEFINE_string("preset", "nemotron-3-nano-4b", "Key of n3jax.configs.PRESETS.")
_TINY = flags.DEFINE_boolean("tiny", False, "CPU smoke run: tiny-dense, batch 1 and 2, prompts 32 and 64.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes.")
_PROMPTS = flags.DEFINE_list("prompts", ["1024", "8192"], "Prompt lengths.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Decode steps timed per configuration.")
_TOKENS_PER_CALL = flags.DEFINE_integer("prefill_tokens_per_call", 16384,
                                        "Prefill chunk = this / batch prompt columns per compiled call.")
_SCAN = flags.DEFINE_boolean("scan_layers", False, "lax.scan over layers (default: unrolled, one program per step).")
_STACKED = flags.DEFINE_boolean("stacked_params", False, "Feed the stacked layer params (default: "
                                "`inference.decoding_params`, what generation decodes from).")
_SSD = flags.DEFINE_string("ssd_backend", None, "ModelConfig.ssd_backend (default: the preset's): \"pallas\" decodes "
                           "with the Triton one-token conv + SSM kernel (pallas_kernels/ssd/ops_decode.py).")
_GATHER = flags.DEFINE_integer("moe_gather_max_rows", None, "ModelConfig.moe_gather_max_rows (default: the "
                                "preset's): MoE decoding steps with at most this many routed rows read their "
                                "experts by id (pallas_kernels/moe/gathered.py) instead of the sorted dispatch.")
_HBM = flags.DEFINE_float("hbm_gbps", None, "HBM bandwidth in GB/s for the bound (default: by device kind).")
_ANCHOR = flags.DEFINE_enum("anchor", "auto", ["auto", "on", "off"], "Run the HF anchor (auto: if torch+CUDA).")
_ANCHOR_SCRIPT = flags.DEFINE_string("anchor_script", None, "Path of anchor_hf_generate.py (default: found "
                                     "under shared/bench or ../shared/bench of the repo).")

# Peak HBM bandwidth by `device_kind` substring, GB/s (vendor data sheets; the SXM parts).
_HBM_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100": 2039.0, "GH200": 4000.0}


def emit(**kw) -> None:
  print(json.dumps(kw), flush=True)


def _anchor_script() -> str | None:
  if _ANCHOR_SCRIPT.value:
    return _ANCHOR_SCRIPT.value
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in (os.path.join(repo, "shared", "bench", "anchor_hf_generate.py"),
               os.path.join(repo, "..", "shared", "bench", "anchor_hf_generate.py")):
    if os.path.isfile(path):
      return path
  return None


def run_anchor() -> None:
  """The HF transformers anchor in a subprocess (its GPU memory is freed before JAX starts)."""
  if _ANCHOR.value == "off" or _TINY.value:
    return
  if _ANCHOR.value == "auto":
    try:
      import torch  # pylint: disable=g-import-not-at-top
      if not torch.cuda.is_available():
        emit(what="anchor_skipped", why="torch has no CUDA device")
        return
    except ImportError:
      emit(what="anchor_skipped", why="torch is not installed")
      return
  script = _anchor_script()
  if script is None:
    emit(what="anchor_skipped", why="anchor_hf_generate.py not found; pass --anchor_script")
    return
  emit(what="anchor_start", script=script)
  proc = subprocess.run([sys.executable, script], capture_output=True, text=True, check=False)
  sys.stdout.write(proc.stdout)
  if proc.returncode:
    emit(what="anchor_failed", returncode=proc.returncode, stderr_tail=proc.stderr[-2000:])


def bench(cfg, params, batch: int, prompt: int, new_tokens: int, bound_tok_s: float | None) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from n3jax import inference  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(batch * 100003 + prompt)
  tokens = rng.randint(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
  tokens, segments = inference.left_align(tokens, np.ones_like(tokens, bool))
  tokens_per_call = 32 if _TINY.value else _TOKENS_PER_CALL.value  # tiny: 2 prefill chunks at prompt 64
  chunk = min(prompt, max(16 if _TINY.value else 128, tokens_per_call // batch))
  max_len = prompt + new_tokens + 8
  sampling = inference.SamplingParams()

  def run_prefill():
    logits, cache = inference.prefill(cfg, params, tokens, segments, max_len=max_len, chunk=chunk)
    return jax.block_until_ready(logits), cache

  def run_decode(cache, steps):
    state = _engine.sampling_state(cfg, tokens, segments, sampling)
    token = jnp.zeros((batch,), jnp.int32)
    forced = jnp.full((batch,), -1, jnp.int32)
    for _ in range(steps):
      token, cache, state = inference.decode_sample(cfg, params, cache, token, state, forced, sampling=sampling)
    return jax.block_until_ready(token), cache

  t = time.perf_counter()
  _, cache = run_prefill()               # compiles the prefill chunk
  _, cache = run_decode(cache, 2)        # compiles the decode step
  compile_s = time.perf_counter() - t
  del cache
  t = time.perf_counter()
  _, cache = run_prefill()
  prefill_s = time.perf_counter() - t
  t = time.perf_counter()
  _, cache = run_decode(cache, new_tokens)
  decode_s = time.perf_counter() - t
  row = dict(what="n3jax_generate", batch=batch, prompt=prompt, new=new_tokens, prefill_chunk=chunk,
             prefill_tok_s=batch * prompt / prefill_s, decode_tok_s=batch * new_tokens / decode_s,
             decode_ms_per_step=1e3 * decode_s / new_tokens, first_call_s=compile_s)
  if batch == 1 and bound_tok_s:
    row["bound_tok_s"] = bound_tok_s
    row["fraction_of_bound"] = row["decode_tok_s"] / bound_tok_s
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  emit(**row)
  del cache


def main(argv):
  del argv  # Unused.
  run_anchor()  # before JAX allocates the accelerator
  import jax  # pylint: disable=g-import-not-at-top
  from n3jax import inference, models  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top
  from n3jax.configs import PRESETS  # pylint: disable=g-import-not-at-top

  preset = "tiny-dense" if _TINY.value else _PRESET.value
  cfg = PRESETS[preset].replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=_SCAN.value)
  if _SSD.value:
    cfg = cfg.replace(ssd_backend=_SSD.value)
  if _GATHER.value is not None:
    cfg = cfg.replace(moe_gather_max_rows=_GATHER.value)
  batches = [1, 2] if _TINY.value else [int(b) for b in _BATCHES.value]
  prompts = [32, 64] if _TINY.value else [int(p) for p in _PROMPTS.value]
  new_tokens = 8 if _TINY.value else _NEW.value
  if _STACKED.value or _SCAN.value:
    params = jax.jit(models.init, static_argnums=0)(cfg, jax.random.key(0))
  else:  # generation's layout (per layer, Mamba input projections fused), made in one program: no stacked copy
    params = jax.jit(lambda key: _engine.decoding_layout(cfg, models.init(cfg, key)))(jax.random.key(0))
    params = jax.block_until_ready(inference.decoding_params(cfg, params))  # row-major where a TPU would not be
  total_bytes = weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  device = jax.devices()[0]
  gbps = _HBM.value or next((v for k, v in _HBM_GBPS.items() if k in device.device_kind), None)
  # As in ANCHORS.md: every weight byte once per token; of a MoE model's routed experts, the R of E a token
  # reaches (batch 1).
  routed = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params)
               if getattr(path[-1], "key", None) in ("experts_up_proj", "experts_down_proj"))
  if routed:
    weight_bytes -= routed * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
  bound = gbps * 1e9 / weight_bytes if gbps else None
  read_bytes = weight_bytes - params["embedder"]["embedding"].nbytes  # a step gathers B embedding rows only
  emit(what="setup", preset=preset, device=device.device_kind, backend=jax.default_backend(), ssd_backend=cfg.ssd_backend,
       moe_gather_max_rows=cfg.moe_gather_max_rows, scan_layers=cfg.scan_layers, stacked_params=_STACKED.value or _SCAN.value,
       params_b=sum(x.size for x in jax.tree.leaves(params)) / 1e9, weight_gb=total_bytes / 1e9,
       batch1_read_gb=weight_bytes / 1e9,
       hbm_gbps=gbps, batch1_decode_bound_tok_s=bound,
       batch1_decode_bound_ms=1e3 / bound if bound else None, weight_gb_without_embedding=read_bytes / 1e9,
       batch1_decode_bound_without_embedding_tok_s=gbps * 1e9 / read_bytes if gbps else None)
  for prompt in prompts:
    for batch in batches:
      try:
        bench(cfg, params, batch, prompt, new_tokens, bound)
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory: report and go on
        emit(what="n3jax_generate_failed", batch=batch, prompt=prompt, error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
  app.run(main)
