"""Generate text from an n3jax checkpoint (made by `checkpoint_convert`, with the hub's tokenizer.json).

  python -m n3jax.generate --ckpt /ckpt/nano3 --prompt "Why is the sky blue?" [--reasoning off]
      [--thinking_budget 256] [--temperature 0.6 --top_p 0.95] [--max_new_tokens 512] [--stop "###"]
      [--speculative_k 3]   # models with MTP heads (Nemotron 3 Super): MTP drafts, one verify forward

One --prompt streams its answer to stdout as it is generated; several (repeat the flag) run as one batch
and print each result. Reasoning goes to stderr unless --show_reasoning=false. The Python API is
`n3jax.generate(...)` (this module is only its command line; import the function, not this module).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from n3jax import inference

_CKPT = flags.DEFINE_string("ckpt", None, "n3jax checkpoint directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "User message (repeat for a batch).")
_SYSTEM = flags.DEFINE_string("system", None, "System message.")
_RAW = flags.DEFINE_boolean("raw", False, "Feed the prompt as raw text, without the chat template (tokenized as "
                            "transformers' tokenizer(prompt): with the BOS a base model's tokenizer adds).")
_REASONING = flags.DEFINE_enum("reasoning", "on", ["on", "off"], "Open a thinking section before the answer.")
_BUDGET = flags.DEFINE_integer("thinking_budget", None, "Close the thinking section after this many tokens.")
_SHOW_REASONING = flags.DEFINE_boolean("show_reasoning", True, "Stream the thinking section to stderr.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most per prompt.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Cache size in tokens (default: prompt + max_new_tokens).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", None, "Prompt columns per prefill call (memory bound).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json to use instead of the checkpoint's.")
# The sampling flags left out take the checkpoint's generation_config.json values (as transformers does),
# else these defaults.
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * p(best) (0 = off).")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL-style penalty (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SAMPLING = (_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _REPETITION_PENALTY, _SEED)
_SPECULATIVE_K = flags.DEFINE_integer(
    "speculative_k", None, "MTP speculative decoding: tokens the MTP heads draft per verify step (models with "
    "MTP heads only; greedy output is unchanged, sampling keeps its distribution).")
flags.mark_flags_as_required(["ckpt", "prompt"])


class _Printer:
  """Streams one row: the thinking section to stderr, the rest to stdout."""

  def __init__(self, thinking: bool):
    self.thinking, self.buffer = thinking, ""

  def __call__(self, delta: inference.Delta) -> None:
    self.buffer += delta.text
    while self.buffer:
      if not self.thinking:
        sys.stdout.write(self.buffer)
        self.buffer = ""
      elif inference.chat.THINK_CLOSE in self.buffer:
        head, self.buffer = self.buffer.split(inference.chat.THINK_CLOSE, 1)
        self._reason(head + inference.chat.THINK_CLOSE + "\n")
        self.thinking = False
      elif delta.finish_reason is not None:  # the row ended inside its thinking section: no marker follows
        self._reason(self.buffer + "\n")
        self.buffer = ""
      else:  # keep a possible partial marker back
        keep = len(inference.chat.THINK_CLOSE) - 1
        self._reason(self.buffer[:-keep] if len(self.buffer) > keep else "")
        self.buffer = self.buffer[-keep:] if len(self.buffer) > keep else self.buffer
        break
    sys.stdout.flush()

  def _reason(self, text: str) -> None:
    if _SHOW_REASONING.value and text:
      sys.stderr.write(text)
      sys.stderr.flush()


def _spec(g: inference.Generation) -> str:
  if g.speculative is None:
    return ""
  st = g.speculative
  return (f", {st.mean_accepted:.2f} drafts accepted per verify step ({st.accepted}/{st.drafted} in "
          f"{st.verify_steps} steps)")


def main(argv):
  del argv  # Unused.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep orbax's restore log off the terminal
  prompts = _PROMPT.value
  chat_mode = not _RAW.value
  reasoning = _REASONING.value == "on"
  printer = _Printer(thinking=chat_mode and reasoning) if len(prompts) == 1 else None
  # Sampling flags given on the command line; the others come from the checkpoint's generation_config.json.
  sampling = {h.name: h.value for h in _SAMPLING if h.present}
  out = inference.generate(
      _CKPT.value, prompts if len(prompts) > 1 else prompts[0], tokenizer=_TOKENIZER.value, chat_mode=chat_mode,
      system=_SYSTEM.value, reasoning=reasoning, thinking_budget=_BUDGET.value, max_new_tokens=_MAX_NEW.value,
      max_len=_MAX_LEN.value, stop=_STOP.value, prefill_chunk=_PREFILL_CHUNK.value, on_token=printer,
      speculative_k=_SPECULATIVE_K.value, **sampling)
  if printer is not None:
    print(f"\n[{out.finish_reason}: {len(out.token_ids)} tokens, {out.thinking_tokens} thinking{_spec(out)}]",
          file=sys.stderr)
    return
  for i, g in enumerate(out):
    print(f"=== {i}: {g.finish_reason}, {len(g.token_ids)} tokens, {g.thinking_tokens} thinking{_spec(g)}")
    if g.reasoning and _SHOW_REASONING.value:
      print(f"[reasoning] {g.reasoning}")
    print(g.answer)


if __name__ == "__main__":
  app.run(main)
