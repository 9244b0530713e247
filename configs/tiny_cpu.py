"""Quickstart: a tiny hybrid Mamba-2 / attention / MoE model learns English text on 2 CPU cores.

    python -m n3jax.train --config=configs/tiny_cpu.py --workdir=/tmp/n3jax_tiny

Preset `tiny-moe` (pattern MEM*EM-E, 0.28M params, 8 experts top-2), the built-in pydoc corpus
(no download) through the byte tokenizer, 16 x 256 tokens per step, 300 steps of AdamW with a WSD
schedule. Expected on 2 CPU cores: about 2 minutes in all (compile ~10 s); the train loss falls from
5.55 (= ln 256, uniform over the vocabulary) to about 2.0 and the held-out loss ends near 2.0.
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model ---
  cfg.model_preset = "tiny-moe"
  # --- Data ---
  cfg.data.source = "builtin:pydoc"
  cfg.data.tokenizer = "byte"
  cfg.data.seq_len = 256
  # --- Steps ---
  cfg.batch_size = 16
  cfg.num_steps = 300
  # --- Optimizer ---
  cfg.optimizer.lr = 3e-3
  cfg.optimizer.warmup_steps = 20
  cfg.optimizer.decay_fraction = 0.2
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 100
  cfg.log_every = 20
  cfg.eval_every = 100
  return cfg
