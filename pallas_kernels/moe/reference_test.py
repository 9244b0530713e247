"""Tests for pallas_kernels.moe: ragged_dot backend vs the dense oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import ops
from pallas_kernels.moe import reference

try:
  import chex  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  chex = None

D_MODEL = 16
D_HIDDEN = 24


def _make_inputs(
    num_tokens: int,
    num_experts: int,
    num_slots: int,
    *,
    seed: int = 0,
    dtype: jnp.dtype = jnp.float32,
    expert_ids: np.ndarray | None = None,
) -> tuple[jax.Array, ...]:
  """Random (tokens, router_weights, expert_ids, w_up, w_down)."""
  rng = np.random.default_rng(seed)
  tokens = rng.standard_normal((num_tokens, D_MODEL))
  w_up = rng.standard_normal((num_experts, D_MODEL, D_HIDDEN))
  w_up /= np.sqrt(D_MODEL)
  w_down = rng.standard_normal((num_experts, D_HIDDEN, D_MODEL))
  w_down /= np.sqrt(D_HIDDEN)
  logits = rng.standard_normal((num_tokens, num_slots))
  router_weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  if expert_ids is None:
    # Random ids with duplicates allowed, so R > E and repeats are covered.
    expert_ids = rng.integers(0, num_experts, (num_tokens, num_slots))
  return (
      jnp.asarray(tokens, dtype),
      jnp.asarray(router_weights, jnp.float32),
      jnp.asarray(expert_ids, jnp.int32),
      jnp.asarray(w_up, dtype),
      jnp.asarray(w_down, dtype),
  )


def _both(args, activation="relu2"):
  """(ragged_dot result, dense result), each (combined, counts)."""
  got = jax.jit(
      functools.partial(ops.moe_dispatch, activation=activation)
  )(*args)
  want = jax.jit(
      functools.partial(reference.moe_dispatch_dense, activation=activation)
  )(*args)
  return got, want


def _grads(fn, args, cotangent):
  """Grads of sum(cotangent * combined) w.r.t. tokens, weights, w_up, w_down."""

  def loss(tokens, router_weights, w_up, w_down):
    combined, _ = fn(tokens, router_weights, args[2], w_up, w_down)
    return jnp.sum(combined.astype(jnp.float32) * cotangent)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
      args[0], args[1], args[3], args[4]
  )


SHAPES = [  # (T, E, R)
    (1, 1, 1),
    (1, 8, 3),
    (5, 4, 2),
    (5, 1, 3),
    (33, 8, 2),
    (33, 4, 3),
    (33, 8, 1),
]


@pytest.mark.parametrize("num_tokens,num_experts,num_slots", SHAPES)
def test_ragged_matches_dense_forward_and_grad(
    num_tokens, num_experts, num_slots
):
  args = _make_inputs(num_tokens, num_experts, num_slots, seed=num_tokens)
  (got, got_counts), (want, want_counts) = _both(args)
  assert got.shape == (num_tokens, D_MODEL) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_counts, want_counts)

  cotangent = jax.random.normal(jax.random.key(1), (num_tokens, D_MODEL))
  got_g = _grads(ops.moe_dispatch, args, cotangent)
  want_g = _grads(reference.moe_dispatch_dense, args, cotangent)
  for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"),
                        got_g, want_g):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("activation", ["relu2", "silu", "gelu"])
def test_activations(activation):
  args = _make_inputs(5, 4, 2, seed=3)
  (got, _), (want, _) = _both(args, activation)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Independent numpy check of the formula for token 0.
  tokens, weights, ids, w_up, w_down = map(np.asarray, args)
  act = {
      "relu2": lambda x: np.maximum(x, 0.0) ** 2,
      "silu": lambda x: x / (1.0 + np.exp(-x)),
      "gelu": lambda x: np.asarray(jax.nn.gelu(x, approximate=False)),
  }[activation]
  expect = sum(
      weights[0, r] * act(tokens[0] @ w_up[ids[0, r]]) @ w_down[ids[0, r]]
      for r in range(ids.shape[1])
  )
  np.testing.assert_allclose(got[0], expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,num_experts,num_slots", SHAPES)
def test_counts_match_bincount(num_tokens, num_experts, num_slots):
  args = _make_inputs(num_tokens, num_experts, num_slots, seed=7)
  _, counts = ops.moe_dispatch(*args)
  assert counts.dtype == jnp.int32 and counts.shape == (num_experts,)
  np.testing.assert_array_equal(
      counts, np.bincount(np.asarray(args[2]).ravel(), minlength=num_experts)
  )


def test_empty_experts_get_zero_counts_and_grads():
  ids = np.random.default_rng(0).choice([0, 2, 5], size=(33, 2))
  args = _make_inputs(33, 8, 2, expert_ids=ids)
  (got, counts), (want, _) = _both(args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  unused = np.array([1, 3, 4, 6, 7])
  np.testing.assert_array_equal(np.asarray(counts)[unused], 0)
  cotangent = jnp.ones((33, D_MODEL))
  _, _, g_up, g_down = _grads(ops.moe_dispatch, args, cotangent)
  np.testing.assert_array_equal(np.asarray(g_up)[unused], 0.0)
  np.testing.assert_array_equal(np.asarray(g_down)[unused], 0.0)
  assert np.all(np.abs(np.asarray(g_down)[[0, 2, 5]]).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("num_slots", [1, 2])
def test_all_tokens_to_one_expert(num_slots):
  ids = np.full((33, num_slots), 3)
  args = _make_inputs(33, 4, num_slots, expert_ids=ids)
  (got, counts), (want, _) = _both(args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(counts, [0, 0, 0, 33 * num_slots])


@pytest.mark.parametrize("backend", ["ragged_dot", "pallas", "dense"])
@pytest.mark.parametrize("num_tokens,num_slots", [(0, 2), (3, 0)])
def test_no_tokens_or_no_slots(backend, num_tokens, num_slots):
  """Zero assignments: zeros [T, D] and zero counts (the sorted backends raised a ZeroDivisionError)."""
  args = _make_inputs(num_tokens, 4, num_slots)
  combined, counts = ops.moe_dispatch(*args, backend=backend)
  assert combined.shape == (num_tokens, D_MODEL) and combined.dtype == jnp.float32
  np.testing.assert_array_equal(combined, 0.0)
  np.testing.assert_array_equal(counts, [0, 0, 0, 0])


@pytest.mark.parametrize("num_experts", [1, 4])
def test_every_token_uses_every_expert(num_experts):
  rng = np.random.default_rng(1)
  ids = np.stack([rng.permutation(num_experts) for _ in range(5)])
  args = _make_inputs(5, num_experts, num_experts, expert_ids=ids)
  (got, counts), (want, _) = _both(args)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(counts, np.full(num_experts, 5))
  # With R == E the result is the weight-sorted sum of all experts.
  tokens, weights, ids, w_up, w_down = map(np.asarray, args)
  dense_w = np.zeros((5, num_experts))
  np.put_along_axis(dense_w, ids, weights, axis=1)
  per_expert = np.einsum(  # [T, E, F] x [E, F, D] -> [T, E, D]
      "TEF,EFD->TED",
      np.maximum(np.einsum("TD,EDF->TEF", tokens, w_up), 0.0) ** 2,
      w_down,
  )
  np.testing.assert_allclose(
      got, np.einsum("TE,TED->TD", dense_w, per_expert), atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize("backend", ["ragged_dot", "dense"])
def test_bf16_close_to_f32(backend):
  args32 = _make_inputs(33, 8, 2, seed=11)
  args16 = tuple(
      a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and i in (0, 3, 4) else a
      for i, a in enumerate(args32)
  )
  fn = jax.jit(functools.partial(ops.moe_dispatch, backend=backend))
  got16, counts16 = fn(*args16)
  assert got16.dtype == jnp.bfloat16
  # f32 result on the same (bf16-representable) inputs.
  want32, counts32 = fn(
      *(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a
        for a in args16)
  )
  np.testing.assert_array_equal(counts16, counts32)
  scale = float(jnp.max(jnp.abs(want32)))
  np.testing.assert_allclose(
      np.asarray(got16, np.float32), want32, atol=2e-2 * scale, rtol=2e-2
  )
  # The two backends share bf16 numerics; they differ only in summation order.
  other, _ = jax.jit(reference.moe_dispatch_dense)(*args16)
  np.testing.assert_allclose(
      np.asarray(got16, np.float32), np.asarray(other, np.float32),
      atol=1e-2 * scale, rtol=1e-2,
  )


def test_bf16_grads_close_to_f32():
  args32 = _make_inputs(33, 8, 2, seed=12)
  args16 = tuple(
      a.astype(jnp.bfloat16) if i in (0, 3, 4) else a
      for i, a in enumerate(args32)
  )
  args32 = tuple(a.astype(jnp.float32) if i in (0, 3, 4) else a
                 for i, a in enumerate(args16))
  cotangent = jax.random.normal(jax.random.key(2), (33, D_MODEL))
  got = _grads(ops.moe_dispatch, args16, cotangent)
  want = _grads(ops.moe_dispatch, args32, cotangent)
  for name, g, w in zip(("tokens", "router_weights", "w_up", "w_down"),
                        got, want):
    assert g.dtype == (jnp.float32 if name == "router_weights"
                       else jnp.bfloat16), name
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(np.asarray(g, np.float32), w,
                               atol=3e-2 * scale, rtol=3e-2, err_msg=name)


def test_bf16_weights_cast_to_token_dtype():
  args = _make_inputs(5, 4, 2, seed=2)
  w16 = (args[0], args[1], args[2], args[3].astype(jnp.bfloat16),
         args[4].astype(jnp.bfloat16))
  got, _ = ops.moe_dispatch(*w16)
  assert got.dtype == jnp.float32


def test_jit_traces_once_across_routings():
  trace_count = [0]

  def dispatch(*args):
    trace_count[0] += 1
    return ops.moe_dispatch(*args)

  if chex is not None:
    dispatch = chex.assert_max_traces(dispatch, n=1)
  jitted = jax.jit(dispatch)
  outs = []
  for seed in range(3):
    args = _make_inputs(33, 8, 2, seed=0)
    ids = np.random.default_rng(seed + 100).integers(0, 8, (33, 2))
    if seed == 2:
      ids[:] = 5  # Degenerate routing must not retrace either.
    outs.append(jitted(*args[:2], jnp.asarray(ids, jnp.int32), *args[3:]))
    want, _ = reference.moe_dispatch_dense(
        *args[:2], jnp.asarray(ids, jnp.int32), *args[3:]
    )
    np.testing.assert_allclose(outs[-1][0], want, atol=1e-5, rtol=1e-5)
  assert trace_count[0] == 1
  assert not np.allclose(outs[0][0], outs[1][0])


def _replace(args, index, value):
  args = list(args)
  args[index] = value
  return args


@pytest.mark.parametrize(
    "index,value,match",
    [
        (0, jnp.zeros((5, D_MODEL, 1)), r"tokens must be \[T, D\]"),
        (0, jnp.zeros((5, D_MODEL), jnp.int32), r"tokens must be floating"),
        (0, jnp.zeros((5, 8)), r"w_up \[E, D, F\] must have D"),
        (3, jnp.zeros((4, D_MODEL)), r"w_up must be \[E, D, F\]"),
        (4, jnp.zeros((4, D_HIDDEN + 1, D_MODEL)), r"w_down must be \[E, F"),
        (4, jnp.zeros((3, D_HIDDEN, D_MODEL)), r"w_down must be \[E, F, D\]"),
        (4, jnp.zeros((4, D_HIDDEN, 8)), r"w_down must be \[E, F, D\]"),
        (1, jnp.zeros((5, 3)), r"router_weights and expert_ids must both"),
        (1, jnp.zeros((5, 2), jnp.int32), r"router_weights must be floating"),
        (2, jnp.zeros((4, 2), jnp.int32), r"expert_ids must be \[T, R\]"),
        (2, jnp.zeros((5, 2), jnp.float32), r"expert_ids must be an integer"),
        (2, jnp.full((5, 2), 4, jnp.int32), r"expert_ids must lie in \[0, 4\)"),
        (2, jnp.full((5, 2), -1, jnp.int32), r"expert_ids must lie in \[0,"),
    ],
)
@pytest.mark.parametrize("backend", ["ragged_dot", "dense"])
def test_bad_inputs_raise(index, value, match, backend):
  args = _replace(_make_inputs(5, 4, 2), index, value)
  with pytest.raises(ValueError, match=match):
    ops.moe_dispatch(*args, backend=backend)


def test_shape_errors_raise_under_jit():
  args = _replace(_make_inputs(5, 4, 2), 1, jnp.zeros((5, 3)))
  with pytest.raises(ValueError, match="router_weights and expert_ids"):
    jax.jit(ops.moe_dispatch)(*args)


def test_unknown_activation_lists_known():
  with pytest.raises(ValueError, match=r"activation='swish'.*relu2"):
    ops.moe_dispatch(*_make_inputs(5, 4, 2), activation="swish")


def test_unknown_backend_lists_known():
  with pytest.raises(ValueError, match=r"backend='nope'.*dense.*pallas.*ragged_dot"):
    ops.moe_dispatch(*_make_inputs(5, 4, 2), backend="nope")


def test_public_exports():
  import pallas_kernels.moe as moe  # pylint: disable=g-import-not-at-top

  assert moe.moe_dispatch is ops.moe_dispatch
  assert set(moe.BACKENDS) >= {"ragged_dot", "dense"}
  assert set(moe.ACTIVATIONS) == {"relu2", "silu", "gelu"}


@pytest.mark.parametrize("device_kind,platform,want", [
    ("NVIDIA H100 80GB HBM3", "gpu", "pallas"),
    ("TPU v5 lite", "tpu", "pallas"),
])
def test_auto_backend_picks_the_kernel_for_accelerators(device_kind, platform, want):
  """"auto" is ragged_dot on CPU (the default backend here) and the Pallas
  grouped matmul when compiling for a GPU or TPU (the abstract mesh's device)."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  assert ops.resolve_backend("auto") == "ragged_dot"
  assert ops.resolve_backend("dense") == "dense"
  device = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
  with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)):
    assert ops.resolve_backend("auto") == want
  assert ops.resolve_backend("auto", "cpu") == "ragged_dot"
