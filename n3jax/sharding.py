"""Logical axis names, the rules tables that map them onto mesh axes, and sharded construction.

Modules say *what* an axis is (`nn.with_logical_partitioning(init, (EMBED, MLP))`); only this file says
*where* it goes. A new layout is a new named entry in `AXIS_RULES`, never an `if` in a layer. Kernels that
XLA cannot partition (Pallas calls) run per shard through `per_shard`, which reads the same rules.
Mesh axes, always in this order: `data`, `fsdp`, `expert`, `tensor`.

    mesh = make_mesh({"data": 2, "fsdp": 4, "expert": 1, "tensor": 1})
    with use_mesh(mesh, "fsdp"):
      params = init_sharded(cfg, key, mesh, "fsdp")   # created sharded, never materialised on one device
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["AXIS_RULES", "MESH_AXES", "make_mesh", "use_mesh", "param_specs", "param_shardings", "unused_mesh_axes",
           "init_sharded", "batch_sharding", "logical_to_mesh", "cache_shardings", "init_cache_sharded",
           "named_sharding", "per_shard", "gathered_for_compute", "compute_spec"]

# --- Parameter axes ---
LAYERS = "layers"              # stacked layers of one block kind (scan axis); never sharded
VOCAB = "vocab"
EMBED = "embed"                # d_model
MLP = "mlp"                    # dense / shared-expert hidden
HEADS = "heads"                # attention query heads
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
SSM_HEADS = "ssm_heads"        # Mamba heads (d_inner = heads x head_dim is split by heads)
SSM_HEAD_DIM = "ssm_head_dim"
SSM_GROUPS = "ssm_groups"      # B/C groups
SSM_STATE = "ssm_state"
CONV_WIDTH = "conv_width"
EXPERT = "expert"
EXPERT_MLP = "expert_mlp"      # routed expert hidden
LATENT = "latent"              # LatentMoE width
NORM = "norm"                  # 1-D norm scales and small vectors (replicated)

# --- Activation axes ---
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"

MESH_AXES = ("data", "fsdp", "expert", "tensor")
_BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis

# Each layout: (logical name, mesh axis or tuple of mesh axes). Unlisted names are replicated. Rules are
# tried in order and a mesh axis is used once per array (flax's `logical_to_mesh_axes`): a later rule for
# the same name is the fallback when an earlier one's mesh axes are taken.
# Under tensor parallelism Mamba heads and B/C groups are split together, so the conv, the scan and the
# gated group norm stay local to a shard (Megatron's layout); this needs heads % tensor == 0 and
# n_groups % tensor == 0.
# With experts split, the expert axis is also a batch axis for every other layer, so the weights of those
# layers (and their optimizer state) are split over it too, as over `fsdp` (ZeRO-3 over both; MaxText maps
# `embed` onto its expert axis the same way). Without this, at Super on 64 H100s (fsdp 8 x expert 8) every
# non-expert weight was split 8 ways, not 64: 33.8 GB of params and AdamW state per GPU, not 23.2 GB.
# Routed experts are split over `expert` for expert parallelism and, at rest, over `fsdp` on the same
# dimension (each device holds whole experts; the FSDP all-gather concatenates along the leading
# dimension of a layer's weights). Split on their width instead, XLA relaid out every expert weight
# stack of the step for the gather (a transposed f32 copy of all of them, 7 GB per GPU at Super).
# Experts that the two axes do not divide fall back to `expert` alone with the width over `fsdp`.
_FSDP_OVER_EXPERT = (
    (EXPERT, ("expert", "fsdp")), (EXPERT, "expert"),
    (EMBED, ("fsdp", "expert")), (EMBED, "fsdp"),
    (LATENT, ("fsdp", "expert")), (LATENT, "fsdp"),
)
AXIS_RULES: dict[str, tuple[tuple[str, str | tuple[str, ...]], ...]] = {
    "data_parallel": (
        (ACT_BATCH, _BATCH_AXES),
    ),
    "fsdp": (
        (ACT_BATCH, _BATCH_AXES),
        (EMBED, "fsdp"), (LATENT, "fsdp"),
    ),
    "fsdp_ep": (
        (ACT_BATCH, _BATCH_AXES),
        *_FSDP_OVER_EXPERT,
    ),
    "fsdp_tp_ep": (
        (ACT_BATCH, _BATCH_AXES),
        *_FSDP_OVER_EXPERT,
        (VOCAB, "tensor"), (MLP, "tensor"), (EXPERT_MLP, "tensor"), (HEADS, "tensor"), (KV_HEADS, "tensor"),
        (SSM_HEADS, "tensor"), (SSM_GROUPS, "tensor"), (ACT_HEADS, "tensor"), (ACT_VOCAB, "tensor"),
    ),
}


def _rules(rules_name: str):
  if rules_name not in AXIS_RULES:
    raise ValueError(f"Unknown axis rules {rules_name!r}; known: {sorted(AXIS_RULES)}")
  return AXIS_RULES[rules_name]


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """A rule's or a `PartitionSpec` entry's mesh axes as a tuple (none for None)."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """A mesh over `devices` (default: all processes' devices) with axes `MESH_AXES`.

  `shape` maps axis names to sizes; one size may be -1 (whatever is left); missing axes are 1.
  """
  if unknown := sorted(set(shape) - set(MESH_AXES)):
    raise ValueError(f"Unknown mesh axes {unknown}; known: {list(MESH_AXES)}")
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {shape}")
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"Mesh axis sizes must be >= 1 (or one of them -1), got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices do not divide into mesh {shape}")
    sizes[sizes.index(-1)] = devices.size // known
  if math.prod(sizes) != devices.size:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {devices.size}")
  return Mesh(devices.reshape(sizes), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules_name: str):
  """Activates the mesh and the layout's rules, so `with_logical_constraint` in the model takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(_rules(rules_name)):
    yield


def logical_to_mesh(logical_axes: Any, rules_name: str, *, shapes: Any = None,
                    mesh: Mesh | dict[str, int] | None = None) -> Any:
  """Maps a pytree of logical `PartitionSpec`s to mesh `PartitionSpec`s under a named layout.

  Rules are tried in order, a mesh axis used once per array (flax's `logical_to_mesh_axes`). Given the
  arrays' `shapes` (a matching pytree of shaped values) and the `mesh` (or its axis sizes), a rule whose
  mesh axes do not divide the dimension is passed over for the next rule of the same name; the last rule
  of a name always applies, so that `param_shardings` can name a dimension nothing divides.
  """
  rules = _rules(rules_name)
  if shapes is None or mesh is None:
    return nn.logical_to_mesh(logical_axes, rules)
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  last = {name: i for i, (name, _) in enumerate(rules)}

  def resolve(names: PartitionSpec, leaf) -> PartitionSpec:
    out: list[Any] = [None] * len(names)
    assigned = [False] * len(names)
    used: set[str] = set()
    for i, (name, axes) in enumerate(rules):
      if name not in names:
        continue
      pos = tuple(names).index(name)
      group = _mesh_axes(axes)
      if assigned[pos] or used & set(group):
        continue
      if leaf.shape[pos] % math.prod(sizes.get(a, 1) for a in group) and i != last[name]:
        continue
      out[pos], assigned[pos] = axes, True
      used |= set(group)
    return PartitionSpec(*out)

  return jax.tree.map(resolve, logical_axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_specs(cfg, mesh: Mesh | dict[str, int], rules_name: str, *, shapes: Any = None, logical: Any = None
                ) -> Any:
  """`PartitionSpec` per parameter of `cfg`'s model under a layout, checked for divisibility: a dimension
  that its mesh axes do not divide is a ValueError naming the param. `mesh` may be the axis sizes alone
  (no devices: the memory plan's question), so that the plan refuses what `param_shardings` refuses.
  shapes, logical: the model's `jax.eval_shape`d params and `models.logical_axes`, if the caller has them."""
  from n3jax import models  # sharding sits below the model in the house plan; this is a lazy helper
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else {a: int(mesh.get(a, 1)) for a in MESH_AXES}
  if shapes is None:
    shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  logical = models.logical_axes(cfg) if logical is None else logical
  specs = logical_to_mesh(logical, rules_name, shapes=shapes, mesh=sizes)

  def check(path, spec, leaf):
    for dim, axes in zip(leaf.shape, spec):
      if axes is None:
        continue
      size = math.prod(sizes.get(a, 1) for a in _mesh_axes(axes))
      if dim % size:
        raise ValueError(f"Param {jax.tree_util.keystr(path)} {leaf.shape} cannot be split {spec} over mesh "
                         f"{sizes} under layout {rules_name!r}: {dim} % {size} != 0")
    return spec

  return jax.tree_util.tree_map_with_path(check, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def unused_mesh_axes(mesh: Mesh | dict[str, int], rules_name: str) -> list[str]:
  """Mesh axes of size > 1 that no rule of the layout maps anything to (e.g. `tensor` under `fsdp`): the
  devices along one hold the same params and the same rows, and do the same work."""
  sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  used = {a for _, axes in _rules(rules_name) for a in _mesh_axes(axes)}
  return [a for a in MESH_AXES if sizes.get(a, 1) > 1 and a not in used]


def param_shardings(cfg, mesh: Mesh, rules_name: str, *, per_layer: bool = False) -> Any:
  """`NamedSharding` per parameter of `cfg`'s model under a layout, checked for divisibility (`param_specs`).
  per_layer: of `models.unstack_layers(params)` instead (each layer sharded like its slice of the stack)."""
  from n3jax import models  # lazy, as in `param_specs`
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  out = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg, mesh, rules_name, shapes=shapes),
                     is_leaf=lambda x: isinstance(x, PartitionSpec))
  return {**out, "layers": _per_layer(out["layers"], shapes["layers"])} if per_layer else out


def _per_layer(stacks: dict, shapes: dict) -> dict:
  """{name: shardings of a stack} -> {name: [shardings of each layer]} (the unsharded layer axis dropped)."""
  def drop(s: NamedSharding) -> NamedSharding:
    if s.spec and s.spec[0] is not None:
      raise ValueError(f"the layer axis of a stack is split ({s.spec}); per-layer arrays need it whole")
    return NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))
  return {name: [jax.tree.map(drop, stack)] * jax.tree.leaves(shapes[name])[0].shape[0]
          for name, stack in stacks.items()}


def init_sharded(cfg, key: jax.Array, mesh: Mesh, rules_name: str) -> Any:
  """Random params created directly in their shards (`jit` with `out_shardings`)."""
  from n3jax import models
  shardings = param_shardings(cfg, mesh, rules_name)
  with use_mesh(mesh, rules_name):
    return jax.jit(lambda k: models.init(cfg, k), out_shardings=shardings)(key)


def named_sharding(mesh: Mesh, rules_name: str, axes: tuple[str | None, ...]) -> NamedSharding:
  """The `NamedSharding` of an array whose dimensions have the logical names `axes`, under a layout."""
  return NamedSharding(mesh, logical_to_mesh(PartitionSpec(*axes), rules_name))


def cache_shardings(cfg, mesh: Mesh, rules_name: str, *, batch: int, max_len: int, mtp: bool = False,
                    per_layer: bool = False) -> Any:
  """`NamedSharding` per leaf of `models.init_cache(cfg, batch, max_len)` under a layout
  (`models.cache_logical_axes`), checked for divisibility: the rows over the batch axes, Mamba heads and
  groups and KV heads over the tensor axis where the layout splits them. mtp=True: the same for the MTP
  modules' KV caches (`models.init_mtp_cache`, `models.mtp_cache_logical_axes`; speculative decoding).
  per_layer: of `models.unstack_cache(...)` instead (each layer sharded like its slice of the stack)."""
  from n3jax import models  # lazy, as in `param_shardings`
  init, logical = ((models.init_mtp_cache, models.mtp_cache_logical_axes(cfg)) if mtp
                   else (models.init_cache, models.cache_logical_axes(cfg)))
  shapes = jax.eval_shape(lambda: init(cfg, batch, max_len))
  specs = logical_to_mesh(logical, rules_name)
  kind = "MTP cache" if mtp else "Cache"

  def check(path, names, spec, leaf):
    for dim, name, axes in zip(leaf.shape, names, spec):
      if axes is None:
        continue
      axes = _mesh_axes(axes)
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        what = f"a batch of {dim} rows" if name == ACT_BATCH else f"{dim} {name}"
        raise ValueError(f"{kind} {jax.tree_util.keystr(path)} {leaf.shape}: {what} cannot be split over mesh axes "
                         f"{axes} ({size} shards) of mesh {dict(mesh.shape)} under layout {rules_name!r}: "
                         f"{dim} % {size} != 0")
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(check, logical, specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if per_layer:
    if mtp:
      raise ValueError("per_layer applies to the main cache (`models.unstack_cache`), not the MTP caches")
    stacks = {k: out[k] for k in ("mamba", "attention") if k in out}
    out = {**out, **_per_layer(stacks, shapes)}
  return out


def init_cache_sharded(cfg, batch: int, max_len: int, mesh: Mesh, rules_name: str) -> Any:
  """Empty generation caches (`models.init_cache`) created directly in their shards."""
  from n3jax import models
  shardings = cache_shardings(cfg, mesh, rules_name, batch=batch, max_len=max_len)
  with use_mesh(mesh, rules_name):
    return jax.jit(lambda: models.init_cache(cfg, batch, max_len), out_shardings=shardings)()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Tokens [B, T]: the batch over data, fsdp and expert; the sequence replicated."""
  return NamedSharding(mesh, PartitionSpec(_BATCH_AXES, None))


def splits(logical_axis: str) -> bool:
  """Whether the active mesh and layout (`use_mesh`, read at trace time) split a logical axis over devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  spec = nn.logical_to_mesh_axes((logical_axis,))
  return spec is not None and any(mesh.shape.get(a, 1) > 1 for a in _mesh_axes(spec[0]))


def moe_shard_axes() -> tuple[str | None, tuple[str, ...], str | None] | None:
  """How a MoE layer splits its routed experts' work on the active mesh: (expert mesh axis or None, the
  other batch axes, tensor mesh axis or None), or None when nothing splits it (no mesh, or every batch,
  expert and tensor axis of size 1).

  Experts split (the layout maps EXPERT to an axis of size > 1): expert parallelism over that axis, tokens
  exchanged with the other shards. Otherwise, while the batch is split, each shard dispatches its own
  tokens (expert axis None): a sort over a token axis split across devices would make XLA gather every
  token onto every device (at Super on 64 GPUs under FSDP, 247 GB of routed rows per GPU; `n3jax.aot`).
  The tensor axis splits each expert's hidden width (EXPERT_MLP's first rule, one axis of size > 1), and
  the layer sums the shards' partial outputs over it; a Pallas kernel, opaque to XLA, would otherwise have
  every expert weight gathered whole onto each device, every step (`expert_parallel.expert_parallel_moe`).
  Read inside the model at trace time: `use_mesh` activates both the mesh and the layout's rules.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = dict(nn.get_logical_axis_rules())
  batch = rules.get(ACT_BATCH, ())
  batch = tuple(a for a in _mesh_axes(batch) if mesh.shape.get(a, 1) > 1)
  # The expert dimension's first rule, less the FSDP axis that also splits it at rest.
  expert_axes = next((axes for name, axes in nn.get_logical_axis_rules() if name == EXPERT), None)
  expert_axes = [a for a in _mesh_axes(expert_axes) if a != "fsdp"]
  expert_axis = expert_axes[0] if len(expert_axes) == 1 else None
  if expert_axis is not None and mesh.shape.get(expert_axis, 1) <= 1:
    expert_axis = None
  hidden_axes = next((axes for name, axes in nn.get_logical_axis_rules() if name == EXPERT_MLP), None)
  hidden_axes = [a for a in _mesh_axes(hidden_axes) if mesh.shape.get(a, 1) > 1]
  tensor_axis = hidden_axes[0] if len(hidden_axes) == 1 and hidden_axes[0] not in batch else None
  if expert_axis is not None:
    batch = tuple(a for a in batch if a != expert_axis)
  if expert_axis is None and not batch and tensor_axis is None:
    return None
  return expert_axis, batch, tensor_axis


# Mesh axes that split parameters (and their optimizer state and gradients) at rest only: a layer uses its
# weights all-gathered over them (ZeRO-3 / FSDP), while the tokens stay split over them as batch axes. The
# expert axis is one of them for every dimension but a routed expert weight's expert dimension.
_AT_REST_AXES = ("fsdp", "expert")


def gathered_for_compute(w: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """A parameter as a layer computes with it: all-gathered over the FSDP axis, still split over the
  expert and tensor axes as its logical `axes` say. A no-op outside `use_mesh`.

  Without it XLA may keep a weight split over `fsdp` on its embed dimension and re-split the activations
  (batch over fsdp) to match, which it can only do by replicating them ("involuntary full
  rematerialization"); gathering the weight is the FSDP all-gather, and its transpose the gradient's
  reduce-scatter.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape.get(a, 1) == 1 for a in _AT_REST_AXES):
    return w
  spec = nn.logical_to_mesh_axes(axes)
  if spec is None:
    return w
  return jax.lax.with_sharding_constraint(w, compute_spec(spec, axes))


def compute_spec(spec: PartitionSpec, axes: tuple[str | None, ...]) -> PartitionSpec:
  """The mesh split of a parameter at rest (`spec`, logical `axes`) as a layer computes with it: the FSDP axes
  dropped, the tensor axis and the expert axis of the experts' dimension kept (`gathered_for_compute`)."""

  def keep(entry, name):
    names = tuple(a for a in _mesh_axes(entry)
                  if a not in _AT_REST_AXES or (name == EXPERT and a == "expert"))
    return names[0] if len(names) == 1 else (names or None)

  return PartitionSpec(*(keep(e, n) for e, n in zip(spec, axes)))


def per_shard(fn: Callable, in_axes: tuple[PartitionSpec | None, ...], out_axes: Any) -> Callable:
  """`fn` run on each shard of its arguments under the active mesh and layout (`use_mesh`); else `fn`.

  For ops that XLA's SPMD partitioner cannot split, such as a Pallas kernel: it is one opaque custom call,
  so XLA would gather every shard's rows onto each device and run the whole batch there. `in_axes` holds
  each argument's logical axes (a `PartitionSpec` of names; None: the argument whole on every shard); name
  only the dimensions `fn` treats independently (batch rows, heads). A name takes the mesh axes of size > 1
  of its first rule if they divide every dimension so named, else it stays whole. Arguments that are None
  are passed through. `out_axes`: the outputs' logical axes (a pytree of `PartitionSpec`s).
  """
  def call(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return fn(*args)
    sizes: dict[str, list[int]] = {}
    for names, x in zip(in_axes, args):
      for name, dim in zip(names or () if x is not None else (), getattr(x, "shape", ())):
        if name is not None:
          sizes.setdefault(name, []).append(dim)
    rules, resolved = nn.get_logical_axis_rules(), {}
    for name, dims in sizes.items():
      axes = next((_mesh_axes(axes) for rule, axes in rules if rule == name), ())
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
      if axes and not any(d % math.prod(mesh.shape[a] for a in axes) for d in dims):
        resolved[name] = axes[0] if len(axes) == 1 else axes
    if not resolved:
      return fn(*args)

    def spec(names):
      entries, used = [], set()
      for name in names or ():
        axes = _mesh_axes(resolved.get(name))
        entries.append(resolved.get(name) if axes and not used & set(axes) else None)
        used |= set(axes)
      return PartitionSpec(*entries)

    present = [i for i, x in enumerate(args) if x is not None]

    def local(*xs):
      full = list(args)
      for i, x in zip(present, xs):
        full[i] = x
      return fn(*full)

    out_specs = jax.tree.map(spec, out_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    # check_vma=False: `fn` need not type its loop carries and kernel outputs as varying over the mesh
    # (references build zero states, interpreted kernels index with plain ints). JAX's transpose then
    # divides output cotangents over the axes an output is replicated on and sums input cotangents over
    # the axes an input is replicated on, so gradients of replicated inputs (A, D, dt_bias) are whole.
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(in_axes[i]) for i in present),
                         out_specs=out_specs, check_vma=False)(*(args[i] for i in present))

  return call


def with_logical_constraint(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding hint; a no-op outside `use_mesh`."""
  return nn.with_logical_constraint(x, axes)
