"""Text in, text out: checkpoint and tokenizer loading, the chat template, and one call to generate.

    out = generate("/ckpt/nano3", "Why is the sky blue?", thinking_budget=256, temperature=0.6, top_p=0.95)
    out.answer, out.reasoning, out.tool_calls, out.finish_reason
    for deltas in stream("/ckpt/nano3", ["a", "b"], reasoning=False): ...   # Deltas per step, as they come
    out = generate("/ckpt/super", "Why?", speculative_k=3)   # MTP speculative decoding (models with MTP heads)
    mesh = n3jax.sharding.make_mesh({"fsdp": 4, "tensor": 2})
    outs = generate("/ckpt/super", ["a", "b", "c", "d"], mesh=mesh, layout="fsdp_tp_ep")  # params + caches sharded
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from n3jax import checkpointing
from n3jax import sharding
from n3jax.configs import ModelConfig
from n3jax.inference import _engine, _generate, _speculative, chat
from n3jax.inference._sampling import sampling_params
from n3jax.inference._speculative import SpeculativeStats

__all__ = ["Generation", "checkpoint_sampling", "generate", "stream", "load_tokenizer", "stop_token_ids"]

ASSETS_DIR = "hf_assets"  # where `convert_from_hf` puts the hub's tokenizer and generation files


@dataclasses.dataclass
class Generation:
  text: str                        # everything generated, markers included (stop token / string cut)
  answer: str                      # the text after the thinking section (chat mode), stripped
  reasoning: str | None            # the thinking section, or None when there was none
  tool_calls: list[dict[str, Any]]  # parsed from the answer (chat mode)
  token_ids: list[int]
  finish_reason: str               # "stop" or "length"
  thinking_tokens: int
  prompt_tokens: int
  speculative: SpeculativeStats | None = None  # with speculative_k: verify steps, drafts made and kept


def load_tokenizer(ckpt_dir: str, cfg: ModelConfig):
  """The checkpoint's `hf_assets/tokenizer.json` as an `n3jax.data.HFTokenizer`."""
  from n3jax.data import HFTokenizer  # pylint: disable=g-import-not-at-top
  path = os.path.join(ckpt_dir, ASSETS_DIR, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"checkpoint {ckpt_dir} has no tokenizer: {path} does not exist (convert_from_hf copies tokenizer.json "
        "from the hub checkpoint when it has one); pass tokenizer=PATH (CLI: --tokenizer) to use another")
  eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  return HFTokenizer(path, pad_id=cfg.pad_token_id, bos_id=cfg.bos_token_id, eos_id=eos)


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(cfg: ModelConfig, tokenizer, ckpt_dir: str | None, *, chat_mode: bool) -> list[int]:
  """EOS of the config and of `hf_assets/generation_config.json`, and `<|im_end|>` in chat mode."""
  ids = _ids(cfg.eos_token_id)
  path = os.path.join(ckpt_dir, ASSETS_DIR, "generation_config.json") if ckpt_dir else None
  if path and os.path.isfile(path):
    with open(path) as f:
      ids += _ids(json.load(f).get("eos_token_id"))
  if chat_mode and (end := tokenizer.special(chat.END_OF_TURN)) is not None:
    ids.append(end)
  return sorted(set(ids))


def checkpoint_sampling(ckpt_dir: str | None) -> dict[str, Any]:
  """The sampling options a checkpoint's `hf_assets/generation_config.json` sets, read as transformers'
  `generate` reads them: with `do_sample` its temperature, top_k, top_p and min_p (transformers' defaults
  1.0, 50, 1.0, off where the file leaves one out), without it greedy; its repetition_penalty either way.
  Options given to `generate` override these one by one."""
  path = os.path.join(ckpt_dir, ASSETS_DIR, "generation_config.json") if ckpt_dir else None
  if not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    g = json.load(f)
  if not isinstance(g, dict):
    raise ValueError(f"{path} is not a JSON object")
  out = {}
  if g.get("repetition_penalty") is not None:
    out["repetition_penalty"] = g["repetition_penalty"]
  if g.get("do_sample"):
    for name, default, off in (("temperature", 1.0, 1.0), ("top_k", 50, 0), ("top_p", 1.0, 1.0), ("min_p", None, 0.0)):
      value = g.get(name, default)
      out[name] = off if value is None else value
  return out


def _conversations(prompt, messages, system: str | None) -> tuple[list, bool]:
  """(list of prompts or conversations, whether the input was a batch)."""
  if (prompt is None) == (messages is None):
    raise ValueError("give exactly one of prompt (a string or list of strings) and messages (a conversation "
                     "or a list of conversations)")
  if prompt is not None:
    batch = not isinstance(prompt, str)
    prompts = list(prompt) if batch else [prompt]
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    head = [{"role": "system", "content": system}] if system is not None else []
    return [head + [{"role": "user", "content": p}] for p in prompts], batch
  batch = bool(messages) and isinstance(messages[0], (list, tuple))
  convs = list(messages) if batch else [messages]
  if system is not None:  # the system turn goes first, unless a conversation already has one
    if any(m.get("role") == "system" for c in convs for m in c):
      raise ValueError("system= was given but the messages already have a system turn; give one of them")
    convs = [[{"role": "system", "content": system}, *c] for c in convs]
  return convs, batch


def _prepare(model, prompt, messages, *, tokenizer, chat_mode, system, tools, reasoning, stop, sampling,
             speculative_k, lengths, mesh=None, layout=None):
  """`lengths`: max_new_tokens, max_len, prefill_chunk and thinking_budget, checked with the prompts before
  any weight is read."""
  sharded = _engine.check_mesh(mesh, layout)
  stop = _generate.stop_strings_tuple(stop)
  if isinstance(model, (str, os.PathLike)):
    ckpt_dir = os.fspath(model)
    cfg = checkpointing.load_config(ckpt_dir)  # fails early, before any weights are read
    tok = load_tokenizer(ckpt_dir, cfg) if tokenizer is None else tokenizer
  else:
    ckpt_dir, (cfg, params) = None, model
    if tokenizer is None:
      raise ValueError("generating from (cfg, params) needs tokenizer= (an n3jax.data tokenizer or a path)")
    tok = tokenizer
  cfg = _engine.decoding_config(cfg)  # layers unrolled, weights split per layer below
  if speculative_k is not None:  # before any weights are read
    _speculative.check(cfg, None, speculative_k)
  if isinstance(tok, (str, os.PathLike)):
    from n3jax.data import load_tokenizer as _load  # pylint: disable=g-import-not-at-top
    tok = _load(os.fspath(tok), pad_id=cfg.pad_token_id or 0, bos_id=cfg.bos_token_id or 1,
                eos_id=_ids(cfg.eos_token_id)[0] if _ids(cfg.eos_token_id) else 2)
  params_sampling = sampling_params(**{**checkpoint_sampling(ckpt_dir), **sampling})
  convs, batch = _conversations(prompt, messages, system)
  if chat_mode:
    texts = [chat.render(c, tools=tools, reasoning=reasoning) for c in convs]
  else:
    if messages is not None or tools or system is not None:
      raise ValueError("messages, tools and system need the chat template (chat_mode=True)")
    texts = [c[-1]["content"] for c in convs]
  # Chat text carries its own markers and no BOS (transformers' apply_chat_template encodes it so); a raw
  # prompt gets what `tokenizer(prompt)` adds (a base model's BOS, where its tokenizer adds one).
  prompts = [chat.encode(tok, t) if chat_mode else np.asarray(tok.encode(t, add_special_tokens=True), np.int32)
             for t in texts]
  _generate.check_request(prompts, vocab_size=cfg.vocab_size, **lengths)
  if isinstance(model, (str, os.PathLike)):  # on a mesh: each process reads its shards only
    if sharded:  # read in their shards, then split per layer on the devices (`_engine.place_params`)
      params = _engine.place_params(
          cfg, checkpointing.load_params(ckpt_dir, shardings=sharding.param_shardings(cfg, mesh, layout)), mesh, layout)
    else:  # the decoding step's layout (`_engine.decoding_params`), made on the host
      params = jax.device_put(_engine.decoding_layout(cfg, checkpointing.load_params(ckpt_dir, as_numpy=True)))
  kwargs = dict(sampling=params_sampling, stop_tokens=stop_token_ids(cfg, tok, ckpt_dir, chat_mode=chat_mode),
                stop_strings=stop, decode=tok.decode,
                think_ids=(tok.special(chat.THINK_OPEN), tok.special(chat.THINK_CLOSE)))
  return cfg, params, tok, prompts, batch, kwargs


def stream(model, prompt: str | Sequence[str] | None = None, *, messages=None, tokenizer=None, chat_mode: bool = True,
           system: str | None = None, tools=None, reasoning: bool = True, thinking_budget: int | None = None,
           max_new_tokens: int = 256, max_len: int | None = None, stop: str | Sequence[str] = (),
           prefill_chunk: int | None = None, rows_out: list | None = None, speculative_k: int | None = None,
           mesh=None, layout: str | None = None, **sampling) -> Iterator[list[_generate.Delta]]:
  """Like `generate`, but yields each step's Deltas (row, token id, released text) as they come."""
  cfg, params, _, prompts, _, kwargs = _prepare(
      model, prompt, messages, tokenizer=tokenizer, chat_mode=chat_mode, system=system, tools=tools,
      reasoning=reasoning, stop=stop, sampling=sampling, speculative_k=speculative_k, mesh=mesh, layout=layout,
      lengths=dict(max_new_tokens=max_new_tokens, max_len=max_len, prefill_chunk=prefill_chunk,
                   thinking_budget=thinking_budget))
  yield from _generate.stream_tokens(cfg, params, prompts, max_new_tokens=max_new_tokens, max_len=max_len,
                                     prefill_chunk=prefill_chunk, thinking_budget=thinking_budget,
                                     rows_out=rows_out, speculative_k=speculative_k, mesh=mesh, layout=layout,
                                     **kwargs)


def generate(model, prompt: str | Sequence[str] | None = None, *, messages=None, tokenizer=None,
             chat_mode: bool = True, system: str | None = None, tools=None, reasoning: bool = True,
             thinking_budget: int | None = None, max_new_tokens: int = 256, max_len: int | None = None,
             stop: str | Sequence[str] = (), prefill_chunk: int | None = None,
             on_token: Callable[[_generate.Delta], None] | None = None, speculative_k: int | None = None,
             mesh=None, layout: str | None = None, **sampling) -> Generation | list[Generation]:
  """Generates from an n3jax checkpoint directory (or a `(cfg, params)` pair with `tokenizer=`).

  prompt: a user message (or a list: a batch) put into the chat template, or raw text with
  `chat_mode=False`; messages: a conversation (or a list of them), OpenAI style, with `tools`.
  reasoning: open a thinking section (on) or start with `<think></think>` (off). thinking_budget: after
  that many thinking tokens the generator writes `</think>` and the model goes on with its answer.
  system: a system turn put first (also before `messages` that have none). stop: a stop string or a list of
  them (EOS and `<|im_end|>` always stop). max_len: the cache size, the most tokens prompt and generation
  together may hold (default prompt + max_new_tokens). on_token: called with every Delta as it is
  generated. **sampling: `SamplingParams` fields (temperature, top_k, top_p, min_p, repetition_penalty,
  seed); anything else is an error. Options left out come from the checkpoint's generation_config.json as
  transformers reads it (`checkpoint_sampling`), else greedy.
  speculative_k: MTP speculative decoding (models with MTP heads, e.g. Nemotron 3 Super): the MTP heads
  draft k tokens and the main model checks them in one forward; greedy output is the same as without it,
  sampled output has the same distribution. `Generation.speculative` then reports the acceptance.
  mesh, layout: generate on a device mesh (`n3jax.sharding.make_mesh`) under a layout of
  `n3jax.sharding.AXIS_RULES` ("fsdp", "fsdp_tp_ep", ...): each process reads only its shards of a checkpoint
  (`(cfg, params)` are placed with `sharding.param_shardings` unless already so),
  the caches are sharded to match (rows over the batch axes, Mamba and KV heads over the tensor axis where
  the layout splits them) and decoding compiles once. The number of prompts must divide over the batch axes.
  With speculative_k the MTP caches are sharded like the main KV cache and each round compiles once.
  Returns one Generation, or a list for a batch.
  """
  cfg, params, _, prompts, batch, kwargs = _prepare(
      model, prompt, messages, tokenizer=tokenizer, chat_mode=chat_mode, system=system, tools=tools,
      reasoning=reasoning, stop=stop, sampling=sampling, speculative_k=speculative_k, mesh=mesh, layout=layout,
      lengths=dict(max_new_tokens=max_new_tokens, max_len=max_len, prefill_chunk=prefill_chunk,
                   thinking_budget=thinking_budget))
  done = _generate.generate_tokens(cfg, params, prompts, on_token=on_token, max_new_tokens=max_new_tokens,
                                   max_len=max_len, prefill_chunk=prefill_chunk, thinking_budget=thinking_budget,
                                   speculative_k=speculative_k, mesh=mesh, layout=layout, **kwargs)
  out = []
  for p, c in zip(prompts, done):
    started = chat_mode and reasoning
    reasoning_text, answer = chat.split_reasoning(c.text, started_in_thinking=started) if chat_mode else (None, c.text)
    out.append(Generation(text=c.text, answer=answer, reasoning=reasoning_text,
                          tool_calls=chat.parse_tool_calls(answer) if chat_mode else [], token_ids=c.token_ids,
                          finish_reason=c.finish_reason, thinking_tokens=c.thinking_tokens, prompt_tokens=len(p),
                          speculative=c.speculative))
  return out if batch else out[0]
