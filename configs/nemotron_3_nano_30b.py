"""Nemotron 3 Nano 30B-A3B pretraining at its published settings (multi-host: add `--config.distributed=True`).

    python -m n3jax.train --config=configs/nemotron_3_nano_30b.py --workdir=gs://... \\
        --config.data.source=... --config.data.tokenizer=.../tokenizer.json

Settings from NVIDIA-NeMo Megatron-Bridge `recipes/nemotronh/nemotron_3_nano.py`
(`nemotron_3_nano_pretrain_config`): sequence length 8192, global batch 3072 sequences (25M tokens),
39,735 steps, peak lr 1.6e-3 to min 1.6e-5, 333 warmup steps, weight decay 0.1, Adam beta2 0.95,
bf16 compute with f32 master weights, router in f32, aux-loss-free expert bias plus `seq_aux_loss`
with coefficient 1e-4. Schedule: WSD, as the Nemotron 3 Nano technical report describes; the recipe
file leaves the decay to its cosine default, so `decay_fraction=0.2` and the `minus_sqrt` shape are
our choices, not published numbers. Layout: FSDP over every device with the 128 experts split 8 ways
(EP8, as NVIDIA's published Megatron-Bridge runs); `python -m n3jax.plan` checks other meshes. Tests only
build this config, `jax.eval_shape` the model and split its params over the mesh on 8 simulated devices.
Memory: compiled for 64 H100s (8 nodes; fsdp 8 x expert 8) without them (`n3jax.aot`), one sequence per GPU
per micro-batch (`micro_batch_size=1`: 48 micro-batches per step), XLA's analysis gives 38.7 GB per GPU
(49.6 GB before the `fsdp_ep` rules split the non-expert weights over the expert axis too and the scanned
layers got their own backward pass).
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model ---
  cfg.model_preset = "nemotron-3-nano-30b-a3b"
  cfg.model_overrides = ml_collections.ConfigDict(dict(
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full",
      initializer_range=0.0173))
  # --- Data ---
  cfg.data.seq_len = 8192
  cfg.data.prefetch = 2
  cfg.data.eval_batches = 32
  # --- Steps ---
  cfg.batch_size = 3072
  cfg.grad_accum_steps = 1
  cfg.micro_batch_size = 1  # one sequence per device per micro-batch: grad_accum_steps = batch / devices
  cfg.num_steps = 39_735
  # --- Optimizer ---
  cfg.optimizer.lr = 1.6e-3
  cfg.optimizer.min_lr_ratio = 0.01
  cfg.optimizer.warmup_steps = 333
  cfg.optimizer.schedule = "wsd"
  cfg.optimizer.decay_fraction = 0.2
  cfg.optimizer.decay_shape = "minus_sqrt"
  cfg.optimizer.weight_decay = 0.1
  cfg.optimizer.b2 = 0.95
  # --- MoE ---
  cfg.moe.bias_update_rate = 1e-3
  cfg.moe.balance_loss_coef = 1e-4
  # --- Devices ---
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=8, tensor=1))
  cfg.axis_rules = "fsdp_ep"
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 200
  cfg.log_every = 10
  cfg.eval_every = 500
  return cfg
