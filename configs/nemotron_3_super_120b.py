"""Nemotron 3 Super 120B-A12B pretraining at its published settings (multi-host: add `--config.distributed=True`).

    python -m n3jax.train --config=configs/nemotron_3_super_120b.py --workdir=gs://... \\
        --config.data.source=... --config.data.tokenizer=.../tokenizer.json

Settings from NVIDIA-NeMo Megatron-Bridge `recipes/nemotronh/nemotron_3_super.py`
(`nemotron_3_super_pretrain_config`): sequence length 8192, global batch 3072 sequences (25M tokens),
39,735 steps, WSD schedule with 333 warmup steps, peak lr 4.5e-4 to min 4.5e-6, weight decay 0.1, Adam
beta2 0.95 and eps 1e-8, init std 0.014, NVFP4 mixed precision (`nemotron_3_super_bf16_with_nvfp4_mixed`:
the `quant="nvfp4"` recipe of `n3jax.quant`, last 14 layers in BF16), and MTP run twice through the one
shared MTP module with loss scale 0.3 (`mtp_num_layers=2`, `mtp_use_repeated_layer`). The recipe does not
set the decay fraction of WSD nor the MoE balancing rates: `decay_fraction=0.2` and the Nano 3 values below
are our choices. Layout: FSDP over every device with the 512 experts split 8 ways (EP8, as the recipe);
`python -m n3jax.plan --preset nemotron-3-super-120b-a12b --devices N` checks a cluster. Tests only build
this config, `jax.eval_shape` the model and split its params over the mesh on 8 simulated devices.
Memory: 68.2 GB per GPU by XLA's count (2026-12-07). Compiled for 64 H100s (fsdp 8 x expert 8) without them
(`n3jax.aot`), one sequence per GPU per micro-batch, XLA's analysis went from 210 GB to 68.2 GB with:
non-expert weights split over the expert axis too and experts split over fsdp on their expert dimension
(`fsdp_ep` rules; arguments 33.8 -> 23.2 GB, and no transposed copy of the expert weights for their
all-gather), the routed experts over 8 pieces of each sequence (`moe_seq_chunks=8`: the dropless
exchange's worst-case buffers, 8 x the routed rows, were 14.5 GB each in f32), blockwise attention
(`attention_impl`: the 8192 x 8192 f32 scores were 8.6 GB per copy), the cross-entropy over 1024-position
pieces (`loss_chunk`: three f32 [8192, 131072] logit tensors) and the scanned stack's own backward pass
(`models._scanned_full_remat`: no zero-filled copy of the expert stack per layer, 7.6 GB). Run it with
`XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (JAX takes 75% of a GPU by default); on a GPU the allocator's
fragmentation and NCCL's buffers come on top (not yet measured).

On a TPU v5p-64 slice (`n3jax.aot`, "tpu:v5p:4x4x4", 95 GB per chip) XLA counts 90.6 GB per chip (2026-12-07); add
`--config.model_overrides.moe_seq_chunks=16` for headroom there (81.9 GB on 2026-12-06).
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model ---
  cfg.model_preset = "nemotron-3-super-120b-a12b"
  cfg.model_overrides = ml_collections.ConfigDict(dict(
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full",
      initializer_range=0.014, quant="nvfp4",
      attention_impl="blockwise", moe_seq_chunks=8))  # memory: see the docstring
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
  cfg.optimizer.lr = 4.5e-4
  cfg.optimizer.min_lr_ratio = 0.01
  cfg.optimizer.warmup_steps = 333
  cfg.optimizer.schedule = "wsd"
  cfg.optimizer.decay_fraction = 0.2
  cfg.optimizer.weight_decay = 0.1
  cfg.optimizer.b2 = 0.95
  cfg.optimizer.eps = 1e-8
  # --- MoE and MTP ---
  cfg.moe.bias_update_rate = 1e-3
  cfg.moe.balance_loss_coef = 1e-4
  cfg.mtp_depths = 2
  cfg.mtp_loss_scale = 0.3
  cfg.loss_chunk = 1024
  # --- Devices ---
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=8, tensor=1))
  cfg.axis_rules = "fsdp_ep"
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 200
  cfg.log_every = 10
  cfg.eval_every = 1000
  return cfg
