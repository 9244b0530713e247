"""The grain input pipeline: records -> token examples -> packed rows -> model batches.

    source (random access) -> map_with_index(example) -> [shard by host] -> shuffle(seed) -> repeat
      -> to_iter_dataset -> pack to seq_len + 1 -> batch -> to_model_batch

Packing (`pack_examples`): `concat` joins documents and splits them into rows (pretraining; a document
may continue in the next row), `first_fit` places whole examples into rows without splitting (SFT). Both
are grain transformations whose iterators carry `get_state` / `set_state`, so a restored run sees exactly
the same batches. A model batch (numpy int32, all [B, T]):

    tokens       input ids                       targets    the next token (tokens shifted by one)
    segment_ids  document id within the row, 1.., 0 = padding (the model's SSD reset / attention mask)
    positions    position within the document    loss_mask  1 where `targets` counts in the loss: same
                                                            document, not padding, and (SFT) an assistant token
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from n3jax.data import _sft
from n3jax.data import _sources

__all__ = ["Data", "make_data", "example_fn", "pack_examples", "to_model_batch", "FORMATS"]

FORMATS = ("text", "tokens", "chat")
PACKINGS = ("concat", "first_fit")
_FIELDS = ("tokens", "mask")


def example_fn(data_cfg, tokenizer, vocab_size: int, seq_len: int, name: str) -> Callable[[int, dict], Any]:
  """(record index, record) -> [{"tokens": int32 [N], "mask": int32 [N]}]; clear errors name the record.

  A text or token record is one example; a chat record one per trained user turn when it has reasoning
  (`render_chat`), else one.
  """
  fmt = data_cfg.format
  overlong = data_cfg.overlong

  def fn(i: int, record: dict) -> list[dict[str, np.ndarray]]:
    where = f"{name}: record {i}"
    if fmt == "chat":
      key, tools_key = data_cfg.messages_key, data_cfg.get("tools_key", "tools")
      if key not in record:
        raise ValueError(f"{where} has no {key!r} list (data.messages_key) for data.format='chat'; "
                         f"its fields are {sorted(record)}")
      try:
        pairs = _sft.render_chat(record[key], tokenizer, tools=record.get(tools_key))
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      return [_example(where, ids, mask) for ids, mask in pairs]
    return [_example(where, *_one(where, record))]

  def _one(where: str, record: dict) -> tuple[np.ndarray, np.ndarray]:
    if fmt == "text":
      key = data_cfg.text_key
      if not isinstance(record.get(key), str):
        raise ValueError(f"{where} has no string field {key!r} (data.text_key) for data.format='text'; "
                         f"its fields are {sorted(record)}")
      # As Megatron's preprocess_data tokenizes pretraining text: `tokenizer(text).input_ids` (the BOS a
      # tokenizer.json's post-processor adds), then the end-of-document token (--append-eod).
      ids = np.asarray(tokenizer.encode(record[key], add_special_tokens=True), np.int32)
      if data_cfg.add_eos and len(ids):
        ids = np.append(ids, np.int32(tokenizer.eos_id))
      mask = np.ones_like(ids)
    elif fmt == "tokens":
      key = data_cfg.tokens_key
      if not isinstance(record.get(key), (list, tuple, np.ndarray)):
        raise ValueError(f"{where} has no id list {key!r} (data.tokens_key) for data.format='tokens'; "
                         f"its fields are {sorted(record)}")
      ids = np.asarray(record[key], np.int64)
      mask = np.asarray(record.get("loss_mask", np.ones_like(ids)), np.int32)
      if mask.shape != ids.shape:
        raise ValueError(f"{where}: loss_mask has {mask.shape[0]} entries but {key!r} has {ids.shape[0]}")
    return ids, mask

  def _example(where: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"{where} has token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} "
                       f"outside the model vocabulary [0, {vocab_size})")
    if len(ids) > seq_len + 1 and data_cfg.packing == "first_fit":
      if overlong == "error":
        raise ValueError(f"{where} is {len(ids)} tokens, longer than data.seq_len + 1 = {seq_len + 1}; raise "
                         "data.seq_len, or set data.overlong='truncate' to cut such examples")
      ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
    return {"tokens": ids.astype(np.int32), "mask": mask.astype(np.int32)}

  return fn


def pack_examples(ds: grain.IterDataset, packing: str, length: int, seed: int) -> grain.IterDataset:
  """Packs {"tokens", "mask"} examples into rows of `length` with `*_segment_ids` / `*_positions`."""
  lengths = {k: length for k in _FIELDS}
  if packing == "concat":
    return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  return grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=8, seed=seed,
                                                    shuffle_bins=False)


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Packed rows of length T + 1 -> the model batch of length T (module docstring)."""
  tok, seg = rows["tokens"], rows["tokens_segment_ids"]
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
  return {
      "tokens": tok[:, :-1].astype(np.int32),
      "targets": tok[:, 1:].astype(np.int32),
      "segment_ids": seg[:, :-1].astype(np.int32),
      "positions": rows["tokens_positions"][:, :-1].astype(np.int32),
      "loss_mask": (same_doc & (rows["mask"][:, 1:] > 0)).astype(np.int32),
  }


class _Iterator:
  """The train iterator: grain's, with a state that survives JSON (the form checkpoints keep it in).

  grain 0.2.18's concat packing marks "no remainder" with the tuple (-1, -1) and compares the restored slices
  with `!=`; JSON turns them into lists, which never equal the tuple, so a restored state with an empty
  remainder read one element too many and a resumed run skipped a document. `set_state` turns them back.
  """

  def __init__(self, it):
    self._it = it

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(_tuple_slices(state))


def _tuple_slices(state: Any) -> Any:
  if isinstance(state, dict):
    return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices" and isinstance(s, dict)
                else _tuple_slices(s)) for k, s in state.items()}
  return state


@dataclasses.dataclass
class Data:
  """What the trainer gets: a checkpointable train iterator and fixed held-out batches."""
  train_iter: Any                        # `_Iterator` over grain's: next() -> model batch; get_state/set_state
  eval_batches: list[dict[str, np.ndarray]]
  tokenizer: Any
  num_train_records: int
  num_eval_records: int


def _check_records(ds_source, fn, name: str, limit: int, purpose: str = "train") -> int:
  """Builds the examples of the first `limit` records up front (so bad records fail before any compile);
  returns their tokens."""
  if len(ds_source) == 0:
    raise ValueError(f"{name} is empty: no records to {purpose} on")
  total = 0
  for i in range(min(limit, len(ds_source))):
    total += sum(len(e["tokens"]) for e in fn(i, ds_source[i]))
  if total == 0:
    raise ValueError(f"{name} is empty: its first {min(limit, len(ds_source))} records hold no tokens")
  return total


class _Examples(grain.experimental.FlatMapTransform):
  """A record's examples, one after another (chat records may hold several)."""
  max_fan_out = 1 << 16  # unused by the iterator form; a MapDataset flat map would reserve this many slots

  def flat_map(self, examples):
    return examples


def _dataset(source, fn, *, shuffle: bool, seed: int, epochs: int | None, shard: tuple[int, int], fan_out: bool):
  """Records -> shuffled, repeated examples. With `fan_out` (chat) each record's list of examples is flattened
  after the shuffle (a record's examples stay together); otherwise a record is exactly one example."""
  ds = grain.MapDataset.source(source).map_with_index(fn if fan_out else lambda i, r: fn(i, r)[0])
  index, count = shard
  if count > 1:
    ds = ds[index::count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if epochs != 1:
    ds = ds.repeat(epochs)
  ds = ds.to_iter_dataset()
  if fan_out:
    ds = grain.experimental.FlatMapIterDataset(ds, _Examples())
  return ds.filter(lambda e: len(e["tokens"]) > 0)


def make_data(data_cfg, *, tokenizer, vocab_size: int, batch_size: int, seed: int,
              shard: tuple[int, int] = (0, 1)) -> Data:
  """Opens and checks the sources, and builds the train iterator and the held-out batches.

  `batch_size` is per host; `shard` = (host index, host count) splits the records between hosts.
  """
  if data_cfg.format not in FORMATS:
    raise ValueError(f"data.format={data_cfg.format!r} must be one of {FORMATS}")
  if data_cfg.packing not in PACKINGS:
    raise ValueError(f"data.packing={data_cfg.packing!r} must be one of {PACKINGS}")
  if data_cfg.overlong not in ("error", "truncate"):
    raise ValueError(f"data.overlong={data_cfg.overlong!r} must be 'error' or 'truncate'")
  seq_len = data_cfg.seq_len
  source = _sources.open_source(data_cfg.source)
  if len(source) == 0:
    raise ValueError(f"data.source={data_cfg.source!r} is empty: no records to train on")
  if data_cfg.eval_source:
    train_src, eval_src = source, _sources.open_source(data_cfg.eval_source)
  else:
    train_src, eval_src = _sources.split_source(source, data_cfg.eval_fraction)
  train_fn = example_fn(data_cfg, tokenizer, vocab_size, seq_len, f"data.source={data_cfg.source!r}")
  eval_name = f"data.eval_source={data_cfg.eval_source!r}" if data_cfg.eval_source else "the held-out split"
  eval_fn = example_fn(data_cfg, tokenizer, vocab_size, seq_len, eval_name)
  _check_records(train_src, train_fn, f"data.source={data_cfg.source!r}", data_cfg.validate_records)
  if not data_cfg.eval_source and len(eval_src) == 0:
    raise ValueError(f"the held-out split has no records: data.source={data_cfg.source!r} has {len(source)} "
                     f"records and data.eval_fraction={data_cfg.eval_fraction} holds out none; raise "
                     "data.eval_fraction or set data.eval_source")
  _check_records(eval_src, eval_fn, eval_name, data_cfg.validate_records, "evaluate")

  fan_out = data_cfg.format == "chat"
  train = _dataset(train_src, train_fn, shuffle=data_cfg.shuffle, seed=seed, epochs=None, shard=shard, fan_out=fan_out)
  train = pack_examples(train, data_cfg.packing, seq_len + 1, seed).batch(batch_size, drop_remainder=True)
  train = train.map(to_model_batch)
  if data_cfg.prefetch > 0:
    train = grain.experimental.ThreadPrefetchIterDataset(train, prefetch_buffer_size=data_cfg.prefetch)

  held = _dataset(eval_src, eval_fn, shuffle=False, seed=seed, epochs=1, shard=shard, fan_out=fan_out)
  held = pack_examples(held, data_cfg.packing, seq_len + 1, seed).batch(batch_size, drop_remainder=False)
  eval_batches = []
  for rows in held:
    if len(eval_batches) >= data_cfg.eval_batches:
      break
    pad = batch_size - rows["tokens"].shape[0]  # a short last batch is padded with empty rows
    rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
    eval_batches.append(to_model_batch(rows))
  if not eval_batches:
    raise ValueError(f"{eval_name} produced no evaluation batch")
  return Data(_Iterator(iter(train)), eval_batches, tokenizer, len(train_src), len(eval_src))
