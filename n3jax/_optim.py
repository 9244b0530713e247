"""AdamW with Warmup-Stable-Decay or cosine schedules, global-norm clipping and weight-decay masks.

WSD (Hu et al. 2024, MiniCPM; used by Nemotron-H and Nemotron Nano 2 / 3): a linear warmup to the peak,
a long stable phase at the peak, and a decay to `lr * min_lr_ratio` over the last `decay_fraction` of
the run. Warmup reaches the peak on its last step and never spends a step at lr 0.

No weight decay on 1-D-in-spirit params, matched by name (stacked layers make them 2-D): norm scales
(`scale`, the Mamba gated `norm`), every `*_bias` (incl. `conv1d_*_bias`, `dt_bias`), `A_log`, `D`.
`e_score_correction_bias` is not trained by the optimizer at all: its update is zeroed here, and the
trainer moves it by the aux-loss-free rule instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["lr_schedule", "decay_mask", "frozen_mask", "make_optimizer", "SCHEDULES"]

SCHEDULES = ("wsd", "cosine", "constant")
_DECAY_SHAPES = ("linear", "cosine", "minus_sqrt")
_NO_DECAY = frozenset({"scale", "norm", "A_log", "D"})
FROZEN = "e_score_correction_bias"


def lr_schedule(opt, num_steps: int) -> optax.Schedule:
  """Learning rate as a function of optax's update count (0 for the first step)."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r} must be one of {SCHEDULES}")
  if opt.decay_shape not in _DECAY_SHAPES:
    raise ValueError(f"optimizer.decay_shape={opt.decay_shape!r} must be one of {_DECAY_SHAPES}")
  peak, floor = float(opt.lr), float(opt.lr) * float(opt.min_lr_ratio)
  warmup = int(opt.warmup_steps)
  decay_steps = round(float(opt.decay_fraction) * num_steps) if opt.schedule == "wsd" else num_steps - warmup
  decay_start = num_steps - decay_steps

  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0                      # 1-based step being taken
    warm = peak * jnp.minimum(1.0, step / max(warmup, 1))
    if opt.schedule == "constant":
      return warm
    frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)  # 0 -> 1 over the decay
    if opt.schedule == "cosine" or opt.decay_shape == "cosine":
      shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif opt.decay_shape == "minus_sqrt":
      shape = 1.0 - jnp.sqrt(frac)
    else:
      shape = 1.0 - frac
    decayed = floor + (peak - floor) * shape
    return jnp.where(step <= warmup, warm, decayed)

  return schedule


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any) -> Any:
  """True where weight decay applies."""
  def decays(path, _):
    name = _name(path)
    return not (name in _NO_DECAY or name.endswith("_bias"))
  return jax.tree_util.tree_map_with_path(decays, params)


def frozen_mask(params: Any) -> Any:
  """True for params the optimizer must leave alone (the router correction bias)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _name(p) == FROZEN, params)


def make_optimizer(opt, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  for name in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "min_lr_ratio", "decay_fraction"):
    if float(opt[name]) < 0:
      raise ValueError(f"optimizer.{name}={opt[name]} must be >= 0")
  if not 0 <= opt.decay_fraction <= 1:
    raise ValueError(f"optimizer.decay_fraction={opt.decay_fraction} must be in [0, 1]")
  if opt.warmup_steps < 0:
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0")
  if opt.schedule == "wsd" and opt.warmup_steps > num_steps - round(float(opt.decay_fraction) * num_steps):
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} runs into the decay, which starts after step "
                     f"{num_steps - round(float(opt.decay_fraction) * num_steps)} (the last decay_fraction="
                     f"{opt.decay_fraction} of num_steps={num_steps}): the lr would jump down from the peak")
  if opt.schedule != "wsd" and opt.warmup_steps > num_steps - (opt.schedule == "cosine"):
    raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} leaves no {opt.schedule} phase in "
                     f"num_steps={num_steps}")
  if opt.mu_dtype not in ("", "bfloat16", "float32"):
    raise ValueError(f"optimizer.mu_dtype={opt.mu_dtype!r} must be '' (the param dtype), 'bfloat16' or 'float32'")
  schedule = lr_schedule(opt, num_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask,
                  mu_dtype=opt.mu_dtype or None),
      optax.masked(optax.set_to_zero(), frozen_mask),
  )
  return tx, schedule
