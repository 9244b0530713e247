"""Chat SFT examples: the Nemotron 3 chat template, with a loss mask on the assistant tokens, as NVIDIA trains.

The text is `chat_template.render` (the released chat template, history reasoning truncated); what is cut
and trained follows the Nemotron 3 Nano SFT data preparation (NVIDIA-NeMo/Nemotron,
`src/nemotron/data_prep/core/chat_template.py`, `create_masked_messages`; `docs/train/nano3/sft.md`):

- A conversation where some turn has `reasoning_content` becomes one example per user turn: the messages
  up to the next user turn. The template drops the reasoning of the turns before that example's last user
  turn, as it does when the model is prompted, so each turn's reasoning is trained where it is seen; only
  the turns after the last user turn are trained.
- A conversation without reasoning is one example; every assistant turn is trained.
- Trained (mask 1): an assistant turn after its generation prompt, through `<|im_end|>\\n`. The generation
  prompt is masked, as the prompt supplies it at inference: `<|im_start|>assistant\\n<think>\\n` before
  reasoning, `<|im_start|>assistant\\n<think></think>` before a turn without. Masked (0): system, user and
  tool turns (tool results come back in a user turn), and assistant turns before the trained part.
- Where two assistant turns follow each other, NVIDIA's incremental rendering trains the second turn's header
  and generation prompt with the first turn's tokens; here every assistant turn's prompt is masked (the
  generation loop supplies it). Otherwise the masks are NVIDIA's, character for character (checked on 1255
  random conversations with tools, tool calls and reasoning against `create_masked_messages`).
- An example with nothing trained (a sub-conversation that ends on its user turn) is skipped, as NVIDIA
  skips it; a conversation with no trained token at all is an error.

Markers (`<|im_start|>` ...) are single tokens where the tokenizer has them (`tokenizer.special`); each piece
is tokenized on its own (role-labelled chunks, as in the Nemotron data prep), so a mask never straddles a token.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from n3jax.data import chat_template as tpl

__all__ = ["render_chat"]


def _examples(messages: Sequence[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], int]]:
  """(sub-conversation, index of its first trainable message) for each example of a conversation."""
  if not any(m.get("reasoning_content") for m in messages):
    return [(list(messages), 0)]
  users = [i for i, m in enumerate(messages) if m["role"] == "user"]
  out = []
  for k, u in enumerate(users):
    end = users[k + 1] if k + 1 < len(users) else len(messages)
    if end - 1 > u:  # something follows the user turn
      out.append((list(messages[:end]), u + 1))
  return out


def _trained_split(m: dict[str, Any], text: str) -> int:
  """Characters of an assistant piece that are its generation prompt (masked)."""
  prompt = tpl.generation_prompt(tpl.reasoning_text(m) is not None)
  header = f"{tpl.IM_START}assistant\n"
  # Content with its own think tags (no reasoning_content) may not start with the prompt: mask the header only.
  return len(prompt) if text.startswith(prompt) else len(header)


def render_chat(messages: Sequence[dict[str, Any]], tokenizer, *, tools: Sequence[dict[str, Any]] | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
  """messages [{"role", "content", optional "reasoning_content" / "tool_calls"}] -> [(ids int32 [N], mask int32 [N])].

  One (ids, loss_mask) pair per example (module docstring); `tools` are the conversation's tool definitions.
  """
  tpl.check_messages(messages)
  out = []
  for sub, first in _examples(messages):
    ids, mask = [], []
    for index, text in tpl.render_pieces(sub, tools=tools):
      parts = [(text, 0)]
      if index >= first and sub[index]["role"] == "assistant":
        cut = _trained_split(sub[index], text)
        parts = [(text[:cut], 0), (text[cut:], 1)]
      for part, trained in parts:
        toks = tpl.encode(tokenizer, part)
        ids.append(toks)
        mask.append(np.full(len(toks), trained, np.int32))
    ids, mask = np.concatenate(ids).astype(np.int32), np.concatenate(mask)
    if mask.any():
      out.append((ids, mask))
  if not out:
    raise ValueError("conversation has no assistant turn after a user turn, so nothing would be trained on")
  return out
