"""Record sources: random-access sequences of dict records that grain's `MapDataset.source` reads.

    builtin:pydoc        English text CPython ships (`pydoc_data.topics`, ~490 kB, 79 documents); no download
    builtin:arith_chat   2,000 generated chats (sums, with and without reasoning) for SFT smoke runs
    *.jsonl / *.json     one JSON object per line (indexed once by byte offset, read lazily)
    *.parquet            one record per row (needs `pyarrow`)
    *.array_record       ArrayRecord files whose records are UTF-8 JSON objects (needs `array_record`)

A path may be a glob (`data/train-*.jsonl`) or a comma-separated list; the files are concatenated in
sorted order. Record fields are read by the pipeline (`text`, `input_ids`, `messages`, ...).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

import numpy as np

__all__ = ["BUILTIN", "BUILTIN_CHAT", "open_source", "split_source", "IndexedView"]

BUILTIN = "builtin:pydoc"
BUILTIN_CHAT = "builtin:arith_chat"
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "array_record",
               ".arrayrecord": "array_record"}


class _BuiltinPydoc:
  """The pydoc topic pages, sorted by topic name, as `{"text": ..., "id": topic}` records."""

  def __init__(self):
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    self._items = sorted(topics.topics.items())

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    name, text = self._items[i]
    return {"text": text, "id": name}

  def __repr__(self):
    return "builtin:pydoc"


class _ArithChat:
  """Deterministic chats `{"messages": [...]}`: "What is a + b?" answered with the sum. Half of them
  ask for reasoning (`/think` system flag, `reasoning_content` shows the column sums), half do not
  (`/no_think`)."""

  def __init__(self, n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    self._ab = rng.integers(0, 1000, size=(n, 2))

  def __len__(self):
    return len(self._ab)

  def __getitem__(self, i):
    a, b = (int(v) for v in self._ab[i])
    think = i % 2 == 0
    answer = {"role": "assistant", "content": f"{a} + {b} = {a + b}."}
    if think:
      answer["reasoning_content"] = f"{a} plus {b}: units {a % 10}+{b % 10}, total {a + b}."
    return {"messages": [{"role": "system", "content": "/think" if think else "/no_think"},
                         {"role": "user", "content": f"What is {a} + {b}?"}, answer]}

  def __repr__(self):
    return BUILTIN_CHAT


class _Jsonl:
  """A JSON-lines file, indexed by line start offsets; each `__getitem__` reads one line with `os.pread`."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      data = f.read()
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1])
    ends = np.concatenate([starts[1:], [len(data)]])
    keep = [(s, e) for s, e in zip(starts.tolist(), ends.tolist()) if data[s:e].strip()]  # skip blank lines
    self._spans = np.asarray(keep, np.int64).reshape(-1, 2)
    self._fd = None

  def __len__(self):
    return len(self._spans)

  def __getitem__(self, i):
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    start, end = self._spans[i]
    line = os.pread(self._fd, int(end - start), int(start))
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.path}: record {i} is not valid JSON ({e}): {line[:80]!r}") from None
    if not isinstance(record, dict):
      raise ValueError(f"{self.path}: record {i} must be a JSON object, got {type(record).__name__}")
    return record

  def __getstate__(self):  # picklable for grain worker processes: reopen lazily
    return {**self.__dict__, "_fd": None}

  def __repr__(self):
    return self.path


class _Parquet:
  def __init__(self, path: str):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
    self.path = path
    self._table = pq.read_table(path)

  def __len__(self):
    return self._table.num_rows

  def __getitem__(self, i):
    return self._table.slice(int(i), 1).to_pylist()[0]

  def __repr__(self):
    return self.path


class _ArrayRecord:
  def __init__(self, path: str):
    try:
      import grain  # pylint: disable=g-import-not-at-top
      self._src = grain.sources.ArrayRecordDataSource([path])
    except ImportError:
      raise ImportError(f"Reading {path} needs array_record: pip install array_record") from None
    self.path = path

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    raw = self._src[int(i)]
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{self.path}: record {i} is not a UTF-8 JSON object ({e})") from None
    if not isinstance(record, dict):
      raise ValueError(f"{self.path}: record {i} must be a JSON object, got {type(record).__name__}")
    return record

  def __repr__(self):
    return self.path


class _Concat:
  def __init__(self, parts: Sequence[Any]):
    self.parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self.parts])

  def __len__(self):
    return int(self._ends[-1]) if len(self._ends) else 0

  def __getitem__(self, i):
    k = int(np.searchsorted(self._ends, i, side="right"))
    return self.parts[k][i - (int(self._ends[k - 1]) if k else 0)]

  def __repr__(self):
    return ",".join(map(repr, self.parts))


class IndexedView:
  """`source[indices[i]]`: a split of a source without copying it."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self):
    return f"{self.source!r}[{len(self.indices)} records]"


def _expand(spec: str) -> list[str]:
  paths = []
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
    if not matches:
      raise FileNotFoundError(f"Data path {part!r} matches no file")
    paths.extend(matches)
  return paths


def open_source(spec: str):
  """A random-access record source for `spec` (module docstring). Raises one clear error for a missing
  file, an unknown extension or a missing optional reader."""
  if not spec:
    raise ValueError("No data source given: set data.source to 'builtin:pydoc' or a .jsonl/.parquet/"
                     ".array_record path")
  if spec == BUILTIN:
    return _BuiltinPydoc()
  if spec == BUILTIN_CHAT:
    return _ArithChat()
  if spec.startswith("builtin:"):
    raise ValueError(f"Unknown built-in corpus {spec!r}; known: {[BUILTIN, BUILTIN_CHAT]}")
  parts = []
  for path in _expand(spec):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
      raise ValueError(f"Data file {path!r}: unknown extension {ext!r}; known: {sorted(_EXTENSIONS)}")
    kind = _EXTENSIONS[ext]
    parts.append({"jsonl": _Jsonl, "parquet": _Parquet, "array_record": _ArrayRecord}[kind](path))
  return parts[0] if len(parts) == 1 else _Concat(parts)


def split_source(source, eval_fraction: float) -> tuple[IndexedView, IndexedView]:
  """Deterministic train / held-out split: every `round(1 / eval_fraction)`-th record is held out.

  The built-in corpus always holds out every 10th topic (8 of 79 documents).
  """
  n = len(source)
  if isinstance(source, _BuiltinPydoc):
    eval_fraction = 0.1
  if not 0 < eval_fraction < 1:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1) when data.eval_source is empty")
  every = max(2, round(1 / eval_fraction))
  idx = np.arange(n)
  held = idx % every == every // 2
  return IndexedView(source, idx[~held]), IndexedView(source, idx[held])
