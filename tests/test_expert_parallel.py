"""Expert parallelism on 8 fake CPU devices: same outputs, gradients and counts as one device.

The reference is `moe_dispatch` (sort + ragged_dot) on one device. Routings are run-time data, so one compile
per (mesh, exchange, backend) is checked against several routings, including one that sends every token to
the experts of a single shard (the dropless worst case) and one with empty experts.
"""

import functools

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import expert_parallel
from pallas_kernels.moe import ops

T, E, R, D, F = 32, 16, 3, 16, 24
TOL = dict(atol=1e-5, rtol=1e-5)  # f32: only the order of f32 sums differs

MESHES = {  # name -> (shape, axis names, data_axes)
    "expert8": ((8,), ("expert",), ()),
    "data2_expert4": ((2, 4), ("data", "expert"), ("data",)),
}


def _mesh(name, axis_type=AxisType.Auto):
  shape, names, data_axes = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape)), data_axes


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((T, D)), jnp.float32),
          jnp.asarray(rng.dirichlet(np.ones(R), T), jnp.float32),
          jnp.asarray(rng.standard_normal((E, D, F)) / 4, jnp.float32),
          jnp.asarray(rng.standard_normal((E, F, D)) / 5, jnp.float32),
          jnp.asarray(rng.standard_normal((T, D)), jnp.float32))  # output cotangent


def _routings():
  rng = np.random.default_rng(1)
  random = rng.integers(0, E, (T, R))
  one_shard = rng.integers(0, 2, (T, R))                         # experts 0-1: all on shard 0 (expert8)
  empties = rng.choice([3, 4, 9, 15], (T, R))                    # most experts empty
  return {"random": random, "one_shard": one_shard, "empty_experts": empties}


def _value_and_grads(dispatch, traces):
  def loss(tokens, router_weights, expert_ids, w_up, w_down, cotangent):
    combined, counts = dispatch(tokens, router_weights, expert_ids, w_up, w_down)
    return jnp.sum(combined * cotangent), (combined, counts)

  @jax.jit
  def run(tokens, router_weights, expert_ids, w_up, w_down, cotangent):
    traces.append(1)
    return jax.value_and_grad(loss, argnums=(0, 1, 3, 4), has_aux=True)(
        tokens, router_weights, expert_ids, w_up, w_down, cotangent)
  return run


_REFERENCE = _value_and_grads(ops.moe_dispatch, [])


def _check(got, want, what):
  (_, (out, counts)), grads = got
  (_, (want_out, want_counts)), want_grads = want
  np.testing.assert_allclose(out, want_out, **TOL, err_msg=f"{what}: combined")
  np.testing.assert_array_equal(counts, want_counts, err_msg=f"{what}: counts")
  for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"), grads, want_grads):
    np.testing.assert_allclose(g, w, **TOL, err_msg=f"{what}: d_{name}")


@pytest.mark.parametrize("exchange,backend,mesh_name", [
    ("all_to_all", "ragged_dot", "expert8"),
    ("all_to_all", "ragged_dot", "data2_expert4"),
    ("all_gather", "ragged_dot", "expert8"),
    ("all_gather", "ragged_dot", "data2_expert4"),
    ("all_to_all", "pallas", "data2_expert4"),  # Pallas gmm, interpret mode on CPU
    ("all_gather", "pallas", "expert8"),
])
def test_matches_single_device(exchange, backend, mesh_name):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh, data_axes = _mesh(mesh_name)
  tokens, router_weights, w_up, w_down, cotangent = _params()
  if data_axes:  # FSDP-style weights: also split over the data axis on D; shard_map gathers them.
    w_up = jax.device_put(w_up, NamedSharding(mesh, P("expert", "data", None)))
    w_down = jax.device_put(w_down, NamedSharding(mesh, P("expert", None, "data")))
  traces = []
  run = _value_and_grads(functools.partial(
      expert_parallel.expert_parallel_moe, mesh=mesh, data_axes=data_axes, exchange=exchange,
      backend=backend), traces)
  for name, ids in _routings().items():
    ids = jnp.asarray(ids, jnp.int32)
    got = run(tokens, router_weights, ids, w_up, w_down, cotangent)
    _check(got, _REFERENCE(tokens, router_weights, ids, w_up, w_down, cotangent), name)
    np.testing.assert_array_equal(got[0][1][1], np.bincount(np.asarray(ids).ravel(), minlength=E))
  assert len(traces) == 1  # routing is data: no retrace
  combined = got[0][1][0]  # sharded like the tokens: over the data axes and the expert axis
  assert combined.sharding.is_equivalent_to(NamedSharding(mesh, P(tuple(data_axes) + ("expert",))), 2)


@pytest.mark.parametrize("how", ["explicit_axes", "abstract_mesh_from_context"])
def test_other_mesh_kinds(how):
  """Explicit-axes meshes, and the model's way: the abstract mesh of `jax.set_mesh` read inside jit."""
  axis_type = AxisType.Explicit if how == "explicit_axes" else AxisType.Auto
  mesh, data_axes = _mesh("data2_expert4", axis_type)
  tokens, router_weights, w_up, w_down, _ = _params(seed=3)
  ids = jnp.asarray(_routings()["random"], jnp.int32)

  @jax.jit
  def run(*args):
    use = jax.sharding.get_abstract_mesh() if how == "abstract_mesh_from_context" else mesh
    return expert_parallel.expert_parallel_moe(*args, mesh=use, data_axes=data_axes, exchange="all_gather")

  with jax.set_mesh(mesh):
    got, counts = run(tokens, router_weights, ids, w_up, w_down)
  want, want_counts = ops.moe_dispatch(tokens, router_weights, ids, w_up, w_down)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(counts, want_counts)


def test_native_ragged_all_to_all_lowers():
  """XLA:CPU cannot compile ragged-all-to-all (jax 0.12), so only the lowering is checked here."""
  mesh, data_axes = _mesh("data2_expert4")
  tokens, router_weights, w_up, w_down, cotangent = _params()
  ids = jnp.asarray(_routings()["random"], jnp.int32)
  fn = functools.partial(expert_parallel.expert_parallel_moe, mesh=mesh, data_axes=data_axes,
                         ragged_impl="native")
  run = _value_and_grads(fn, [])
  text = run.trace(tokens, router_weights, ids, w_up, w_down, cotangent).lower().as_text()
  assert text.count("ragged_all_to_all") >= 4  # dispatch + return, forward and backward


@pytest.mark.parametrize("kwargs,match", [
    (dict(expert_axis="tensor"), r"axis='tensor' is not a mesh axis"),
    (dict(data_axes=("expert",)), r"must not be one of"),
    (dict(backend="dense"), r"Unknown backend='dense'"),
    (dict(exchange="broadcast"), r"Unknown exchange='broadcast'"),
    (dict(ragged_impl="fast"), r"Unknown ragged_impl='fast'"),
])
def test_bad_arguments_raise(kwargs, match):
  mesh, data_axes = _mesh("data2_expert4")
  tokens, router_weights, w_up, w_down, _ = _params()
  ids = jnp.zeros((T, R), jnp.int32)
  with pytest.raises(ValueError, match=match):
    expert_parallel.expert_parallel_moe(tokens, router_weights, ids, w_up, w_down, mesh=mesh,
                                        **{"data_axes": data_axes, **kwargs})


@pytest.mark.parametrize("num_tokens,num_experts,match", [
    (30, E, r"num_tokens=30 must be a multiple of the token shards 8"),
    (T, 12, r"num_experts=12 must be a multiple of the 'expert' axis size 8"),
])
def test_indivisible_shapes_raise(num_tokens, num_experts, match):
  mesh, data_axes = _mesh("expert8")
  with pytest.raises(ValueError, match=match):
    expert_parallel.expert_parallel_moe(
        jnp.zeros((num_tokens, D)), jnp.zeros((num_tokens, R)), jnp.zeros((num_tokens, R), jnp.int32),
        jnp.zeros((num_experts, D, F)), jnp.zeros((num_experts, F, D)), mesh=mesh, data_axes=data_axes)


@pytest.mark.parametrize("mode,mesh_name", [("fp8", "expert8"), ("nvfp4", "expert8"), ("fp8", "data2_expert4")])
def test_quantized_experts_match_single_device(mode, mesh_name):
  """A low-precision grouped matmul (`n3jax.quant`, one scale set per expert) runs on each device's local
  experts and gives what it gives on one device. Experts over all 8 devices (expert8): each expert sees
  all its rows, so FP8 is the same up to f32 summation order, and NVFP4 (SR off) has the same forward but
  wgrad blocks along each expert's rows, whose order the exchange changes, so close. With a data axis too
  (data2_expert4) each data shard quantizes its own rows: per-tensor scales come from that shard's amax,
  as Transformer Engine's current scaling takes each GPU's own, so only close (and it must trace: the
  weights vary over fewer mesh axes than the rows)."""
  from n3jax import quant  # pylint: disable=g-import-not-at-top
  gmm = quant.make_grouped_matmul(quant.QuantConfig(mode=mode, nvfp4_stochastic_rounding=False),
                                  layer_index=4, num_layers=32)  # not in a BF16-kept layer
  mesh, data_axes = _mesh(mesh_name)  # data2_expert4: weights vary over fewer axes than tokens in shard_map
  tokens, router_weights, w_up, w_down, cotangent = _params()
  ids = jnp.asarray(_routings()["random"], jnp.int32)
  got = _value_and_grads(functools.partial(expert_parallel.expert_parallel_moe, mesh=mesh, data_axes=data_axes,
                                           grouped_matmul=gmm), [])(tokens, router_weights, ids, w_up, w_down,
                                                                    cotangent)
  want = _value_and_grads(functools.partial(ops.moe_dispatch, grouped_matmul=gmm), [])(
      tokens, router_weights, ids, w_up, w_down, cotangent)
  plain = _REFERENCE(tokens, router_weights, ids, w_up, w_down, cotangent)
  assert not np.allclose(want[0][1][0], plain[0][1][0], atol=1e-4)  # the recipe changed the numbers
  if mode == "fp8" and mesh_name == "expert8":
    _check(got, want, mode)
    return
  (_, (out, _)), grads = got
  (_, (want_out, _)), want_grads = want
  if mesh_name == "expert8":
    np.testing.assert_allclose(out, want_out, **TOL)  # fprop is row-local: same up to summation order
  for g, w in zip((out, *grads), (want_out, *want_grads)):
    assert np.linalg.norm(g - w) <= 0.1 * np.linalg.norm(w)


def test_no_expert_split_runs_each_token_shard_locally():
  """expert_axis=None (data parallel / FSDP MoE): each of the 8 token shards dispatches its own T/8 tokens
  against every expert (the sort sees local rows only) and the result is the one-device one."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  tokens, router_weights, w_up, w_down, cotangent = _params()
  w_up = jax.device_put(w_up, NamedSharding(mesh, P(None, "fsdp", None)))  # FSDP at rest; gathered on entry
  seen = []

  def recording_gmm(lhs, rhs, group_sizes, **kw):
    seen.append(lhs.shape[0])
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, **kw)

  run = _value_and_grads(functools.partial(expert_parallel.expert_parallel_moe, mesh=mesh, expert_axis=None,
                                           data_axes=("fsdp",), grouped_matmul=recording_gmm), [])
  for name, ids in _routings().items():
    ids = jnp.asarray(ids, jnp.int32)
    _check(run(tokens, router_weights, ids, w_up, w_down, cotangent),
           _REFERENCE(tokens, router_weights, ids, w_up, w_down, cotangent), name)
  assert set(seen) == {T // 8 * R}, seen


def test_moe_layer_under_fsdp_dispatches_local_tokens(monkeypatch):
  """The model's MoE layer under the `fsdp` layout on 8 devices: each device's dispatch sees its own
  tokens (B*T/8 rows x top-k), not the whole batch."""
  from n3jax import models, sharding  # pylint: disable=g-import-not-at-top
  from n3jax.configs import PRESETS  # pylint: disable=g-import-not-at-top
  from pallas_kernels.moe import reference  # pylint: disable=g-import-not-at-top

  cfg = PRESETS["tiny-moe"]
  rows = []
  real = reference.sorted_dispatch
  monkeypatch.setattr(reference, "sorted_dispatch", lambda tokens, *a, **kw: (rows.append(tokens.shape[0]),
                                                                               real(tokens, *a, **kw))[1])
  mesh = sharding.make_mesh({"fsdp": 8})
  params = sharding.init_sharded(cfg, jax.random.key(0), mesh, "fsdp")
  tokens = jnp.zeros((8, 16), jnp.int32)
  rows.clear()  # init traced a 1-token dummy
  with sharding.use_mesh(mesh, "fsdp"):
    jax.jit(functools.partial(models.forward, cfg)).trace(params, tokens)
  assert rows and set(rows) == {8 * 16 // 8}, rows


def test_native_exchange_types_received_rows_as_varying_over_data():
  """The native ragged all-to-all (GPU) writes into a buffer whose varying mesh axes type the result; the
  received rows must vary over the data axes too, or under check_vma the weight gradients would miss their
  sum over data shards. XLA:CPU cannot run it, so this traces the gradient through a custom-VJP grouped
  matmul (the FP8 recipe's), which rejects a cotangent typed unlike its primal."""
  from n3jax import quant  # pylint: disable=g-import-not-at-top
  gmm = quant.make_grouped_matmul(quant.QuantConfig(mode="fp8"), layer_index=4, num_layers=32)
  mesh, data_axes = _mesh("data2_expert4")
  tokens, router_weights, w_up, w_down, cotangent = _params()
  ids = jnp.asarray(_routings()["random"], jnp.int32)
  run = _value_and_grads(functools.partial(expert_parallel.expert_parallel_moe, mesh=mesh, data_axes=data_axes,
                                           ragged_impl="native", grouped_matmul=gmm), [])
  text = run.trace(tokens, router_weights, ids, w_up, w_down, cotangent).lower().as_text()
  assert "ragged_all_to_all" in text


def _kept_slots(ids: np.ndarray, shards: int, ep: int, capacity: int) -> np.ndarray:
  """The capacity rule in numpy: [T, R] bool, whether each (token, slot) row reaches its expert. Tokens
  are split over `shards` (the expert axis last, so source = shard index); each source sorts its rows by
  expert; each destination takes sources in order, each block's head first, up to `capacity` rows."""
  t, r = ids.shape
  e_local = E // ep
  flat = ids.reshape(shards, t // shards * r)                        # rows of each source
  kept = np.zeros_like(flat, bool)
  taken = np.zeros(ep, int)
  for src in range(shards):
    order = np.argsort(flat[src], kind="stable")
    for dst in range(ep):
      block = [i for i in order if flat[src, i] // e_local == dst]
      n = min(len(block), max(0, capacity - taken[dst]))
      kept[src, block[:n]] = True
      taken[dst] += len(block)
  return kept.reshape(t, r)


@pytest.mark.parametrize("factor", [8.0, 1.0, 0.5])
def test_capacity_factor_drops_what_does_not_fit(factor):
  """capacity_factor >= ep is dropless (the worst case fits); below it, each expert shard takes at most
  ceil(factor * T_l * R) rows by the documented rule, and the dropped rows count and contribute nothing:
  the result equals one-device dispatch with those rows' routing weights set to zero."""
  mesh, data_axes = _mesh("expert8")
  tokens, router_weights, w_up, w_down, cotangent = _params()
  ids = np.asarray(_routings()["one_shard"])                          # everything to shard 0's experts
  capacity = int(np.ceil(factor * T // 8 * R))
  kept = _kept_slots(ids, shards=8, ep=8, capacity=capacity)
  ids = jnp.asarray(ids, jnp.int32)

  def loss(fn, weights, *a):
    out = fn(tokens, weights, ids, *a)
    return jnp.sum(out[0] * cotangent), out

  ep_fn = functools.partial(expert_parallel.expert_parallel_moe, mesh=mesh, data_axes=data_axes,
                            capacity_factor=factor, return_dropped=True)
  (_, (out, counts, dropped)), grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, ep_fn), argnums=(0, 1, 2), has_aux=True))(router_weights, w_up, w_down)
  masked = jnp.where(kept, router_weights, 0.0)
  (_, (want_out, want_counts)), want_grads = jax.value_and_grad(
      functools.partial(loss, ops.moe_dispatch), argnums=(0, 1, 2), has_aux=True)(masked, w_up, w_down)
  assert int(dropped) == int((~kept).sum())
  assert (int(dropped) == 0) == (factor >= 8.0) and (factor >= 8.0 or int(dropped) > 0)
  np.testing.assert_allclose(out, want_out, **TOL)
  np.testing.assert_array_equal(counts, want_counts)                  # what the router chose
  np.testing.assert_allclose(jnp.where(kept, grads[0], 0.0), jnp.where(kept, want_grads[0], 0.0), **TOL)
  np.testing.assert_array_equal(jnp.where(kept, 0.0, grads[0]), 0.0)  # dropped slots: no gradient
  for g, w in zip(grads[1:], want_grads[1:]):
    np.testing.assert_allclose(g, w, **TOL)


def test_capacity_factor_needs_the_all_to_all_exchange():
  mesh, data_axes = _mesh("expert8")
  tokens, router_weights, w_up, w_down, _ = _params()
  with pytest.raises(ValueError, match="capacity_factor=2.0 needs exchange='all_to_all'"):
    expert_parallel.expert_parallel_moe(tokens, router_weights, jnp.zeros((T, R), jnp.int32), w_up, w_down,
                                        mesh=mesh, data_axes=data_axes, exchange="all_gather", capacity_factor=2.0)


TENSOR_MESHES = {  # name -> (mesh shape, expert axis, data axes, exchange)
    "tensor8": ({"tensor": 8}, None, (), "all_to_all"),
    "data2_tensor4": ({"data": 2, "tensor": 4}, None, ("data",), "all_to_all"),
    "expert2_tensor4": ({"expert": 2, "tensor": 4}, "expert", (), "all_to_all"),
    "expert4_tensor2_all_gather": ({"expert": 4, "tensor": 2}, "expert", (), "all_gather"),
}


@pytest.mark.parametrize("mesh_name", sorted(TENSOR_MESHES))
def test_tensor_parallel_experts_match_single_device(mesh_name):
  """`tensor_axis` splits each expert's hidden width F (w_up by columns, w_down by rows; Megatron's tensor
  parallelism): each shard's grouped matmuls see F / tensor, and the psum of their partial down products
  gives the one-device outputs and gradients, alone or with data and expert axes."""
  shape, expert_axis, data_axes, exchange = TENSOR_MESHES[mesh_name]
  mesh = jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape))
  tokens, router_weights, w_up, w_down, cotangent = _params(seed=4)
  w_up = jax.device_put(w_up, NamedSharding(mesh, P(expert_axis, None, "tensor")))
  w_down = jax.device_put(w_down, NamedSharding(mesh, P(expert_axis, "tensor", None)))
  widths = []

  def recording_gmm(lhs, rhs, group_sizes, **kw):
    widths.append(rhs.shape)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, **kw)

  run = _value_and_grads(functools.partial(
      expert_parallel.expert_parallel_moe, mesh=mesh, expert_axis=expert_axis, data_axes=data_axes,
      tensor_axis="tensor", exchange=exchange, grouped_matmul=recording_gmm), [])
  for name, ids in _routings().items():
    ids = jnp.asarray(ids, jnp.int32)
    _check(run(tokens, router_weights, ids, w_up, w_down, cotangent),
           _REFERENCE(tokens, router_weights, ids, w_up, w_down, cotangent), name)
  local_e, local_f = E // (mesh.shape[expert_axis] if expert_axis else 1), F // mesh.shape["tensor"]
  assert set(widths) == {(local_e, D, local_f), (local_e, local_f, D)}, widths


@pytest.mark.parametrize("mesh_shape", [{"tensor": 8}, {"data": 2, "tensor": 4}])
def test_gathered_rows_on_a_tensor_mesh_match_single_device(mesh_shape):
  """A few rows per shard (decoding) through the gathered-expert kernels (Triton, interpreted), each shard
  with its F-slice of the experts: the one-device outputs and gradients."""
  mesh = jax.make_mesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=(AxisType.Auto,) * len(mesh_shape))
  data_axes = tuple(a for a in mesh_shape if a != "tensor")
  tokens, router_weights, w_up, w_down, cotangent = (x[:4] if x.ndim == 2 else x for x in _params(seed=5))
  ids = jnp.asarray(_routings()["random"][:4], jnp.int32)
  w_up = jax.device_put(w_up, NamedSharding(mesh, P(None, None, "tensor")))
  w_down = jax.device_put(w_down, NamedSharding(mesh, P(None, "tensor", None)))
  run = _value_and_grads(functools.partial(
      expert_parallel.expert_parallel_moe, mesh=mesh, expert_axis=None, data_axes=data_axes,
      tensor_axis="tensor", gathered_rows=True), [])
  _check(run(tokens, router_weights, ids, w_up, w_down, cotangent),
         _REFERENCE(tokens, router_weights, ids, w_up, w_down, cotangent), "gathered")


def test_tensor_axis_arguments_are_checked():
  mesh = jax.make_mesh((2, 4), ("expert", "tensor"), axis_types=(AxisType.Auto,) * 2)
  tokens, router_weights, w_up, w_down, _ = _params()
  ids = jnp.zeros((T, R), jnp.int32)
  call = functools.partial(expert_parallel.expert_parallel_moe, tokens, router_weights, ids, mesh=mesh, data_axes=())
  with pytest.raises(ValueError, match="hidden width 30 must be a multiple of the 'tensor' axis size 4"):
    call(jnp.zeros((E, D, 30)), jnp.zeros((E, 30, D)), tensor_axis="tensor")
  with pytest.raises(ValueError, match="tensor_axis='expert' must be none of"):
    call(w_up, w_down, tensor_axis="expert")
  with pytest.raises(ValueError, match="gathered_rows runs every expert on each shard"):
    call(w_up, w_down, expert_axis="expert", gathered_rows=True)
