"""The Nemotron 3 chat template for generation: turns, tools and tool calls, reasoning on or off.

`n3jax.data.render_chat` renders finished conversations for SFT (with a loss mask); this module renders
the prompt the model continues, and parses what it writes. For system, user and assistant turns the two
give the same text (tested); this one adds what generation needs and `render_chat` does not have: the
generation prompt, tool definitions, assistant tool calls, tool results, and the dropping of earlier
turns' reasoning. It follows the chat template shipped with `nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16`
(`chat_template.jinja`, rendered by `transformers` with `enable_thinking` and `truncate_history_thinking`):

    <|im_start|>system\\n{system}[\\n\\n# Tools ... <tools>...</tools> ... call format]<|im_end|>\\n
    <|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n<think></think>{answer}<|im_end|>\\n          (reasoning of turns before the
                                                                       last user turn is dropped)
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n{answer}<tool_call>...</tool_call>\\n<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response>\\n<|im_end|>\\n   (consecutive tool turns
                                                                       share one user turn)
    <|im_start|>assistant\\n<think>\\n          generation prompt, reasoning on
    <|im_start|>assistant\\n<think></think>     generation prompt, reasoning off

A tool call: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import numpy as np

from n3jax.data import CHAT_SPECIALS

__all__ = ["render", "encode", "split_reasoning", "parse_tool_calls", "THINK_OPEN", "THINK_CLOSE", "END_OF_TURN"]

IM_START, END_OF_TURN, THINK_OPEN, THINK_CLOSE = CHAT_SPECIALS
_ROLES = ("system", "user", "assistant", "tool")
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


def _assistant(m: dict[str, Any], keep_reasoning: bool) -> str:
  reasoning = m.get("reasoning_content")
  content = m.get("content") or ""
  if isinstance(reasoning, str) and reasoning.strip():
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


def render(messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
           reasoning: bool = True, add_generation_prompt: bool = True, truncate_history_thinking: bool = True) -> str:
  """OpenAI-style messages ({"role", "content"}, assistant "reasoning_content" and "tool_calls") -> prompt text.

  reasoning: the generation prompt opens a thinking section (`<think>\\n`) or closes it at once
  (`<think></think>`); truncate_history_thinking: drop the reasoning of assistant turns before the last
  user turn, as the template does by default.
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
      raise ValueError(f"message {i} must be a dict with a role in {_ROLES}, got {m!r:.80}")
    if m["role"] != "assistant" and not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} ({m['role']}) needs a string 'content', got {type(m.get('content')).__name__}")
  system = messages[0]["content"] if messages[0]["role"] == "system" else ""
  turns = list(messages[1:] if messages[0]["role"] == "system" else messages)
  last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
  out = [f"{IM_START}system\n{system}"]
  if tools:
    out.append(("\n\n" if system else "") + _tools_block(tools))
  out.append(f"{END_OF_TURN}\n")
  for i, m in enumerate(turns):
    role, content = m["role"], m.get("content")
    if role == "assistant":
      out.append(_assistant(m, keep_reasoning=not (truncate_history_thinking and i < last_user)))
    elif role == "tool":
      if i == 0 or turns[i - 1]["role"] != "tool":
        out.append(f"{IM_START}user\n")
      out.append(f"<tool_response>\n{content}\n</tool_response>\n")
      if i == len(turns) - 1 or turns[i + 1]["role"] != "tool":
        out.append(f"{END_OF_TURN}\n")
    else:
      out.append(f"{IM_START}{role}\n{content}{END_OF_TURN}\n")
  if add_generation_prompt:
    out.append(f"{IM_START}assistant\n" + (f"{THINK_OPEN}\n" if reasoning else THINK_OPEN + THINK_CLOSE))
  return "".join(out)


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
