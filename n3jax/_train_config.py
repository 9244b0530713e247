"""The training config schema: `default_config()` holds every key with its default and a comment.

Experiment files (`configs/*.py`) start from `default_config()` and change what they need; a key that is
not in the schema (a typo) is one clear error naming the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from n3jax import configs as model_configs

__all__ = ["default_config", "merge_with_defaults", "build_model_config"]


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --- Model ---
  c.model_preset = "tiny-moe"          # key of n3jax.configs.PRESETS (ignored when init_from is set)
  c.model_overrides = ml_collections.ConfigDict()  # ModelConfig fields, e.g. dtype="bfloat16"
  c.init_from = ""                     # n3jax checkpoint dir (checkpointing.save_params) to fine-tune
  c.seed = 0                           # params init and the data order
  # --- Data ---
  c.data = ml_collections.ConfigDict(dict(
      source="builtin:pydoc",          # 'builtin:pydoc', or .jsonl / .parquet / .array_record path(s) or glob
      eval_source="",                  # held-out file(s); empty: hold out eval_fraction of `source`
      eval_fraction=0.05,
      format="text",                   # 'text' | 'tokens' (pre-tokenized ids) | 'chat' (SFT messages)
      text_key="text", tokens_key="input_ids", messages_key="messages",
      tools_key="tools",               # chat: the record field with its tool definitions (absent: none)
      tokenizer="byte",                # 'byte' (n3jax.data.ByteTokenizer) or a tokenizer.json path
      seq_len=256,                     # tokens per row (T)
      packing="concat",                # 'concat' (split docs across rows) | 'first_fit' (whole examples)
      overlong="error",                # first_fit: an example longer than seq_len + 1: 'error' | 'truncate'
      add_eos=True,                    # text: append eos to every document (a tokenizer.json's own BOS / EOS
                                       # template applies too, as in Megatron's data preparation)
      shuffle=True,
      prefetch=0,                      # batches prefetched by a background thread (0: none)
      eval_batches=4,                  # held-out batches per evaluation
      validate_records=1000,           # records of each split built up front, before any compile
  ))
  # --- Batch and steps ---
  c.batch_size = 8                     # sequences per optimizer step, all hosts together
  c.grad_accum_steps = 1               # micro-batches per step (a scan inside the jitted step)
  c.micro_batch_size = 0               # > 0: sequences per device per micro-batch; sets grad_accum_steps to
                                       # batch_size / (devices splitting the batch x micro_batch_size)
  c.num_steps = 100                    # sets the schedule; training ends here
  c.stop_after_step = 0                # > 0: save and return after this step (preemption drill)
  # --- Optimizer (AdamW; master params, gradients and moments in model param_dtype unless mu_dtype) ---
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4,                         # peak learning rate
      schedule="wsd",                  # 'wsd' (warmup-stable-decay) | 'cosine' | 'constant'
      warmup_steps=10,
      decay_fraction=0.2,              # wsd: the last fraction of num_steps decays
      decay_shape="linear",            # wsd decay: 'linear' | 'cosine' | 'minus_sqrt'
      min_lr_ratio=0.01,               # final lr = lr * min_lr_ratio (wsd and cosine)
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1,                # not on norms, biases, A_log, D, dt_bias (see n3jax._optim)
      grad_clip=1.0,                   # global-norm clip; 0 disables
      mu_dtype="",                     # AdamW first moment: '' (param dtype) | 'bfloat16' | 'float32'
  ))
  # --- MoE and MTP losses ---
  c.moe = ml_collections.ConfigDict(dict(
      bias_update_rate=1e-3,           # aux-loss-free balancing: b += rate * sign(mean_load - load)
      balance_loss_coef=1e-4,          # sequence-level balance loss (0 disables)
  ))
  c.loss_chunk = 0                     # positions per piece of the cross-entropy: the f32 logits [B, chunk, V]
                                       # of one piece at a time, recomputed in the backward pass; 0: whole
  c.mtp_loss_scale = 0.3               # loss = main + mtp_loss_scale / D * sum_k CE_k
  c.mtp_depths = 0                     # 0: the model's num_nextn_predict_layers (Super trains 2)
  # --- Checkpoints ---
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100,                 # 0: only at the end and on SIGTERM
      keep=3,                          # keep the last K
      async_save=True,
  ))
  # --- Devices (n3jax.sharding) ---
  # Mesh axis sizes over all processes' devices; one may be -1 (whatever is left). All 1: one device.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, expert=1, tensor=1))
  c.axis_rules = "data_parallel"       # key of n3jax.sharding.AXIS_RULES: data_parallel|fsdp|fsdp_ep|fsdp_tp_ep
  c.distributed = False                # multi-host: call jax.distributed.initialize() first (SLURM, TPU pods,
                                       # or JAX_COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID set)
  # --- Progress ---
  c.log_every = 10
  c.eval_every = 50                    # 0: only at the end
  return c


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != "model_overrides":
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def merge_with_defaults(config) -> ml_collections.ConfigDict:
  """The full config: `config`'s values over `default_config()`. Unknown keys raise one error."""
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  flat = _flatten(given)
  known = _flatten(default_config().to_dict())
  if unknown := sorted(set(flat) - set(known)):
    hints = []
    for k in unknown:
      close = difflib.get_close_matches(k, known, n=1)
      hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"Unknown config key(s): {', '.join(hints)}. The keys and their meaning are in "
                     "n3jax._train_config.default_config().")
  merged = default_config()
  for key, value in flat.items():
    *path, leaf = key.split(".")
    node = merged
    for p in path:
      node = node[p]
    if leaf == "model_overrides":
      node[leaf] = ml_collections.ConfigDict(dict(value or {}))
    else:
      node[leaf] = value
  return merged


def build_model_config(config) -> model_configs.ModelConfig:
  """The preset (or the `init_from` checkpoint's config) with `model_overrides` applied."""
  from n3jax import checkpointing  # pylint: disable=g-import-not-at-top

  if config.init_from:
    base = checkpointing.load_config(config.init_from)
    where = f"init_from={config.init_from!r}"
  else:
    if config.model_preset not in model_configs.PRESETS:
      close = difflib.get_close_matches(config.model_preset, model_configs.PRESETS, n=1)
      raise ValueError(f"Unknown model_preset={config.model_preset!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; known: {sorted(model_configs.PRESETS)}")
    base = model_configs.PRESETS[config.model_preset]
    where = f"model_preset={config.model_preset!r}"
  overrides = dict(config.model_overrides.to_dict() if config.model_overrides else {})
  fields = {f.name for f in dataclasses.fields(model_configs.ModelConfig)}
  if unknown := sorted(set(overrides) - fields):
    raise ValueError(f"model_overrides has unknown ModelConfig field(s) {unknown}; known: {sorted(fields)}")
  try:
    return base.replace(**overrides)
  except (ValueError, TypeError) as e:
    raise ValueError(f"model_overrides {overrides} on {where}: {e}") from None
