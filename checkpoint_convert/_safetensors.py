"""Streaming safetensors I/O: one tensor in memory at a time, precise errors on damaged files.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
buffer. We read each tensor with one `readinto` (no mmap, so peak memory is what we hold), and write
the header first (all offsets are known from shapes) and then each tensor as it is produced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A safetensors file is truncated, corrupted or not what the index says."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int   # absolute file offset of the first byte
  nbytes: int


def loads_unique(data: bytes | str):
  """`json.loads`, except that a key repeated inside one object raises ValueError (plain json keeps the last)."""
  return json.loads(data, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"key {key!r} appears more than once")
    out[key] = value
  return out


def _is_uint(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parses and validates a file's header like the reference reader. Raises `SafetensorsError`.

  Checked: the header is one JSON object with no repeated name; `__metadata__`, if present, maps str -> str;
  each entry has a known dtype, a shape and [begin, end] offsets of non-negative ints, and spans exactly its
  shape's bytes; sorted by offsets, the tensors tile the data section (no gap, no overlap, no trailing bytes).
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise SafetensorsError(f"{path}: corrupted or truncated safetensors header (says {n} bytes, file has {size})")
    try:
      header = loads_unique(f.read(n))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a repeated name
      raise SafetensorsError(f"{path}: corrupted safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)")
  if (metadata := header.get("__metadata__")) is not None:  # null is allowed, as by the reference reader
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
      raise SafetensorsError(f"{path}: corrupted safetensors header: __metadata__ must map str to str, got "
                             f"{metadata!r}")
  data_start, data_size = 8 + n, size - 8 - n
  infos, spans = {}, []
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    shape = meta.get("shape") if isinstance(meta, dict) else None
    offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
    if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] in _DTYPES
            and isinstance(shape, list) and all(_is_uint(s) for s in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
            and offsets[0] <= offsets[1]):
      raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {meta!r} (needs a known dtype, "
                             f"a shape and data_offsets [begin <= end] of non-negative ints)")
    dtype, shape, (begin, end) = _DTYPES[meta["dtype"]], tuple(shape), offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
      raise SafetensorsError(f"{path}: tensor {name!r} {meta['dtype']}{list(shape)} needs {nbytes} bytes but its "
                             f"offsets span {end - begin}")
    if end > data_size:
      raise SafetensorsError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data section but "
                             f"only {data_size} bytes are present")
    infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, nbytes)
    spans.append((begin, end, name))
  previous, position = None, 0
  for begin, end, name in sorted(spans):
    if begin != position:
      where = f"the previous tensor {previous!r} ends at {position}" if previous else "the data section starts at 0"
      raise SafetensorsError(f"{path}: corrupted safetensors header: tensor {name!r} begins at byte {begin} of the "
                             f"data section but {where} ({'overlap' if begin < position else 'gap'})")
    previous, position = name, end
  if position != data_size:
    raise SafetensorsError(f"{path}: corrupted safetensors file: the tensors end at byte {position} of the data "
                           f"section but it has {data_size} bytes ({data_size - position} trailing)")
  return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
  out = np.empty(info.shape, info.dtype)
  with open(info.path, "rb") as f:
    f.seek(info.offset)
    got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
  if got != info.nbytes:
    raise SafetensorsError(f"{info.path}: truncated file while reading {info.name!r} ({got} of {info.nbytes} bytes)")
  return out


def dtype_name(dtype: np.dtype) -> str:
  if np.dtype(dtype) not in _NAMES:
    raise ValueError(f"dtype {dtype} has no safetensors name")
  return _NAMES[np.dtype(dtype)]


def write_file(path: str, specs: list[tuple[str, tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors `specs` (name, shape, dtype) in order, calling `produce(name)` for each one."""
  header, offset = {}, 0
  for name, shape, dtype in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header = {"__metadata__": metadata or {"format": "pt"}, **header}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section like the reference writer
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      arr = np.asarray(produce(name))
      arr = np.ascontiguousarray(arr).reshape(arr.shape)  # ascontiguousarray alone makes a 0-d scale 1-d
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: produced {arr.dtype}{list(arr.shape)}, header says {np.dtype(dtype)}{list(shape)}")
      f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def plan_shards(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Splits tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
  shards, current, size = [], [], 0
  for spec in specs:
    nbytes = math.prod(spec[1]) * np.dtype(spec[2]).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += nbytes
  if current:
    shards.append(current)
  return shards
