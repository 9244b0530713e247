"""The Nemotron 3 chat template for generation: the prompt the model continues, and parsing what it writes.

The template itself (turns, tools and tool calls, reasoning on or off, history reasoning dropped) is
`n3jax.data.chat_template`, the one renderer that SFT examples (`n3jax.data.render_chat`) and prompts share;
`render` and `encode` are re-exported here. This module adds the parsing of generated text: the reasoning
section and the tool calls (`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>...`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from n3jax.data.chat_template import END_OF_TURN, IM_START, THINK_CLOSE, THINK_OPEN, encode, render

__all__ = ["render", "encode", "split_reasoning", "parse_tool_calls", "THINK_OPEN", "THINK_CLOSE", "END_OF_TURN",
           "IM_START"]


def split_reasoning(text: str, *, started_in_thinking: bool = True) -> tuple[str | None, str]:
  """Generated text -> (reasoning or None, answer). The prompt opened the thinking section when
  `started_in_thinking`; a section the model opens itself (`<think>...`) is split the same way."""
  if not started_in_thinking:
    if not text.lstrip().startswith(THINK_OPEN):
      return None, text.strip()
    text = text.lstrip()[len(THINK_OPEN):]
  if THINK_CLOSE not in text:
    return text.strip(), ""  # never closed (budget or length): all of it is reasoning
  reasoning, answer = text.split(THINK_CLOSE, 1)
  return reasoning.strip(), answer.strip()


_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
  """The tool calls in an answer -> [{"name", "arguments": {key: value}}]; JSON values are decoded."""
  calls = []
  for name, body in _CALL.findall(text):
    args = {}
    for key, value in _PARAM.findall(body):
      try:
        args[key] = json.loads(value)
      except ValueError:
        args[key] = value
    calls.append({"name": name.strip(), "arguments": args})
  return calls
