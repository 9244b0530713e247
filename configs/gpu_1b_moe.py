"""A ~1B-parameter hybrid Mamba-2 / attention / MoE model for one GPU (80 GB), scaled up from `tiny-moe`.

    python -m n3jax.train --config=configs/gpu_1b_moe.py --workdir=/tmp/n3jax_1b \\
        --config.data.source=/data/train-*.jsonl --config.data.tokenizer=/ckpt/tokenizer.json

0.99B params in all, 0.46B active per token (0.19B without the 131072 x 1024 embedding and head):
pattern MEMEM*EMEMEM*EMEMEME (10 Mamba-2, 2 attention, 9 MoE layers with 32 experts, top-4, and a
shared expert). bf16 compute, f32 master params and Adam moments, layers scanned and rematerialised
(`dots_saveable`). 8 x 4096 tokens per step as 8 micro-batches of 1 x 4096. Memory, from XLA's analysis
of the step compiled for one H100 without one (`trainer.compile_train_step` on `n3jax.aot` devices): 48.0 GB
(11.9 GB params + Adam state, 36.1 GB temporaries; 2026-12-07); micro-batches of 2 x 4096 would need 76.4 GB, more
than the 75% of the GPU that XLA takes by default; `remat_policy="full"` needs 27.7 GB. Without
`data.source`, it trains on the built-in corpus with the byte tokenizer, which fits any vocabulary.
Not yet run on a GPU: speed is unmeasured (`benchmarks/train_step.py` measures the step).
"""

import ml_collections

from n3jax import trainer


def get_config() -> ml_collections.ConfigDict:
  cfg = trainer.default_config()
  # --- Model: tiny-moe's block kinds and routing at ~1B scale ---
  cfg.model_preset = "tiny-moe"
  cfg.model_overrides = ml_collections.ConfigDict(dict(
      vocab_size=131072, hidden_size=1024, blocks="MEMEM*EMEMEM*EMEMEME",
      mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
      num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=2048,
      n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=1024,
      moe_shared_expert_intermediate_size=2048, n_group=1, topk_group=1, routed_scaling_factor=2.5,
      max_position_embeddings=8192,
      dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="dots_saveable",
  ))
  # --- Data ---
  cfg.data.seq_len = 4096
  cfg.data.prefetch = 2
  cfg.data.eval_batches = 8
  # --- Steps ---
  cfg.batch_size = 8
  cfg.grad_accum_steps = 8
  cfg.num_steps = 20_000
  # --- Optimizer ---
  cfg.optimizer.lr = 1e-3
  cfg.optimizer.warmup_steps = 500
  cfg.optimizer.schedule = "wsd"
  cfg.optimizer.decay_fraction = 0.2
  # --- Checkpoints and progress ---
  cfg.checkpoint.every_steps = 1000
  cfg.log_every = 50
  cfg.eval_every = 1000
  return cfg
