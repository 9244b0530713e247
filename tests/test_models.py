"""The hybrid stack on its own: execution strategies, packed sequences, dtypes, MTP, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import n3jax
from n3jax import models
from n3jax.configs import PRESETS

TINY = ("tiny-dense", "tiny-moe", "tiny-latent-moe")


@functools.lru_cache(maxsize=None)
def _params(name):
  return models.init(PRESETS[name], jax.random.key(0))


def _tokens(cfg, batch=2, seq=19, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq)), jnp.int32)


def _loss(cfg, params, tokens):
  logits = models.forward(cfg, params, tokens)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))


def test_scan_and_remat_match_unrolled_values_and_grads():
  """On the richest preset (Mamba, attention, LatentMoE, MTP). Scanned + "full" (the stack's own backward
  pass), on every preset: test_memory_saving_options_match_the_default_path."""
  name = "tiny-latent-moe"
  cfg, params = PRESETS[name], _params(name)
  tokens = _tokens(cfg)
  want_loss, want_grad = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(params, tokens)
  for variant in (dict(scan_layers=True), dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots_saveable")):
    got_loss, got_grad = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg.replace(**variant))))(params, tokens)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=str(variant))
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=str(variant))


@pytest.mark.parametrize("name", TINY)
def test_memory_saving_options_match_the_default_path(name):
  """Flash attention (blockwise off GPUs) and routed experts over sequence pieces only change memory: the same loss and
  gradients as the materialised path, alone and with scanned, rematerialised layers; packed documents."""
  cfg, params = PRESETS[name], _params(name)
  tokens = _tokens(cfg, seq=20)
  segments = jnp.asarray(np.repeat([[1] * 7 + [2] * 13], 2, 0), jnp.int32)
  loss = lambda cfg, params: _loss_packed(cfg, params, tokens, segments)
  want_loss, want_grad = jax.value_and_grad(functools.partial(loss, cfg))(params)
  moe = {"moe_seq_chunks": 4} if cfg.n_routed_experts else {}
  # The switches together, in one compile (attention alone: pallas_kernels/attention/).
  for variant in (dict(attention_impl="flash", scan_layers=True, remat_policy="full", **moe),):
    got_loss, got_grad = jax.jit(jax.value_and_grad(functools.partial(loss, cfg.replace(**variant))))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6, err_msg=str(variant))
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5, err_msg=str(variant))


def _loss_packed(cfg, params, tokens, segments):
  logits = models.forward(cfg, params, tokens, segment_ids=segments)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))


def test_moe_seq_chunks_must_divide_the_sequence_but_decoding_runs_whole():
  cfg = PRESETS["tiny-moe"].replace(moe_seq_chunks=4)
  with pytest.raises(ValueError, match="moe_seq_chunks=4 must divide the sequence length 10"):
    n3jax.forward(cfg, _params("tiny-moe"), jnp.zeros((1, 10), jnp.int32))
  cache = models.init_cache(cfg, 1, 32)  # a one-token step is not split
  logits, _ = models.apply_cached(cfg, _params("tiny-moe"), jnp.zeros((1, 1), jnp.int32), cache)
  assert logits.shape == (1, cfg.vocab_size)


def test_per_layer_caches_give_the_stacked_caches_numbers():
  """`unstack_cache` (one buffer per layer, what `inference.prefill` decodes with) against the stacked cache:
  a prefill chunk, then a step that starts a new document in row 0 (its Mamba state restarts from zero)."""
  cfg, params = PRESETS["tiny-dense"], _params("tiny-dense")
  step = jax.jit(functools.partial(models.apply_cached, cfg))
  tokens, segments = _tokens(cfg, seq=5), jnp.ones((2, 5), jnp.int32)
  stacked = per_layer = models.init_cache(cfg, 2, 32)
  per_layer = jax.jit(models.unstack_cache)(per_layer)
  assert len(per_layer["mamba"]) == cfg.count(n3jax.Block.MAMBA) and set(per_layer["attention"][0]) == {"k", "v"}
  for tok, seg in ((tokens, segments), (tokens[:, :1], jnp.asarray([[2], [1]], jnp.int32))):
    want, stacked = step(params, tok, stacked, segment_ids=seg)
    got, per_layer = step(params, tok, per_layer, segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  for name in ("mamba", "attention"):
    for i, layer in enumerate(per_layer[name]):
      for key, a in layer.items():
        np.testing.assert_allclose(a, stacked[name][key][i], atol=1e-6, rtol=0, err_msg=f"{name} {i} {key}")
  with pytest.raises(ValueError, match="unstack_cache.*scan_layers=False"):
    models.apply_cached(cfg.replace(scan_layers=True), params, tokens, per_layer)


@pytest.mark.parametrize("name", TINY)
def test_fused_mamba_input_projections_give_the_split_params_numbers(name):
  """`models.fuse_in_proj` (the decoding layout): the same logits in the full forward, scanned or unrolled,
  and over a prefill chunk and one-token steps of `apply_cached`; a fused matrix of the wrong width is a
  clear error."""
  cfg, params = PRESETS[name], _params(name)
  fused = models.fuse_in_proj(cfg, params)
  assert models.in_proj_fused(fused) and not models.in_proj_fused(params)
  tokens = _tokens(cfg, seq=9)
  for scan in (False, True):
    c = cfg.replace(scan_layers=scan)
    np.testing.assert_allclose(models.forward(c, fused, tokens), models.forward(c, params, tokens), atol=1e-5, rtol=0)
  unrolled = cfg.replace(scan_layers=False)
  step = jax.jit(functools.partial(models.apply_cached, unrolled))
  split, joined = models.unstack_layers(params), models.fuse_in_proj(cfg, models.unstack_layers(params))
  caches = [jax.jit(models.unstack_cache)(models.init_cache(cfg, 2, 16)) for _ in range(2)]
  for chunk in (tokens[:, :6], tokens[:, 6:7], tokens[:, 7:8]):
    (want, caches[0]), (got, caches[1]) = step(split, chunk, caches[0]), step(joined, chunk, caches[1])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  mixer = fused["layers"]["mamba"]["mixer"]
  bad = {**fused, "layers": {**fused["layers"], "mamba": {**fused["layers"]["mamba"], "mixer": {
      **mixer, "in_proj": mixer["in_proj"][..., 1:]}}}}
  with pytest.raises(ValueError, match="fused in_proj has shape"):
    models.forward(cfg, bad, tokens)


def test_one_row_products_are_computed_on_two_rows_with_the_same_numbers():
  """`nn._common.one_row_as_two`: a product whose activations hold one row runs on two (the second zero) and
  gives the one-row result; products with more rows are left alone."""
  from n3jax.nn import _common  # pylint: disable=g-import-not-at-top

  calls = []

  def einsum(spec, x, w):
    calls.append(x.shape)
    return jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST)

  rng = np.random.RandomState(0)
  w = jnp.asarray(rng.randn(6, 3, 4), jnp.float32)
  for shape in ((1, 1, 6), (2, 1, 6), (1, 3, 6)):
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    got = _common.one_row_as_two(einsum, "BTD,DXY->BTXY", x, w)
    np.testing.assert_allclose(got, jnp.einsum("BTD,DXY->BTXY", x, w, precision=jax.lax.Precision.HIGHEST),
                               atol=1e-6, rtol=0)
    assert got.shape == (*shape[:2], 3, 4)
  assert calls == [(2, 1, 6), (2, 1, 6), (1, 3, 6)]
  y = jnp.asarray(rng.randn(1, 1, 3, 4), jnp.float32)  # the output projection: contracted over two axes
  np.testing.assert_allclose(_common.one_row_as_two(einsum, "BTXY,XYD->BTD", y, w.transpose(1, 2, 0)),
                             jnp.einsum("BTXY,XYD->BTD", y, w.transpose(1, 2, 0), precision="highest"), atol=1e-6)
  assert calls[-1] == (2, 1, 3, 4)


@pytest.mark.parametrize("name", TINY)
def test_every_param_gets_a_gradient_except_the_selection_bias(name):
  cfg, params = PRESETS[name], _params(name)
  grads = jax.grad(functools.partial(_loss, cfg))(params, _tokens(cfg))
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    key = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), key
    if "e_score_correction_bias" in key:
      assert not np.any(g), key  # selects experts only: no gradient, updated outside the optimizer
    elif "mtp" not in key:  # MTP params only see the MTP loss
      assert np.any(g), key


@pytest.mark.parametrize("name", ("tiny-dense", "tiny-moe"))
def test_packed_documents_do_not_see_each_other(name):
  cfg, params = PRESETS[name], _params(name)
  a, b = _tokens(cfg, 1, 11, seed=1), _tokens(cfg, 1, 8, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.asarray([[0] * 11 + [1] * 8], jnp.int32)
  got = models.forward(cfg, params, packed, segment_ids=segments)
  np.testing.assert_allclose(got[:, :11], models.forward(cfg, params, a), atol=2e-5)
  np.testing.assert_allclose(got[:, 11:], models.forward(cfg, params, b), atol=2e-5)


def test_forward_compiles_once_for_new_token_values():
  cfg, params = PRESETS["tiny-moe"], _params("tiny-moe")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(params, tokens):
    return n3jax.forward(cfg, params, tokens)

  for seed in range(3):
    out = fwd(params, _tokens(cfg, seed=seed))
  assert out.dtype == jnp.float32 and out.shape == (2, 19, cfg.vocab_size)


def test_bf16_compute_with_f32_params():
  cfg = PRESETS["tiny-latent-moe"]
  params = _params("tiny-latent-moe")
  tokens = _tokens(cfg)
  want = models.forward(cfg, params, tokens)
  got = models.forward(cfg.replace(dtype="bfloat16"), params, tokens)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
  assert np.mean(np.abs(got - want)) < 0.05 * np.mean(np.abs(want)) + 0.02


def test_bf16_params_init_and_router_stays_f32():
  cfg = PRESETS["tiny-moe"].replace(param_dtype="bfloat16", dtype="bfloat16")
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  moe = shapes["layers"]["moe"]["mixer"]
  assert moe["gate"].dtype == jnp.float32 and moe["e_score_correction_bias"].dtype == jnp.float32
  assert moe["experts_up_proj"].dtype == jnp.bfloat16


def test_mtp_heads():
  cfg, params = PRESETS["tiny-latent-moe"], _params("tiny-latent-moe")
  tokens = _tokens(cfg, seq=9)
  out = models.apply(cfg, params, tokens, mtp_depths=2)  # Super trains 2 depths of its one module
  assert out["mtp_logits"].shape == (2, 2, 9, cfg.vocab_size)
  assert out["expert_counts"].shape == (cfg.count(n3jax.Block.MOE), cfg.n_routed_experts)
  np.testing.assert_array_equal(out["expert_counts"].sum(-1), 2 * 9 * cfg.num_experts_per_tok)
  # Depth 1 at position i sees tokens <= i + 1 only: changing token i + 2 leaves it unchanged.
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab_size)
  again = models.apply(cfg, params, changed, mtp_depths=1)["mtp_logits"][0]
  np.testing.assert_allclose(again[:, :4], out["mtp_logits"][0][:, :4], atol=1e-6)
  assert not np.allclose(again[:, 4], out["mtp_logits"][0][:, 4])


def test_mtp_on_a_model_without_experts():
  """An MTP module of attention + MLP on a dense stack (no experts: E = 0) runs; no expert counts."""
  cfg = PRESETS["tiny-dense"].replace(num_nextn_predict_layers=1,
                                      mtp_blocks=(n3jax.Block.ATTENTION, n3jax.Block.MLP))
  out = models.apply(cfg, models.init(cfg, jax.random.key(0)), _tokens(cfg, seq=6), mtp_depths=2)
  assert out["mtp_logits"].shape == (2, 2, 6, cfg.vocab_size) and np.all(np.isfinite(out["mtp_logits"]))
  assert out["mtp_expert_counts"].shape == (0, 0)


@pytest.mark.parametrize("tokens,match", [
    (np.zeros((2, 3), np.float32), "must be integers"),
    (np.zeros((6,), np.int32), r"int \[batch, seq\]"),
])
def test_bad_tokens(tokens, match):
  with pytest.raises(ValueError, match=match):
    n3jax.forward(PRESETS["tiny-dense"], _params("tiny-dense"), jnp.asarray(tokens))


def test_bad_segment_ids():
  with pytest.raises(ValueError, match="segment_ids.shape"):
    n3jax.forward(PRESETS["tiny-dense"], _params("tiny-dense"), jnp.zeros((2, 4), jnp.int32),
                  segment_ids=jnp.zeros((2, 5), jnp.int32))


@pytest.mark.parametrize("name", ["nemotron-3-nano-30b-a3b", "nemotron-3-super-120b-a12b", "nemotron-h-56b"])
def test_big_presets_trace_abstractly(name):
  """The released presets build their forward (scanned layers, MTP) without allocating any weights."""
  cfg = PRESETS[name]
  params = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  out = jax.eval_shape(lambda p, t: models.apply(cfg, p, t), params, jax.ShapeDtypeStruct((1, 256), jnp.int32))
  assert out["logits"].shape == (1, 256, cfg.vocab_size) and out["logits"].dtype == jnp.float32
  if cfg.num_nextn_predict_layers:
    assert out["mtp_logits"].shape == (1, 1, 256, cfg.vocab_size)


def test_pallas_ssd_kernel_inside_the_model(monkeypatch):
  """The Pallas SSD kernels (interpret mode on CPU) plugged into the model via `ssd_backend` give the
  reference's logits and gradients."""
  from n3jax.nn import _mamba2
  from pallas_kernels.ssd import ops as ssd_ops
  monkeypatch.setitem(_mamba2.SSD_BACKENDS, "pallas_interpret",
                      functools.partial(ssd_ops.ssd, backend="triton", interpret=True))
  cfg = PRESETS["tiny-dense"].replace(blocks="M*M")
  params = models.init(cfg, jax.random.key(0))
  tokens = _tokens(cfg, batch=1, seq=21)
  want_loss, want_grad = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg)))(params, tokens)
  got_loss, got_grad = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg.replace(ssd_backend="pallas_interpret"))))(
      params, tokens)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_conv_ssm_decode_kernels_inside_the_model(monkeypatch, fused, backend):
  """`ssd_backend="pallas"` decodes each Mamba layer with the one-token kernel of the target (interpreted on
  CPU): on a GPU the Triton conv + SSM kernel, on a TPU the conv windows in jnp and the Mosaic SSM kernel;
  from split projections or, in generation's layout (`fused`), from the fused projection (the Triton kernel
  reads x, B, C and dt where it put them): the reference's logits and caches over a prefill chunk and
  one-token steps, one of which starts a new document in row 0 (its windows and state restart from zero)."""
  from n3jax.nn import _mamba2
  from pallas_kernels.ssd import ops_decode
  calls = []
  name = "_conv_decode_call" if backend == "triton" else "_ssd_decode_tpu"
  call = getattr(ops_decode, name)

  def kernel(*args, **kw):
    calls.append(1)
    return call(*args, **kw)

  monkeypatch.setattr(ops_decode, name, kernel)
  monkeypatch.setitem(_mamba2.DECODE_BACKENDS, "pallas", dict(backend=backend, interpret=True))
  cfg = PRESETS["tiny-dense"].replace(scan_layers=False)
  params = models.unstack_layers(_params("tiny-dense"))
  if fused:
    params = models.fuse_in_proj(cfg, params)
  tokens = _tokens(cfg, seq=8)
  caches = [jax.jit(models.unstack_cache)(models.init_cache(cfg, 2, 16)) for _ in range(2)]
  steps = [(tokens[:, :5], jnp.ones((2, 5), jnp.int32)), (tokens[:, 5:6], jnp.ones((2, 1), jnp.int32)),
           (tokens[:, 6:7], jnp.asarray([[2], [1]], jnp.int32)), (tokens[:, 7:8], jnp.asarray([[2], [1]], jnp.int32))]
  for tok, seg in steps:
    want, caches[0] = models.apply_cached(cfg, params, tok, caches[0], segment_ids=seg)
    got, caches[1] = models.apply_cached(cfg.replace(ssd_backend="pallas"), params, tok, caches[1], segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert len(calls) == 3 * cfg.count(n3jax.Block.MAMBA)  # the three one-token steps
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=0), caches[1], caches[0])


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-latent-moe"])
def test_gathered_expert_kernels_decode_inside_the_model(monkeypatch, name):
  """With `moe_gather_max_rows`, a decoding step's few routed rows skip the sort: each runs its expert's
  weights read by id (`pallas_kernels.moe.gathered`, Triton interpreted on CPU), two kernels per MoE layer;
  a prefill chunk with more rows keeps the sorted grouped matmul. The logits and caches are the sorted
  path's (`moe_backend="pallas"` for both, so the prefill is the same)."""
  from pallas_kernels.moe import gathered
  calls = []
  call = gathered._rows_call_triton  # pylint: disable=protected-access
  monkeypatch.setattr(gathered, "_rows_call_triton", lambda *a, **kw: (calls.append(a[0].shape[0]), call(*a, **kw))[1])
  cfg = PRESETS[name].replace(scan_layers=False, moe_backend="pallas")
  params = models.unstack_layers(_params(name))
  tokens = _tokens(cfg, seq=7)
  caches = [jax.jit(models.unstack_cache)(models.init_cache(cfg, 2, 16)) for _ in range(2)]
  gathering = cfg.replace(moe_gather_max_rows=2 * cfg.num_experts_per_tok)
  for t0, t1 in ((0, 5), (5, 6), (6, 7)):
    seg = jnp.ones((2, t1 - t0), jnp.int32)
    want, caches[0] = models.apply_cached(cfg, params, tokens[:, t0:t1], caches[0], segment_ids=seg)
    got, caches[1] = models.apply_cached(gathering, params, tokens[:, t0:t1], caches[1], segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # two one-token steps x MoE layers x (up, down), each on batch x R rows; none in the 5-token prefill
  assert calls == [2 * cfg.num_experts_per_tok] * (2 * 2 * cfg.count(n3jax.Block.MOE)), calls
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=2e-5, rtol=0), caches[1], caches[0])


def test_moe_gather_max_rows_is_validated():
  with pytest.raises(ValueError, match="moe_gather_max_rows=-1 must be an int >= 0"):
    PRESETS["tiny-moe"].replace(moe_gather_max_rows=-1)


def test_mosaic_gpu_ssd_kernel_inside_the_model(monkeypatch):
  """`ssd_backend="pallas_mgpu"` (the Hopper kernels, here in JAX's Mosaic GPU interpreter) in a bf16
  model with 64-token chunks and packed documents: the reference's loss and gradients within bf16 error."""
  from n3jax.nn import _mamba2
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from pallas_kernels.ssd import ops as ssd_ops
  monkeypatch.setitem(_mamba2.SSD_BACKENDS, "pallas_mgpu",
                      functools.partial(ssd_ops.ssd, backend="mosaic_gpu", interpret=plgpu.InterpretGPUParams()))
  cfg = PRESETS["tiny-dense"].replace(blocks="M", chunk_size=64, dtype="bfloat16")
  params = models.init(cfg, jax.random.key(0))
  tokens = _tokens(cfg, batch=1, seq=70)
  segments = jnp.asarray([[1] * 30 + [2] * 40], jnp.int32)
  want_loss, want_grad = jax.jit(jax.value_and_grad(functools.partial(_loss_packed, cfg)))(params, tokens, segments)
  got_loss, got_grad = jax.jit(jax.value_and_grad(functools.partial(_loss_packed, cfg.replace(
      ssd_backend="pallas_mgpu"))))(params, tokens, segments)
  np.testing.assert_allclose(got_loss, want_loss, rtol=2e-3)
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(got_grad), jax.tree.leaves(got_grad),
                        jax.tree.leaves(want_grad)):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, atol=3e-2 * np.abs(w).max() + 1e-6, err_msg=jax.tree_util.keystr(path[0]))


def test_mtp_expert_counts_feed_the_bias_update():
  from n3jax import _moe_balance
  cfg, params = PRESETS["tiny-latent-moe"], _params("tiny-latent-moe")
  out = models.apply(cfg, params, _tokens(cfg, seq=9), mtp_depths=2)
  mtp_counts = out["mtp_expert_counts"]  # one module with one MoE layer, serving 2 depths
  assert mtp_counts.shape == (1, cfg.n_routed_experts)
  np.testing.assert_array_equal(mtp_counts.sum(), 2 * (2 * 9 * cfg.num_experts_per_tok))
  counts = jnp.concatenate([out["expert_counts"], mtp_counts])
  new = _moe_balance.update_expert_bias(params, counts, 1e-3)
  moved = new["mtp"]["0"]["layer_1"]["mixer"]["e_score_correction_bias"] - \
      params["mtp"]["0"]["layer_1"]["mixer"]["e_score_correction_bias"]
  want = 1e-3 * np.sign(np.asarray(mtp_counts[0], np.float32).mean() - np.asarray(mtp_counts[0], np.float32))
  np.testing.assert_allclose(moved, want, atol=1e-7)
  main_moved = new["layers"]["moe"]["mixer"]["e_score_correction_bias"] - \
      params["layers"]["moe"]["mixer"]["e_score_correction_bias"]
  load = np.asarray(out["expert_counts"], np.float32)
  np.testing.assert_allclose(main_moved, 1e-3 * np.sign(load.mean(-1, keepdims=True) - load), atol=1e-7)


def test_padding_is_left_out_of_expert_counts_and_the_balance_loss():
  """Segment 0 (padding, as n3jax.data packs) is routed but moves neither the counts nor the balance loss."""
  from n3jax.nn import _moe
  cfg, params = PRESETS["tiny-moe"], _params("tiny-moe")
  tokens = _tokens(cfg, seq=12)
  segments = jnp.ones_like(tokens).at[:, 8:].set(0)  # the last 4 positions of each row are padding
  padded = models.apply(cfg, params, tokens, segment_ids=segments, mtp_depths=0)["expert_counts"]
  real = models.apply(cfg, params, tokens[:, :8], mtp_depths=0)["expert_counts"]  # causal: the same routing
  np.testing.assert_array_equal(padded, real)
  np.testing.assert_array_equal(padded.sum(-1), 2 * 8 * cfg.num_experts_per_tok)
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 12, 8), jnp.float32)
  ids = jnp.asarray(rng.randint(0, 8, (3, 12, 2)))
  mask = jnp.ones((3, 12), bool).at[0, 7:].set(False).at[2].set(False)  # row 2: all padding
  got = _moe.sequence_balance_loss(logits, ids, 8, mask)
  want = (_moe.sequence_balance_loss(logits[:1, :7], ids[:1, :7], 8)
          + _moe.sequence_balance_loss(logits[1:2], ids[1:2], 8)) / 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(_moe.sequence_balance_loss(logits, ids, 8),
                             _moe.sequence_balance_loss(logits, ids, 8, jnp.ones((3, 12), bool)), rtol=1e-6)
