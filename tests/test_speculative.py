"""MTP speculative decoding (`n3jax.inference._speculative`): greedy output equals plain greedy decoding, the
Mamba roll-back after partial and full acceptance, batches with per-row acceptance, the speculative-sampling
rule, the thinking budget, the CLI flag, bad input, and generation on a mesh of the fake CPU devices (the same
greedy tokens, the state keeping its shardings, one compiled round).

One tiny random hybrid with every kind the roll-back touches (Mamba, attention, LatentMoE) and one MTP module
`*E` like Nemotron 3 Super, in float32 so that the chunked verify and one-token decoding agree to rounding,
its layers scanned (one test unrolls them).
Params are drawn with numpy (an eager `models.init` compiles op by op for half a minute on 2 cores). Shapes
repeat on purpose (prompt width 8, cache 32, one row) so that the compiled steps are shared between tests.
"""


import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import n3jax
from n3jax import configs, models, sharding
from n3jax.inference import _engine, _speculative
from n3jax.inference import Generation, SamplingParams, SpeculativeStats, generate_tokens, speculative_accept

CFG = configs.PRESETS["tiny-latent-moe"].replace(blocks="M*EM", dtype="float32", param_dtype="float32",
                                                 scan_layers=True)
PROMPTS = [[5, 17, 9, 33, 7], [40, 2, 71, 8, 8, 19], [250, 3]]
NEW = 12
MAX_LEN = 32  # every one-row run: prompt width 8 + 12 new tokens + k <= 32
GREEDY = SamplingParams()


def _random_params(cfg, seed: int):
  """Random params with the init's scales (normal 0.02, unit norms, Mamba A / dt / conv ranges)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = str(path[-1].key)
    if name in ("scale", "norm", "D"):
      v = np.ones(s.shape)
    elif name == "A_log":
      v = np.log(rng.uniform(1, 16, s.shape))
    elif name == "dt_bias":
      dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), s.shape))
      v = dt + np.log(-np.expm1(-dt))
    elif name == "e_score_correction_bias":
      v = np.zeros(s.shape)
    elif name.startswith("conv1d"):
      v = rng.uniform(-0.5, 0.5, s.shape)
    else:
      v = rng.normal(0, 0.02, s.shape)
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(lambda: models.init(cfg, jax.random.key(0))))


def _agreeing(params, eps: float):
  """Params whose MTP module predicts what the main model would: its layers add nothing and eh_proj passes
  the embedding half through, so a draft is argmax lm_head(norm(emb(previous token))). The main model's
  mixers are scaled by `eps`: at 0 it predicts the same (every draft kept), a little above 0 its Mamba and
  attention context now and then overrules a draft (partial acceptance)."""
  d = CFG.hidden_size
  layers, mtp = params["layers"], params["mtp"]["0"]
  scaled = {"mamba": {"mixer": {"out_proj": layers["mamba"]["mixer"]["out_proj"] * eps}},
            "attention": {"mixer": {"o_proj": layers["attention"]["mixer"]["o_proj"] * eps}},
            "moe": {"mixer": {"fc2_latent_proj": layers["moe"]["mixer"]["fc2_latent_proj"] * eps,
                              "shared_experts": {"down_proj": layers["moe"]["mixer"]["shared_experts"]["down_proj"]
                                                 * eps}}}}
  silent = {"eh_proj": jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]),
            "layer_0": {"mixer": {"o_proj": 0 * mtp["layer_0"]["mixer"]["o_proj"]}},
            "layer_1": {"mixer": {"fc2_latent_proj": 0 * mtp["layer_1"]["mixer"]["fc2_latent_proj"],
                                  "shared_experts": {"down_proj": 0 * mtp["layer_1"]["mixer"]["shared_experts"]
                                                     ["down_proj"]}}}}

  def merge(base, new):
    return {k: merge(v, new[k]) if isinstance(v, dict) and k in new else new.get(k, v) for k, v in base.items()}

  return {**params, "layers": merge(layers, scaled), "mtp": {"0": merge(mtp, silent)}}


@pytest.fixture(scope="module")
def param_sets():
  """random: drafts mostly rejected; agree: always accepted; mixed: partial and full acceptance."""
  params = _random_params(CFG, 0)
  return {"random": params, "agree": _agreeing(params, 0.0), "mixed": _agreeing(params, 0.02)}


def _run(params, prompts, k=None, cfg=CFG, **kw):
  max_len = MAX_LEN if len(prompts) == 1 else None
  return generate_tokens(cfg, params, prompts, max_new_tokens=NEW, max_len=max_len, speculative_k=k, **kw)


@pytest.fixture(scope="module")
def plain(param_sets):
  """Plain greedy decoding of every prompt, one row at a time: {(params name, prompt index): token ids}."""
  return {(name, i): _run(p, [prompt])[0].token_ids for name, p in param_sets.items()
          for i, prompt in enumerate(PROMPTS)}


# --- Greedy: the same tokens -----------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculative_equals_plain_greedy(param_sets, plain, k):
  for name, p in param_sets.items():
    steps = accepted = 0
    for i, prompt in enumerate(PROMPTS):
      got = _run(p, [prompt], k)[0]
      assert got.token_ids == plain[name, i], (name, prompt)
      st = got.speculative
      assert st.verify_steps >= 1 and st.drafted == k * st.verify_steps and 0 <= st.accepted <= st.drafted
      steps, accepted = steps + st.verify_steps, accepted + st.accepted
    mean = accepted / steps
    print(f"k={k} {name}: {mean:.2f} drafts accepted per verify step ({accepted}/{k * steps})")
    if name == "agree":
      assert mean == k  # every draft kept: the roll-back takes the last position
    if name == "mixed":
      assert 0 < mean < k


def test_rollback_leaves_the_caches_of_plain_decoding(param_sets):
  """After every round (k = 3; partial and full acceptance both happen) the Mamba conv / SSM states and
  the filled KV slots equal those of plain decoding of the same tokens."""
  k, params = 3, param_sets["mixed"]
  seen_accepted = set()
  for prompt in PROMPTS:
    tokens, segments = _engine.left_align([prompt], length=8)
    sstate = _engine.sampling_state(CFG, tokens, segments, GREEDY)
    steps = _speculative.compiled_steps(CFG, 1, MAX_LEN)  # one device: the module-level jits
    first, state = _speculative.start(steps, params, tokens, segments, chunk=None, k=k, sampling=GREEDY,
                                      sstate=sstate, forced=jnp.full((1,), -1, jnp.int32))
    _, cache = _engine.prefill(CFG, params, tokens, segments, max_len=MAX_LEN)
    plain_state = _engine.sampling_state(CFG, tokens, segments, GREEDY)
    fed = [int(first[0])]
    while len(fed) < NEW:
      out, kept, accepted, state = steps.step(params, state, jnp.full((1,), -1, jnp.int32),
                                              jnp.asarray([-1, -1], jnp.int32), k=k, sampling=GREEDY)
      kept, accepted = int(kept[0]), int(accepted[0])
      seen_accepted.add(accepted)
      for tok in fed[-1:] + [int(t) for t in np.asarray(out)[0, :kept - 1]]:  # what the round put in the cache
        nxt, cache, plain_state = _engine.decode_sample(CFG, params, cache, jnp.asarray([tok], jnp.int32),
                                                        plain_state, jnp.full((1,), -1, jnp.int32), sampling=GREEDY)
      assert int(nxt[0]) == int(np.asarray(out)[0, kept - 1])  # the round's last token: plain's next one
      fed += [int(t) for t in np.asarray(out)[0, :kept]]
      spec = state["cache"]
      n = int(cache["index"])
      assert int(spec["index"]) == n
      np.testing.assert_array_equal(spec["segment_ids"][:, :n], cache["segment_ids"][:, :n])
      for name in ("conv_x", "conv_B", "conv_C", "ssm"):
        np.testing.assert_allclose(spec["mamba"][name], cache["mamba"][name], atol=2e-5, rtol=1e-4, err_msg=name)
      for name in ("k", "v"):
        np.testing.assert_allclose(spec["attention"][name][:, :, :, :n], cache["attention"][name][:, :, :, :n],
                                   atol=2e-5, rtol=1e-4)
  assert {0, k} <= seen_accepted and seen_accepted & {1, 2}, seen_accepted  # none, partial and full acceptance


def test_batch_rows_keep_different_counts(param_sets, plain):
  """Three rows of different lengths, prefilled in chunks of 4: each row keeps its own number of drafts per
  round (holes in the shared cache), and its tokens are those of plain greedy decoding of its prompt alone.
  Layers unrolled here (scanned elsewhere): the per-position Mamba states travel through both stacks."""
  got = _run(param_sets["mixed"], PROMPTS, 2, cfg=CFG.replace(scan_layers=False), prefill_chunk=4)
  for i, row in enumerate(got):
    assert row.token_ids == plain["mixed", i], i
  assert len({row.speculative.accepted for row in got}) > 1  # the rows really kept different counts


def test_thinking_budget_caps_the_drafts(param_sets, plain):
  """With a thinking budget the forced close marker lands where plain decoding puts it, though every
  draft would have been accepted."""
  prompt = [5, 17, 9, 33, 7]  # 5 opens a thinking section; the close marker is token 99
  kw = dict(thinking_budget=3, think_ids=(5, 99))
  want = _run(param_sets["agree"], [prompt], **kw)[0]
  assert want.token_ids[3] == 99 and want.thinking_tokens == 3
  for k in (1, 3):
    got = _run(param_sets["agree"], [prompt], k, **kw)[0]
    assert got.token_ids == want.token_ids and got.thinking_tokens == 3


def test_the_cache_end_falls_back_to_plain_steps(param_sets):
  """As many new tokens as the cache holds: the rounds stop when k + 1 slots no longer fit, plain steps
  fill the rest, and the tokens and the finish are those of plain decoding."""
  params, prompt, new = param_sets["random"], PROMPTS[0], MAX_LEN - 8 + 1
  want = generate_tokens(CFG, params, [prompt], max_new_tokens=new, max_len=MAX_LEN)[0]
  got = generate_tokens(CFG, params, [prompt], max_new_tokens=new, max_len=MAX_LEN, speculative_k=3)[0]
  assert got.token_ids == want.token_ids and len(got.token_ids) == new and got.finish_reason == "length"
  assert got.speculative.verify_steps + got.speculative.accepted < new - 1  # some tokens came from plain steps


def test_sampling_runs_and_is_seeded(param_sets):
  sampling = SamplingParams(temperature=1.0, seed=3)
  a, b = (_run(param_sets["mixed"], [PROMPTS[0]], 2, sampling=sampling)[0] for _ in range(2))
  assert a.token_ids == b.token_ids and len(a.token_ids) == NEW and a.speculative.verify_steps >= 1


# --- On a device mesh ----------------------------------------------------------------------------------
BATCH_SPLIT, TENSOR_SPLIT = ("fsdp", {"fsdp": 2}), ("fsdp_tp_ep", {"fsdp": 2, "tensor": 2})  # heads 8, groups 2, KV 2


def _mesh(shape):
  return sharding.make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])


@pytest.mark.parametrize("layout,shape", [BATCH_SPLIT, TENSOR_SPLIT])
def test_greedy_on_a_mesh_equals_one_device_and_plain(param_sets, plain, layout, shape):
  """Two rows (different acceptance per round) over the batch shards, prefilled in chunks of 4: the tokens
  of one device and of plain greedy decoding; the round compiled once for all rounds."""
  mesh, params, k = _mesh(shape), param_sets["mixed"], 2
  one = _run(params, PROMPTS[:2], k, prefill_chunk=4)
  split = _run(params, PROMPTS[:2], k, prefill_chunk=4, mesh=mesh, layout=layout)
  assert [c.token_ids for c in split] == [c.token_ids for c in one] == [plain["mixed", i] for i in range(2)]
  assert sum(c.speculative.verify_steps for c in split) > 4
  steps = _speculative.compiled_steps(CFG, 2, _speculative.cache_size(8, NEW, k, 2), mesh=mesh, layout=layout)
  assert isinstance(steps, _speculative.ShardedSteps) and steps._step[True]._cache_size() == 1


def test_mesh_round_state_keeps_its_shardings(param_sets):
  """Rounds run by hand with sampling on (the state then holds draft_probs): every leaf of the state and
  of the caches stays in its sharding, the KV heads of the MTP cache split over tensor like the main ones."""
  layout, shape = TENSOR_SPLIT
  mesh, k, sampling = _mesh(shape), 2, SamplingParams(temperature=1.0)
  steps = _speculative.compiled_steps(CFG, 2, MAX_LEN, mesh=mesh, layout=layout)
  params = steps.place(param_sets["mixed"])
  tokens, segments = _engine.left_align(PROMPTS[:2], length=8)
  sstate = _engine.sampling_state(CFG, tokens, segments, sampling)
  forced, limit, markers = np.full((2,), -1, np.int32), np.full((2,), -1, np.int32), np.asarray([-1, -1], np.int32)
  _, state = _speculative.start(steps, params, tokens, segments, chunk=None, k=k, sampling=sampling,
                                sstate=sstate, forced=forced)
  for _ in range(3):
    toks, kept, _, state = steps.step(params, state, limit, markers, k=k, sampling=sampling)
  assert "draft_probs" in state and steps._step[False]._cache_size() == 1
  expected = steps.state_shardings[False]
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  batch = ("data", "fsdp", "expert")
  assert state["mtp"]["0"]["k"].sharding.spec == P(None, batch, "tensor", None, None)
  assert state["cache"]["attention"]["k"].sharding.spec == P(None, batch, "tensor", None, None)
  assert toks.sharding.spec == P(batch, None) and kept.sharding.spec == P(batch)


def test_mesh_shapes_that_do_not_split(param_sets):
  layout, shape = BATCH_SPLIT
  with pytest.raises(ValueError, match=r"a batch of 3 rows cannot be split .* 3 % 2 != 0"):
    _run(param_sets["random"], PROMPTS, 2, mesh=_mesh(shape), layout=layout)
  with pytest.raises(ValueError, match=r"MTP cache \['0'\]\['k'\].* 2 kv_heads cannot be split .* 2 % 4 != 0"):
    sharding.cache_shardings(CFG, _mesh({"tensor": 4}), "fsdp_tp_ep", batch=1, max_len=MAX_LEN, mtp=True)
  axes, shapes = models.mtp_cache_logical_axes(CFG), jax.eval_shape(lambda: models.init_mtp_cache(CFG, 2, MAX_LEN))
  assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P))


# --- The speculative-sampling rule ------------------------------------------------------------------
def test_rejection_sampling_gives_the_target_distribution():
  """One round on a 4-token vocabulary, 40000 seeds: the first emitted token follows the target p_0, and
  the second (when a draft was kept) follows p_1 given the first, whatever the draft distribution."""
  v, k, n = 4, 2, 40_000
  rng = np.random.default_rng(0)
  p0 = rng.dirichlet(np.ones(v))
  p1 = rng.dirichlet(np.ones(v), size=v)             # p_1(. | d_1)
  p2 = rng.dirichlet(np.ones(v), size=(v, v))        # p_2(. | d_1, d_2)
  q1 = rng.dirichlet(np.ones(v))
  q2 = rng.dirichlet(np.ones(v), size=v)             # q_2(. | d_1)
  p0, p1, p2, q1, q2 = map(jnp.asarray, (p0, p1, p2, q1, q2))

  def one(key):
    k1, k2, k3 = jax.random.split(key, 3)
    d1 = jax.random.categorical(k1, jnp.log(q1))
    d2 = jax.random.categorical(k2, jnp.log(q2[d1]))
    drafts = jnp.stack([d1, d2])[None]
    accepted, nxt = speculative_accept(k3, drafts, jnp.stack([q1, q2[d1]])[None],
                                       jnp.stack([p0, p1[d1], p2[d1, d2]])[None])
    emitted = jnp.where(jnp.arange(k + 1) < accepted[0], jnp.pad(drafts[0], (0, 1)), nxt[0])
    return emitted[0], emitted[1], accepted[0]

  first, second, accepted = map(np.asarray, jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), n)))
  assert 0 < accepted.mean() < k

  def chi2(samples, probs):
    counts = np.bincount(samples, minlength=v)
    expect = len(samples) * np.asarray(probs)
    return float(((counts - expect) ** 2 / expect).sum())

  # 3 degrees of freedom: P(chi2 > 25) < 2e-5 (the seeds are fixed, so this is deterministic anyway).
  assert chi2(first, p0) < 25, chi2(first, p0)
  for x in range(v):
    sel = (accepted >= 1) & (first == x)
    if sel.sum() > 500:
      assert chi2(second[sel], p1[x]) < 25, (x, chi2(second[sel], p1[x]))
  wrong = jnp.roll(p0, 1)  # the test has power: a wrong target is far outside the bound
  assert chi2(first, wrong) > 1000


# --- API, CLI, errors -------------------------------------------------------------------------------
def test_cli_passes_speculative_k(monkeypatch, capsys, run_cli):
  seen = {}

  def fake_generate(*args, **kwargs):
    seen.update(kwargs)
    return Generation(text="hi", answer="hi", reasoning=None, tool_calls=[], token_ids=[1, 2], finish_reason="stop",
                      thinking_tokens=0, prompt_tokens=3,
                      speculative=SpeculativeStats(verify_steps=1, drafted=3, accepted=2))

  monkeypatch.setattr(n3jax.inference, "generate", fake_generate)
  assert run_cli("n3jax.generate", "--ckpt=/nowhere", "--prompt=hi", "--speculative_k=3") == 0
  assert seen["speculative_k"] == 3
  assert "2.00 drafts accepted per verify step" in capsys.readouterr().err


def test_bad_speculative_input_gives_one_clear_error(param_sets):
  params = param_sets["random"]
  no_mtp = CFG.replace(num_nextn_predict_layers=0)
  with pytest.raises(ValueError, match="this model has none"):
    generate_tokens(no_mtp, {k: v for k, v in params.items() if k != "mtp"}, [PROMPTS[0]], max_new_tokens=4,
                    speculative_k=2)
  for k in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=r"must be an int >= 1"):
      generate_tokens(CFG, params, [PROMPTS[0]], max_new_tokens=4, speculative_k=k)
  with pytest.raises(ValueError, match="no 'mtp' entry"):
    generate_tokens(CFG, {k: v for k, v in params.items() if k != "mtp"}, [PROMPTS[0]], max_new_tokens=4,
                    speculative_k=2)
  with pytest.raises(ValueError, match="this model has none"):
    n3jax.generate((no_mtp, params), "hello", tokenizer=object(), chat_mode=False, speculative_k=2)
