"""Expert parallelism (EP) for the routed-expert MLP: ``expert_parallel_moe``.

Experts are split over one mesh axis (``expert_axis``, ep shards of E/ep
experts each) and tokens over the data axes *and* the expert axis (as in
n3jax's ``ACT_BATCH -> ("data", "fsdp", "expert")`` rules), inside one
``jax.shard_map``. The result equals ``ops.moe_dispatch`` on one device
(dropless; only the order of f32 sums differs), and it is differentiable
w.r.t. tokens, router weights, w_up and w_down.

Two token exchanges (``exchange=``), both dropless and exact:

* "all_to_all" (default): each shard sorts its T_l * R assignments by expert
  and sends each expert shard exactly its rows with
  ``jax.lax.ragged_all_to_all`` (sizes exchanged first with a tiny all_gather
  of the [E] counts); the receiver regroups the rows by local expert, runs
  the grouped MLP, and a second ragged all-to-all returns the outputs.
  Traffic per shard and direction: about T_l * R * D * (ep - 1) / ep
  elements in tokens.dtype, twice per pass. The receive buffer is
  sized for the worst case (ep * T_l * R rows, every token to one shard) so
  nothing is dropped; the Pallas gmm does no work on its unused rows, but the
  memory is held. XLA:CPU does not implement ``ragged_all_to_all`` (jax 0.12:
  "HLO opcode ragged-all-to-all is not supported by XLA:CPU"), so on CPU
  meshes (``ragged_impl="auto"``) the same exchange is emulated with a padded
  ``jax.lax.all_to_all`` (ep x the traffic and memory; for tests).
* "all_gather": all_gather the shard's tokens (and routing) over the expert
  axis, run only the local experts on the rows routed to them, and
  psum_scatter the f32 partial outputs back to the token owners. Traffic per
  shard: (ep - 1) * T_l * D elements gathered plus (ep - 1) * T_l * D f32
  reduce-scattered (and the same again in the backward), independent of R. In
  bytes (bf16 tokens, f32 partial sums) it moves less than the all-to-all when
  R > 1.5 * ep (Super, R = 22: ep <= 14; Nano, R = 6: ep <= 3), and it is
  simpler, but its sort and gmm buffer hold ep * T_l * R rows.

Composability: weights enter with specs P(expert_axis, None, tensor_axis)
(w_up) and P(expert_axis, tensor_axis, None) (w_down), so weights that the
caller shards over FSDP axes on another dim are all-gathered on entry (and
their gradients reduce-scattered) by shard_map, as FSDP does. ``tensor_axis``
splits each expert's hidden width F (Megatron's tensor parallelism for expert
MLPs): each shard computes its columns of the up product and a partial down
product, summed over the axis in f32 (one ``psum`` of the rows' outputs)
before the rounding. Without it, a mesh axis that is neither a data, expert nor
tensor axis sees replicated work, and a weight split over it is gathered on
entry: for a decoding step on a tensor-parallel mesh, every routed expert's
weights, every step (Nemotron 3 Nano on two H100s: 0.64 GB per weight and
MoE layer, 28 GB per device and step, in XLA's compile through ``n3jax.aot``).

Per-expert counts are psum'd over the data and expert axes: every shard
returns the global [E] counts.

``expert_axis=None`` (experts not split): each token shard dispatches its own
tokens against the whole (gathered) expert set, with no exchange. This is the
data-parallel / FSDP MoE; a plain ``moe_dispatch`` on a token axis split over
devices would not be: its sort makes XLA gather every token onto every device.

This module imports only jax/numpy (it is part of ``pallas_kernels``).
"""

import math
from typing import Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

from pallas_kernels.moe import _gmm_common as common
from pallas_kernels.moe import gathered
from pallas_kernels.moe import ops
from pallas_kernels.moe import reference
from pallas_kernels.moe.reference import GroupedMatmul

Array = jax.Array

EXCHANGES = ("all_to_all", "all_gather")
RAGGED_IMPLS = ("auto", "native", "padded")


def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def _padded_ragged_all_to_all(
    operand: Array,
    output: Array,
    input_offsets: Array,
    send_sizes: Array,
    output_offsets: Array,
    recv_sizes: Array,
    *,
    axis_name: str,
) -> Array:
  """``jax.lax.ragged_all_to_all`` semantics on a dense ``all_to_all``.

  Each shard packs what it sends to shard j into row block j of an
  [ep, rows(operand), ...] buffer (the worst case: everything to one shard),
  exchanges the blocks with ``all_to_all``, and scatters each received block
  to the offset its sender chose. Used where XLA has no ragged all-to-all
  (CPU); ep x the traffic of the real thing.
  """
  num_in = operand.shape[0]
  num_out = output.shape[0]
  ep = send_sizes.shape[0]
  r = jnp.arange(num_in, dtype=jnp.int32)
  src = input_offsets[:, None] + r[None, :]  # [ep, n_in]
  valid = r[None, :] < send_sizes[:, None]  # [ep, n_in]
  tail = (1,) * (operand.ndim - 1)
  send = jnp.where(
      valid.reshape(valid.shape + tail),
      jnp.take(operand, jnp.clip(src, 0, num_in - 1), axis=0),
      jnp.zeros((), operand.dtype),
  )  # [ep, n_in, ...]
  recv = jax.lax.all_to_all(send, axis_name, 0, 0)  # recv[i]: block from i
  # Where sender i asked its block to go in this shard's output.
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)  # [ep]
  dst = offsets[:, None] + r[None, :]  # [ep, n_in]
  dst = jnp.where(r[None, :] < recv_sizes[:, None], dst, num_out)  # OOB: drop
  del ep
  return output.at[dst.reshape(-1)].set(
      recv.reshape((-1,) + operand.shape[1:]), mode="drop",
      unique_indices=True,
  )


def _buffer_like(rows: Array, num: int) -> Array:
  """Zeros [num, ...] for ``ragged_all_to_all`` to write ``rows`` into, varying over the same mesh axes.

  The exchange's result takes the output buffer's varying axes (jax 0.12); a fresh ``jnp.zeros`` varies
  over none, which would type the received rows as equal on every data shard. Under
  ``shard_map(check_vma=True)`` the weight gradients would then miss their sum over the data axes.
  """
  buffer = jnp.zeros((num,) + rows.shape[1:], rows.dtype)
  return common.match_vma(rows, buffer)[1]


def _local_all_to_all(
    tokens, router_weights, expert_ids, w_up, w_down, *, expert_axis,
    ep, activation, preferred_element_type, grouped_matmul, native,
    partial_sum, capacity=None,
):
  """Per-shard body of the "all_to_all" exchange (inside shard_map).

  capacity: rows each shard can receive (None: ep * its own rows, the
  dropless worst case). Sources fill it in shard order, each with the head of
  its block (its lowest experts' rows); rows past it are dropped (zero output
  and gradient). -> (combined, counts, rows dropped from this shard's tokens).
  """
  dtype = tokens.dtype
  num_slots = expert_ids.shape[1]
  e_local = w_up.shape[0]
  num_experts = e_local * ep
  shard = jax.lax.axis_index(expert_axis)
  exchange = (
      jax.lax.ragged_all_to_all if native else _padded_ragged_all_to_all
  )

  # 1. Sort this shard's (token, slot) assignments by global expert id.
  flat_ids = expert_ids.reshape(-1)  # [N_l]
  num_rows = flat_ids.shape[0]
  order = jnp.argsort(flat_ids, stable=True)  # [N_l]
  counts = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)  # [E]
  rows = jnp.take(tokens, order // num_slots, axis=0)  # [N_l, D]

  # 2. Sizes: rows from source shard i for each expert, for all i.
  all_counts = jax.lax.all_gather(counts, expert_axis)  # [ep_src, E]
  per_local = all_counts.reshape(ep, ep, e_local)  # [src, dst, local expert]
  sizes = per_local.sum(-1)  # [src, dst] rows routed from src to dst
  # What each destination takes (the same on every shard: from the gathered
  # counts): sources in order until `capacity`, each block's head first.
  capacity = ep * num_rows if capacity is None else min(capacity, ep * num_rows)
  kept = jnp.clip(capacity - _exclusive_cumsum(sizes, axis=0), 0, sizes)
  kept_local = jnp.clip(
      kept[..., None] - _exclusive_cumsum(per_local, axis=2), 0, per_local
  )  # [src, dst, local expert]
  send_sizes = kept[shard]  # [ep] (to each dst)
  input_offsets = _exclusive_cumsum(sizes[shard])  # block starts (all rows)
  recv_sizes = kept[:, shard]  # [ep] (from each src)
  # Receivers stack what they get by source shard order.
  output_offsets = _exclusive_cumsum(kept, axis=0)[shard]  # [ep] (per dst)

  # 3. Dispatch into the receive buffer.
  received = exchange(
      rows, _buffer_like(rows, capacity), input_offsets,
      send_sizes, output_offsets, recv_sizes, axis_name=expert_axis,
  )  # [cap, D], blocks by source, each sorted by expert

  # 4. Regroup by local expert: segment (src i, local expert e) has
  # per_local[i, shard, e] rows, in (i, e) order.
  seg_sizes = kept_local[:, shard, :].reshape(-1)  # [ep * E_l]
  seg_expert = jnp.tile(jnp.arange(e_local, dtype=jnp.int32), ep)
  local_ids = jnp.repeat(seg_expert, seg_sizes, total_repeat_length=capacity)
  total = seg_sizes.sum()
  local_ids = jnp.where(
      jnp.arange(capacity) < total, local_ids, e_local
  )  # padding sorts last
  regroup = jnp.argsort(local_ids, stable=True)  # [cap]
  group_sizes = kept_local[:, shard, :].sum(0).astype(jnp.int32)  # [E_l]
  y = ops.expert_mlp(
      jnp.take(received, regroup, axis=0), group_sizes, w_up, w_down,
      activation=activation, preferred_element_type=preferred_element_type,
      grouped_matmul=grouped_matmul, partial_sum=partial_sum,
  )  # [cap, D], zeros past `total`
  inverse = jnp.zeros_like(regroup).at[regroup].set(
      jnp.arange(capacity, dtype=regroup.dtype)
  )
  y = jnp.take(y, inverse, axis=0)  # back to received order

  # 5. Return: the reverse exchange, into this shard's sorted order.
  returned = exchange(
      y, _buffer_like(y, num_rows),
      _exclusive_cumsum(recv_sizes), recv_sizes,
      _exclusive_cumsum(sizes, axis=1)[:, shard], send_sizes,
      axis_name=expert_axis,
  )  # [N_l, D], zeros for dropped rows
  dropped = sizes[shard].sum() - send_sizes.sum()
  return (ops.combine(returned, order, router_weights).astype(dtype), counts,
          dropped)


def _local_all_gather(
    tokens, router_weights, expert_ids, w_up, w_down, *, expert_axis,
    ep, activation, preferred_element_type, grouped_matmul, native,
    partial_sum,
):
  """Per-shard body of the "all_gather" exchange (inside shard_map)."""
  del native
  dtype = tokens.dtype
  e_local = w_up.shape[0]
  num_experts = e_local * ep
  counts = jnp.bincount(
      expert_ids.reshape(-1), length=num_experts
  ).astype(jnp.int32)  # [E], this shard's tokens
  gather = lambda x: jax.lax.all_gather(x, expert_axis, axis=0, tiled=True)
  tokens, router_weights, expert_ids = map(
      gather, (tokens, router_weights, expert_ids)
  )  # [ep * T_l, ...]
  num_slots = expert_ids.shape[1]
  local = expert_ids - jax.lax.axis_index(expert_axis) * e_local  # [T, R]
  is_local = (local >= 0) & (local < e_local)
  key = jnp.where(is_local, local, e_local).reshape(-1)  # others sort last
  order = jnp.argsort(key, stable=True)  # [N]
  group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(
      jnp.int32
  )
  y = ops.expert_mlp(
      jnp.take(tokens, order // num_slots, axis=0), group_sizes, w_up, w_down,
      activation=activation, preferred_element_type=preferred_element_type,
      grouped_matmul=grouped_matmul, partial_sum=partial_sum,
  )  # [N, D], zeros for other shards' rows
  partial = ops.combine(
      y, order, jnp.where(is_local, router_weights, 0.0)
  )  # [T, D] f32: this shard's experts only
  out = jax.lax.psum_scatter(
      partial, expert_axis, scatter_dimension=0, tiled=True
  )  # [T_l, D]
  return out.astype(dtype), counts, jnp.zeros((), jnp.int32)


def _local(tokens, router_weights, expert_ids, w_up, w_down, *, activation, preferred_element_type,
           grouped_matmul, partial_sum, **_):
  """No expert split: this shard's tokens through every expert (``sorted_dispatch``)."""
  combined, counts = reference.sorted_dispatch(
      tokens, router_weights, expert_ids, w_up, w_down, activation=activation,
      preferred_element_type=preferred_element_type,
      grouped_matmul=grouped_matmul, partial_sum=partial_sum,
  )
  return combined, counts, jnp.zeros((), jnp.int32)


def _local_gathered(tokens, router_weights, expert_ids, w_up, w_down, *, activation, preferred_element_type,
                    partial_sum, **_):
  """No expert split, a few rows: each (token, slot) row through its expert's weights read by id
  (``gathered.gathered_dispatch``), no sort."""
  combined, counts = gathered.gathered_dispatch(
      tokens, router_weights, expert_ids, w_up, w_down, activation=activation,
      preferred_element_type=preferred_element_type, partial_sum=partial_sum)
  return combined, counts, jnp.zeros((), jnp.int32)


def _platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> str:
  """"cpu", "gpu", "tpu", ... of a concrete or abstract mesh."""
  if isinstance(mesh, jax.sharding.Mesh):
    return mesh.devices.flat[0].platform
  device = getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _place(x: Array, mesh: jax.sharding.Mesh, spec: P) -> Array:
  """Reshards to spec on meshes with Explicit axes (shard_map wants it)."""
  explicit = any(
      t == jax.sharding.AxisType.Explicit for t in mesh.axis_types
  )
  return jax.sharding.reshard(x, NamedSharding(mesh, spec)) if explicit else x


def expert_parallel_moe(
    tokens: Array,
    router_weights: Array,
    expert_ids: Array,
    w_up: Array,
    w_down: Array,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    expert_axis: str | None = "expert",
    data_axes: Sequence[str] = ("data",),
    activation: str = "relu2",
    backend: str = "auto",
    exchange: str = "all_to_all",
    ragged_impl: str = "auto",
    preferred_element_type: jax.typing.DTypeLike = jnp.float32,
    grouped_matmul: GroupedMatmul | None = None,
    capacity_factor: float | None = None,
    return_dropped: bool = False,
    tensor_axis: str | None = None,
    gathered_rows: bool = False,
) -> tuple[Array, Array] | tuple[Array, Array, Array]:
  """``moe_dispatch`` with experts sharded over ``mesh[expert_axis]``.

  Args:
    tokens: [T, D]; T must divide by the product of the data and expert axis
      sizes (tokens are sharded over both).
    router_weights: [T, R] float routing weights.
    expert_ids: [T, R] int expert ids in [0, E).
    w_up: [E, D, F]; E must divide by the expert axis size.
    w_down: [E, F, D].
    mesh: The device mesh, concrete or abstract (e.g. the model's
      ``jax.sharding.get_abstract_mesh()`` under ``jax.set_mesh``).
    expert_axis: Mesh axis the experts (and part of the tokens) are split on;
      None: experts not split, each shard of ``data_axes`` runs its tokens.
    data_axes: Further mesh axes the tokens are split on (data, FSDP).
    activation: A key of ``reference.ACTIVATIONS``.
    backend: Grouped matmul, a key of ``ops.GROUPED_MATMULS`` ("ragged_dot"
      or "pallas"), or "auto" (``ops.resolve_backend`` for the mesh's platform).
    exchange: "all_to_all" or "all_gather" (see the module docstring).
    ragged_impl: For "all_to_all": "native" (``jax.lax.ragged_all_to_all``),
      "padded" (dense all_to_all emulation) or "auto" (padded on CPU meshes,
      native elsewhere).
    preferred_element_type: Matmul accumulation dtype.
    grouped_matmul: Overrides ``backend``'s grouped matmul (as in
      ``ops.moe_dispatch``); it runs on each device's local experts.
    capacity_factor: For "all_to_all": each shard receives at most
      ceil(capacity_factor * T_l * R) rows (T_l * R: the rows a shard routes),
      and sizes its buffers so. None: ep * T_l * R, the worst case, dropless.
      Over capacity, each destination takes sources in shard order, each
      source's rows for its lowest experts first; the rest are dropped (zero
      output, zero gradient), as with an expert capacity in GShard/Megatron.
      The buffers, sized for the worst case, hold ep x the rows a balanced
      routing needs (Super on EP8: 1.4M rows of 2688 per buffer).
    return_dropped: Also return the number of (token, slot) rows dropped.
    tensor_axis: Mesh axis the experts' hidden width F is split on (Megatron's
      tensor parallelism for expert MLPs: w_up by columns, w_down by rows);
      each shard's partial down products are summed over it (``psum``, f32)
      before they are rounded. None: F whole on every shard.
    gathered_rows: Without an expert axis: each (token, slot) row runs its
      expert's weights read by id (``gathered.gathered_expert_mlp``: no sort,
      the Pallas kernels of the mesh's platform) instead of the sorted
      grouped matmul; for a few rows per shard (decoding). ``backend`` and
      ``grouped_matmul`` do not apply.

  Returns:
    combined: [T, D] in tokens.dtype, sharded like tokens.
    counts: [E] int32 global assignments per expert (replicated), dropped
      rows included (what the router chose).
    dropped: (with ``return_dropped``) [] int32 rows dropped, all shards.
  """
  reference._validate(  # pylint: disable=protected-access
      tokens, router_weights, expert_ids, w_up, w_down, activation
  )
  data_axes = tuple(data_axes)
  expert_axes = () if expert_axis is None else (expert_axis,)
  tensor_axes = () if tensor_axis is None else (tensor_axis,)
  for axis in data_axes + expert_axes + tensor_axes:
    if axis not in mesh.shape:
      raise ValueError(f"{axis=} is not a mesh axis; {mesh.axis_names=}.")
  if expert_axis in data_axes:
    raise ValueError(f"{expert_axis=} must not be one of {data_axes=}.")
  if tensor_axis is not None and tensor_axis in data_axes + expert_axes:
    raise ValueError(f"{tensor_axis=} must be none of {data_axes=} and {expert_axis=}.")
  if tensor_axis is not None and w_up.shape[2] % mesh.shape[tensor_axis]:
    raise ValueError(f"The experts' hidden width {w_up.shape[2]} must be a multiple of the {tensor_axis!r} axis "
                     f"size {mesh.shape[tensor_axis]}.")
  if gathered_rows and expert_axis is not None:
    raise ValueError(f"gathered_rows runs every expert on each shard: it takes no {expert_axis=}.")
  backend = ops.resolve_backend(backend, _platform(mesh))
  if backend not in ops.GROUPED_MATMULS:
    raise ValueError(
        f"Unknown {backend=!r}; known: {sorted(ops.GROUPED_MATMULS)}."
    )
  if exchange not in EXCHANGES:
    raise ValueError(f"Unknown {exchange=!r}; known: {EXCHANGES}.")
  if ragged_impl not in RAGGED_IMPLS:
    raise ValueError(f"Unknown {ragged_impl=!r}; known: {RAGGED_IMPLS}.")
  if capacity_factor is not None and (
      exchange != "all_to_all" or expert_axis is None or not capacity_factor > 0):
    raise ValueError(
        f"{capacity_factor=} needs exchange='all_to_all' with an expert axis"
        f" and a value > 0 (got {exchange=!r}, {expert_axis=!r})."
    )
  ep = 1 if expert_axis is None else mesh.shape[expert_axis]
  batch_axes = data_axes + expert_axes
  token_shards = math.prod(mesh.shape[a] for a in batch_axes)
  if w_up.shape[0] % ep:
    raise ValueError(
        f"num_experts={w_up.shape[0]} must be a multiple of the"
        f" {expert_axis!r} axis size {ep}."
    )
  if tokens.shape[0] % token_shards:
    raise ValueError(
        f"num_tokens={tokens.shape[0]} must be a multiple of the token shards"
        f" {token_shards} (axes {batch_axes})."
    )
  on_cpu = _platform(mesh) == "cpu"
  if ragged_impl == "auto":
    native = not on_cpu  # see the module docstring
  else:
    native = ragged_impl == "native"

  if expert_axis is None:
    body = _local_gathered if gathered_rows else _local
  else:
    body = _local_all_to_all if exchange == "all_to_all" else _local_all_gather
  # Pallas interpret mode (CPU) lowers the kernel body to dynamic_slices whose
  # grid indices are not typed as varying over the mesh, which
  # check_vma=True rejects (jax 0.12); the compiled kernel has no such body.
  check_vma = not ((gathered_rows or backend in ("pallas", "pallas_mgpu")) and on_cpu)
  partial_sum = None
  if tensor_axis is not None:
    partial_sum = lambda y: jax.lax.psum(y, tensor_axis)

  extra = {}
  if capacity_factor is not None:
    routed_rows = tokens.shape[0] // token_shards * expert_ids.shape[1]
    extra["capacity"] = math.ceil(capacity_factor * routed_rows)

  def shard_fn(tokens, router_weights, expert_ids, w_up, w_down):
    combined, counts, dropped = body(
        tokens, router_weights, expert_ids, w_up, w_down,
        expert_axis=expert_axis, ep=ep, activation=activation,
        preferred_element_type=preferred_element_type,
        grouped_matmul=grouped_matmul or ops.GROUPED_MATMULS[backend],
        native=native, partial_sum=partial_sum, **extra,
    )
    return (combined, jax.lax.psum(counts, batch_axes),
            jax.lax.psum(dropped, batch_axes))

  row_spec = P(batch_axes, None)
  # expert_axis / tensor_axis None: replicated
  specs = (row_spec, row_spec, row_spec, P(expert_axis, None, tensor_axis), P(expert_axis, tensor_axis, None))
  args = [
      _place(x, mesh, s)
      for x, s in zip(
          (tokens, router_weights, expert_ids, w_up, w_down), specs
      )
  ]
  combined, counts, dropped = jax.shard_map(
      shard_fn, mesh=mesh, in_specs=specs, out_specs=(row_spec, P(), P()),
      check_vma=check_vma,
  )(*args)
  return (combined, counts, dropped) if return_dropped else (combined, counts)
