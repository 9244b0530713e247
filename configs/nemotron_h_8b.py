"""Nemotron-H 8B pretraining at its published settings (multi-host: add `--config.distributed=True`).

    python -m n3jax.train --config=configs/nemotron_h_8b.py --workdir=gs://... \\
        --config.data.source=... --config.data.tokenizer=.../tokenizer.json

Settings from NVIDIA-NeMo Megatron-Bridge `recipes/nemotronh/nemotronh.py` (`nemotronh_8b_pretrain_config`
over `_pretrain_common`): sequence length 8192, global batch 768 sequences (6.3M tokens), 1,168,251
steps, 2000 warmup steps, peak lr 3e-4 to min 3e-5, weight decay 0.1, Adam beta2 0.95, bf16 mixed
precision with f32 master weights. Schedule: WSD, as the Nemotron-H paper (arXiv 2504.03624) trains;
`decay_fraction=0.2` is our choice (the recipe file uses its cosine default). Layout: FSDP over every
device (`python -m n3jax.plan` checks other meshes). Tests only build this config, `jax.eval_shape` the
model and split its params over the mesh on 8 simulated devices. Memory: compiled for 64 H100s without them
(`n3jax.aot`), one sequence per GPU per micro-batch, XLA's analysis gives 36.8 GB per GPU.
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model ---
  cfg.model_preset = "nemotron-h-8b"
  cfg.model_overrides = ml_collections.ConfigDict(dict(
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full"))
  # --- Data ---
  cfg.data.seq_len = 8192
  cfg.data.prefetch = 2
  cfg.data.eval_batches = 32
  # --- Steps ---
  cfg.batch_size = 768
  cfg.micro_batch_size = 1  # one sequence per device per micro-batch: grad_accum_steps = batch / devices
  cfg.num_steps = 1_168_251
  # --- Optimizer ---
  cfg.optimizer.lr = 3e-4
  cfg.optimizer.min_lr_ratio = 0.1
  cfg.optimizer.warmup_steps = 2000
  cfg.optimizer.schedule = "wsd"
  cfg.optimizer.decay_fraction = 0.2
  cfg.optimizer.weight_decay = 0.1
  cfg.optimizer.b2 = 0.95
  # --- Devices ---
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  cfg.axis_rules = "fsdp"
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 1000
  cfg.log_every = 10
  cfg.eval_every = 1000
  return cfg
