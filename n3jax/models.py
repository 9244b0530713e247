"""The hybrid stack: embedding, the pattern of residual layers, final norm, LM head, and MTP.

Param tree (one layout for every execution strategy; `checkpoint_convert` maps it to HF keys):

    embedder/embedding                 [V, D]
    layers/<kind>/...                  every layer of one kind stacked on a leading axis, in layer order;
                                       kind in {mamba, attention, mlp, moe}; layer i of the pattern is entry
                                       (number of earlier layers of its kind) of its stack
    final_norm/scale                   [D]        (HF `norm_f`)
    lm_head                            [D, V]     (absent when `tie_word_embeddings`)
    mtp/<d>/{enorm,hnorm,final_norm}/scale, mtp/<d>/eh_proj [2D, D], mtp/<d>/layer_<i>/...
                                       one entry per physical MTP module (Super: one `*E` module)

Execution: `scan_layers=False` unrolls a Python loop (fast to compile for tiny models);
`scan_layers=True` runs one `lax.scan` over the layers whose body is a `lax.switch` over the block kinds
present, each branch reading its layer from its stack with a dynamic index, so the compiled program holds
one copy of each kind whatever the depth. `remat_policy` wraps each layer in `jax.checkpoint`, except
scanned layers under `"full"`, whose backward pass is written out (`_scanned_full_remat`: the same
gradients, without a zero-filled copy of a whole weight stack per layer).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from n3jax import sharding as shd
from n3jax.configs import Block, ModelConfig
from n3jax.nn import _common
from n3jax.nn import _mamba2
from n3jax.nn._attention import KV_BLOCK
from n3jax.nn._layer import Layer
from n3jax.nn._norms import RMSNorm

__all__ = ["init", "logical_axes", "forward", "apply", "kind_name", "layer_slots", "init_cache", "apply_cached",
           "cache_logical_axes", "cache_length", "unstack_layers", "layers_unstacked", "fuse_in_proj",
           "in_proj_fused", "unstack_cache", "init_mtp_cache", "mtp_apply_cached"]

Params = dict[str, Any]

_KIND_NAMES = {Block.MAMBA: "mamba", Block.ATTENTION: "attention", Block.MLP: "mlp", Block.MOE: "moe"}


def kind_name(kind: Block) -> str:
  return _KIND_NAMES[kind]


def layer_slots(cfg: ModelConfig) -> list[tuple[Block, int]]:
  """For each layer of the pattern: (its kind, its index within that kind's stack)."""
  seen: dict[Block, int] = {}
  slots = []
  for kind in cfg.blocks:
    slots.append((kind, seen.get(kind, 0)))
    seen[kind] = seen.get(kind, 0) + 1
  return slots


def _kinds(cfg: ModelConfig) -> list[Block]:
  return [k for k in Block if k in cfg.blocks]


class Embedder(nn.Module):
  """Token ids [B, T] -> embeddings [B, T, D].

  A lookup of a single token (batch-1 decoding) from a table whose vocabulary the mesh splits gathers two
  copies of its row and keeps one: XLA rewrites a one-row gather as a dynamic slice, which its SPMD partitioner
  makes from a vocab-split table by gathering the whole table onto every device (0.82 GB per token for
  Nemotron-3-Nano-4B split over 8 H100s, by XLA's compile). A gather it splits: each device looks up the rows
  in its part of the vocabulary, then one all-reduce of [B, T, D]. Unsplit, the one-row dynamic slice stays:
  on a TPU, whose default layout of this table (width 3136, not a multiple of 128) is column-major, a gather
  of two rows or more copies the whole table into rows first (0.84 GB per call on a v5e; XLA's compile).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:  # tokens [B, T] -> [B, T, D]
    cfg = self.cfg
    table = _common.param(self, "embedding", _common.dense_init(cfg), (cfg.vocab_size, cfg.hidden_size),
                          (shd.VOCAB, shd.EMBED), _common.dtype_of(cfg.param_dtype))
    if tokens.size == 1 and shd.splits(shd.VOCAB):
      flat = tokens.reshape(1)
      return jnp.take(table, jnp.concatenate([flat, flat]), axis=0)[:1].reshape(
          *tokens.shape, cfg.hidden_size).astype(_common.dtype_of(cfg.dtype))
    return jnp.take(table, tokens, axis=0).astype(_common.dtype_of(cfg.dtype))


class Head(nn.Module):
  """Final RMSNorm (`norm_f`) and the untied LM head; logits are f32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, embedding: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="final_norm")(h)
    if cfg.tie_word_embeddings:
      w = embedding.T
    else:
      w = _common.param(self, "lm_head", _common.dense_init(cfg), (cfg.hidden_size, cfg.vocab_size),
                        (shd.EMBED, shd.VOCAB), pdtype)
    return h, project_to_vocab(cfg, h, w)


def project_to_vocab(cfg: ModelConfig, h: jax.Array, w: jax.Array) -> jax.Array:
  """h [B, T, D] @ w [D, V] -> f32 logits (HF: `lm_head(h).float()`)."""
  dtype = _common.dtype_of(cfg.dtype)
  return jnp.einsum("BTD,DV->BTV", h.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def lm_head_weight(cfg: ModelConfig, params: Params) -> jax.Array:
  """[D, V]: the LM head, or the transposed embedding when tied."""
  return params["embedder"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


class MTPModule(nn.Module):
  """One multi-token-prediction depth (ARCHITECTURE.md §3.6; Megatron `MultiTokenPredictionLayer`).

  u = eh_proj([enorm(embed(tokens shifted by k)) ; hnorm(h^{k-1})]); u = the `mtp_blocks` layers;
  h^k = final_norm(u). The embedding half comes first. Logits use the shared LM head.
  """
  cfg: ModelConfig
  balance_loss_coef: float = 0.0  # its MoE layers in training (`_moe.MoE`)

  @nn.compact
  def __call__(self, emb: jax.Array, h_prev: jax.Array, segment_ids: jax.Array, caches: list | None = None,
               cache_index: jax.Array | None = None, cache_segment_ids: jax.Array | None = None) -> tuple:
    """-> (h^k, expert counts [E] of each MoE layer of the module, in order).

    Generation (speculative drafting): `caches` holds the KV cache {"k", "v": [B, K, S, H]} of each
    attention layer of the module, in order, written at slot `cache_index` (see `Attention`); the updated
    caches then come as a third output.
    """
    cfg = self.cfg
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    norm = functools.partial(RMSNorm, cfg.layer_norm_epsilon, dtype, pdtype)
    d = cfg.hidden_size
    w = _common.param(self, "eh_proj", _common.dense_init(cfg), (2 * d, d), (shd.NORM, shd.EMBED), pdtype)
    eh = jnp.concatenate([norm(name="enorm")(emb), norm(name="hnorm")(h_prev)], axis=-1)  # [B, T, 2D]
    u = jnp.einsum("BTX,XD->BTD", eh, w.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
    counts, new_caches = [], []
    for i, kind in enumerate(cfg.mtp_blocks):
      if caches is not None and kind == Block.ATTENTION:
        u, aux = Layer(cfg, kind, name=f"layer_{i}")(u, segment_ids, caches[len(new_caches)], cache_index,
                                                     cache_segment_ids)
        new_caches.append(aux["state"])
      else:
        u, aux = Layer(cfg, kind, balance_loss_coef=self.balance_loss_coef, name=f"layer_{i}")(u, segment_ids)
      if kind == Block.MOE:
        counts.append(aux["expert_counts"])
    h = norm(name="final_norm")(u)
    return (h, counts) if caches is None else (h, counts, new_caches)


# ---------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------
def _stack_names(tree):
  """Prepend the `layers` logical axis to every boxed param of a vmapped (stacked) init."""
  return jax.tree.map(lambda b: b.replace(names=(shd.LAYERS, *b.names)), tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _init_boxed(cfg: ModelConfig, key: jax.Array) -> Params:
  dtype = _common.dtype_of(cfg.dtype)
  k_embed, k_head, k_mtp, *k_kinds = jax.random.split(key, 3 + len(Block))
  tokens = jnp.zeros((1, 1), jnp.int32)
  h = jnp.zeros((1, 1, cfg.hidden_size), dtype)
  params: Params = {"embedder": Embedder(cfg).init(k_embed, tokens)["params"], "layers": {}}
  for kind, k in zip(Block, k_kinds):
    if n := cfg.count(kind):
      one = lambda kk, kind=kind: Layer(cfg, kind).init(kk, h, tokens)["params"]
      params["layers"][kind_name(kind)] = _stack_names(jax.vmap(one)(jax.random.split(k, n)))
  emb = nn.unbox(params["embedder"])["embedding"]
  params.update(Head(cfg).init(k_head, h, emb)["params"])
  if cfg.num_nextn_predict_layers:
    keys = jax.random.split(k_mtp, cfg.num_nextn_predict_layers)
    params["mtp"] = {str(i): MTPModule(cfg).init(keys[i], h, h, tokens)["params"]
                     for i in range(cfg.num_nextn_predict_layers)}
  return params


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random params (plain nested dicts of arrays). Use under `jax.eval_shape` for big presets.

  Jitted: run op by op, flax's init of the tiny MoE preset took 21 s on a CPU core, compiled 10 s.
  """
  return nn.unbox(_init_boxed(cfg, key))


def logical_axes(cfg: ModelConfig) -> Params:
  """Same tree as `init`, with a `PartitionSpec` of logical axis names per leaf (no memory used)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
  return nn.get_partition_spec(boxed)


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
def _remat(cfg: ModelConfig, fn):
  if cfg.remat_policy == "none":
    return fn
  policy = {"full": None, "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
            "dots_saveable": jax.checkpoint_policies.dots_saveable}[cfg.remat_policy]
  return jax.checkpoint(fn, policy=policy)


def _run_layer(cfg: ModelConfig, kind: Block, layer_index: int, balance: float, p: Params, h: jax.Array,
               segment_ids: jax.Array, key: jax.Array | None):
  rngs = None if key is None else {"quant": key}
  h, aux = Layer(cfg, kind, layer_index, balance).apply({"params": p}, h, segment_ids, rngs=rngs)
  counts = aux.get("expert_counts", jnp.zeros((cfg.n_routed_experts if kind == Block.MOE else 0,), jnp.int32))
  return h, counts


def _layer_key(quant_key: jax.Array | None, layer: jax.Array | int) -> jax.Array | None:
  return None if quant_key is None else jax.random.fold_in(quant_key, layer)


def _stack_unrolled(cfg, layers: Params, h, segment_ids, quant_key, balance: float):
  counts = []
  for n, (kind, idx) in enumerate(layer_slots(cfg)):
    p = jax.tree.map(lambda a, idx=idx: a[idx], layers[kind_name(kind)])
    h, c = _remat(cfg, functools.partial(_run_layer, cfg, kind, n, balance))(p, h, segment_ids,
                                                                            _layer_key(quant_key, n))
    if kind == Block.MOE:
      counts.append(c)
  return h, counts


def _precision_runs(cfg: ModelConfig) -> list[tuple[int, int]]:
  """[start, end) runs of layers that the low-precision recipe treats alike (BF16-kept or quantized):
  a scan needs a static layer index for the recipe, so it is split at each change (one run if none)."""
  quantized = [_common.is_quantized_layer(cfg, n) for n in range(cfg.num_hidden_layers)]
  runs, start = [], 0
  for n in range(1, len(quantized) + 1):
    if n == len(quantized) or quantized[n] != quantized[start]:
      runs.append((start, n))
      start = n
  return runs


def _run_xs(cfg: ModelConfig, start: int, end: int) -> tuple[list[Block], tuple[jax.Array, jax.Array, jax.Array]]:
  """The kinds of slots [start, end) and the scan inputs: (branch of each slot's kind, its index in the
  kind's stack, its position n in the whole stack)."""
  run = layer_slots(cfg)[start:end]
  run_kinds = [k for k in _kinds(cfg) if any(k == kind for kind, _ in run)]
  xs = (jnp.asarray([run_kinds.index(k) for k, _ in run], jnp.int32), jnp.asarray([i for _, i in run], jnp.int32),
        jnp.arange(start, end, dtype=jnp.int32))
  return run_kinds, xs


def _stack_slice(layers: Params, kind: Block, i) -> Params:
  """Layer `i` (traced) of `kind`'s stack."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), layers[kind_name(kind)])


def _layer_of_stack(cfg, kind: Block, start: int, balance: float, layers: Params, h, i, n, segment_ids, quant_key):
  """Layer `i` of `kind`'s stack (at position n; `start` places the run in the low-precision recipe) on h."""
  p = _stack_slice(layers, kind, i)
  h, c = _run_layer(cfg, kind, start, balance, p, h, segment_ids, _layer_key(quant_key, n))
  return h, c if kind == Block.MOE else jnp.zeros((cfg.n_routed_experts if Block.MOE in _kinds(cfg) else 0,), jnp.int32)


def _stack_scanned(cfg, layers: Params, h, segment_ids, quant_key, balance: float):
  if cfg.remat_policy == "full":
    h, counts = _scanned_full_remat(cfg, balance, layers, h, segment_ids, quant_key)
  else:
    counts = []
    for start, end in _precision_runs(cfg):
      run_kinds, xs = _run_xs(cfg, start, end)
      branches = [_remat(cfg, functools.partial(_layer_of_stack, cfg, k, start, balance, layers)) for k in run_kinds]

      def body(h, xs, branches=branches):
        b, i, n = xs
        if len(branches) == 1:
          return branches[0](h, i, n, segment_ids, quant_key)
        return jax.lax.switch(b, branches, h, i, n, segment_ids, quant_key)

      h, run_counts = jax.lax.scan(body, h, xs)  # run_counts [end - start, E]
      counts.append(run_counts)
    counts = jnp.concatenate(counts)
  moe_slots = [n for n, (k, _) in enumerate(layer_slots(cfg)) if k == Block.MOE]
  return h, [counts[n] for n in moe_slots]


# --- Scanned layers with full rematerialisation, and a backward pass of our own -----------------------
# With `jax.checkpoint` around each layer of a `lax.scan` over a `lax.switch`, each layer's slice of a
# stacked weight is a dynamic index inside a switch branch, and its transpose is a zero-filled buffer the
# size of the whole stack with the slice's gradient written in, added to the scan's gradient carry: XLA
# materialises that buffer inside the branch (at Super, 7 GB per GPU for the expert stacks, beside the
# carry). Here the backward is written out: a reverse scan whose carry holds the stacked gradients and
# adds each layer's into its slot in place (outside the switch), recomputing the layer's forward from its
# saved input, as `remat_policy="full"` does. One custom VJP spans every precision run, so the stacks'
# gradients are one buffer, not one per run.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scanned_full_remat(cfg, balance, layers, h, segment_ids, quant_key):
  (h, counts), _ = _scanned_fwd(cfg, balance, layers, h, segment_ids, quant_key)
  return h, counts


def _scanned_fwd(cfg, balance, layers, h, segment_ids, quant_key):
  counts, inputs = [], []
  for start, end in _precision_runs(cfg):
    run_kinds, xs = _run_xs(cfg, start, end)
    branches = [functools.partial(_layer_of_stack, cfg, k, start, balance, layers) for k in run_kinds]

    def body(h, xs, branches=branches):
      b, i, n = xs
      h_out, c = jax.lax.switch(b, branches, h, i, n, segment_ids, quant_key)
      return h_out, (h, c)

    h, (h_in, run_counts) = jax.lax.scan(body, h, xs)
    counts.append(run_counts)
    inputs.append(h_in)                                                     # [end - start, B, T, D]
  return (h, jnp.concatenate(counts)), (layers, inputs, segment_ids, quant_key)


def _scanned_bwd(cfg, balance, residuals, cotangents):
  layers, inputs, segment_ids, quant_key = residuals
  dh, _ = cotangents  # the expert counts are integers
  grads = jax.tree.map(jnp.zeros_like, layers)
  for (start, end), h_in in reversed(list(zip(_precision_runs(cfg), inputs))):
    run_kinds, xs = _run_xs(cfg, start, end)

    def make_branch(kind, start=start):
      def branch(dh, i, n, h):
        p = _stack_slice(layers, kind, i)
        layer = lambda p, h: _run_layer(cfg, kind, start, balance, p, h, segment_ids, _layer_key(quant_key, n))[0]
        _, pull = jax.vjp(layer, p, h)                                      # the layer's forward again
        dp, dh_in = pull(dh)
        return dh_in, {k: dp if k == kind_name(kind) else jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype),
                                                                         layers[k]) for k in layers}
      return branch

    branches = [make_branch(k) for k in run_kinds]

    def body(carry, xs, branches=branches):
      dh, grads = carry
      b, i, n, h = xs
      dh, dp = jax.lax.switch(b, branches, dh, i, n, h)
      # Each kind's slot i gets its gradient, in place (zeros for the kinds this layer is not).
      grads = {k: jax.tree.map(lambda g, d: jax.lax.dynamic_update_index_in_dim(
          g, jax.lax.dynamic_index_in_dim(g, i, 0, keepdims=False) + d.astype(g.dtype), i, 0), grads[k], dp[k])
               for k in layers}
      return (dh, grads), None

    (dh, grads), _ = jax.lax.scan(body, (dh, grads), (*xs, h_in), reverse=True)
  return grads, dh, None, None


_scanned_full_remat.defvjp(_scanned_fwd, _scanned_bwd)


def _check_tokens(cfg: ModelConfig, tokens, segment_ids, *, whole_sequence: bool = False):
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int [batch, seq], got {tokens.shape=}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got {tokens.dtype=}")
  if segment_ids is not None and segment_ids.shape != tokens.shape:
    raise ValueError(f"{segment_ids.shape=} must equal {tokens.shape=}")
  if whole_sequence and tokens.shape[1] % cfg.moe_seq_chunks:
    raise ValueError(f"moe_seq_chunks={cfg.moe_seq_chunks} must divide the sequence length {tokens.shape[1]}")


def apply(cfg: ModelConfig, params: Params, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
          mtp_depths: int | None = None, quant_key: jax.Array | None = None, balance_loss_coef: float = 0.0
          ) -> dict[str, Any]:
  """The whole model. tokens int [B, T]; segment_ids int [B, T] for packed sequences (default: one
  document per row). Tokens attend (and Mamba states carry) only within a segment; segment 0
  (`PAD_SEGMENT`, as n3jax.data packs and generation pads) is padding, which MoE layers route but leave
  out of `expert_counts` and the balance loss. Returns a dict with:
    logits [B, T, V] f32; hidden [B, T, D] (after the final norm);
    expert_counts [n_moe_layers, E] int32 (tokens routed per expert, for balancing);
    mtp_logits [depths, B, T, V] f32 when the model has MTP (depth k at position i predicts token
      i + k + 1; its input at the last k positions is padding), and mtp_expert_counts
      [modules * MoE layers per module, E] int32 (module-major; summed over the depths a module serves),
      and mtp_hidden [depths, B, T, D] (each depth's output, the input of its logits). `mtp_depths`
      repeats the last physical module beyond `num_nextn_predict_layers` (Super trains with 2 depths of
      one module). Under jit, what the caller leaves unused (e.g. the logits) is never computed.
  quant_key: under `cfg.quant`, the step's key for stochastic rounding (each layer folds in its index);
    pass a new one every training step.
  balance_loss_coef: training; every MoE layer (MTP modules' too) adds this times its sequence balance loss
    (`nn._moe.sequence_balance_loss`) to the loss, through the gradient of its output.
  """
  _check_tokens(cfg, tokens, segment_ids, whole_sequence=True)
  tokens = tokens.astype(jnp.int32)
  if segment_ids is None:
    segment_ids = jnp.full_like(tokens, SEQUENCE_SEGMENT)
  h = Embedder(cfg).apply({"params": params["embedder"]}, tokens)
  h = shd.with_logical_constraint(h, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_EMBED))
  stack = _stack_scanned if cfg.scan_layers else _stack_unrolled
  h, counts = stack(cfg, params["layers"], h, segment_ids, quant_key, balance_loss_coef)
  emb = params["embedder"]["embedding"]
  head_params = {k: params[k] for k in ("final_norm", "lm_head") if k in params}
  hidden, logits = Head(cfg).apply({"params": head_params}, h, emb)
  e = cfg.n_routed_experts if Block.MOE in cfg.blocks else 0
  out = {"logits": logits, "hidden": hidden,
         "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, e), jnp.int32)}
  depths = cfg.num_nextn_predict_layers if mtp_depths is None else mtp_depths
  if depths and cfg.num_nextn_predict_layers:
    mtp_logits, mtp_hidden, h_prev = [], [], hidden
    n_moe = sum(k == Block.MOE for k in cfg.mtp_blocks)
    mtp_counts = jnp.zeros((cfg.num_nextn_predict_layers, n_moe, cfg.n_routed_experts), jnp.int32)
    for k in range(1, depths + 1):
      shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, min(k, tokens.shape[1]))))[:, : tokens.shape[1]]
      emb_k = Embedder(cfg).apply({"params": params["embedder"]}, shifted)
      physical = min(k, cfg.num_nextn_predict_layers) - 1
      h_prev, counts = MTPModule(cfg, balance_loss_coef).apply({"params": params["mtp"][str(physical)]}, emb_k,
                                                               h_prev, segment_ids)
      if counts:  # a repeated module accumulates the counts of every depth it serves
        mtp_counts = mtp_counts.at[physical].add(jnp.stack(counts))
      mtp_hidden.append(h_prev)
      mtp_logits.append(project_to_vocab(cfg, h_prev, lm_head_weight(cfg, params)))
    out["mtp_logits"] = jnp.stack(mtp_logits)
    out["mtp_hidden"] = jnp.stack(mtp_hidden)
    out["mtp_expert_counts"] = mtp_counts.reshape(cfg.num_nextn_predict_layers * n_moe, cfg.n_routed_experts)
  return out


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, *, segment_ids: jax.Array | None = None
            ) -> jax.Array:
  """tokens int32 [B, T] -> logits float32 [B, T, V]."""
  return apply(cfg, params, tokens, segment_ids=segment_ids, mtp_depths=0)["logits"]


# ---------------------------------------------------------------------------------------------------
# Generation caches (ARCHITECTURE.md §7): one fixed-shape pytree, so that decoding compiles once
# ---------------------------------------------------------------------------------------------------
PAD_SEGMENT, SEQUENCE_SEGMENT, EMPTY_SEGMENT = 0, 1, -1  # segment ids of cache slots


def cache_length(max_len: int) -> int:
  """Slots allocated for `max_len` tokens: a multiple of KV_BLOCK once past one block."""
  if max_len < 1:
    raise ValueError(f"{max_len=} must be >= 1")
  return max_len if max_len <= KV_BLOCK else -(-max_len // KV_BLOCK) * KV_BLOCK


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Params:
  """Empty caches for `batch` rows of up to `max_len` tokens (zeros; no slot filled).

      mamba/conv_x      [Lm, B, W-1, M, P]   last W-1 conv inputs of x, B, C (compute dtype)
      mamba/conv_B, conv_C [Lm, B, W-1, J, Q]
      mamba/ssm         [Lm, B, M, P, Q]     SSM state (`mamba_ssm_cache_dtype`, f32)
      attention/k, v    [La, B, K, S, H]     keys and values of every filled slot (compute dtype)
      segment_ids       [B, S] int32         per slot: PAD_SEGMENT, SEQUENCE_SEGMENT or EMPTY_SEGMENT
      index             [] int32             slots filled so far (all rows share it: prompts are left-aligned)

  Lm / La: Mamba / attention layers in pattern order (entry i of a stack is the i-th layer of that kind,
  as in `params["layers"]`); S = `cache_length(max_len)`. MLP and MoE layers keep nothing. For decoding
  with unrolled layers, `unstack_cache` gives each layer's entries buffers of their own.
  """
  dtype = _common.dtype_of(cfg.dtype)
  w, m, p, j, q = cfg.conv_kernel, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
  s = cache_length(max_len)
  cache: Params = {"segment_ids": jnp.full((batch, s), EMPTY_SEGMENT, jnp.int32), "index": jnp.zeros((), jnp.int32)}
  if n := cfg.count(Block.MAMBA):
    cache["mamba"] = {"conv_x": jnp.zeros((n, batch, w - 1, m, p), dtype),
                      "conv_B": jnp.zeros((n, batch, w - 1, j, q), dtype),
                      "conv_C": jnp.zeros((n, batch, w - 1, j, q), dtype),
                      "ssm": jnp.zeros((n, batch, m, p, q), _common.dtype_of(cfg.mamba_ssm_cache_dtype))}
  if n := cfg.count(Block.ATTENTION):
    kv = (n, batch, cfg.num_key_value_heads, s, cfg.head_dim)
    cache["attention"] = {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)}
  return cache


# Keys / values [L, B, K, S, H]: rows over the batch axes, KV heads as the layout splits them.
_KV_AXES = jax.sharding.PartitionSpec(shd.LAYERS, shd.ACT_BATCH, shd.KV_HEADS, None, shd.HEAD_DIM)


def cache_logical_axes(cfg: ModelConfig) -> Params:
  """Logical `PartitionSpec`s of `init_cache(cfg, ...)`'s pytree, leaf for leaf.

  Rows go over the batch axes (`ACT_BATCH`), Mamba heads / B-C groups and KV heads over whatever the layout
  splits them by (`SSM_HEADS`, `SSM_GROUPS`, `KV_HEADS`), like the weights that write them; the layer
  axis and the slot axis stay whole. `sharding.cache_shardings` maps them onto a mesh.
  """
  P = jax.sharding.PartitionSpec
  axes: Params = {"segment_ids": P(shd.ACT_BATCH, None), "index": P()}
  if cfg.count(Block.MAMBA):
    conv_bc = P(shd.LAYERS, shd.ACT_BATCH, shd.CONV_WIDTH, shd.SSM_GROUPS, shd.SSM_STATE)
    axes["mamba"] = {"conv_x": P(shd.LAYERS, shd.ACT_BATCH, shd.CONV_WIDTH, shd.SSM_HEADS, shd.SSM_HEAD_DIM),
                     "conv_B": conv_bc, "conv_C": conv_bc,
                     "ssm": P(shd.LAYERS, shd.ACT_BATCH, shd.SSM_HEADS, shd.SSM_HEAD_DIM, shd.SSM_STATE)}
  if cfg.count(Block.ATTENTION):
    axes["attention"] = {"k": _KV_AXES, "v": _KV_AXES}
  return axes


def _cached_layer(cfg, kind: Block, p: Params, c: Params | None, h, segment_ids, index, slot_segments):
  """One layer with its cache (None for MLP / MoE) -> (h, updated cache or None)."""
  h, aux = Layer(cfg, kind).apply({"params": p}, h, segment_ids, c, index, slot_segments)
  if c is None:
    return h, None
  new = aux["state"]
  return h, {k: new[k].astype(c[k].dtype) for k in c if k != "continues"}


def _unstack(stack: Params) -> list[Params]:
  return [jax.tree.map(lambda a, i=i: a[i], stack) for i in range(len(jax.tree.leaves(stack)[0]))]


def unstack_layers(params: Params) -> Params:
  """The same params with each kind's stack split into a list of per-layer trees (a copy of the layers).

  `apply_cached` takes either layout when layers are unrolled; the split one hands each layer's weights
  to the compiled step as buffers of their own, so no slice of a stack is materialised per token.
  """
  return {**params, "layers": {name: _unstack(stack) for name, stack in params["layers"].items()}}


def layers_unstacked(params: Params) -> bool:
  """Whether `params` holds per-layer lists (`unstack_layers`) rather than stacks."""
  return any(isinstance(v, list) for v in params["layers"].values())


def fuse_in_proj(cfg: ModelConfig, params: Params) -> Params:
  """The same params with each Mamba layer's five input projections joined into one `in_proj` matrix
  (`nn._mamba2.fuse_in_proj`; a copy of them; stacked or per-layer, numpy or jax arrays).

  The decoding layout on one device for unquantized configs: one matrix product per Mamba layer and token
  instead of five (see `nn._mamba2.fuse_in_proj` for what XLA made of the five at batch 1). `apply` and
  `apply_cached` take it as they take the split params, with the same numbers up to the order of f32 sums.
  The split params stay the training and checkpoint layout.
  """
  mamba = params["layers"].get(kind_name(Block.MAMBA))
  if mamba is None:
    return params
  fuse = lambda layer: {**layer, "mixer": _mamba2.fuse_in_proj(cfg, layer["mixer"])}
  mamba = [fuse(layer) for layer in mamba] if isinstance(mamba, list) else fuse(mamba)
  return {**params, "layers": {**params["layers"], kind_name(Block.MAMBA): mamba}}


def in_proj_fused(params: Params) -> bool:
  """Whether the Mamba layers of `params` hold the fused `in_proj` of `fuse_in_proj` (False without Mamba)."""
  mamba = params["layers"].get(kind_name(Block.MAMBA))
  if mamba is None:
    return False
  first = mamba[0] if isinstance(mamba, list) else mamba
  return _mamba2.IN_PROJ in first["mixer"]


def unstack_cache(cache: Params) -> Params:
  """`init_cache`'s pytree with the Mamba and attention stacks split into lists of per-layer trees.

  For decoding with unrolled layers (`scan_layers=False`; `n3jax.inference.prefill` makes its caches so).
  Each layer's state and keys / values are then buffers of their own, donated to the step and updated
  where they lie. In a stack they are not: in XLA's H100 compile of the Nemotron-3-Nano-4B decoding step, each
  attention layer's keys and values were copied out of the stack, written, attended over and copied back
  (four passes over the KV cache per token instead of one), and likewise each Mamba state (see
  `ssd_decode_step_reference`). Apply it inside `jax.jit` (as `init_cache` is): outside, it copies.
  """
  return {k: _unstack(v) if k in ("mamba", "attention") else v for k, v in cache.items()}


def _layer_cache(caches: Params, name: str, take, continues: jax.Array) -> Params | None:
  """One layer's entry of the caches (`take` picks it from a stack; a list from `unstack_cache` is indexed
  instead), or None for MLP / MoE layers.

  A Mamba layer's state (conv windows and SSM state) goes to the mixer with the rows that carry on
  (`"continues"` [B]); the others start a new document (the reset of `ssd_reference`), and the mixer resets
  them where it reads them (in the decode kernel, without a pass of its own). Resetting the whole stack up
  front instead made XLA write a fresh copy of it, update that, and copy the result back into the donated
  cache at the end: four extra passes over every Mamba state per decoding step (21 GB of traffic at batch 64
  of Nemotron-3-Nano-4B).
  """
  if name not in caches:
    return None
  c = take(caches[name]) if isinstance(caches[name], list) else jax.tree.map(take, caches[name])
  if name == kind_name(Block.MAMBA):
    c = {**c, "continues": continues}
  return c


def _stack_cached_unrolled(cfg, layers: Params, caches: Params, h, segment_ids, index, slot_segments, continues):
  caches = {k: list(v) if isinstance(v, list) else v for k, v in caches.items()}  # lists: `unstack_cache`
  for kind, idx in layer_slots(cfg):
    name = kind_name(kind)
    if isinstance(layers[name], list):  # `unstack_layers`
      p = layers[name][idx]
    else:
      p = jax.tree.map(lambda a, idx=idx: a[idx], layers[name])
    c = _layer_cache(caches, name, lambda a, idx=idx: a[idx], continues)
    h, c = _cached_layer(cfg, kind, p, c, h, segment_ids, index, slot_segments)
    if c is None:
      continue
    if isinstance(caches[name], list):
      caches[name][idx] = c
    else:
      caches[name] = jax.tree.map(lambda a, v, idx=idx: a.at[idx].set(v), caches[name], c)
  return h, caches


def _stack_cached_scanned(cfg, layers: Params, caches: Params, h, segment_ids, index, slot_segments, continues):
  kinds = _kinds(cfg)
  slots = layer_slots(cfg)
  branch_of = jnp.asarray([kinds.index(k) for k, _ in slots], jnp.int32)
  index_in_stack = jnp.asarray([i for _, i in slots], jnp.int32)
  take = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)

  def make_branch(kind):
    name = kind_name(kind)
    def branch(carry, i):
      h, caches = carry
      c = _layer_cache(caches, name, lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), continues)
      h, c = _cached_layer(cfg, kind, take(layers[name], i), c, h, segment_ids, index, slot_segments)
      if c is not None:
        caches = {**caches, name: jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0),
                                               caches[name], c)}
      return h, caches
    return branch

  branches = [make_branch(k) for k in kinds]

  def body(carry, xs):
    b, i = xs
    out = branches[0](carry, i) if len(branches) == 1 else jax.lax.switch(b, branches, carry, i)
    return out, None

  (h, caches), _ = jax.lax.scan(body, (h, dict(caches)), (branch_of, index_in_stack))
  return h, caches


def apply_cached(cfg: ModelConfig, params: Params, tokens: jax.Array, cache: Params, *,
                 segment_ids: jax.Array | None = None, all_logits: bool = False, return_hidden: bool = False
                 ) -> tuple[jax.Array, ...]:
  """Runs `tokens` [B, T] as the next T slots of every row of `cache`: prefill (T = prompt, empty cache),
  a chunk of a longer prefill, or one decoding step (T = 1). Returns (logits, updated cache): f32 [B, V]
  of the last position, or [B, T, V] with `all_logits`. `return_hidden` adds a third output, the hidden
  states after the final norm (the input of the MTP heads), [B, D] or [B, T, D] like the logits.

  segment_ids [B, T] (default SEQUENCE_SEGMENT everywhere) follow the document rule of the SSD reference
  across calls too: the cached Mamba state belongs to the document of the last filled slot and flows into
  the new tokens only if the first of them has that segment id (else it restarts from zero); a token
  attends to filled slots of its own segment. A left-padded prompt (PAD_SEGMENT then SEQUENCE_SEGMENT)
  therefore gives its row exactly the caches and logits of the unpadded prompt.
  The caller checks that `index + T` fits the cache (the index is traced here).
  """
  _check_tokens(cfg, tokens, segment_ids)
  bsz, t = tokens.shape
  s = cache["segment_ids"].shape[1]
  if cache["segment_ids"].shape[0] != bsz or t > s:
    raise ValueError(f"{tokens.shape=} does not fit a cache of {cache['segment_ids'].shape=} (batch, slots)")
  tokens = tokens.astype(jnp.int32)
  segment_ids = (jnp.full_like(tokens, SEQUENCE_SEGMENT) if segment_ids is None
                 else segment_ids.astype(jnp.int32))
  index = cache["index"]
  last = jax.lax.dynamic_index_in_dim(cache["segment_ids"], jnp.maximum(index - 1, 0), axis=1, keepdims=False)
  continues = (index > 0) & (last == segment_ids[:, 0])                      # [B]
  caches = {k: cache[k] for k in ("mamba", "attention") if k in cache}  # Mamba states reset per layer
  slot_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, axis=1)  # [B, S]

  h = Embedder(cfg).apply({"params": params["embedder"]}, tokens)
  h = shd.with_logical_constraint(h, (shd.ACT_BATCH, shd.ACT_SEQ, shd.ACT_EMBED))  # a no-op outside use_mesh
  if cfg.scan_layers and layers_unstacked(params):
    raise ValueError("params from `unstack_layers` need scan_layers=False")
  if cfg.scan_layers and any(isinstance(v, list) for v in caches.values()):
    raise ValueError("a cache from `unstack_cache` needs scan_layers=False")
  stack = _stack_cached_scanned if cfg.scan_layers else _stack_cached_unrolled
  h, caches = stack(cfg, params["layers"], caches, h, segment_ids, index, slot_segments, continues)
  if not all_logits:
    h = h[:, -1:]
  head_params = {k: params[k] for k in ("final_norm", "lm_head") if k in params}
  hidden, logits = Head(cfg).apply({"params": head_params}, h, params["embedder"]["embedding"])
  new_cache = {**caches, "segment_ids": slot_segments, "index": index + t}
  if return_hidden:
    return (logits, new_cache, hidden) if all_logits else (logits[:, 0], new_cache, hidden[:, 0])
  return (logits if all_logits else logits[:, 0]), new_cache


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int) -> Params:
  """Empty KV caches of the MTP modules' attention layers (speculative decoding), slot for slot beside
  `init_cache`'s: {"<module>": {"k", "v": [La_mtp, B, K, S, H]}}, one entry per physical MTP module and
  La_mtp = attention layers in `mtp_blocks`. Slot i holds the module's keys and values at position i."""
  if not cfg.num_nextn_predict_layers:
    raise ValueError("the model has no MTP modules (num_nextn_predict_layers=0)")
  n = sum(k == Block.ATTENTION for k in cfg.mtp_blocks)
  kv = (n, batch, cfg.num_key_value_heads, cache_length(max_len), cfg.head_dim)
  dtype = _common.dtype_of(cfg.dtype)
  return {str(m): {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)}
          for m in range(cfg.num_nextn_predict_layers)}


def mtp_cache_logical_axes(cfg: ModelConfig) -> Params:
  """Logical `PartitionSpec`s of `init_mtp_cache(cfg, ...)`'s pytree: the main KV cache's axes (see
  `cache_logical_axes`); `sharding.cache_shardings(..., mtp=True)` maps them onto a mesh."""
  return {str(m): {"k": _KV_AXES, "v": _KV_AXES} for m in range(cfg.num_nextn_predict_layers)}


def mtp_apply_cached(cfg: ModelConfig, params: Params, module: int, tokens: jax.Array, h_prev: jax.Array,
                     mtp_cache: Params, *, index: jax.Array, slot_segments: jax.Array,
                     segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Params]:
  """MTP module `module` over T positions written at slots `index + t` of its cache (speculative drafting).

  tokens [B, T]: the token after each position; h_prev [B, T, D]: the hidden state that predicted it (the
  main model's after the final norm, or an earlier MTP output). mtp_cache: the module's entry of
  `init_mtp_cache`; slot_segments [B, S]: the segment id of every slot, these T included (the main cache's
  rule: a position attends to earlier slots of its own segment); segment_ids [B, T] default SEQUENCE_SEGMENT.
  Returns (logits f32 [B, T, V] of the token after next, h^k [B, T, D], the updated module cache).
  """
  _check_tokens(cfg, tokens, segment_ids)
  segment_ids = (jnp.full(tokens.shape, SEQUENCE_SEGMENT, jnp.int32) if segment_ids is None
                 else segment_ids.astype(jnp.int32))
  emb = Embedder(cfg).apply({"params": params["embedder"]}, tokens.astype(jnp.int32))
  n = mtp_cache["k"].shape[0]
  caches = [{"k": mtp_cache["k"][i], "v": mtp_cache["v"][i]} for i in range(n)]
  h, _, caches = MTPModule(cfg).apply({"params": params["mtp"][str(module)]}, emb, h_prev, segment_ids, caches,
                                      index, slot_segments)
  new_cache = {name: jnp.stack([c[name].astype(mtp_cache[name].dtype) for c in caches]) if caches
               else mtp_cache[name] for name in ("k", "v")}
  return project_to_vocab(cfg, h, lm_head_weight(cfg, params)), h, new_cache
