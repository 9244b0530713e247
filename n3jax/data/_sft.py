"""Chat formatting for SFT: the Nemotron 3 template, with a loss mask that covers assistant tokens only.

Each turn is rendered ChatML style, as the chat template of `nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16`
does (tokenizer `chat_template`; NVIDIA-NeMo `Nemotron` recipe, `docs/train/nano3/sft.md`: "Renders
messages using Nano3 Jinja template with special tokens (<|im_start|>, <|im_end|>)", role-based mask):

    <|im_start|>system\\n{system, may carry the reasoning flags /think or /no_think}<|im_end|>\\n
    <|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning_content}\\n</think>\\n{content}<|im_end|>\\n

- A system block is always emitted (empty when the conversation has none), like the HF template.
- An assistant turn without `reasoning_content` gets an empty `<think></think>` before its content.
- Loss mask: 1 on every assistant token after the `<|im_start|>assistant\\n` header, through its
  `<|im_end|>` (the model must learn to stop); 0 on system / user / tool turns, on headers, and on the
  newline after `<|im_end|>`. Every assistant turn of a conversation is trained on.

Markers are single tokens: `tokenizer.special(name)` (the byte tokenizer reserves ids for them); a
tokenizer without them encodes the marker text as ordinary text. Each piece is tokenized on its own
(role-labelled chunks, as in the Nemotron data prep), so masks never straddle a token.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["render_chat", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")


def _piece(tokenizer, text: str) -> np.ndarray:
  if (sid := tokenizer.special(text)) is not None and text.startswith("<"):
    return np.asarray([sid], np.int32)
  return np.asarray(tokenizer.encode(text), np.int32)


def render_chat(messages: Sequence[dict[str, Any]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """messages [{"role", "content", optional "reasoning_content"}] -> (ids int32 [N], loss_mask int32 [N])."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
  pieces: list[tuple[str, int]] = []  # (text or marker, trained?)

  def turn(role: str, body: list[tuple[str, int]]):
    pieces.extend([("<|im_start|>", 0), (f"{role}\n", 0), *body, ("<|im_end|>", int(role == "assistant")),
                   ("\n", 0)])

  msgs = list(messages)
  if msgs[0].get("role") != "system":
    msgs.insert(0, {"role": "system", "content": ""})
  for i, m in enumerate(msgs):
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise ValueError(f"message {i} has role {role!r}; known roles: {ROLES}")
    if not isinstance(content, str):
      raise ValueError(f"message {i} ({role}) needs a string 'content', got {type(content).__name__}")
    if role != "assistant":
      turn(role, [(content, 0)] if content else [])
      continue
    reasoning = m.get("reasoning_content")
    if reasoning:
      body = [("<think>", 1), (f"\n{reasoning}\n", 1), ("</think>", 1), (f"\n{content}", 1)]
    else:
      body = [("<think>", 1), ("</think>", 1)] + ([(content, 1)] if content else [])
    turn(role, body)
  if not any(m.get("role") == "assistant" for m in msgs):
    raise ValueError("conversation has no assistant turn, so nothing would be trained on")
  ids, mask = [], []
  for text, trained in pieces:
    toks = _piece(tokenizer, text)
    ids.append(toks)
    mask.append(np.full(len(toks), trained, np.int32))
  return np.concatenate(ids).astype(np.int32), np.concatenate(mask)
