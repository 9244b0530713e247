"""The grain input pipeline: tokenizers, sources, packing, SFT masks, iterator state, bad inputs."""

import json

import grain
import ml_collections
import numpy as np
import pytest

from n3jax import data as data_lib
from n3jax import trainer


def _data_cfg(**kw) -> ml_collections.ConfigDict:
  cfg = trainer.default_config().data
  cfg.update(kw)
  return cfg


def _make(cfg, batch_size=2, vocab=256, seed=0):
  return data_lib.make_data(cfg, tokenizer=data_lib.ByteTokenizer(), vocab_size=vocab, batch_size=batch_size,
                            seed=seed)


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# --- Tokenizers ---
def test_byte_tokenizer_round_trips_utf8_within_256_ids():
  tok = data_lib.ByteTokenizer()
  text = "Hello, Nemotron! Grüße, 日本語, emoji 🙂, tab\tand newline\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 246
  assert tok.decode(ids) == text
  specials = [tok.special(s) for s in data_lib.CHAT_SPECIALS]
  assert specials == [246, 247, 248, 249] and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.decode([246, *tok.encode("user"), 247]) == "<|im_start|>user<|im_end|>"


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<|im_start|>": 3, "<|im_end|>": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = data_lib.load_tokenizer(str(tmp_path))
  assert loaded.encode("hello world").tolist() == [1, 2]
  assert loaded.special("<|im_end|>") == 4 and loaded.vocab_size == 5
  with pytest.raises(FileNotFoundError, match="no such tokenizer.json"):
    data_lib.load_tokenizer(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("post_processor", [None, "<s> $A", "$A </s>"])
@pytest.mark.parametrize("config", [None, {"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True}])
def test_raw_text_gets_the_specials_transformers_adds(tmp_path, config, post_processor):
  """`encode(text, add_special_tokens=True)` (a raw prompt) equals transformers' `tokenizer(text).input_ids`."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  if post_processor:
    tok.post_processor = tokenizers.processors.TemplateProcessing(single=post_processor,
                                                                  special_tokens=[("<s>", 1), ("</s>", 2)])
  tok.save(str(tmp_path / "tokenizer.json"))
  if config is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", **config}))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))("hello world").input_ids
  mine = data_lib.load_tokenizer(str(tmp_path))
  assert mine.encode("hello world", add_special_tokens=True).tolist() == theirs
  assert mine.encode("hello world").tolist() == [3, 4]
  # Pretraining text is tokenized the same way (Megatron: tokenizer(text).input_ids), then gets its EOS.
  example, = data_lib.example_fn(_data_cfg(), mine, 5, 16, "docs")(0, {"text": "hello world"})
  assert example["tokens"].tolist() == theirs + [mine.eos_id]


# --- Packing ---
def _packed(examples, packing, length):
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  rows = list(data_lib.pack_examples(ds, packing, length, seed=0).batch(1))
  return [data_lib.to_model_batch(r) for r in rows]


def test_concat_packing_segments_positions_and_loss_mask():
  docs = [{"tokens": np.arange(10, 15, dtype=np.int32), "mask": np.ones(5, np.int32)},    # 5 tokens
          {"tokens": np.arange(20, 23, dtype=np.int32), "mask": np.ones(3, np.int32)},    # 3 tokens
          {"tokens": np.arange(30, 40, dtype=np.int32), "mask": np.ones(10, np.int32)}]   # 10 tokens
  b = _packed(docs, "concat", 9)  # rows of T + 1 = 9 -> model rows of T = 8
  assert b[0]["tokens"].tolist() == [[10, 11, 12, 13, 14, 20, 21, 22]]
  assert b[0]["targets"].tolist() == [[11, 12, 13, 14, 20, 21, 22, 30]]
  assert b[0]["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2]]
  assert b[0]["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
  # No loss where the target is in the next document (14 -> 20, 22 -> 30).
  assert b[0]["loss_mask"].tolist() == [[1, 1, 1, 1, 0, 1, 1, 0]]
  # The third document continues in the next row, as a new segment.
  assert b[1]["tokens"][0, :3].tolist() == [31, 32, 33] and b[1]["segment_ids"][0, 0] == 1


def test_first_fit_packing_keeps_examples_whole_and_masks_padding():
  ex = [{"tokens": np.arange(1, 6, dtype=np.int32), "mask": np.asarray([0, 0, 1, 1, 1], np.int32)},
        {"tokens": np.arange(6, 10, dtype=np.int32), "mask": np.asarray([0, 1, 1, 1], np.int32)}]
  (b,) = _packed(ex, "first_fit", 12)
  assert b["tokens"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0]]
  assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]]
  assert b["positions"][0, :9].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
  # Target t counts where it is an assistant (mask 1) token of the same example.
  assert b["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]]


# --- SFT ---
def test_chat_loss_mask_covers_exactly_the_assistant_tokens():
  """A conversation with reasoning is one example per user turn (NVIDIA's Nano 3 SFT data prep): the template
  drops the reasoning of turns before the last user turn, so each turn is trained where its reasoning is seen."""
  tok = data_lib.ByteTokenizer()
  msgs = [{"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "Hello.", "reasoning_content": "be kind"},
          {"role": "user", "content": "Sum 2+2"},
          {"role": "assistant", "content": "4"}]
  (ids1, mask1), (ids2, mask2) = data_lib.render_chat(msgs, tok)
  assert tok.decode(ids1) == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                              "<|im_start|>assistant\n<think>\nbe kind\n</think>\nHello.<|im_end|>\n")
  # The generation prompt (`<|im_start|>assistant\n<think>\n`) is the prompt's, so it is masked.
  assert tok.decode(ids1[mask1 == 1]) == "be kind\n</think>\nHello.<|im_end|>\n"
  assert tok.decode(ids2) == (
      "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
      "<|im_start|>assistant\n<think></think>\nHello.<|im_end|>\n"
      "<|im_start|>user\nSum 2+2<|im_end|>\n<|im_start|>assistant\n<think></think>4<|im_end|>\n")
  assert tok.decode(ids2[mask2 == 1]) == "4<|im_end|>\n"  # the first turn is history here
  # Without reasoning: one example, every assistant turn trained after its `<think></think>` prompt.
  plain = [{**m, "reasoning_content": None} for m in msgs]
  ((ids, mask),) = data_lib.render_chat(plain, tok)
  assert tok.decode(ids[mask == 1]) == "Hello.<|im_end|>\n4<|im_end|>\n"


def test_chat_tools_tool_calls_and_results():
  tok = data_lib.ByteTokenizer()
  tools = [{"type": "function", "function": {"name": "add", "parameters": {
      "type": "object", "properties": {"a": {"type": "integer"}}}}}]
  msgs = [{"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "", "reasoning_content": "use the tool",
           "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
          {"role": "tool", "content": "4"},
          {"role": "assistant", "content": "It is 4.", "reasoning_content": "got it"}]
  ((ids, mask),) = data_lib.render_chat(msgs, tok, tools=tools)
  text = tok.decode(ids)
  assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:")
  assert ("<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<|im_end|>\n"
          "<|im_start|>assistant\n<think>\ngot it") in text  # a tool result comes back in a user turn
  assert tok.decode(ids[mask == 1]) == ("use the tool\n</think>\n<tool_call>\n<function=add>\n<parameter=a>\n2\n"
                                        "</parameter>\n</function>\n</tool_call>\n<|im_end|>\n"
                                        "got it\n</think>\nIt is 4.<|im_end|>\n")
  assert data_lib.chat_template.render(msgs, tools=tools, add_generation_prompt=False) == text
  with pytest.raises(ValueError, match=r"tool call 0 needs a 'name'"):
    data_lib.render_chat([msgs[0], {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], tok)
  with pytest.raises(ValueError, match="tool 0 needs a 'name'"):
    data_lib.render_chat(msgs, tok, tools=[{"description": "x"}])
  with pytest.raises(ValueError, match="nothing would be trained"):
    data_lib.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tok)


def test_chat_records_through_the_pipeline(tmp_path):
  path = _write_jsonl(tmp_path / "chat.jsonl", [
      {"messages": [{"role": "system", "content": "/no_think"}, {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": f"answer {i}"}]} for i in range(20)])
  d = _make(_data_cfg(source=path, format="chat", packing="first_fit", seq_len=64, eval_fraction=0.1))
  b = next(d.train_iter)
  tok = data_lib.ByteTokenizer()
  targets = tok.decode(b["targets"][b["loss_mask"] == 1])
  assert "answer" in targets and "q" not in targets.replace("<|im_end|>", "") and "/no_think" not in targets


# --- Sources and formats ---
def test_jsonl_text_and_pretokenized(tmp_path):
  text = _write_jsonl(tmp_path / "t.jsonl", [{"text": f"document number {i}. " * 3} for i in range(30)])
  d = _make(_data_cfg(source=text, seq_len=32))
  b = next(d.train_iter)
  assert set(b) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
  assert all(v.shape == (2, 32) and v.dtype == np.int32 for v in b.values())
  assert "document number" in data_lib.ByteTokenizer().decode(b["tokens"][0])
  ids = _write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": list(range(100 + i, 140 + i))} for i in range(30)])
  d = _make(_data_cfg(source=ids, format="tokens", seq_len=16, shuffle=False))
  b = next(d.train_iter)
  row = b["tokens"][0].tolist()
  assert row == list(range(row[0], row[0] + 16)) and b["loss_mask"].all()
  assert d.num_train_records + d.num_eval_records == 30


def test_array_record_source(tmp_path):
  array_record = pytest.importorskip("array_record.python.array_record_module")
  path = str(tmp_path / "docs.array_record")
  writer = array_record.ArrayRecordWriter(path, "group_size:1")
  for i in range(12):
    writer.write(json.dumps({"text": f"record {i} text"}).encode())
  writer.close()
  d = _make(_data_cfg(source=path, seq_len=16, eval_fraction=0.25))
  assert "record" in data_lib.ByteTokenizer().decode(next(d.train_iter)["tokens"][0])


def test_parquet_text_and_pretokenized(tmp_path):
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:  # pyarrow is a test dependency; users without it get this error.
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow"):
      data_lib.open_source(str(tmp_path / "d.parquet"))
    return
  pq.write_table(pa.table({"text": [f"row {i} of the table. " * 2 for i in range(20)]}), tmp_path / "t.parquet")
  assert data_lib.open_source(str(tmp_path / "t.parquet"))[3] == {"text": "row 3 of the table. " * 2}
  b = next(_make(_data_cfg(source=str(tmp_path / "t.parquet"), seq_len=32)).train_iter)
  assert "of the table" in data_lib.ByteTokenizer().decode(b["tokens"][0])
  ids = pa.table({"input_ids": [list(range(100 + i, 140 + i)) for i in range(30)]})
  pq.write_table(ids, tmp_path / "ids.parquet")
  d = _make(_data_cfg(source=str(tmp_path / "ids.parquet"), format="tokens", seq_len=16, shuffle=False))
  row = next(d.train_iter)["tokens"][0].tolist()
  assert row == list(range(row[0], row[0] + 16))
  assert d.num_train_records + d.num_eval_records == 30


# --- Determinism and checkpointable state ---
@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_state_round_trips_through_json(prefetch):
  cfg = _data_cfg(seq_len=64, prefetch=prefetch)
  d = _make(cfg, batch_size=3)
  for _ in range(4):
    next(d.train_iter)
  state = json.loads(json.dumps(d.train_iter.get_state()))
  want = [next(d.train_iter) for _ in range(3)]
  fresh = _make(cfg, batch_size=3)
  fresh.train_iter.set_state(state)
  got = [next(fresh.train_iter) for _ in range(3)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  # Same seed -> same first batch; another seed -> another order.
  np.testing.assert_array_equal(next(_make(cfg).train_iter)["tokens"], next(_make(cfg).train_iter)["tokens"])
  assert not np.array_equal(next(_make(cfg).train_iter)["tokens"], next(_make(cfg, seed=1).train_iter)["tokens"])


def _assert_resumes_after(cfg, steps: int) -> None:
  """The state after `steps` batches, through JSON as checkpoints keep it, restores the same next batches."""
  d = _make(cfg, batch_size=1)
  for _ in range(steps):
    next(d.train_iter)
  state = json.loads(json.dumps(d.train_iter.get_state()))
  want = [next(d.train_iter)["tokens"] for _ in range(3)]
  fresh = _make(cfg, batch_size=1)
  fresh.train_iter.set_state(state)
  np.testing.assert_array_equal(np.stack(want), np.stack([next(fresh.train_iter)["tokens"] for _ in range(3)]))


def test_chat_records_with_reasoning_fan_out_and_resume_mid_record(tmp_path):
  """Each user turn of a reasoning conversation is its own example; a state saved between two examples of one
  record restores there (grain's flat map keeps the index within the record)."""
  records = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}", "reasoning_content": f"r{i}"},
                           {"role": "user", "content": f"p{i}"},
                           {"role": "assistant", "content": f"b{i}", "reasoning_content": f"s{i}"}]}
             for i in range(24)]
  path = _write_jsonl(tmp_path / "chat.jsonl", records)
  cfg = _data_cfg(source=path, format="chat", packing="concat", seq_len=24, eval_fraction=0.2)
  d = _make(cfg, batch_size=1)
  tok = data_lib.ByteTokenizer()
  trained = "".join(tok.decode(b["targets"][b["loss_mask"] == 1]) for b in (next(d.train_iter) for _ in range(40)))
  # Both turns of a conversation are trained, each with its own reasoning.
  i = int(trained.split("r", 1)[1].split("\n", 1)[0])
  assert f"r{i}\n</think>\na{i}" in trained and f"s{i}\n</think>\nb{i}" in trained
  for steps in range(1, 8):  # some of these states fall between the two examples of a record
    _assert_resumes_after(cfg, steps)


def test_resume_where_the_concat_buffer_is_empty(tmp_path):
  """Documents of exactly one row leave no remainder. grain's concat packing marks that with a tuple that JSON
  (the checkpoint's form) turns into a list, and the restored iterator then skipped a document."""
  path = _write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": list(range(100 + i, 117 + i))} for i in range(30)])
  _assert_resumes_after(_data_cfg(source=path, format="tokens", seq_len=16), 1)


def test_builtin_corpus_split_is_disjoint():
  train, held = data_lib.split_source(data_lib.open_source(data_lib.BUILTIN), 0.05)
  assert len(train) == 71 and len(held) == 8
  assert not {train[i]["id"] for i in range(len(train))} & {held[i]["id"] for i in range(len(held))}


# --- Bad input: one clear error each ---
def test_bad_inputs_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _make(_data_cfg(source=str(tmp_path / "nope.jsonl")))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    _make(_data_cfg(source=str(tmp_path / "nope-*.jsonl")))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="is empty"):
    _make(_data_cfg(source=str(tmp_path / "empty.jsonl")))
  blank = _write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 5)
  with pytest.raises(ValueError, match="hold no tokens"):
    _make(_data_cfg(source=blank, eval_fraction=0.4))
  wrong_key = _write_jsonl(tmp_path / "k.jsonl", [{"body": "x"}] * 5)
  with pytest.raises(ValueError, match=r"record 0 has no string field 'text'.*\['body'\]"):
    _make(_data_cfg(source=wrong_key, eval_fraction=0.4))
  big_ids = _write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 300]}] * 5)
  with pytest.raises(ValueError, match=r"token id 300 outside the model vocabulary \[0, 256\)"):
    _make(_data_cfg(source=big_ids, format="tokens", eval_fraction=0.4))
  long_chat = _write_jsonl(tmp_path / "long.jsonl", [
      {"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]}] * 5)
  with pytest.raises(ValueError, match=r"longer than data.seq_len \+ 1 = 33"):
    _make(_data_cfg(source=long_chat, format="chat", packing="first_fit", seq_len=32, eval_fraction=0.4))
  with pytest.raises(ValueError, match="unknown extension"):
    (tmp_path / "d.csv").write_text("a\n")
    _make(_data_cfg(source=str(tmp_path / "d.csv")))
