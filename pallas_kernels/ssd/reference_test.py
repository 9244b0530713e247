"""Tests for the pure-jnp SSD and causal conv1d references."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ssd import reference as ref

_BATCH, _NHEADS, _HEADDIM, _DSTATE, _NGROUPS = 2, 4, 8, 16, 2
_TOL = dict(atol=1e-5, rtol=1e-5)
_GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
_SSD_GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")

_chunked = jax.jit(
    ref.ssd_reference,
    static_argnames=("chunk_size", "dt_softplus", "dt_min", "dt_max"),
)
_sequential = jax.jit(
    ref.ssd_sequential_reference,
    static_argnames=("chunk_size", "dt_softplus", "dt_min", "dt_max"),
)
_conv = jax.jit(ref.causal_conv1d_reference, static_argnames=("activation",))


def _normal(rng, shape, scale=1.0, dtype=jnp.float32):
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _ssd_inputs(seqlen, seed=0, batch=_BATCH, dtype=jnp.float32):
  # numpy RNG: eager jax.random would compile per shape and dominate runtime.
  rng = np.random.default_rng(seed)
  b, t, m, p, q, j = batch, seqlen, _NHEADS, _HEADDIM, _DSTATE, _NGROUPS
  return dict(
      x=_normal(rng, (b, t, m, p), dtype=dtype),
      dt=_normal(rng, (b, t, m), 0.5, dtype=dtype) - 1.0,
      A=-jnp.asarray(np.exp(rng.uniform(-1.0, 1.0, (m,))), jnp.float32),
      B=_normal(rng, (b, t, j, q), 0.5, dtype=dtype),
      C=_normal(rng, (b, t, j, q), 0.5, dtype=dtype),
      D=_normal(rng, (m,)),
      dt_bias=_normal(rng, (m,), 0.5),
  )


def _initial_state(seed=1, batch=_BATCH):
  shape = (batch, _NHEADS, _HEADDIM, _DSTATE)
  return _normal(np.random.default_rng(seed), shape, 0.5)


def _doc_ids(seqlen):
  """Row 0: boundary at 8 and 16 (chunk edges), a one-token doc, reused ids.

  Row 1: non-monotonic ids, boundary at 16, a one-token doc at t=3.
  """
  rows = [
      [0] * 8 + [1] * 8 + [0] * 4 + [2] + [1] * 100,
      [3] * 3 + [7] + [3] * 12 + [0] * 5 + [3] * 100,
  ]
  return jnp.asarray([r[:seqlen] for r in rows], jnp.int32)


def _assert_close(a, b, tol=_TOL):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


# Chunked vs sequential.


@pytest.mark.parametrize(
    "seqlen,chunk_size,use_init,use_docs",
    list(
        itertools.product([1, 7, 37, 64], [8, 16], [False, True], [False, True])
    ),
)
def test_chunked_matches_sequential(seqlen, chunk_size, use_init, use_docs):
  inputs = _ssd_inputs(seqlen)
  kw = dict(
      initial_state=_initial_state() if use_init else None,
      doc_ids=_doc_ids(seqlen) if use_docs else None,
  )
  y, h = _chunked(**inputs, **kw, chunk_size=chunk_size)
  y_seq, h_seq = _sequential(**inputs, **kw)
  assert y.shape == inputs["x"].shape and y.dtype == jnp.float32
  assert (
      h.shape == (_BATCH, _NHEADS, _HEADDIM, _DSTATE) and h.dtype == jnp.float32
  )
  _assert_close(y, y_seq)
  _assert_close(h, h_seq)


def test_chunked_matches_sequential_optional_args():
  """No D / dt_bias, no softplus, active dt clipping, J == 1 and J == M."""
  inputs = _ssd_inputs(21)
  inputs.update(D=None, dt_bias=None, dt=jnp.abs(inputs["dt"]))
  kw = dict(dt_softplus=False, dt_min=0.1, dt_max=0.9, chunk_size=8)
  for ngroups in (1, _NHEADS):
    inputs["B"] = jnp.tile(inputs["B"][:, :, :1], (1, 1, ngroups, 1)) * (
        1.0 + jnp.arange(ngroups)[:, None]
    )
    inputs["C"] = jnp.tile(inputs["C"][:, :, :1], (1, 1, ngroups, 1))
    y, h = _chunked(**inputs, **kw, doc_ids=_doc_ids(21))
    y_seq, h_seq = _sequential(**inputs, **kw, doc_ids=_doc_ids(21))
    _assert_close(y, y_seq)
    _assert_close(h, h_seq)


def test_chunk_size_invariance():
  seqlen = 37
  inputs = _ssd_inputs(seqlen, seed=3)
  kw = dict(initial_state=_initial_state(), doc_ids=_doc_ids(seqlen))
  outs = [_chunked(**inputs, **kw, chunk_size=c) for c in (4, 16, seqlen)]
  for y, h in outs[1:]:
    _assert_close(y, outs[0][0])
    _assert_close(h, outs[0][1])


def _numpy_ssd(x, dt, A, B, C, D, dt_bias, initial_state, doc_ids):
  """Independent float64 double loop over (batch, head) and time."""
  x, dt, A, B, C, D, dt_bias, h0 = (
      np.asarray(v, np.float64)
      for v in (x, dt, A, B, C, D, dt_bias, initial_state)
  )
  bsz, seqlen, nheads, _ = x.shape
  heads_per_group = nheads // B.shape[2]
  y = np.zeros_like(x)
  h_final = np.zeros_like(h0)
  doc_ids = np.asarray(doc_ids)
  for b in range(bsz):
    for m in range(nheads):
      g = m // heads_per_group
      h = h0[b, m].copy()
      for t in range(seqlen):
        if t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
          h = np.zeros_like(h)
        d = np.log1p(np.exp(dt[b, t, m] + dt_bias[m]))
        h = np.exp(d * A[m]) * h + d * np.outer(x[b, t, m], B[b, t, g])
        y[b, t, m] = h @ C[b, t, g] + D[m] * x[b, t, m]
      h_final[b, m] = h
  return y, h_final


def test_matches_numpy_float64_oracle():
  seqlen = 13
  inputs = _ssd_inputs(seqlen, seed=5)
  h0, doc_ids = _initial_state(), _doc_ids(seqlen)
  y, h = _chunked(**inputs, initial_state=h0, doc_ids=doc_ids, chunk_size=4)
  y_np, h_np = _numpy_ssd(**inputs, initial_state=h0, doc_ids=doc_ids)
  _assert_close(y, y_np)
  _assert_close(h, h_np)


# Packed documents, state chaining, decoding.


def _split(inputs, start, stop):
  return {
      k: v[:, start:stop] if v is not None and v.ndim >= 3 else v
      for k, v in inputs.items()
  }


@pytest.mark.parametrize("len_a,len_b", [(8, 15), (11, 1), (5, 27)])
def test_ssd_packed_equals_separate(len_a, len_b):
  inputs = _ssd_inputs(len_a + len_b, seed=7, batch=1)
  doc_ids = jnp.asarray([[4] * len_a + [2] * len_b], jnp.int32)
  h0 = _initial_state(batch=1)
  y, h = _chunked(**inputs, initial_state=h0, doc_ids=doc_ids, chunk_size=8)
  y_a, _ = _chunked(**_split(inputs, 0, len_a), initial_state=h0, chunk_size=8)
  y_b, h_b = _chunked(**_split(inputs, len_a, None), chunk_size=8)
  _assert_close(y[:, :len_a], y_a)
  _assert_close(y[:, len_a:], y_b)
  _assert_close(h, h_b)


@pytest.mark.parametrize("use_docs", [False, True])
def test_ssd_final_state_chaining(use_docs):
  seqlen, split = 37, 18  # split is inside a document of _doc_ids
  inputs = _ssd_inputs(seqlen, seed=9)
  doc_ids = _doc_ids(seqlen) if use_docs else None
  h0 = _initial_state()
  y, h = _chunked(**inputs, initial_state=h0, doc_ids=doc_ids, chunk_size=8)
  part = lambda lo, hi: dict(
      _split(inputs, lo, hi),
      doc_ids=None if doc_ids is None else doc_ids[:, lo:hi],
  )
  y1, h1 = _chunked(**part(0, split), initial_state=h0, chunk_size=8)
  y2, h2 = _chunked(**part(split, None), initial_state=h1, chunk_size=16)
  _assert_close(jnp.concatenate([y1, y2], axis=1), y)
  _assert_close(h2, h)


def test_ssd_decode_matches_full_sequence():
  prefill, steps = 21, 5
  inputs = _ssd_inputs(prefill + steps, seed=11)
  doc_ids = _doc_ids(prefill)
  doc_ids = jnp.concatenate(
      [doc_ids, jnp.repeat(doc_ids[:, -1:], steps, axis=1)], axis=1
  )
  h0 = _initial_state()
  y_full, h_full = _sequential(**inputs, initial_state=h0, doc_ids=doc_ids)
  _, state = _chunked(
      **_split(inputs, 0, prefill),
      initial_state=h0,
      doc_ids=doc_ids[:, :prefill],
      chunk_size=8,
  )
  for t in range(prefill, prefill + steps):
    y_t, state = ref.ssd_decode_step_reference(
        state,
        inputs["x"][:, t],
        inputs["dt"][:, t],
        inputs["A"],
        inputs["B"][:, t],
        inputs["C"][:, t],
        inputs["D"],
        inputs["dt_bias"],
    )
    _assert_close(y_t, y_full[:, t])
  _assert_close(state, h_full)


# Gradients and dtypes.


def _ssd_loss(fn, seqlen, chunk_size, doc_ids, args):
  kw = dict(zip(_SSD_GRAD_ARGS, args))
  y, h = fn(**kw, doc_ids=doc_ids, chunk_size=chunk_size)
  wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
  wh = jnp.sin(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
  return jnp.sum(y * wy) + jnp.sum(h * wh)


@pytest.mark.parametrize(
    "use_docs,extreme", [(False, False), (True, False), (True, True)]
)
def test_gradients_match_sequential(use_docs, extreme):
  seqlen, chunk_size = 37, 8
  inputs = _ssd_inputs(seqlen, seed=13)
  if extreme:  # Very strong decay: exp underflows to 0 inside chunks.
    inputs["dt"] = inputs["dt"] + 6.0
    inputs["A"] = inputs["A"] * 30.0
  args = tuple(inputs.get(k, None) for k in _SSD_GRAD_ARGS[:-1]) + (
      _initial_state(),
  )
  doc_ids = _doc_ids(seqlen) if use_docs else None
  grad = lambda fn: jax.jit(
      jax.grad(functools.partial(_ssd_loss, fn, seqlen, chunk_size, doc_ids))
  )(args)
  grads = grad(ref.ssd_reference)
  grads_seq = grad(ref.ssd_sequential_reference)
  for name, g, g_seq in zip(_SSD_GRAD_ARGS, grads, grads_seq):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert np.any(np.asarray(g) != 0), name
    np.testing.assert_allclose(
        np.asarray(g), np.asarray(g_seq), err_msg=name, **_GRAD_TOL
    )


def test_bf16_inputs():
  seqlen = 37
  inputs = _ssd_inputs(seqlen, seed=15)
  inputs_bf16 = dict(inputs)
  for k in ("x", "B", "C"):
    inputs_bf16[k] = inputs[k].astype(jnp.bfloat16)
  inputs_bf16["dt"] = inputs["dt"].astype(jnp.bfloat16)
  kw = dict(
      initial_state=_initial_state(), doc_ids=_doc_ids(seqlen), chunk_size=16
  )
  y, h = _chunked(**inputs_bf16, **kw)
  y_f32, h_f32 = _chunked(**inputs, **kw)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(y_f32)))
  tol = dict(atol=3e-2 * scale, rtol=3e-2)
  _assert_close(y.astype(jnp.float32), y_f32, tol)
  _assert_close(h, h_f32, tol)
  y_seq, _ = _sequential(**inputs_bf16, **kw)
  assert y_seq.dtype == jnp.bfloat16
  _assert_close(y.astype(jnp.float32), y_seq.astype(jnp.float32), tol)


# Causal conv1d.


def _conv_inputs(seqlen, width, seed=0, batch=_BATCH, channels=6):
  rng = np.random.default_rng(seed)
  return dict(
      x=_normal(rng, (batch, seqlen, channels)),
      weight=_normal(rng, (width, channels)),
      bias=_normal(rng, (channels,)),
  ), _normal(rng, (batch, width - 1, channels))


def _numpy_conv(x, weight, bias, init, doc_ids, activation):
  x, weight, bias, init = (
      np.asarray(v, np.float64) for v in (x, weight, bias, init)
  )
  bsz, seqlen, channels = x.shape
  width = weight.shape[0]
  doc_ids = np.asarray(doc_ids)
  seg = np.concatenate(
      [
          np.zeros((bsz, 1), int),
          np.cumsum(doc_ids[:, 1:] != doc_ids[:, :-1], 1),
      ],
      1,
  )
  y = np.zeros_like(x)
  for b in range(bsz):
    for t in range(seqlen):
      acc = bias.copy()
      for k in range(width):
        src = t - (width - 1) + k
        if src >= 0 and seg[b, src] == seg[b, t]:
          acc += weight[k] * x[b, src]
        elif src < 0 and seg[b, t] == 0:
          acc += weight[k] * init[b, width - 1 + src]
      y[b, t] = acc / (1.0 + np.exp(-acc)) if activation == "silu" else acc
  return y


@pytest.mark.parametrize(
    "seqlen,width,use_docs,activation",
    [
        (37, 4, True, "silu"),
        (37, 4, False, None),
        (2, 4, True, "silu"),
        (9, 1, True, "silu"),
        (16, 2, True, None),
    ],
)
def test_conv_matches_numpy(seqlen, width, use_docs, activation):
  inputs, init = _conv_inputs(seqlen, width)
  doc_ids = (
      _doc_ids(seqlen) if use_docs else jnp.zeros((_BATCH, seqlen), jnp.int32)
  )
  y, state = _conv(
      **inputs,
      initial_state=init,
      doc_ids=doc_ids if use_docs else None,
      activation=activation,
  )
  _assert_close(
      y,
      _numpy_conv(**inputs, init=init, doc_ids=doc_ids, activation=activation),
  )
  assert state.shape == init.shape


@pytest.mark.parametrize("len_a,len_b", [(8, 15), (11, 2), (5, 1)])
def test_conv_packed_equals_separate(len_a, len_b):
  inputs, init = _conv_inputs(len_a + len_b, 4, seed=2, batch=1)
  doc_ids = jnp.asarray([[1] * len_a + [0] * len_b], jnp.int32)
  y, state = _conv(**inputs, initial_state=init, doc_ids=doc_ids)
  part = lambda lo, hi: dict(inputs, x=inputs["x"][:, lo:hi])
  y_a, _ = _conv(**part(0, len_a), initial_state=init)
  y_b, state_b = _conv(**part(len_a, None))
  _assert_close(y[:, :len_a], y_a)
  _assert_close(y[:, len_a:], y_b)
  _assert_close(state, state_b)


@pytest.mark.parametrize("split,use_docs", [(18, True), (2, False), (35, True)])
def test_conv_state_chaining(split, use_docs):
  seqlen = 37
  inputs, init = _conv_inputs(seqlen, 4, seed=4)
  doc_ids = _doc_ids(seqlen) if use_docs else None
  y, state = _conv(**inputs, initial_state=init, doc_ids=doc_ids)
  part = lambda lo, hi: dict(
      inputs,
      x=inputs["x"][:, lo:hi],
      doc_ids=None if doc_ids is None else doc_ids[:, lo:hi],
  )
  y1, s1 = _conv(**part(0, split), initial_state=init)
  y2, s2 = _conv(**part(split, None), initial_state=s1)
  _assert_close(jnp.concatenate([y1, y2], axis=1), y)
  _assert_close(s2, state)


def test_conv_decode_matches_full_sequence():
  prefill, steps = 21, 5
  inputs, init = _conv_inputs(prefill + steps, 4, seed=6)
  doc_ids = _doc_ids(prefill)
  doc_ids = jnp.concatenate(
      [doc_ids, jnp.repeat(doc_ids[:, -1:], steps, axis=1)], axis=1
  )
  y_full, state_full = _conv(**inputs, initial_state=init, doc_ids=doc_ids)
  _, state = _conv(
      **dict(inputs, x=inputs["x"][:, :prefill]),
      initial_state=init,
      doc_ids=doc_ids[:, :prefill],
  )
  for t in range(prefill, prefill + steps):
    y_t, state = ref.causal_conv1d_update_reference(
        state, inputs["x"][:, t], inputs["weight"], inputs["bias"]
    )
    _assert_close(y_t, y_full[:, t])
  _assert_close(state, state_full)


def test_conv_bf16_and_grads():
  inputs, init = _conv_inputs(19, 4, seed=8)
  doc_ids = _doc_ids(19)
  y, state = _conv(
      **{**inputs, "x": inputs["x"].astype(jnp.bfloat16)}, doc_ids=doc_ids
  )
  assert y.dtype == jnp.bfloat16 and state.dtype == jnp.bfloat16
  y_f32, _ = _conv(**inputs, doc_ids=doc_ids)
  _assert_close(y.astype(jnp.float32), y_f32, dict(atol=3e-2, rtol=3e-2))

  def loss(x, weight, bias, init):
    y, s = ref.causal_conv1d_reference(
        x, weight, bias, initial_state=init, doc_ids=doc_ids
    )
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(s)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(
      inputs["x"], inputs["weight"], inputs["bias"], init
  )
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


# Input validation.


def _bad(**overrides):
  inputs = _ssd_inputs(8)
  inputs.update(overrides)
  return inputs


@pytest.mark.parametrize(
    "overrides,kwargs,match",
    [
        (
            dict(B=jnp.zeros((2, 8, 3, 16)), C=jnp.zeros((2, 8, 3, 16))),
            {},
            "divisible",
        ),
        (dict(C=jnp.zeros((2, 8, 2, 8))), {}, "C must have the shape"),
        (dict(B=jnp.zeros((2, 9, 2, 16))), {}, "B must be"),
        (dict(dt=jnp.zeros((2, 8, 3))), {}, "dt must be"),
        (dict(A=jnp.zeros((3,))), {}, "A must have shape"),
        (dict(D=jnp.zeros((2,))), {}, "D must have shape"),
        (dict(x=jnp.zeros((2, 8, 4))), {}, "x must be"),
        ({}, dict(initial_state=jnp.zeros((2, 4, 8, 8))), "initial_state"),
        (
            {},
            dict(doc_ids=jnp.zeros((2, 7), jnp.int32)),
            "doc_ids must be an integer array of shape",
        ),
        ({}, dict(doc_ids=jnp.zeros((2, 8), jnp.float32)), "integer"),
        ({}, dict(chunk_size=0), "chunk_size"),
        ({}, dict(chunk_size=True), "chunk_size"),  # a bool is an int: it ran 1-token chunks
        # Integer operands ran (an integer x gave an integer y), silently.
        (dict(x=jnp.zeros((2, 8, 4, 8), jnp.int32)), {}, "x must be floating point"),
        (dict(A=-jnp.ones((4,), jnp.int32)), {}, "A must be floating point"),
        ({}, dict(initial_state=jnp.zeros((2, 4, 8, 16), jnp.int32)), "initial_state must be floating point"),
    ],
)
def test_ssd_bad_inputs(overrides, kwargs, match):
  for fn in (ref.ssd_reference, ref.ssd_sequential_reference):
    with pytest.raises(ValueError, match=match):
      fn(**_bad(**overrides), **kwargs)


def test_decode_and_conv_bad_inputs():
  state = jnp.zeros((2, 4, 8, 16))
  x, dt, A = jnp.zeros((2, 4, 8)), jnp.zeros((2, 4)), -jnp.ones((4,))
  bc = jnp.zeros((2, 2, 16))
  with pytest.raises(ValueError, match="state must be"):
    ref.ssd_decode_step_reference(state[..., :8], x, dt, A, bc, bc, None, None)
  with pytest.raises(ValueError, match="divisible"):
    ref.ssd_decode_step_reference(
        state,
        x,
        dt,
        A,
        bc[:, :1].repeat(3, 1),
        bc[:, :1].repeat(3, 1),
        None,
        None,
    )
  xc, w = jnp.zeros((2, 5, 6)), jnp.zeros((4, 6))
  with pytest.raises(ValueError, match="weight must be"):
    ref.causal_conv1d_reference(xc, jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match="activation"):
    ref.causal_conv1d_reference(xc, w, activation="relu")
  with pytest.raises(ValueError, match="initial_state"):
    ref.causal_conv1d_reference(xc, w, initial_state=jnp.zeros((2, 4, 6)))
  with pytest.raises(ValueError, match="doc_ids"):
    ref.causal_conv1d_reference(xc, w, doc_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="conv_state must be"):
    ref.causal_conv1d_update_reference(jnp.zeros((2, 2, 6)), xc[:, 0], w)
