"""The decoding loop: prefill once, then one compiled step per token, streaming each token to the caller.

The device picks every token (sampling is inside the compiled step); the host watches the tokens for stop
tokens, stop strings and the thinking budget, and can force the next token of a row (the close marker of
a thinking section). Without a thinking budget the host never forces anything, so step k+1 is dispatched
before step k's tokens are read and the host work overlaps the device.

With `speculative_k` (models with MTP heads) each compiled step is a speculative round instead
(`_speculative`): up to k + 1 tokens per row per step, the same tokens as plain greedy decoding (or, when
sampling, the same distribution). The thinking budget caps how many drafts a row may keep in a round.

With `mesh=` and `layout=` the loop runs on a device mesh (`_engine.sharded_steps`, speculative rounds
`_speculative.ShardedSteps`): params placed with `sharding.param_shardings`, the caches created in their
shards and kept in them by every step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from n3jax import models
from n3jax.configs import ModelConfig
from n3jax.inference import _engine, _speculative
from n3jax.inference._sampling import SamplingParams
from n3jax.inference._speculative import SpeculativeStats

__all__ = ["Delta", "Completion", "stream_tokens", "generate_tokens"]


@dataclasses.dataclass(frozen=True)
class Delta:
  """One new token of one row: its id, the text it releases ("" while held back), and the finish reason
  on the row's last token ("stop" or "length")."""
  row: int
  token_id: int
  text: str
  finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
  token_ids: list[int]          # generated ids, a final stop token included
  text: str | None              # decoded text (None without a detokenizer), stop token and stop string cut
  finish_reason: str            # "stop": a stop token or string; "length": max_new_tokens or the cache is full
  thinking_tokens: int = 0      # tokens generated inside a thinking section
  speculative: SpeculativeStats | None = None  # draft acceptance, with speculative_k


@dataclasses.dataclass
class _Row:
  ids: list[int]
  thinking: bool
  thinking_tokens: int = 0
  done: bool = False
  finish_reason: str = "length"
  text: str = ""                # decoded so far (stop string cut)
  released: int = 0             # characters of `text` handed to the caller
  prefix_offset: int = 0        # incremental detokenization offsets (ids of `text_ids`)
  read_offset: int = 0
  text_ids: list[int] = dataclasses.field(default_factory=list)


def stop_strings_tuple(stop: str | Sequence[str] | None) -> tuple[str, ...]:
  """`stop` as a tuple of stop strings: one string is one stop string (as in transformers), not its letters."""
  if stop is None:
    return ()
  if isinstance(stop, str):
    return (stop,)
  stops = tuple(stop)
  if not all(isinstance(s, str) for s in stops):
    raise ValueError(f"stop strings must be strings, got {list(stops)!r:.200}")
  return stops


def _need_int(name: str, value, low: int, optional: bool = False) -> None:
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}" + (" or None" if optional else ""))


def check_request(prompts: Sequence[Sequence[int]], *, vocab_size: int, max_new_tokens: int,
                  max_len: int | None = None, prefill_chunk: int | None = None,
                  thinking_budget: int | None = None) -> None:
  """One clear ValueError for a bad request, before anything is compiled (or, from `n3jax.generate`, before
  any weight is read): lengths that are not positive ints, a prompt longer than the cache, a token id
  outside the vocabulary."""
  _need_int("max_new_tokens", max_new_tokens, 1)
  _need_int("max_len", max_len, 1, optional=True)
  _need_int("prefill_chunk", prefill_chunk, 1, optional=True)
  _need_int("thinking_budget", thinking_budget, 0, optional=True)
  rows = [np.asarray(p).reshape(-1) for p in prompts]
  for b, r in enumerate(rows):
    if r.size and not np.issubdtype(r.dtype, np.integer):
      raise ValueError(f"prompt {b} holds {r.dtype} values; token ids are ints")
    if r.size and (r.min() < 0 or r.max() >= vocab_size):
      bad = int(r[(r < 0) | (r >= vocab_size)][0])
      raise ValueError(f"prompt {b} has token id {bad}, outside the model's vocabulary [0, {vocab_size})")
  longest = max((r.size for r in rows), default=0)
  if max_len is not None and longest > max_len:
    raise ValueError(f"a prompt of {longest} tokens is longer than the cache (max_len={max_len}); "
                     "raise max_len or shorten the prompt")


class _Think:
  """Thinking-section markers (single token ids) and the budget."""

  def __init__(self, open_id: int | None, close_id: int | None, budget: int | None):
    if budget is not None:
      if open_id is None or close_id is None:
        raise ValueError("a thinking budget needs the <think> and </think> markers as single tokens of the "
                         f"tokenizer, got open={open_id}, close={close_id}")
    self.open_id, self.close_id, self.budget = open_id, close_id, budget

  def starts_inside(self, prompt: np.ndarray) -> bool:
    """Whether the prompt ends inside an open thinking section (chat prompt with reasoning on)."""
    if self.open_id is None:
      return False
    opens = np.nonzero(prompt == self.open_id)[0]
    closes = np.nonzero(prompt == self.close_id)[0] if self.close_id is not None else np.zeros((0,), int)
    return opens.size > 0 and (closes.size == 0 or closes[-1] < opens[-1])

  def track(self, row: _Row, token: int) -> None:
    if token == self.close_id:
      row.thinking = False
    elif token == self.open_id:
      row.thinking = True
    elif row.thinking:
      row.thinking_tokens += 1

  def must_close(self, row: _Row) -> bool:
    return self.budget is not None and row.thinking and row.thinking_tokens >= self.budget


class _Text:
  """Incremental detokenization (offsets as in HF text-generation-inference) and stop strings, holding
  back the characters that could still become a stop string."""

  def __init__(self, decode: Callable[[Sequence[int]], str] | None, stop_strings: Sequence[str]):
    stop_strings = stop_strings_tuple(stop_strings)
    if stop_strings and decode is None:
      raise ValueError("stop strings need a tokenizer to decode the generated tokens")
    if any(not s for s in stop_strings):
      raise ValueError(f"stop strings must be non-empty, got {list(stop_strings)}")
    self.decode, self.stops = decode, tuple(stop_strings)
    self.hold = max((len(s) for s in self.stops), default=1) - 1

  def add(self, row: _Row, token: int | None) -> bool:
    """Appends a token's text (None: flush only); True if a stop string ended the row."""
    if self.decode is None:
      return False
    if token is not None:
      row.text_ids.append(token)
      prefix = self.decode(row.text_ids[row.prefix_offset:row.read_offset])
      full = self.decode(row.text_ids[row.prefix_offset:])
      if len(full) > len(prefix) and not full.endswith("\ufffd"):  # "\ufffd": an unfinished UTF-8 character
        start = len(row.text)
        row.text += full[len(prefix):]
        row.prefix_offset, row.read_offset = row.read_offset, len(row.text_ids)
        if self.stops:
          hits = [i for s in self.stops if (i := row.text.find(s, max(0, start - len(s) + 1))) >= 0]
          if hits:
            row.text = row.text[:min(hits)]
            return True
    return False

  def flush(self, row: _Row) -> None:
    """A row that ends without a stop string keeps the text of trailing ids that made no whole character."""
    if self.decode is not None and row.read_offset < len(row.text_ids):
      done = self.decode(row.text_ids[row.prefix_offset:row.read_offset])
      row.text += self.decode(row.text_ids[row.prefix_offset:])[len(done):]
      row.prefix_offset = row.read_offset = len(row.text_ids)

  def release(self, row: _Row) -> str:
    """The text the caller may see now: all of it once the row is done, else all but the held-back tail."""
    end = len(row.text) if row.done else max(row.released, len(row.text) - self.hold)
    out, row.released = row.text[row.released:end], end
    return out


def _advance(b: int, row: _Row, tok: int, *, last: bool, stops: set[int], think: _Think, text: _Text) -> Delta:
  """Appends one generated token to a row: thinking, stop tokens and strings; `last`: no more may follow."""
  row.ids.append(tok)
  think.track(row, tok)
  if tok in stops:  # the stop token itself is not text
    row.done, row.finish_reason = True, "stop"
    text.flush(row)
  elif text.add(row, tok):
    row.done, row.finish_reason = True, "stop"
  elif last:
    row.done = True  # "length": max_new_tokens or the cache is full
    text.flush(row)
  return Delta(b, tok, text.release(row), row.finish_reason if row.done else None)


def stream_tokens(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
                  stop_strings: Sequence[str] = (), decode: Callable[[Sequence[int]], str] | None = None,
                  max_len: int | None = None, prefill_chunk: int | None = None, thinking_budget: int | None = None,
                  think_ids: tuple[int | None, int | None] = (None, None), rows_out: list | None = None,
                  speculative_k: int | None = None, mesh=None, layout: str | None = None) -> Iterator[list[Delta]]:
  """Generates for a batch of token prompts; yields, per step, the Deltas of the rows still running.

  max_len: cache size in tokens: a row's prompt and generated tokens together never exceed it (default: the
  padded prompt plus max_new_tokens); a prompt longer than it is an error. decode: ids -> text, for text
  deltas and stop strings. think_ids: the (open, close) marker ids; with `thinking_budget` N a row that has
  generated N tokens inside a thinking section is given the close marker as its next token and goes on
  with its answer. `rows_out` (a list) receives the
  per-row results as `Completion`s when the stream ends.
  speculative_k: MTP speculative decoding with k drafts per step (models with MTP heads only; see
  `_speculative`). The default cache then also holds the k draft slots of the last step, and, for a batch,
  the slots of rows that keep fewer tokens than the best row of a step ((k + 1) * max_new_tokens in all).
  mesh, layout: generate on a `sharding.make_mesh` mesh under a `sharding.AXIS_RULES` layout: params are
  placed with `sharding.param_shardings` (params already placed so are not moved), the cache is sharded
  (rows over the batch axes, Mamba heads / groups and KV heads over the tensor axis where the layout splits
  them) and prefill and decode are compiled under `sharding.use_mesh`, decode once. The number of prompts
  must divide over the batch axes (a ValueError names the numbers). With `speculative_k` too: the MTP
  caches are sharded like the main KV cache and each speculative round compiles once.
  """
  check_request(prompts, vocab_size=cfg.vocab_size, max_new_tokens=max_new_tokens, max_len=max_len,
                prefill_chunk=prefill_chunk, thinking_budget=thinking_budget)
  cfg = _engine.decoding_config(cfg)  # layers unrolled
  if speculative_k is not None:
    _speculative.check(cfg, params, speculative_k)
  sharded = _engine.check_mesh(mesh, layout)
  if not sharded:  # the decoding layout: a device copy per call unless given so (`_engine.decoding_params`)
    params = _engine.decoding_params(cfg, params)
  think = _Think(*think_ids, thinking_budget)
  text = _Text(decode, stop_strings)
  longest = max((len(p) for p in prompts), default=0)
  if max_len is not None:
    width = _engine.padded_length(longest, prefill_chunk, limit=max(longest, max_len - max_new_tokens + 1))
  else:
    width = _engine.padded_length(longest, prefill_chunk)
    max_len = (width + max_new_tokens if speculative_k is None
               else _speculative.cache_size(width, max_new_tokens, speculative_k, len(prompts)))
  tokens, segments = _engine.left_align(prompts, length=width, pad_id=cfg.pad_token_id or 0)
  rows = [_Row(ids=[], thinking=think.starts_inside(tokens[b][segments[b] == models.SEQUENCE_SEGMENT]))
          for b in range(len(tokens))]
  stops = set(int(t) for t in stop_tokens)
  sampling, seed = dataclasses.replace(sampling, seed=0), sampling.seed  # the seed is data, not a compile key
  lookahead = thinking_budget is None
  advance = functools.partial(_advance, stops=stops, think=think, text=text)

  def forced() -> jnp.ndarray:
    return jnp.asarray([think.close_id if not r.done and think.must_close(r) else -1 for r in rows], jnp.int32)

  state = _engine.sampling_state(cfg, tokens, segments, sampling, seed=seed)
  if speculative_k is not None:
    stats = [SpeculativeStats() for _ in rows]
    steps = _speculative.compiled_steps(cfg, len(prompts), max_len, mesh=mesh, layout=layout)
    yield from _stream_speculative(steps, params, tokens, segments, rows, stats, state, advance, forced, think,
                                   k=speculative_k, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                                   sampling=sampling, lookahead=lookahead, room=max_len - longest)
    if rows_out is not None:
      rows_out.extend(Completion(r.ids, r.text if decode else None, r.finish_reason, r.thinking_tokens, st)
                      for r, st in zip(rows, stats))
    return

  if sharded:
    steps = _engine.sharded_steps(cfg, mesh, layout, len(prompts), max_len)
    params = steps.place(params)
    logits, cache = steps.prefill(params, *_engine.prefill_chunks(tokens, segments, max_len=max_len,
                                                                  chunk=prefill_chunk))
    choose, decode_sample = steps.choose, functools.partial(steps.decode_sample, params)
  else:
    logits, cache = _engine.prefill(cfg, params, tokens, segments, max_len=max_len, chunk=prefill_chunk)
    choose, decode_sample = _engine.choose_jit, functools.partial(_engine.decode_sample, cfg, params)
  filled, slots = _engine.cache_room(cache)
  # The cache is allocated in whole blocks and holds the prompt padding; the last token is never fed.
  slots = min(slots, filled + max_len - longest - 1)
  pending, state = choose(logits, state, forced(), sampling=sampling)
  for step in range(max_new_tokens):
    more = step + 1 < max_new_tokens and filled + step < slots  # room for feeding this step's token
    nxt = None
    if lookahead and more:
      nxt, cache, state = decode_sample(cache, pending, state, forced(), sampling=sampling)
    chosen = np.asarray(pending)
    deltas = [advance(b, row, int(chosen[b]), last=not more) for b, row in enumerate(rows) if not row.done]
    if deltas:
      yield deltas
    if all(r.done for r in rows) or not more:
      break
    if not lookahead:
      nxt, cache, state = decode_sample(cache, pending, state, forced(), sampling=sampling)
    pending = nxt
  if rows_out is not None:
    rows_out.extend(Completion(r.ids, r.text if decode else None, r.finish_reason, r.thinking_tokens) for r in rows)


def _stream_speculative(steps: _speculative.Steps, params, tokens, segments, rows: list[_Row],
                        stats: list[SpeculativeStats], sstate, advance, forced, think: _Think, *, k: int,
                        max_new_tokens: int, prefill_chunk: int | None, sampling: SamplingParams, lookahead: bool,
                        room: int) -> Iterator[list[Delta]]:
  """The loop of `stream_tokens` with speculative rounds (`steps`: on one device or a mesh); once the cache
  has no room for a round's k + 1 slots it finishes with plain one-token steps."""
  params = steps.place(params)
  first, state = _speculative.start(steps, params, tokens, segments, chunk=prefill_chunk, k=k, sampling=sampling,
                                    sstate=sstate, forced=forced())
  filled, slots = _engine.cache_room(state["cache"])
  slots = min(slots, filled + room - 1)  # `room`: tokens max_len leaves after the longest prompt
  markers = jnp.asarray([-1 if i is None else i for i in (think.open_id, think.close_id)], jnp.int32)

  def limits() -> jnp.ndarray:
    """Drafts a row may keep before its thinking budget forces the close marker (-1: no budget); outside a
    thinking section k + 1, which only stops the row's drafts at a thinking marker (see `_speculative._cap`)."""
    if think.budget is None:
      return jnp.full((len(rows),), -1, jnp.int32)
    return jnp.asarray([-1 if r.done else max(0, think.budget - r.thinking_tokens) if r.thinking else k + 1
                        for r in rows], jnp.int32)

  def launch(state, filled: int):
    """-> ((tokens [B, n], kept [B] or None, accepted [B] or None), state, slots it may fill), or None."""
    if filled + k + 1 <= slots:
      toks, kept, accepted, state = steps.step(params, state, limits(), markers, k=k, sampling=sampling)
      return (toks, kept, accepted), state, k + 1
    if filled < slots:  # no room for a round: plain steps (the MTP state is not needed any more)
      nxt, cache, sst = steps.decode_sample(params, state["cache"], state["pending"],
                                            {"key": state["key"], "seen": state["seen"]}, forced(), sampling=sampling)
      return (nxt[:, None], None, None), {"cache": cache, "pending": nxt, **sst}, 1
    return None

  chosen = np.asarray(first)
  yield [advance(b, row, int(chosen[b]), last=max_new_tokens == 1 or filled >= slots) for b, row in enumerate(rows)]
  launched = None
  while not all(r.done for r in rows):
    launched = launched or launch(state, filled)
    if launched is None:  # unreachable: a row whose last token has no room to be fed is done
      break
    (toks, kept, accepted), state, most = launched
    launched = None
    if lookahead and (most == 1 or filled + most + k + 1 <= slots):  # the next step is known: dispatch it first
      launched = launch(state, filled + most)
    toks = np.asarray(toks)
    kept = np.ones(len(rows), np.int64) if kept is None else np.asarray(kept)
    accepted = None if accepted is None else np.asarray(accepted)
    filled += int(kept.max())
    room = filled < slots  # for feeding this step's last token
    deltas = []
    for b, row in enumerate(rows):
      if row.done:
        continue
      if accepted is not None:
        st = stats[b]
        st.verify_steps, st.drafted, st.accepted = st.verify_steps + 1, st.drafted + k, st.accepted + int(accepted[b])
      for i in range(int(kept[b])):
        last = len(row.ids) + 1 >= max_new_tokens or (not room and i == kept[b] - 1)
        deltas.append(advance(b, row, int(toks[b, i]), last=last))
        if row.done:
          break
    if deltas:
      yield deltas


def generate_tokens(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                    on_token: Callable[[Delta], None] | None = None, **kwargs) -> list[Completion]:
  """`stream_tokens` run to the end: one Completion per prompt; `on_token` sees every Delta as it comes."""
  rows: list[Completion] = []
  for deltas in stream_tokens(cfg, params, prompts, rows_out=rows, **kwargs):
    if on_token is not None:
      for d in deltas:
        on_token(d)
  return rows
