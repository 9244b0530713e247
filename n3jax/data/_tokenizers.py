"""Tokenizers: a built-in byte tokenizer that fits a 256-entry vocabulary, and HF `tokenizer.json` files.

Both expose the same small interface (`Tokenizer`): `encode(text) -> np.int32 ids` (no specials added;
`add_special_tokens=True`: the BOS / EOS transformers' `tokenizer(text)` adds), `decode(ids)`, `special(name) -> id` for the chat markers, `vocab_size`, and `pad_id` / `bos_id` /
`eos_id`.

Byte tokenizer id table (vocab 256, so it fits the tiny presets; specials keep the ids every Nemotron
`ModelConfig` uses, pad 0 / bos 1 / eos 2):

    id 0, 1, 2        <pad>, <s>, </s>
    id 3 .. 194       UTF-8 bytes 0x00 .. 0xBF          (id = byte + 3)
    id 195 .. 245     UTF-8 bytes 0xC2 .. 0xF4          (id = byte + 1)
    id 246 .. 249     <|im_start|>  <|im_end|>  <think>  </think>   (the chat markers, one id each)
    id 250 .. 255     unused

Bytes 0xC0, 0xC1 and 0xF5 .. 0xFF never occur in valid UTF-8 (RFC 3629 section 3), so every Python
string round-trips exactly; text is always encoded as UTF-8 first.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "CHAT_SPECIALS", "load_tokenizer"]

# The Nemotron 3 chat markers (see `n3jax.data._sft`).
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str, *, add_special_tokens: bool = False) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def special(self, name: str) -> int | None: ...


def _byte_tables() -> tuple[np.ndarray, np.ndarray]:
  to_id = np.full(256, -1, np.int32)
  to_id[:0xC0] = np.arange(0xC0) + 3
  to_id[0xC2:0xF5] = np.arange(0xC2, 0xF5) + 1
  to_byte = np.full(256, -1, np.int32)
  valid = to_id >= 0
  to_byte[to_id[valid]] = np.arange(256)[valid]
  return to_id, to_byte


class ByteTokenizer:
  """UTF-8 bytes with a gap-free id table of 256 entries (module docstring)."""

  vocab_size = 256
  pad_id, bos_id, eos_id = 0, 1, 2
  _SPECIALS = {name: 246 + i for i, name in enumerate(CHAT_SPECIALS)}

  def __init__(self):
    self._to_id, self._to_byte = _byte_tables()

  def encode(self, text: str, *, add_special_tokens: bool = False) -> np.ndarray:
    """UTF-8 bytes -> ids. `add_special_tokens` adds nothing: the byte tokenizer has no BOS / EOS template."""
    del add_special_tokens
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    return self._to_id[raw]

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64)
    names = {v: k for k, v in self._SPECIALS.items()}
    out, run = [], []
    for i in ids.tolist():
      b = self._to_byte[i] if 0 <= i < 256 else -1
      if b >= 0:
        run.append(b)
        continue
      if run:
        out.append(bytes(run).decode("utf-8", errors="replace"))
        run = []
      out.append(names.get(i, ""))
    if run:
      out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)

  def special(self, name: str) -> int | None:
    return self._SPECIALS.get(name)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library). Special ids come from the model config."""

  def __init__(self, path: str, *, pad_id: int, bos_id: int, eos_id: int):
    import tokenizers  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.tokenizer={path!r}: no such tokenizer.json file")
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

  def encode(self, text: str, *, add_special_tokens: bool = False) -> np.ndarray:
    """text -> ids. add_special_tokens: what tokenizer.json's post-processor adds around them (a base model's
    BOS, say), as transformers 5.24's `tokenizer(text)` does for these checkpoints' `PreTrainedTokenizerFast`
    (it ignores tokenizer_config.json's add_bos_token / add_eos_token there; tested)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def special(self, name: str) -> int | None:
    return self._tok.token_to_id(name)


def load_tokenizer(spec: str, *, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2) -> Tokenizer:
  """`"byte"` -> `ByteTokenizer()`; anything else is the path of a `tokenizer.json` (or a directory with one)."""
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  return HFTokenizer(path, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id)
