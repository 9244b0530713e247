"""The declarative map between Hugging Face hub tensors and the n3jax param tree.

Hub layout (ARCHITECTURE.md §6): prefix `backbone.`, `nn.Linear` weights `[out, in]`, routed experts
stored per expert, MTP under `mtp.layers.{depth * len(mtp_pattern) + inner}`. n3jax layout: see
`n3jax.models` (layers of one kind stacked, kernels `[in, out]`, heads and groups as their own axes).

Each `Rule` names one HF tensor (a template over the layer, expert and MTP indices) and the n3jax
leaves it becomes: usually one, several for the fused Mamba `in_proj` / `conv1d` rows. Every transform
is a transpose / reshape / row split, so both directions are bit-exact. Only the tables below know HF
names; modules never rename.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from n3jax.configs import Block, ModelConfig
from n3jax import models

Layout = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


# --- Layouts: (hf piece -> n3jax leaf, n3jax leaf -> hf piece) ---
def identity() -> Layout:
  return (lambda a: a, lambda w: w)


def vector(shape: tuple[int, ...]) -> Layout:
  """[prod(shape)] <-> shape."""
  return (lambda a: a.reshape(shape), lambda w: w.reshape(-1))


def linear_out(out_shape: tuple[int, ...]) -> Layout:
  """HF [prod(out), in] <-> [in, *out] (the output features get their own axes)."""
  return (lambda a: a.T.reshape(a.shape[1], *out_shape), lambda w: w.reshape(w.shape[0], -1).T)


def linear_in(in_shape: tuple[int, ...]) -> Layout:
  """HF [out, prod(in)] <-> [*in, out]."""
  return (lambda a: a.T.reshape(*in_shape, a.shape[0]), lambda w: w.reshape(-1, w.shape[-1]).T)


def conv(width: int, shape: tuple[int, ...]) -> Layout:
  """HF depthwise Conv1d weight [channels, 1, W] <-> [W, *shape]."""
  return (lambda a: a[:, 0, :].T.reshape(width, *shape), lambda w: w.reshape(width, -1).T[:, None, :])


@dataclasses.dataclass(frozen=True)
class Piece:
  path: str            # n3jax leaf, relative to the layer (e.g. "mixer/in_proj_x")
  rows: int            # HF rows (dim 0) this piece takes, in order
  layout: Layout


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                        # HF name relative to the layer prefix; "{e}" = expert index
  hf_shape: tuple[int, ...]      # per tensor (per expert for expert rules)
  pieces: tuple[Piece, ...]
  per_expert: bool = False       # one HF tensor per expert, stacked on the n3jax leaf's expert axis


def _one(hf: str, shape: tuple[int, ...], path: str, layout: Layout, per_expert: bool = False) -> Rule:
  return Rule(hf, shape, (Piece(path, shape[0], layout),), per_expert)


def layer_rules(cfg: ModelConfig, kind: Block) -> tuple[Rule, ...]:
  """Rules for one layer of `kind`, relative to `backbone.layers.{i}.` / the layer's params."""
  d = cfg.hidden_size
  rules = [_one("norm.weight", (d,), "norm/scale", identity())]
  if kind == Block.MAMBA:
    m, p, j, q, w = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.conv_kernel
    di, jq = cfg.d_inner, j * q
    proj = (("z", di, (m, p)), ("x", di, (m, p)), ("B", jq, (j, q)), ("C", jq, (j, q)), ("dt", m, (m,)))
    rules.append(Rule("mixer.in_proj.weight", (2 * di + 2 * jq + m, d),
                      tuple(Piece(f"mixer/in_proj_{n}", r, linear_out(s)) for n, r, s in proj)))
    if cfg.use_bias:
      rules.append(Rule("mixer.in_proj.bias", (2 * di + 2 * jq + m,),
                        tuple(Piece(f"mixer/in_proj_{n}_bias", r, vector(s)) for n, r, s in proj)))
    conv_parts = (("x", di, (m, p)), ("B", jq, (j, q)), ("C", jq, (j, q)))
    rules.append(Rule("mixer.conv1d.weight", (cfg.conv_dim, 1, w),
                      tuple(Piece(f"mixer/conv1d_{n}", r, conv(w, s)) for n, r, s in conv_parts)))
    if cfg.use_conv_bias:
      rules.append(Rule("mixer.conv1d.bias", (cfg.conv_dim,),
                        tuple(Piece(f"mixer/conv1d_{n}_bias", r, vector(s)) for n, r, s in conv_parts)))
    rules += [_one(f"mixer.{n}", (m,), f"mixer/{n}", identity()) for n in ("A_log", "D", "dt_bias")]
    rules.append(_one("mixer.norm.weight", (di,), "mixer/norm", vector((m, p))))
    rules.append(_one("mixer.out_proj.weight", (d, di), "mixer/out_proj", linear_in((m, p))))
    if cfg.use_bias:
      rules.append(_one("mixer.out_proj.bias", (d,), "mixer/out_proj_bias", identity()))
  elif kind == Block.ATTENTION:
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rules += [_one("mixer.q_proj.weight", (n * h, d), "mixer/q_proj", linear_out((n, h))),
              _one("mixer.k_proj.weight", (k * h, d), "mixer/k_proj", linear_out((k, h))),
              _one("mixer.v_proj.weight", (k * h, d), "mixer/v_proj", linear_out((k, h))),
              _one("mixer.o_proj.weight", (d, n * h), "mixer/o_proj", linear_in((n, h)))]
  elif kind == Block.MLP:
    rules += _mlp_rules(cfg, "mixer", "mixer", cfg.intermediate_size)
  elif kind == Block.MOE:
    e, f, din = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_size
    rules += [_one("mixer.gate.weight", (e, d), "mixer/gate", linear_out((e,))),
              _one("mixer.gate.e_score_correction_bias", (e,), "mixer/e_score_correction_bias", identity()),
              _one("mixer.experts.{e}.up_proj.weight", (f, din), "mixer/experts_up_proj", linear_out((f,)), True),
              _one("mixer.experts.{e}.down_proj.weight", (din, f), "mixer/experts_down_proj", linear_out((din,)),
                   True)]
    rules += _mlp_rules(cfg, "mixer.shared_experts", "mixer/shared_experts", cfg.moe_shared_expert_intermediate_size)
    if cfg.moe_latent_size:
      lat = cfg.moe_latent_size
      rules += [_one("mixer.fc1_latent_proj.weight", (lat, d), "mixer/fc1_latent_proj", linear_out((lat,))),
                _one("mixer.fc2_latent_proj.weight", (d, lat), "mixer/fc2_latent_proj", linear_out((d,)))]
  return tuple(rules)


def _mlp_rules(cfg: ModelConfig, hf: str, path: str, f: int) -> list[Rule]:
  d = cfg.hidden_size
  rules = [_one(f"{hf}.up_proj.weight", (f, d), f"{path}/up_proj", linear_out((f,))),
           _one(f"{hf}.down_proj.weight", (d, f), f"{path}/down_proj", linear_out((d,)))]
  if cfg.mlp_bias:
    rules += [_one(f"{hf}.up_proj.bias", (f,), f"{path}/up_proj_bias", identity()),
              _one(f"{hf}.down_proj.bias", (d,), f"{path}/down_proj_bias", identity())]
  return rules


@dataclasses.dataclass(frozen=True)
class Target:
  """Where one HF tensor goes: the rule, and the index prefix into stacked leaves."""
  rule: Rule
  root: str                      # n3jax path prefix of the rule's pieces
  index: tuple[int, ...]         # leading indices into the leaves (stack slot, expert)


def hf_targets(cfg: ModelConfig) -> Iterator[tuple[str, Target]]:
  """Every HF tensor name the model has, in the order transformers writes them, with its target."""
  d, v = cfg.hidden_size, cfg.vocab_size
  yield "backbone.embeddings.weight", Target(_one("", (v, d), "embedding", identity()), "embedder", ())
  for i, (kind, slot) in enumerate(models.layer_slots(cfg)):
    yield from _layer_targets(cfg, kind, f"backbone.layers.{i}.", f"layers/{models.kind_name(kind)}", (slot,))
  yield "backbone.norm_f.weight", Target(_one("", (d,), "scale", identity()), "final_norm", ())
  if not cfg.tie_word_embeddings:
    yield "lm_head.weight", Target(_one("", (v, d), "lm_head", linear_out((v,))), "", ())
  n_inner = len(cfg.mtp_blocks)
  for depth in range(cfg.num_nextn_predict_layers):
    for inner, kind in enumerate(cfg.mtp_blocks):
      prefix = f"mtp.layers.{depth * n_inner + inner}."
      root = f"mtp/{depth}"
      if inner == 0:
        yield prefix + "enorm.weight", Target(_one("", (d,), "enorm/scale", identity()), root, ())
        yield prefix + "hnorm.weight", Target(_one("", (d,), "hnorm/scale", identity()), root, ())
        yield prefix + "eh_proj.weight", Target(_one("", (d, 2 * d), "eh_proj", linear_out((d,))), root, ())
      yield from _layer_targets(cfg, kind, prefix, f"{root}/layer_{inner}", ())
      if inner == n_inner - 1:
        yield prefix + "final_layernorm.weight", Target(_one("", (d,), "final_norm/scale", identity()), root, ())


def _layer_targets(cfg, kind, prefix, root, index) -> Iterator[tuple[str, Target]]:
  for rule in layer_rules(cfg, kind):
    if rule.per_expert:
      for e in range(cfg.n_routed_experts):
        yield prefix + rule.hf.format(e=e), Target(rule, root, index + (e,))
    else:
      yield prefix + rule.hf, Target(rule, root, index)


def leaf_path(target: Target, piece: Piece) -> str:
  return f"{target.root}/{piece.path}" if target.root else piece.path


def split_hf(target: Target, name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  """One HF tensor -> its n3jax leaf pieces (leaf path, value for the slot `target.index`)."""
  rule = target.rule
  if tuple(array.shape) != rule.hf_shape:
    raise ValueError(f"Tensor {name!r} has shape {list(array.shape)}, the config implies {list(rule.hf_shape)}")
  start = 0
  for piece in rule.pieces:
    yield leaf_path(target, piece), piece.layout[0](array[start:start + piece.rows])
    start += piece.rows


def join_hf(target: Target, leaves: Callable[[str], np.ndarray]) -> np.ndarray:
  """The inverse of `split_hf`: reads the slot `target.index` of each piece's leaf."""
  parts = [p.layout[1](leaves(leaf_path(target, p))[target.index]) for p in target.rule.pieces]
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
