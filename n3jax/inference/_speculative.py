"""MTP speculative decoding: the MTP heads draft k tokens, the main model checks them in one forward.

One round is one compiled call (k static). With I the filled slots, c the last chosen token (not yet in
the cache), d_1 and h^1 the first draft and its MTP hidden state (from the previous round):

    draft    d_j = MTP_{min(j, D) - 1}(emb(d_{j-1}), h^{j-1}) for j = 2..k  (one position each, slots I..)
    verify   main model over [c, d_1, ..., d_k] at slots I..I+k -> logits, hidden states, and the Mamba
             conv / SSM states after every one of the k + 1 positions
    accept   greedy: the longest prefix of drafts equal to the target's argmax; sampling: the speculative
             sampling rule (Leviathan et al. 2023, Chen et al. 2023: accept d_j with min(1, p/q), else draw
             from norm(max(0, p - q))) -> a accepted drafts and one more token c' (correction or bonus)
    commit   Mamba states := the states after position a (c, d_1..d_a fed); KV slots I..I+a stay
    catch up every used MTP module over the k + 1 verified positions with their exact inputs (the next
             token, the main model's hidden state): rewrites its KV there (the speculative draft entries
             included) and, at position a, drafts d_1 of the next round.

Roll-back of the Mamba layers: the verify call runs `models.apply_cached` over a Mamba cache that holds one
state per chunk position ([Lm, B, T, ...]). Given such a state, every `Mamba2Mixer` runs its chunk as usual
(its output feeds the logits) and returns the state after each position: the conv window is the last W-1
raw inputs, the SSM state is replayed with the decode recurrence from the mixer's own projections. Nothing
is recomputed through the weights.

Exactness: every kept token is the target's own choice (greedy: its argmax; sampling: a draw from its
distribution, by the rule above), so greedy output equals plain greedy decoding and sampled output has its
distribution. The verify forward runs the chunked paths (SSD scan, block attention) where plain decoding
runs one-token ones; in float32 the logits agree to rounding (the tests compare tokens exactly), in
bfloat16 a near-tie between two tokens can come out either way, as between any two kernels.

Batches: all rows share one cache index (see `_engine`). A round advances it by the most tokens any row
kept (n_max); a row that kept n < n_max has its n KV slots moved to the end of the round's window and the
n_max - n slots before them marked empty (EMPTY_SEGMENT: never attended; NoPE means a key does not care
which slot it sits in). Such holes cost cache slots, so a batch reserves (k + 1) slots per new token.
The MTP modules' KV caches sit slot for slot beside the main ones (`models.init_mtp_cache`).

Compiled pieces (`compiled_steps`): the prefill and the round are plain functions; on one device `Steps`
runs them as module-level jits (`step` is the round), on a mesh `ShardedSteps` compiles them under
`sharding.use_mesh` with fixed output shardings (the caches as `sharding.cache_shardings`, the MTP caches
with mtp=True, the rest of the round state by rows), so a round compiles once and keeps the layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from n3jax import models, sharding
from n3jax.configs import ModelConfig
from n3jax.inference import _engine, _sampling

__all__ = ["SpeculativeStats", "check", "cache_size", "speculative_accept", "verify", "start", "step", "Steps",
           "ShardedSteps", "compiled_steps"]

Params = Any


@dataclasses.dataclass
class SpeculativeStats:
  """Per row: how the MTP drafts fared."""
  verify_steps: int = 0  # verify forwards while the row was generating
  drafted: int = 0       # draft tokens proposed (k per verify step)
  accepted: int = 0      # draft tokens accepted

  @property
  def mean_accepted(self) -> float:
    """Accepted drafts per verify step (a row gets this + 1 tokens per step)."""
    return self.accepted / self.verify_steps if self.verify_steps else 0.0

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else 0.0


def check(cfg: ModelConfig, params: Params | None, k) -> None:
  """Clear errors for a bad k or a model without MTP heads."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"speculative_k={k!r} must be an int >= 1 (MTP draft tokens per verify step)")
  if not cfg.num_nextn_predict_layers:
    raise ValueError("speculative decoding drafts with the MTP heads, but this model has none "
                     "(num_nextn_predict_layers=0); leave speculative_k unset")
  if params is not None and "mtp" not in params:
    raise ValueError("the config has MTP heads but the params have no 'mtp' entry (converted without the "
                     "hub's mtp.* weights?); leave speculative_k unset")


def cache_size(width: int, max_new_tokens: int, k: int, batch: int) -> int:
  """Default cache size: room for every round's k + 1 slots (and, in a batch, for the holes)."""
  return width + (max_new_tokens + k if batch == 1 else (k + 1) * max_new_tokens)


def _modules(cfg: ModelConfig, k: int) -> range:
  """Physical MTP modules a round uses: draft j runs module min(j, D) - 1 (the rule of `models.apply`)."""
  return range(min(k, cfg.num_nextn_predict_layers))


# ---------------------------------------------------------------------------------------------------
# Verify: one chunk, Mamba states after every position
# ---------------------------------------------------------------------------------------------------
def verify(cfg: ModelConfig, params: Params, cache: Params, tokens: jax.Array) -> tuple[jax.Array, jax.Array, Params]:
  """tokens [B, T] (one document, continuing each row) as the next T slots -> (logits f32 [B, T, V], hidden
  [B, T, D] after the final norm, cache). The returned cache's Mamba entries have a position axis,
  [Lm, B, T, ...]: entry t is the state after tokens[:, :t + 1] (`select_mamba` picks one per row)."""
  t = tokens.shape[1]
  cache = dict(cache)
  if "mamba" in cache:
    cache["mamba"] = jax.tree.map(lambda a: jnp.broadcast_to(a[:, :, None], a.shape[:2] + (t,) + a.shape[2:]),
                                  cache["mamba"])
  # A Mamba state with a position axis makes each `Mamba2Mixer` return its state after every position.
  logits, cache, hidden = models.apply_cached(cfg, params, tokens, cache, all_logits=True, return_hidden=True)
  return logits, hidden, cache


def select_mamba(mamba: Params, position: jax.Array) -> Params:
  """Per-position Mamba caches [Lm, B, T, ...] -> [Lm, B, ...] at `position` [B] of each row."""
  def pick(a):
    idx = position.reshape((1, -1, 1) + (1,) * (a.ndim - 3))
    return jnp.take_along_axis(a, idx, axis=2)[:, :, 0]
  return jax.tree.map(pick, mamba)


# ---------------------------------------------------------------------------------------------------
# Acceptance
# ---------------------------------------------------------------------------------------------------
def speculative_accept(key: jax.Array, drafts: jax.Array, draft_probs: jax.Array, target_probs: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """The speculative sampling rule (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

  drafts [B, k] drawn from draft_probs [B, k, V]; target_probs [B, k + 1, V], entry j the target's
  distribution after the first j drafts. Draft j is kept with probability min(1, p(d_j) / q(d_j)) while all
  before it were; at the first rejection the next token is drawn from norm(max(0, p - q)), after k
  acceptances from p_k (the bonus). The kept drafts and that token are distributed as the target's own
  samples. -> (accepted drafts a [B] in [0, k], next token [B]).
  """
  k = drafts.shape[1]
  k_accept, k_next = jax.random.split(key)
  u = jax.random.uniform(k_accept, drafts.shape)                                      # [B, k]
  p_d = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
  q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
  kept = (u * q_d < p_d).astype(jnp.int32)                                            # u < p / q
  accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)             # [B]
  p = jnp.take_along_axis(target_probs, accepted[:, None, None], axis=1)[:, 0]        # [B, V]
  q_ext = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)  # q = 0 after k: bonus
  q = jnp.take_along_axis(q_ext, accepted[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p - q, 0.0)
  total = residual.sum(-1, keepdims=True)
  residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p)  # p == q: reject has prob 0
  return accepted, jax.random.categorical(k_next, jnp.log(residual), axis=-1).astype(jnp.int32)


def _greedy_accept(drafts: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """drafts [B, k], the target's argmax after each prefix targets [B, k + 1] -> (accepted [B], next [B])."""
  match = (drafts == targets[:, :-1]).astype(jnp.int32)
  accepted = jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)
  return accepted, jnp.take_along_axis(targets, accepted[:, None], axis=1)[:, 0]


def _cap(accepted, nxt, drafts, limit, markers, close):
  """The thinking budget: a row with limit >= 0 keeps at most `limit` drafts and none from the first
  thinking marker on (the marker comes as the next token instead, and the host sees it before the budget
  counts again); when it keeps exactly `limit`, the next token is the close marker (what the plain loop
  forces). A kept prefix of accepted drafts is still the target's own choice, so capping loses nothing."""
  k = drafts.shape[1]
  is_marker = jnp.any(drafts[..., None] == markers, axis=-1)                           # [B, k]
  first = jnp.where(is_marker.any(1), jnp.argmax(is_marker, axis=1), k)                # drafts before a marker
  capped = jnp.where(limit >= 0, jnp.minimum(accepted, jnp.minimum(limit, first)), accepted)
  kept_draft = jnp.take_along_axis(jnp.concatenate([drafts, nxt[:, None]], 1), capped[:, None], axis=1)[:, 0]
  nxt = jnp.where(capped < accepted, kept_draft, nxt)                                  # an accepted draft: valid
  nxt = jnp.where((limit >= 0) & (capped == limit), close, nxt)
  return capped, nxt.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------
# Drafting and the MTP caches
# ---------------------------------------------------------------------------------------------------
def _penalised(sampling: _sampling.SamplingParams) -> bool:
  return sampling.repetition_penalty != 1.0


def _pick(logits: jax.Array, sampling, seen, key) -> tuple[jax.Array, jax.Array | None]:
  """A draft token [B] from MTP logits [B, V], and the distribution it was drawn from (None: greedy)."""
  seen = seen if _penalised(sampling) else None
  if sampling.greedy:
    return _sampling.sample(logits, key, sampling, seen), None
  probs = _sampling.distribution(logits, sampling, seen)
  return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs


def _mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """seen [B, V] | tokens [B, n] (where valid [B, n])."""
  hit = jax.nn.one_hot(tokens, seen.shape[-1], dtype=jnp.bool_)                      # [B, n, V]
  if valid is not None:
    hit &= valid[..., None]
  return seen | hit.any(axis=1)


def _catch_up(cfg, params, mtp, next_tokens, hidden, segment_ids, *, index, slot_segments, k):
  """Every used MTP module over T positions with their exact inputs -> (logits, h of module 0, mtp)."""
  mtp, first = dict(mtp), None
  for m in _modules(cfg, k):
    logits, h, mtp[str(m)] = models.mtp_apply_cached(cfg, params, m, next_tokens, hidden, mtp[str(m)], index=index,
                                                     slot_segments=slot_segments, segment_ids=segment_ids)
    first = first or (logits, h)
  return first[0], first[1], mtp


def _shift_window(a: jax.Array, index: jax.Array, src: jax.Array) -> jax.Array:
  """KV [L, B, K, S, H]: slot index + j of row b takes slot index + src[b, j] (src [B, T])."""
  win = jax.lax.dynamic_slice_in_dim(a, index, src.shape[1], axis=3)
  win = jnp.take_along_axis(win, src[None, :, None, :, None], axis=3)
  return jax.lax.dynamic_update_slice_in_dim(a, win, index, axis=3)


# ---------------------------------------------------------------------------------------------------
# Prefill (main model + MTP catch-up over the prompt) and the round, as plain functions (see `Steps`)
# ---------------------------------------------------------------------------------------------------
def _empty_caches(cfg: ModelConfig, batch: int, max_len: int) -> tuple[Params, Params]:
  return models.init_cache(cfg, batch, max_len), models.init_mtp_cache(cfg, batch, max_len)


def _prefill_main(cfg, params, tokens, segment_ids, cache):
  """A prompt chunk through the main model -> (logits [B, V] of its last column, hidden [B, C, D], cache)."""
  logits, cache, hidden = models.apply_cached(cfg, params, tokens, cache, segment_ids=segment_ids, all_logits=True,
                                              return_hidden=True)
  return logits[:, -1], hidden, cache


def _prefill_mtp(cfg, params, next_tokens, hidden, segment_ids, index, slot_segments, mtp, *, k):
  """The same chunk through the MTP modules (next_tokens: the token after each column) -> (module 0's
  logits [B, V] and h^1 [B, D] at the last column, mtp)."""
  logits, h, mtp = _catch_up(cfg, params, mtp, next_tokens, hidden, segment_ids, index=index,
                             slot_segments=slot_segments, k=k)
  return logits[:, -1], h[:, -1], mtp


def _first_draft(logits, sstate, *, sampling):
  """-> the round state's draft entries: {"draft", "draft_probs" (sampling only), "key", "seen"}."""
  key, sub = jax.random.split(sstate["key"])
  draft, probs = _pick(logits, sampling, sstate["seen"], sub)
  out = {"draft": draft, "key": key, "seen": sstate["seen"]}
  return out if probs is None else {**out, "draft_probs": probs}


def start(steps: Steps, params: Params, tokens, segment_ids, *, chunk: int | None, k: int,
          sampling: _sampling.SamplingParams, sstate: dict[str, jax.Array], forced: jax.Array
          ) -> tuple[jax.Array, dict[str, Any]]:
  """Prefill for speculative decoding: left-aligned prompts (see `_engine.left_align`) -> (the first
  chosen token [B], the round state). Each prompt chunk runs through the main model, then through the MTP
  modules (whose inputs are the next column's token: the prompt's, or for the last column the chosen one).
  steps: `compiled_steps` of this batch (one device or a mesh; `params` best placed with `steps.place`);
  sstate: `_engine.sampling_state`; forced: as in `_engine.choose`."""
  tokens, segment_ids, chunk = _engine.prefill_chunks(tokens, segment_ids, max_len=steps.max_len, chunk=chunk)
  if tokens.shape[0] != steps.batch:
    raise ValueError(f"{tokens.shape[0]} prompts, but the compiled steps are for a batch of {steps.batch}")
  total = tokens.shape[1]
  cache, mtp = steps.empty_caches()
  first = None
  for s in range(0, total, chunk):
    segs = segment_ids[:, s:s + chunk]
    logits, hidden, cache = steps.prefill_main(params, tokens[:, s:s + chunk], segs, cache)
    next_tokens = jnp.asarray(tokens[:, s + 1:s + chunk + 1])
    if s + chunk == total:
      first, sstate = steps.choose(logits, sstate, forced, sampling=sampling)
      next_tokens = jnp.concatenate([next_tokens, first[:, None]], axis=1)
    logits, hidden, mtp = steps.prefill_mtp(params, next_tokens, hidden, segs, s, cache["segment_ids"], mtp, k=k)
  state = {"cache": cache, "mtp": mtp, "pending": first, "hidden": hidden,
           **steps.first_draft(logits, sstate, sampling=sampling)}
  return first, state


def _round(cfg: ModelConfig, params: Params, state: dict[str, Any], limit: jax.Array, markers: jax.Array, *, k: int,
           sampling: _sampling.SamplingParams) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
  """One round (see the module docstring); the caller checks that slots index..index+k are free.

  limit [B] int32: -1, or the drafts a row may keep (its thinking budget left; see `_cap`); markers [2]
  int32: the (open, close) thinking markers (-1: none). -> (tokens [B, k + 1] int32: the accepted drafts
  then the next chosen token, -1 after; counts [B] = accepted + 1; accepted [B]; state).
  """
  cache, mtp = state["cache"], dict(state["mtp"])
  index, bsz = cache["index"], state["pending"].shape[0]
  penalised = _penalised(sampling)
  keys = jax.random.split(state["key"], k + 2)  # [0]: carried on; [1..k-1]: drafts; [k]: acceptance; [k+1]: next draft

  # Draft: d_2..d_k, one MTP position each at slots index..index+k-2 (overwritten by the catch-up).
  draft_segments = jax.lax.dynamic_update_slice_in_dim(
      cache["segment_ids"], jnp.full((bsz, k), models.SEQUENCE_SEGMENT, jnp.int32), index, axis=1)
  seen = _mark_seen(state["seen"], state["draft"][:, None]) if penalised else state["seen"]

  def draft(m: int, carry, xs):
    tok, hid, cache_m, seen = carry
    j, key = xs
    logits, h, cache_m = models.mtp_apply_cached(cfg, params, m, tok[:, None], hid[:, None], cache_m,
                                                 index=index + j - 2, slot_segments=draft_segments)
    tok, probs = _pick(logits[:, 0], sampling, seen, key)
    seen = _mark_seen(seen, tok[:, None]) if penalised else seen
    return (tok, h[:, 0], cache_m, seen), (tok, probs)

  drafts, draft_probs = [state["draft"]], [state.get("draft_probs")]
  if k > 1 and cfg.num_nextn_predict_layers == 1:  # one module drafts them all: one compiled body
    carry = (state["draft"], state["hidden"], mtp["0"], seen)
    (*_, mtp["0"], _), (toks, probs) = jax.lax.scan(functools.partial(draft, 0), carry,
                                                     (jnp.arange(2, k + 1), keys[1:k]))
    drafts += list(toks)
    draft_probs += [None] * (k - 1) if probs is None else list(probs)
  else:
    carry = (state["draft"], state["hidden"], None, seen)
    for j in range(2, k + 1):
      m = min(j, cfg.num_nextn_predict_layers) - 1
      carry = (*carry[:2], mtp[str(m)], carry[3])
      carry, (tok, probs) = draft(m, carry, (j, keys[j - 1]))
      mtp[str(m)] = carry[2]
      drafts.append(tok)
      draft_probs.append(probs)
  drafts = jnp.stack(drafts, axis=1)                                                   # [B, k]

  # Verify: c, d_1..d_k in one forward.
  window = jnp.concatenate([state["pending"][:, None], drafts], axis=1)                # [B, k+1]
  logits, hidden, verified = verify(cfg, params, cache, window)                        # [B, k+1, V], [B, k+1, D]
  seen_at = None
  if penalised:  # the target after draft j has seen d_1..d_j too
    hits = jnp.cumsum(jax.nn.one_hot(drafts, cfg.vocab_size, dtype=jnp.int32), axis=1) > 0  # [B, k, V]
    seen_at = state["seen"][:, None] | jnp.concatenate([jnp.zeros_like(hits[:, :1]), hits], axis=1)
    seen_at = seen_at.reshape(bsz * (k + 1), -1)
  flat = logits.reshape(bsz * (k + 1), -1)                                              # [B * (k+1), V]
  if sampling.greedy:
    targets = _sampling.sample(flat, keys[k], sampling, seen_at).reshape(bsz, k + 1)   # the argmax
    accepted, nxt = _greedy_accept(drafts, targets)
  else:
    target = _sampling.distribution(flat, sampling, seen_at).reshape(bsz, k + 1, -1)
    accepted, nxt = speculative_accept(keys[k], drafts, jnp.stack(draft_probs, axis=1), target)
  accepted, nxt = _cap(accepted, nxt, drafts, limit, markers, markers[1])
  cols = jnp.arange(k + 1)[None]
  tokens = jnp.where(cols < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
  tokens = jnp.where(cols <= accepted[:, None], tokens, -1).astype(jnp.int32)         # [B, k+1]

  # MTP catch-up over the verified positions (inputs past a row's last kept token are unused).
  next_tokens = jnp.where(tokens >= 0, tokens, nxt[:, None])
  mtp_logits, mtp_h, mtp = _catch_up(cfg, params, mtp, next_tokens, hidden, None, index=index,
                                     slot_segments=verified["segment_ids"], k=k)

  # Commit: Mamba states after the kept tokens; KV slots of the kept tokens moved to the window's end.
  kept = accepted + 1
  most = jnp.max(kept)
  new_cache = {"index": index + most}
  if "mamba" in verified:
    new_cache["mamba"] = select_mamba(verified["mamba"], accepted)
  shift = most - kept                                                                  # [B]
  src = jnp.clip(cols - shift[:, None], 0, k)                                          # [B, k+1]
  move = (lambda a: _shift_window(a, index, src)) if bsz > 1 else (lambda a: a)
  if "attention" in verified:
    new_cache["attention"] = jax.tree.map(move, verified["attention"])
  mtp = jax.tree.map(move, mtp)
  live = (cols >= shift[:, None]) & (cols < most)
  new_cache["segment_ids"] = jax.lax.dynamic_update_slice_in_dim(
      verified["segment_ids"], jnp.where(live, models.SEQUENCE_SEGMENT, models.EMPTY_SEGMENT).astype(jnp.int32),
      index, axis=1)

  # The next round's first draft: module 0 at the last kept position.
  seen = _mark_seen(state["seen"], next_tokens, cols <= accepted[:, None])
  at = lambda a: jnp.take_along_axis(a, accepted.reshape((bsz, 1) + (1,) * (a.ndim - 2)), axis=1)[:, 0]
  draft, probs = _pick(at(mtp_logits), sampling, seen, keys[k + 1])
  new_state = {"cache": new_cache, "mtp": mtp, "pending": nxt, "draft": draft, "hidden": at(mtp_h),
               "key": keys[0], "seen": seen}
  if probs is not None:
    new_state["draft_probs"] = probs
  return tokens, kept, accepted, new_state

# ---------------------------------------------------------------------------------------------------
# Compiled: on one device (the module-level jits) or on a mesh (fixed output shardings)
# ---------------------------------------------------------------------------------------------------
_JIT_OPTIONS = {
    _empty_caches: dict(static_argnums=(0, 1, 2)),
    _prefill_main: dict(static_argnames=("cfg",), donate_argnames=("cache",)),
    _prefill_mtp: dict(static_argnames=("cfg", "k"), donate_argnames=("mtp",)),
    _first_draft: dict(static_argnames=("sampling",), donate_argnames=("sstate",)),
    _round: dict(static_argnames=("cfg", "k", "sampling"), donate_argnames=("state",)),
}


def _jit(fn, **out_shardings):
  return jax.jit(fn, **_JIT_OPTIONS[fn], **out_shardings)


# One device: step(cfg, params, state, limit, markers, k=, sampling=) is one round.
step = _jit(_round)
_empty_caches_jit, _prefill_main_jit, _prefill_mtp_jit, _first_draft_jit = map(
    _jit, (_empty_caches, _prefill_main, _prefill_mtp, _first_draft))


class Steps:
  """The compiled pieces of speculative decoding for one (cfg, batch, max_len), on one device: the
  module-level jits (shared by every instance) and `_engine`'s `choose_jit` and `decode_sample`.
  `ShardedSteps` runs the same on a mesh. Get one from `compiled_steps`."""

  def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
    self.cfg, self.batch, self.max_len = cfg, batch, max_len
    self.rows = self.columns = self.replicated = None  # where `_put` places host inputs (one device: anywhere)
    self._empty, self._prefill_main, self._prefill_mtp = _empty_caches_jit, _prefill_main_jit, _prefill_mtp_jit
    self._first_draft = dict.fromkeys((True, False), _first_draft_jit)  # by sampling.greedy (see ShardedSteps)
    self._step = dict.fromkeys((True, False), step)

  def _context(self):
    return contextlib.nullcontext()

  def _put(self, x, where):
    return jnp.asarray(x)

  def place(self, params: Params) -> Params:
    return params

  def empty_caches(self) -> tuple[Params, Params]:
    with self._context():
      return self._empty(self.cfg, self.batch, self.max_len)

  def prefill_main(self, params: Params, tokens, segment_ids, cache: Params):
    with self._context():
      return self._prefill_main(self.cfg, params, self._put(tokens, self.columns), self._put(segment_ids, self.columns),
                                cache)

  def prefill_mtp(self, params: Params, next_tokens, hidden, segment_ids, index: int, slot_segments, mtp: Params, *,
                  k: int):
    with self._context():
      return self._prefill_mtp(self.cfg, params, self._put(next_tokens, self.columns), hidden,
                               self._put(segment_ids, self.columns), self._put(np.int32(index), self.replicated),
                               slot_segments, mtp, k=k)

  def choose(self, logits, sstate, forced, *, sampling: _sampling.SamplingParams):
    return _engine.choose_jit(logits, sstate, forced, sampling=sampling)

  def first_draft(self, logits, sstate, *, sampling: _sampling.SamplingParams) -> dict[str, jax.Array]:
    with self._context():
      return self._first_draft[sampling.greedy](logits, sstate, sampling=sampling)

  def step(self, params: Params, state: dict[str, Any], limit, markers, *, k: int, sampling: _sampling.SamplingParams):
    """One round (`_round`); limit and markers may be host arrays."""
    with self._context():
      return self._step[sampling.greedy](self.cfg, params, state, self._put(limit, self.rows),
                                         self._put(markers, self.replicated), k=k, sampling=sampling)

  def decode_sample(self, params: Params, cache: Params, tokens, sstate, forced, *,
                    sampling: _sampling.SamplingParams):
    """A plain one-token step (`_engine.decode_sample`), for the end of the cache."""
    return _engine.decode_sample(self.cfg, params, cache, tokens, sstate, forced, sampling=sampling)


class ShardedSteps(Steps):
  """`Steps` on a mesh under a layout, compiled under `sharding.use_mesh` with fixed output shardings, so
  each piece sees the same input shardings every time and compiles once (a round: once per k and sampling
  mode). Output shardings: the main cache's and the MTP caches' from `sharding.cache_shardings` (mtp=False /
  True), the rest of the round state by rows ([B], [B, D], [B, V]), its PRNG key replicated. Params
  placement, prefill's first choice and the plain steps at the end of the cache: `_engine.sharded_steps`."""

  def __init__(self, cfg: ModelConfig, mesh, layout: str, batch: int, max_len: int):
    super().__init__(cfg, batch, max_len)
    self.mesh, self.layout = mesh, layout
    self.plain = plain = _engine.sharded_steps(cfg, mesh, layout, batch, max_len,  # checks the main cache
                                                per_layer_cache=False)
    self.mtp_shardings = sharding.cache_shardings(cfg, mesh, layout, batch=batch, max_len=max_len, mtp=True)
    self.rows, self.columns = plain.rows, plain.columns  # [B]; [B, T], [B, V], [B, D]
    self.replicated = sharding.named_sharding(mesh, layout, ())
    chunk_hidden = sharding.named_sharding(mesh, layout, (sharding.ACT_BATCH, None, None))  # [B, C, D]
    cache_sh, mtp_sh, rows, columns = plain.cache_shardings, self.mtp_shardings, self.rows, self.columns
    state = {"cache": cache_sh, "mtp": mtp_sh, "pending": rows, "draft": rows, "hidden": columns,
             **plain.state_shardings}
    # By sampling.greedy: when sampling, the state also holds the draft's distribution [B, V].
    self.state_shardings = {True: state, False: {**state, "draft_probs": columns}}
    drafts = lambda sh: {k: v for k, v in sh.items() if k in ("draft", "draft_probs", "key", "seen")}
    self._empty = _jit(_empty_caches, out_shardings=(cache_sh, mtp_sh))
    self._prefill_main = _jit(_prefill_main, out_shardings=(columns, chunk_hidden, cache_sh))
    self._prefill_mtp = _jit(_prefill_mtp, out_shardings=(columns, columns, mtp_sh))
    self._first_draft = {g: _jit(_first_draft, out_shardings=drafts(sh)) for g, sh in self.state_shardings.items()}
    self._step = {g: _jit(_round, out_shardings=(columns, rows, rows, sh)) for g, sh in self.state_shardings.items()}

  def _context(self):
    return sharding.use_mesh(self.mesh, self.layout)

  def _put(self, x, where):
    return jax.device_put(x, where)

  def place(self, params: Params) -> Params:
    return self.plain.place(params)

  def choose(self, logits, sstate, forced, *, sampling: _sampling.SamplingParams):
    return self.plain.choose(logits, sstate, forced, sampling=sampling)

  def decode_sample(self, params: Params, cache: Params, tokens, sstate, forced, *,
                    sampling: _sampling.SamplingParams):
    return self.plain.decode_sample(params, cache, tokens, sstate, forced, sampling=sampling)


@functools.lru_cache(maxsize=16)
def compiled_steps(cfg: ModelConfig, batch: int, max_len: int, *, mesh=None, layout: str | None = None) -> Steps:
  """The compiled pieces for `batch` rows and a cache of `max_len`: on one device, or with `mesh=` and
  `layout=` on a mesh (`ShardedSteps`; cached per arguments). On a mesh a ValueError names the numbers when
  the batch does not divide over the batch axes or the heads / groups over the tensor axis."""
  if _engine.check_mesh(mesh, layout):
    return ShardedSteps(cfg, mesh, layout, batch, max_len)
  return Steps(cfg, batch, max_len)
