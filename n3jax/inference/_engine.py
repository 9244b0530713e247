"""Prefill and decode over fixed-size caches, compiled once per shape.

Every batch is normalised to LEFT padding: each row's tokens end at the same column, so all rows write
their next token into the same cache slot (one scalar index) and decoding needs no per-row positions
(Nemotron attention has NoPE). Padding slots carry `models.PAD_SEGMENT`, real ones `SEQUENCE_SEGMENT`;
with the document-reset rule of the SSD scan the padding never reaches a row's Mamba state, and attention
never reads a padding slot, so a padded row computes exactly what the unpadded prompt computes.

    tokens, segment_ids = left_align(prompts)                 # ragged lists, or a padded array + mask
    logits, cache = prefill(cfg, params, tokens, segment_ids, max_len=...)
    logits, cache = decode_logits(cfg, params, cache, next_tokens)      # one token per row

On a mesh (`mesh=` and `layout=`, a `sharding.AXIS_RULES` name) the params are placed with
`sharding.param_shardings`, the cache is created in its shards (`sharding.cache_shardings`: rows over the
batch axes, Mamba heads / groups and KV heads over the tensor axis where the layout splits them) and every
step is compiled under `sharding.use_mesh` with the cache's shardings as its output shardings, so decoding
compiles once and keeps the layout (`sharded_steps`).

`prefill` runs the prompt in chunks of `chunk` columns (memory bound for long prompts and big batches);
the prompt is left-padded further to a multiple of the chunk (or to a power of two when it fits one),
which bounds the number of compiled shapes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental.layout import Format, Layout
import jax.numpy as jnp
import numpy as np

from n3jax import models, sharding
from n3jax.configs import Block, ModelConfig
from n3jax.inference import _sampling

__all__ = ["left_align", "padded_length", "prefill", "decode_logits", "decode_sample", "choose", "cache_room",
           "sharded_steps", "check_mesh", "decoding_params", "decoding_layout", "decoding_config"]

Params = Any
_MIN_BUCKET = 8


def left_align(prompts: Sequence[Sequence[int]] | np.ndarray, mask: np.ndarray | None = None, *,
               length: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts, or a padded [B, T] array with a mask (True = token; left or right padding), ->
  (tokens int32 [B, L], segment_ids int32 [B, L]) with every row's tokens at the right end.

  L = `length` (default: the longest prompt). A row without tokens is an error.
  """
  if mask is not None:
    tokens, mask = np.asarray(prompts), np.asarray(mask, bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
      raise ValueError(f"a padded prompt batch needs tokens [B, T] and a mask of the same shape, got "
                       f"{tokens.shape=} {mask.shape=}")
    rows = [tokens[b][mask[b]] for b in range(tokens.shape[0])]
  else:
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if not rows:
    raise ValueError("no prompts given")
  if empty := [b for b, r in enumerate(rows) if r.size == 0]:
    raise ValueError(f"prompt(s) {empty} have no tokens; every row needs at least one")
  longest = max(r.size for r in rows)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"{length=} is shorter than the longest prompt ({longest} tokens)")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  segments = np.full((len(rows), length), models.PAD_SEGMENT, np.int32)
  for b, r in enumerate(rows):
    tokens[b, length - r.size:] = r
    segments[b, length - r.size:] = models.SEQUENCE_SEGMENT
  return tokens, segments


def padded_length(prompt_len: int, chunk: int | None, limit: int | None = None) -> int:
  """Columns a prompt of `prompt_len` is left-padded to: a multiple of `chunk` past one chunk, else the
  next power of two (at least 8); never above `limit` (nor below the prompt)."""
  if chunk and prompt_len > chunk:
    n = -(-prompt_len // chunk) * chunk
  else:
    n = max(_MIN_BUCKET, 1 << (prompt_len - 1).bit_length())
    n = min(n, chunk) if chunk else n
  return max(prompt_len, min(n, limit) if limit else n)


def cache_room(cache: Params) -> tuple[int, int]:
  """(filled slots, total slots) of a cache (reads the index from the device)."""
  return int(cache["index"]), cache["segment_ids"].shape[1]


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """The config generation runs: layers unrolled (`scan_layers=False`), whatever the model trained with.

  The released presets scan their layers (compile time in training). In XLA's H100 compile of a scanned
  batch-1 decoding step of Nemotron-3-Nano-4B, every iteration copies its layer's weights out of the stacks
  before the products read them: 5.97 GB of copies per token for 7.1 GB of weights, about 2.7 times the bytes
  the unrolled step moves (MaxText decodes with unrolled layers for the same reason). Unrolled, the step
  compiles once per shape, longer, and reads per-layer weights and caches where they lie.
  """
  return cfg.replace(scan_layers=False) if cfg.scan_layers else cfg


def _fuse_ok(cfg: ModelConfig) -> bool:
  return cfg.quant == "none" and bool(cfg.count(Block.MAMBA))


def decoding_layout(cfg: ModelConfig, params: Params) -> Params:
  """The layout of `decoding_params` as a pure function: host (numpy) params stay on the host, so a checkpoint
  is put in it before it is placed (no device copy)."""
  params = params if models.layers_unstacked(params) else models.unstack_layers(params)
  return models.fuse_in_proj(cfg, params) if _fuse_ok(cfg) and not models.in_proj_fused(params) else params


@functools.partial(jax.jit, static_argnums=0)
def _decoding_layers(cfg: ModelConfig, layers: Params) -> Params:
  """`decoding_layout` of the layers on the device (the embedding table and the LM head are not touched: not
  copied, and left in the layout they were placed in)."""
  return decoding_layout(cfg, {"layers": layers})["layers"]


def decoding_params(cfg: ModelConfig, params: Params) -> Params:
  """Params as the unrolled decoding step on one device reads them fastest: one buffer per layer
  (`models.unstack_layers`) and, for unquantized configs, each Mamba layer's input projections fused into one
  matrix (`models.fuse_in_proj`). A copy of what changes, on the device; params already so (and `scan_layers`
  configs) pass through.

  From stacked weights, XLA's H100 compile of the batch-1 decoding step of Nemotron-3-Nano-4B (bf16, 7.9 GB)
  slices every layer's weights out of its stack into f32 temporaries, 11 GB of them per token, where the
  per-layer step reads each weight once from where it lies (0.03 GB of temporaries). Fused, a Mamba layer
  projects with one matrix product instead of five, and XLA no longer concatenates the dt, B and C weights
  every token (see `models.fuse_in_proj`). Where the device has no room for the copy, the params are kept
  (with a warning).
  """
  if cfg.scan_layers:
    return _rows_contiguous(cfg, params)
  unstack = not models.layers_unstacked(params)
  fuse = _fuse_ok(cfg) and not models.in_proj_fused(params)
  if not (unstack or fuse):
    return _rows_contiguous(cfg, params)
  copied = params["layers"] if unstack else [
      {k: v for k, v in layer["mixer"].items() if k.startswith("in_proj_")}
      for layer in params["layers"][models.kind_name(Block.MAMBA)]]
  if not _room_for_a_copy(copied):
    return _rows_contiguous(cfg, params)
  # Last: the jitted split gives its outputs the device's default layouts.
  return _rows_contiguous(cfg, {**params, "layers": _decoding_layers(cfg, params["layers"])})


# Leaves that decoding hands to a gather or to a Pallas kernel, which read them row-major.
_KERNEL_OPERANDS = ("experts_up_proj", "experts_down_proj")


def _rows_contiguous(cfg: ModelConfig, params: Params) -> Params:
  """The embedding table and the routed experts' weights re-placed row-major where their device keeps them
  otherwise (a copy, made once).

  A TPU lays an array out with its last dimension major when that one is no multiple of 128 and the one
  before it is: Nemotron-3-Nano-4B's [131072, 3136] table on a v5e (V minor), Nemotron 3 Nano's [128, 2688,
  1856] expert up-projections (D minor). XLA then copies the whole table into rows before any gather of two
  rows or more (0.84 GB per decoding step at batch >= 2 in its v5e compile), and every expert weight that a
  Mosaic kernel reads (the grouped matmul, `pallas_kernels.moe.gathered`), which takes its operands
  row-major: 0.64 GB per weight and MoE layer, every step. A jitted step compiles for the layout of the
  arrays it is given, so arrays placed row-major are read where they lie (temporaries 0.85 -> 0.01 GB at
  batch 8 for the table; 1.32 GB -> 0 for one layer's experts). GPUs and CPUs place arrays row-major
  already. A tied table, which is also the LM head's matrix, is kept.
  """
  def wants_rows(path, leaf) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if names[-2:] == ["embedder", "embedding"]:
      return not cfg.tie_word_embeddings and getattr(leaf, "ndim", 0) == 2
    return bool(names) and names[-1] in _KERNEL_OPERANDS

  def misplaced(path, leaf) -> bool:
    if not (isinstance(leaf, jax.Array) and wants_rows(path, leaf)):
      return False
    layout = leaf.format.layout
    return layout is not None and layout.major_to_minor != tuple(range(leaf.ndim))

  moved = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if misplaced(path, leaf)]
  if not moved or not _room_for_a_copy(moved):
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.device_put(leaf, Format(Layout(tuple(range(leaf.ndim))), leaf.sharding))
      if misplaced(path, leaf) else leaf, params)


def _room_for_a_copy(layers: Params) -> bool:
  """Whether a device holding `layers` has room for a second copy of its part of them (unknown: yes). Where
  it has not, generation decodes from the params as they are (slower; see `decoding_params`) and says so."""
  arrays = [a for a in jax.tree.leaves(layers) if isinstance(a, jax.Array)]
  if not arrays:
    return True  # host arrays: split before they are placed
  stats = arrays[0].addressable_shards[0].device.memory_stats()
  if not stats or "bytes_limit" not in stats:
    return True
  need = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in arrays)
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  if free >= need:
    return True
  logging.warning("decoding from the params as given: their decoding layout (per-layer weights, fused Mamba "
                  "input projections) needs %.1f GB more per device and %.1f GB are free; pass "
                  "inference.decoding_params' layout to decode faster", need / 1e9, free / 1e9)
  return False


@functools.lru_cache(maxsize=32)
def _param_shardings(cfg: ModelConfig, mesh, layout: str, per_layer: bool) -> Params:
  return sharding.param_shardings(cfg, mesh, layout, per_layer=per_layer)


def place_params(cfg: ModelConfig, params: Params, mesh, layout: str) -> Params:
  """Params on a mesh in their `sharding.param_shardings`: per layer (`models.unstack_layers`) unless
  `cfg.scan_layers`, as the decoding step reads them fastest (see `decoding_params`). Params already placed
  so are not moved; stacked params are split on the devices (a copy of the layers while both are alive),
  where the devices have room for it. The embedding table's and the routed experts' shards are placed
  row-major (see `_rows_contiguous`)."""
  if not cfg.scan_layers and not models.layers_unstacked(params):
    stacked = jax.device_put(params, _param_shardings(cfg, mesh, layout, False))
    if not _room_for_a_copy(stacked["layers"]):
      return _rows_contiguous(cfg, stacked)
    per_layer = {"layers": _param_shardings(cfg, mesh, layout, True)["layers"]}  # the layers only: the rest stays
    layers = jax.jit(models.unstack_layers, out_shardings=per_layer)({"layers": stacked["layers"]})["layers"]
    return _rows_contiguous(cfg, {**stacked, "layers": layers})
  return _rows_contiguous(cfg, jax.device_put(params, _param_shardings(cfg, mesh, layout, not cfg.scan_layers)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(cfg: ModelConfig, batch: int, max_len: int) -> Params:
  """`models.init_cache`; with unrolled layers, one buffer per layer (`models.unstack_cache`) so that the
  decoding step updates each layer's state and KV cache in place."""
  cache = models.init_cache(cfg, batch, max_len)
  return cache if cfg.scan_layers else models.unstack_cache(cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _extend(cfg: ModelConfig, params: Params, tokens, segment_ids, cache):
  return models.apply_cached(cfg, params, tokens, cache, segment_ids=segment_ids)


def prefill_chunks(tokens, segment_ids, *, max_len: int, chunk: int | None) -> tuple[np.ndarray, np.ndarray, int]:
  """-> (tokens, segment_ids) left-padded to a multiple of the chunk, and the chunk (see `prefill`)."""
  tokens, segment_ids = np.asarray(tokens, np.int32), np.asarray(segment_ids, np.int32)
  length = tokens.shape[1]
  if length > max_len:
    raise ValueError(f"the prompt has {length} columns (padding included) but the cache holds {max_len=} tokens; "
                     "raise max_len or shorten the prompt")
  chunk = min(chunk or length, length)
  total = -(-length // chunk) * chunk
  if total > models.cache_length(max_len):  # the last chunk would run past the cache: one call instead
    chunk = total = length
  pad = total - length
  tokens = np.pad(tokens, ((0, 0), (pad, 0)))
  segment_ids = np.pad(segment_ids, ((0, 0), (pad, 0)), constant_values=models.PAD_SEGMENT)
  return tokens, segment_ids, chunk


def prefill(cfg: ModelConfig, params: Params, tokens, segment_ids, *, max_len: int,
            chunk: int | None = None, mesh=None, layout: str | None = None) -> tuple[jax.Array, Params]:
  """Left-aligned prompts (see `left_align`) -> (logits f32 [B, V] of each row's last token, cache).

  The cache holds `max_len` tokens (prompt columns included). `chunk` columns run per compiled call
  (None: the whole prompt in one call); the prompt is left-padded to a multiple of it.
  mesh, layout: run on a `sharding.make_mesh` mesh under a layout (see `sharded_steps`); the cache comes
  back sharded. `params` are best placed first (`sharded_steps(...).place(params)`), else each call moves them.
  """
  tokens, segment_ids, chunk = prefill_chunks(tokens, segment_ids, max_len=max_len, chunk=chunk)
  bsz, total = tokens.shape
  if check_mesh(mesh, layout):
    return sharded_steps(cfg, mesh, layout, bsz, max_len).prefill(params, tokens, segment_ids, chunk)
  cache = _empty_cache(cfg, bsz, max_len)
  logits = None
  for start in range(0, total, chunk):
    logits, cache = _extend(cfg, params, jnp.asarray(tokens[:, start:start + chunk]),
                            jnp.asarray(segment_ids[:, start:start + chunk]), cache)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_logits(cfg: ModelConfig, params: Params, cache: Params, tokens: jax.Array) -> tuple[jax.Array, Params]:
  """One token per row [B] -> (logits f32 [B, V] after it, cache). Teacher forcing, scoring."""
  return models.apply_cached(cfg, params, tokens[:, None], cache)


def choose(logits: jax.Array, state: dict[str, jax.Array], forced: jax.Array,
           sampling: _sampling.SamplingParams) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next token [B] from logits [B, V]: sampled, or `forced` where >= 0. state: {"key", "seen" [B, V] bool}."""
  key, sub = jax.random.split(state["key"])
  token = _sampling.sample(logits, sub, sampling, state["seen"])
  token = jnp.where(forced >= 0, forced, token).astype(jnp.int32)
  seen = state["seen"].at[jnp.arange(token.shape[0]), token].set(True)
  return token, {"key": key, "seen": seen}


choose_jit = jax.jit(choose, static_argnames=("sampling",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("cache", "state"))
def decode_sample(cfg: ModelConfig, params: Params, cache: Params, tokens: jax.Array, state: dict[str, jax.Array],
                  forced: jax.Array, sampling: _sampling.SamplingParams):
  """Feeds tokens [B] and picks the next ones: -> (next tokens [B] int32, cache, state)."""
  logits, cache = models.apply_cached(cfg, params, tokens[:, None], cache)
  token, state = choose(logits, state, forced, sampling)
  return token, cache, state


def sampling_state(cfg: ModelConfig, tokens: np.ndarray, segment_ids: np.ndarray,
                   sampling: _sampling.SamplingParams, *, seed: int | None = None) -> dict[str, jax.Array]:
  """PRNG key and the [B, V] mask of prompt tokens (for the repetition penalty; padding excluded)."""
  bsz = tokens.shape[0]
  seen = np.zeros((bsz, cfg.vocab_size), bool)
  if sampling.repetition_penalty != 1.0:
    rows, cols = np.nonzero(segment_ids == models.SEQUENCE_SEGMENT)
    seen[rows, tokens[rows, cols]] = True
  return {"key": jax.random.key(sampling.seed if seed is None else seed), "seen": jnp.asarray(seen)}


def check_mesh(mesh, layout: str | None) -> bool:
  """Whether generation runs on a mesh; a layout without a mesh (or the reverse) is an error."""
  if mesh is None and layout is None:
    return False
  if mesh is None or layout is None:
    raise ValueError(f"sharded generation needs both mesh= and layout= (one of {sorted(sharding.AXIS_RULES)}), "
                     f"got mesh={mesh} layout={layout!r}")
  if layout not in sharding.AXIS_RULES:
    raise ValueError(f"Unknown layout {layout!r}; known: {sorted(sharding.AXIS_RULES)}")
  return True


class ShardedSteps:
  """Prefill and decode of one (cfg, mesh, layout, batch, max_len), compiled under `sharding.use_mesh`.

  Every output has a fixed sharding (the cache's from `sharding.cache_shardings`; tokens, logits and the
  sampling state split by rows), so each step sees the same input shardings every time and compiles once.
  Build it with `sharded_steps` (cached), which checks that the batch and the heads divide over the mesh.
  """

  def __init__(self, cfg: ModelConfig, mesh, layout: str, batch: int, max_len: int, per_layer_cache: bool = True):
    self.cfg, self.mesh, self.layout, self.batch, self.max_len = cfg, mesh, layout, batch, max_len
    # One cache buffer per layer, as on one device (`models.unstack_cache`), unless the layers are scanned or
    # the caller works on stacks (speculative decoding).
    per_layer = per_layer_cache and not cfg.scan_layers
    self.cache_shardings = sharding.cache_shardings(cfg, mesh, layout, batch=batch, max_len=max_len,
                                                    per_layer=per_layer)
    self.param_shardings = _param_shardings(cfg, mesh, layout, not cfg.scan_layers)
    rows = functools.partial(sharding.named_sharding, mesh, layout)
    self.rows = rows((sharding.ACT_BATCH,))                   # [B]
    self.columns = rows((sharding.ACT_BATCH, None))           # [B, T], [B, V]
    self.state_shardings = {"key": rows(()), "seen": self.columns}
    cache_sh, state_sh = self.cache_shardings, self.state_shardings

    def extend(params, tokens, segment_ids, cache):
      return models.apply_cached(cfg, params, tokens, cache, segment_ids=segment_ids)

    def decode_logits(params, cache, tokens):
      return models.apply_cached(cfg, params, tokens[:, None], cache)

    def decode_sample(params, cache, tokens, state, forced, sampling):
      logits, cache = models.apply_cached(cfg, params, tokens[:, None], cache)
      token, state = choose(logits, state, forced, sampling)
      return token, cache, state

    self._empty = jax.jit(lambda: (models.unstack_cache if per_layer else lambda c: c)(
        models.init_cache(cfg, batch, max_len)), out_shardings=cache_sh)
    self._extend = jax.jit(extend, out_shardings=(self.columns, cache_sh), donate_argnames=("cache",))
    self._decode_logits = jax.jit(decode_logits, out_shardings=(self.columns, cache_sh), donate_argnames=("cache",))
    self._choose = jax.jit(choose, static_argnames=("sampling",), out_shardings=(self.rows, state_sh),
                           donate_argnames=("state",))
    self._decode_sample = jax.jit(decode_sample, static_argnames=("sampling",),
                                  out_shardings=(self.rows, cache_sh, state_sh), donate_argnames=("cache", "state"))

  def place(self, params: Params) -> Params:
    """Params in their `sharding.param_shardings`, per layer unless the layers are scanned (`place_params`)."""
    return place_params(self.cfg, params, self.mesh, self.layout)

  def put(self, x, shardings):
    return jax.device_put(x, shardings)

  def empty_cache(self) -> Params:
    with sharding.use_mesh(self.mesh, self.layout):
      return self._empty()

  def prefill(self, params: Params, tokens: np.ndarray, segment_ids: np.ndarray, chunk: int
              ) -> tuple[jax.Array, Params]:
    """`prefill` on the mesh, from `prefill_chunks`' output."""
    params, cache, logits = self.place(params), self.empty_cache(), None
    with sharding.use_mesh(self.mesh, self.layout):
      for start in range(0, tokens.shape[1], chunk):
        logits, cache = self._extend(params, self.put(tokens[:, start:start + chunk], self.columns),
                                     self.put(segment_ids[:, start:start + chunk], self.columns), cache)
    return logits, cache

  def decode_logits(self, params: Params, cache: Params, tokens) -> tuple[jax.Array, Params]:
    with sharding.use_mesh(self.mesh, self.layout):
      return self._decode_logits(params, cache, self.put(tokens, self.rows))

  def choose(self, logits, state, forced, *, sampling: _sampling.SamplingParams):
    with sharding.use_mesh(self.mesh, self.layout):
      return self._choose(logits, self.put(state, self.state_shardings), self.put(forced, self.rows),
                          sampling=sampling)

  def decode_sample(self, params: Params, cache: Params, tokens, state, forced, *,
                    sampling: _sampling.SamplingParams):
    with sharding.use_mesh(self.mesh, self.layout):
      return self._decode_sample(params, cache, self.put(tokens, self.rows), self.put(state, self.state_shardings),
                                 self.put(forced, self.rows), sampling=sampling)


@functools.lru_cache(maxsize=16)
def sharded_steps(cfg: ModelConfig, mesh, layout: str, batch: int, max_len: int, per_layer_cache: bool = True
                  ) -> ShardedSteps:
  """The compiled steps of generation on `mesh` under `layout` (cached per arguments; see `ShardedSteps`).
  Raises ValueError, naming the numbers, when the batch does not divide over the batch axes or the heads
  / groups over the tensor axis."""
  check_mesh(mesh, layout)
  return ShardedSteps(cfg, mesh, layout, batch, max_len, per_layer_cache)
