"""Generation for n3jax models: caches, prefill and decode, sampling, the chat template, streaming.

Import from here; `_*.py` files are private.

    out = generate("/ckpt/nano3", "Why is the sky blue?", thinking_budget=256, temperature=0.6, top_p=0.95)
    tokens, segment_ids = left_align(prompts)                         # token level: any padding side in
    params = decoding_params(cfg, params)          # per-layer weights, fused Mamba input projections (one device)
    logits, cache = prefill(cfg, params, tokens, segment_ids, max_len=4096)
    logits, cache = decode_logits(cfg, params, cache, next_tokens)     # one compiled step, fixed shapes
    completions = generate_tokens(cfg, params, prompts, max_new_tokens=64, sampling=SamplingParams(...))
    out = generate("/ckpt/super", "Why?", speculative_k=3)            # MTP drafts 3, one verify forward
    out.speculative.mean_accepted                                     # drafts kept per verify step
    completions = generate_tokens(cfg, params, prompts, max_new_tokens=64, mesh=mesh, layout="fsdp_tp_ep")
                                  # on a mesh: params + caches sharded, decode compiled once
"""

from n3jax.inference import chat
from n3jax.inference._api import (Generation, checkpoint_sampling, generate, load_tokenizer, stop_token_ids,
                                  stream)
from n3jax.inference._engine import decode_logits, decode_sample, decoding_params, left_align, padded_length, prefill
from n3jax.inference._generate import Completion, Delta, generate_tokens, stream_tokens
from n3jax.inference._sampling import SamplingParams, distribution, sample, sampling_params
from n3jax.inference._speculative import SpeculativeStats, speculative_accept

__all__ = ["Completion", "Delta", "Generation", "SamplingParams", "SpeculativeStats", "chat", "checkpoint_sampling",
           "decode_logits", "decode_sample", "decoding_params", "distribution", "generate", "generate_tokens",
           "left_align", "load_tokenizer", "padded_length", "prefill", "sample", "sampling_params", "speculative_accept",
           "stop_token_ids", "stream", "stream_tokens"]
