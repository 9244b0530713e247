"""SFT smoke run: chat-formatted data, loss on assistant tokens only, on 2 CPU cores.

    python -m n3jax.train --config=configs/tiny_sft_cpu.py --workdir=/tmp/n3jax_sft

Preset `tiny-dense` learns the built-in `builtin:arith_chat` conversations (sums, half with `/think`
reasoning), rendered with the Nemotron 3 chat template (`n3jax.data.render_chat`) and packed whole
into 256-token rows. Only assistant tokens after the generation prompt (reasoning, answer, `<|im_end|>`)
are in the loss, as NVIDIA's SFT data preparation masks them.
Expected: the assistant-token loss falls from 5.6 to about 0.94 (held-out 0.84) in 150 steps, 98 s on
2 shared CPU cores. To fine-tune a converted checkpoint instead, add `--config.init_from=DIR` and
`--config.data.tokenizer=DIR/tokenizer.json`.
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model ---
  cfg.model_preset = "tiny-dense"
  # --- Data ---
  cfg.data.source = "builtin:arith_chat"
  cfg.data.format = "chat"
  cfg.data.packing = "first_fit"
  cfg.data.seq_len = 256
  cfg.data.tokenizer = "byte"
  # --- Steps ---
  cfg.batch_size = 8
  cfg.num_steps = 150
  # --- Optimizer (cosine, as the Nemotron 3 SFT recipe) ---
  cfg.optimizer.lr = 3e-3
  cfg.optimizer.schedule = "cosine"
  cfg.optimizer.warmup_steps = 10
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 50
  cfg.log_every = 10
  cfg.eval_every = 50
  return cfg
