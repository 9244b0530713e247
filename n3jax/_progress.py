"""Progress a person can read (one line per log interval) and TensorBoard event files.

    step 40/300 | loss 2.913 | grad 0.81 | lr 3.0e-03 | 9.8k tok/s | MFU n/a (cpu) | experts max/mean 1.31 | ETA 0:00:55

`loss` is the mean over the interval; the other values are the last step's. tok/s counts real tokens
(segment id > 0), not the padding of packed rows.
MFU = 6 * N * tokens/s / (peak bf16 dense FLOP/s of the devices), N = active parameters per token
without the embedding table (the usual 6N estimate; attention and SSD-scan FLOPs are not counted).
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import jax
import numpy as np

from n3jax import configs as model_configs

__all__ = ["PEAK_FLOPS", "peak_flops", "flops_per_token", "Progress"]

# Dense bf16 peak per chip, FLOP/s (vendor datasheets, without sparsity). Matched on `device_kind`.
PEAK_FLOPS = {
    "GB200": 2.5e15, "B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5": 197e12, "TPU v4": 275e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """Per-device peak, or None where unknown (CPU)."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for name, flops in PEAK_FLOPS.items():  # ordered so that "GB200" wins over "B200", "TPU v5p" over "TPU v5"
    if name in kind:
      return flops
  return None


def flops_per_token(cfg: model_configs.ModelConfig) -> float:
  counts = model_configs.param_counts(cfg)
  n = counts["active"] - cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
  return 6.0 * n


def _si(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Progress:
  """Buffers per-step device metrics, fetches them once per log interval, prints, and writes TensorBoard."""

  def __init__(self, workdir: str, *, cfg, num_steps: int, tokens_per_step: int, first_step: int,
               devices: list[jax.Device], enabled: bool = True):
    self.num_steps, self.tokens_per_step = num_steps, tokens_per_step
    self.enabled = enabled
    self._pending: list[tuple[int, Any]] = []
    self._t_last, self._step_last = time.perf_counter(), first_step
    self._flops = flops_per_token(cfg)
    peaks = [peak_flops(d) for d in devices]
    self._peak = None if any(p is None for p in peaks) else sum(peaks)
    self._platform = devices[0].platform
    self.history: dict[int, dict[str, float]] = {}
    self.last_interval_loss = float("nan")
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation, a save) out of the next line's step time."""
    self._t_last += seconds

  def record(self, step: int, metrics: dict[str, Any]) -> None:
    self._pending.append((step, metrics))

  def flush(self, step: int, *, note: str = "") -> dict[str, float]:
    """Fetches buffered metrics (a device sync), prints one line, and writes scalars."""
    if not self._pending:
      return {}
    fetched = jax.device_get([m for _, m in self._pending])
    for (s, _), m in zip(self._pending, fetched):
      row = {k: float(np.asarray(v)) for k, v in m.items()}
      self.history[s] = row
      if self._writer:
        for k, v in row.items():
          self._writer.add_scalar(f"train/{k}", v, s)
    last = dict(self.history[self._pending[-1][0]])
    last["loss"] = float(np.mean([self.history[s]["loss"] for s, _ in self._pending]))  # interval mean
    self.last_interval_loss = last["loss"]
    interval = [self.history[s] for s, _ in self._pending]
    self._pending = []
    now = time.perf_counter()
    steps = max(step - self._step_last, 1)
    sec_per_step = (now - self._t_last) / steps
    # Real (non-padding) tokens; the packed batch shape counts padding too.
    tokens = sum(r.get("tokens", self.tokens_per_step) for r in interval)
    tok_s = tokens / max(now - self._t_last, 1e-9)
    self._t_last, self._step_last = now, step
    if self._peak:
      mfu = f"MFU {100 * self._flops * tok_s / self._peak:.1f}%"
    else:
      mfu = f"MFU n/a ({self._platform})"
    eta = datetime.timedelta(seconds=round(sec_per_step * (self.num_steps - step)))
    parts = [f"step {step:>5}/{self.num_steps}", f"loss {last['loss']:.3f}"]
    if "mtp_loss" in last:
      parts.append(f"mtp {last['mtp_loss']:.3f}")
    parts += [f"grad {last['grad_norm']:.2f}", f"lr {last['lr']:.1e}", f"{_si(tok_s)} tok/s", mfu]
    if last.get("expert_imbalance"):
      parts.append(f"experts max/mean {last['expert_imbalance']:.2f}")
    parts += [f"{sec_per_step:.2f} s/step", f"ETA {eta}"]
    if self._writer:
      self._writer.add_scalar("perf/tokens_per_second", tok_s, step)
      self._writer.add_scalar("perf/seconds_per_step", sec_per_step, step)
      self._writer.flush()
    self.print(" | ".join(parts) + note)
    return last

  def eval(self, step: int, loss: float, tokens: int) -> None:
    if self._writer:
      self._writer.add_scalar("eval/loss", loss, step)
      self._writer.flush()
    self.print(f"eval  {step:>5}/{self.num_steps} | held-out loss {loss:.3f} ({tokens} tokens)")

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, flush=True)

  def close(self) -> None:
    if self._writer:
      self._writer.close()
