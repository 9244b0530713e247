"""The Nemotron 3 chat template, rendered turn by turn: one text for SFT (with its loss mask) and generation.

It follows the chat template shipped with `nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16` (`chat_template.jinja`;
NVIDIA-NeMo/Nemotron bundles it as `src/nemotron/data_prep/templates/nano3.jinja`), as transformers renders it
with `enable_thinking` and `truncate_history_thinking` (default true):

    <|im_start|>system\\n{system}[\\n\\n# Tools ... <tools>...</tools> ... call format]<|im_end|>\\n
    <|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n<think></think>{answer}<|im_end|>\\n          (reasoning of turns before the
                                                                       last user turn is dropped)
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n{answer}<tool_call>...</tool_call>\\n<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response>\\n<|im_end|>\\n   (consecutive tool turns
                                                                       share one user turn)
    <|im_start|>assistant\\n<think>\\n          generation prompt, reasoning on
    <|im_start|>assistant\\n<think></think>     generation prompt, reasoning off

A system block is always emitted (empty when the conversation has none). An assistant turn without
`reasoning_content` (and without think tags in its content) gets an empty `<think></think>`. A tool call:
`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`, dict and
list values as JSON. A tool turn opens the user turn only after a turn of another role, as the template
does (a conversation that starts with a tool turn gets no `<|im_start|>user`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np

from n3jax.data._tokenizers import CHAT_SPECIALS

__all__ = ["render", "render_pieces", "generation_prompt", "reasoning_text", "encode", "check_messages", "check_tools",
           "ROLES",
           "IM_START", "END_OF_TURN", "THINK_OPEN", "THINK_CLOSE"]

IM_START, END_OF_TURN, THINK_OPEN, THINK_CLOSE = CHAT_SPECIALS
ROLES = ("system", "user", "assistant", "tool")
_CALL_FORMAT = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified "
    "format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural "
    "language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question "
    "like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>")


def _json(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False)


def _extra_keys(d: Any, handled: Sequence[str]) -> str:
  """Fields of a tool / parameter schema the template has no slot for, as `<key>value</key>` lines."""
  if not isinstance(d, dict):
    return ""
  out = []
  for key, value in d.items():
    if key not in handled:
      out.append(f"\n<{key}>{_json(value) if isinstance(value, (dict, list, tuple)) else str(value)}</{key}>")
  return "".join(out)


def _tools_block(tools: Sequence[dict[str, Any]]) -> str:
  out = ["# Tools\n\nYou have access to the following functions:\n\n<tools>"]
  for tool in tools:
    tool = tool.get("function", tool)
    out.append(f"\n<function>\n<name>{tool['name']}</name>")
    if "description" in tool:
      out.append(f"\n<description>{tool['description'].strip()}</description>")
    out.append("\n<parameters>")
    params = tool.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("properties"), dict):
      for name, fields in params["properties"].items():
        out.append(f"\n<parameter>\n<name>{name}</name>")
        if "type" in fields:
          out.append(f"\n<type>{fields['type']}</type>")
        if "description" in fields:
          out.append(f"\n<description>{fields['description'].strip()}</description>")
        if "enum" in fields:
          out.append(f"\n<enum>{_json(fields['enum'])}</enum>")
        out.append(_extra_keys(fields, ("name", "type", "description", "enum")) + "\n</parameter>")
    out.append(_extra_keys(params, ("type", "properties", "required")))
    if isinstance(params, dict) and "required" in params:
      out.append(f"\n<required>{_json(params['required'])}</required>")
    out.append("\n</parameters>" + _extra_keys(tool, ("type", "name", "description", "parameters")) + "\n</function>")
  return "".join(out) + "\n</tools>" + _CALL_FORMAT


def _tool_call(call: dict[str, Any]) -> str:
  call = call.get("function", call)
  args = call.get("arguments") or {}
  if isinstance(args, str):
    args = json.loads(args)  # OpenAI style: arguments as a JSON string
  out = [f"<tool_call>\n<function={call['name']}>\n"]
  for key, value in args.items():
    value = _json(value) if isinstance(value, (dict, list, tuple)) else value
    out.append(f"<parameter={key}>\n{value}\n</parameter>\n")
  return "".join(out) + "</function>\n</tool_call>\n"


def reasoning_text(m: dict[str, Any]) -> str | None:
  """An assistant turn's reasoning as the template keeps it: a string with more than whitespace, else None."""
  reasoning = m.get("reasoning_content")
  return reasoning if isinstance(reasoning, str) and reasoning.strip() else None


def _assistant(m: dict[str, Any], keep_reasoning: bool) -> str:
  reasoning = reasoning_text(m)
  content = m.get("content") or ""
  if reasoning is not None:
    content = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{content}"
  elif THINK_OPEN not in content and THINK_CLOSE not in content:
    content = THINK_OPEN + THINK_CLOSE + content
  calls = m.get("tool_calls") or []
  if calls:
    if not content.strip():
      body = THINK_OPEN + THINK_CLOSE
    elif keep_reasoning:
      body = content.strip() + "\n"
    else:
      c = content.split(THINK_CLOSE)[-1] if THINK_CLOSE in content else content.split(THINK_OPEN)[0]
      body = THINK_OPEN + THINK_CLOSE + c.strip() + "\n"
    return f"{IM_START}assistant\n{body}{''.join(_tool_call(c) for c in calls)}{END_OF_TURN}\n"
  if not keep_reasoning and THINK_OPEN in content and THINK_CLOSE in content:
    content = THINK_OPEN + THINK_CLOSE + content.split(THINK_CLOSE)[-1]
  return f"{IM_START}assistant\n{content.strip()}{END_OF_TURN}\n"


def _check_function(d: Any, what: str, *, arguments: bool) -> None:
  f = d.get("function", d) if isinstance(d, dict) else None
  if not (isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]):
    raise ValueError(f"{what} needs a 'name' (OpenAI style: {{'function': {{'name', ...}}}}), got {d!r:.80}")
  if arguments:
    args = f.get("arguments")
    if isinstance(args, str):
      try:
        args = json.loads(args)
      except ValueError:
        raise ValueError(f"{what}: 'arguments' is a string that is not JSON: {args!r:.80}") from None
    if args is not None and not isinstance(args, dict):
      raise ValueError(f"{what}: 'arguments' must be an object (or its JSON), got {args!r:.80}")


def check_tools(tools: Any) -> None:
  """One ValueError naming the first malformed tool definition."""
  if tools is None:
    return
  if not isinstance(tools, (list, tuple)):
    raise ValueError(f"tools must be a list of tool definitions, got {tools!r:.80}")
  for i, tool in enumerate(tools):
    _check_function(tool, f"tool {i}", arguments=False)


def check_messages(messages: Any) -> None:
  """One ValueError naming the first malformed message (roles, string contents, tool calls)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise ValueError(f"message {i} must be a dict with a role in {ROLES}, got {m!r:.80}")
    content = m.get("content")
    if m["role"] == "assistant":
      if content is not None and not isinstance(content, str):
        raise ValueError(f"message {i} (assistant) has a {type(content).__name__} 'content'; a string or null")
      calls = m.get("tool_calls") or []
      if not isinstance(calls, (list, tuple)):
        raise ValueError(f"message {i} (assistant): 'tool_calls' must be a list, got {calls!r:.80}")
      for j, call in enumerate(calls):
        _check_function(call, f"message {i} (assistant) tool call {j}", arguments=True)
    elif not isinstance(content, str):
      raise ValueError(f"message {i} ({m['role']}) needs a string 'content', got {type(content).__name__}")


def render_pieces(messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
                  truncate_history_thinking: bool = True) -> list[tuple[int, str]]:
  """The template's text without a generation prompt, as (message index, text) pieces in order.

  The system block is index 0 when the conversation starts with a system turn, else -1. A tool turn's
  piece carries the user-turn header before it and the `<|im_end|>` after it where the template puts them.
  """
  check_messages(messages)
  check_tools(tools)
  has_system = messages[0]["role"] == "system"
  system = messages[0]["content"] if has_system else ""
  turns = list(messages[1:] if has_system else messages)
  offset = 1 if has_system else 0
  last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
  head = f"{IM_START}system\n{system}"
  if tools:
    head += ("\n\n" if system else "") + _tools_block(tools)
  pieces = [(0 if has_system else -1, head + f"{END_OF_TURN}\n")]
  for i, m in enumerate(turns):
    role, content = m["role"], m.get("content")
    if role == "assistant":
      text = _assistant(m, keep_reasoning=not (truncate_history_thinking and i < last_user))
    elif role == "tool":
      text = f"{IM_START}user\n" if i > 0 and turns[i - 1]["role"] != "tool" else ""
      text += f"<tool_response>\n{content}\n</tool_response>\n"
      if i == len(turns) - 1 or turns[i + 1]["role"] != "tool":
        text += f"{END_OF_TURN}\n"
    else:
      text = f"{IM_START}{role}\n{content}{END_OF_TURN}\n"
    pieces.append((i + offset, text))
  return pieces


def generation_prompt(reasoning: bool) -> str:
  """What opens the assistant turn the model writes: a thinking section (reasoning on) or an empty one."""
  return f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if reasoning else THINK_OPEN + THINK_CLOSE)


def render(messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
           reasoning: bool = True, add_generation_prompt: bool = True, truncate_history_thinking: bool = True) -> str:
  """OpenAI-style messages ({"role", "content"}, assistant "reasoning_content" and "tool_calls") -> prompt text.

  reasoning: the generation prompt opens a thinking section (`<think>\\n`) or closes it at once
  (`<think></think>`); truncate_history_thinking: drop the reasoning of assistant turns before the last
  user turn, as the template does by default.
  """
  text = "".join(t for _, t in render_pieces(messages, tools=tools, truncate_history_thinking=truncate_history_thinking))
  return text + generation_prompt(reasoning) if add_generation_prompt else text


_MARKERS = re.compile("(" + "|".join(re.escape(s) for s in CHAT_SPECIALS) + ")")


def encode(tokenizer, text: str) -> np.ndarray:
  """Text with chat markers -> int32 ids; each marker is the tokenizer's single special token when it has
  one (`tokenizer.special(marker)`), else ordinary text. No BOS is added (the template adds none)."""
  ids = []
  for piece in _MARKERS.split(text):
    if not piece:
      continue
    special = tokenizer.special(piece) if piece in CHAT_SPECIALS else None
    ids.append(np.asarray([special] if special is not None else tokenizer.encode(piece), np.int32))
  return np.concatenate(ids) if ids else np.zeros((0,), np.int32)
