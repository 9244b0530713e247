"""Generation: cached decoding vs the full forward, greedy parity with `transformers` generate, sampling,
the chat template, the thinking budget, stop strings, streaming, the CLI, and bad input.

Models are the tiny random HF fixtures (dense, MoE, LatentMoE hybrids) converted with `checkpoint_convert`,
with a small WordLevel tokenizer.json trained here (nothing is downloaded). Shapes repeat on purpose (batch
3 / cache 32, batch 1 / cache 64) so that the compiled prefill and decode steps are shared between tests.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import n3jax  # noqa: E402
from n3jax import inference, models  # noqa: E402
from n3jax.data import ByteTokenizer, load_tokenizer, render_chat  # noqa: E402
from n3jax.inference import chat  # noqa: E402
from tests import hf_fixtures  # noqa: E402

KINDS = ("dense", "moe", "latent")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
WORDS = ["hello", "world", "sky", "blue", "why", "is", "the", "user", "assistant", "system"] + [
    f"w{i}" for i in range(78)]
PROMPTS = [[5, 17, 9, 33], [40, 2, 71, 8, 8, 19, 60, 3, 11, 25, 90], [7]]  # mixed lengths, one past a chunk
MAX_LEN = 32  # batch-3 tests share this cache size; batch-1 tests use 64


def _tokenizer_json(path: str) -> None:
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=96, special_tokens=SPECIALS)
  tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)], trainer)
  assert tok.get_vocab_size() == len(SPECIALS) + len(WORDS) <= 96
  tok.save(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """kind -> (HF model, n3jax checkpoint dir, cfg, params)."""
  out = {}
  for kind in KINDS:
    hf_dir, ckpt = (str(tmp_path_factory.mktemp(f"{kind}_{s}")) for s in ("hf", "n3jax"))
    model = hf_fixtures.build_hf_model(kind)
    hf_fixtures.save_hf_checkpoint(model, hf_dir, with_mtp=bool(model.config.num_nextn_predict_layers))
    _tokenizer_json(os.path.join(hf_dir, "tokenizer.json"))
    n3jax.convert_from_hf(hf_dir, ckpt)
    out[kind] = (model, ckpt, *n3jax.load(ckpt))
  return out


@pytest.fixture(scope="module")
def tok(ckpts):
  _, ckpt, cfg, _ = ckpts["dense"]
  return inference.load_tokenizer(ckpt, cfg)


def _teacher_forced(cfg, params, prompts, continuations, *, right_padded: bool, chunk=None):
  """Prefill + one decode step per continuation token -> per row, logits [len(prompt + cont), V]."""
  width = inference.padded_length(max(map(len, prompts)), None)
  if right_padded:  # the caller's batch is right-padded; left_align turns it around
    arr = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros(arr.shape, bool)
    for b, p in enumerate(prompts):
      arr[b, :len(p)], mask[b, :len(p)] = p, True
    tokens, segments = inference.left_align(arr, mask, length=width)
  else:
    tokens, segments = inference.left_align(prompts, length=width)
  logits, cache = inference.prefill(cfg, params, tokens, segments, max_len=MAX_LEN, chunk=chunk)
  steps = [np.asarray(logits)]
  compiled = inference.decode_logits._cache_size()  # pylint: disable=protected-access
  for col in np.asarray(continuations).T:
    logits, cache = inference.decode_logits(cfg, params, cache, jnp.asarray(col))
    steps.append(np.asarray(logits))
  assert inference.decode_logits._cache_size() <= compiled + 1  # fixed-shape cache: one compile for all steps
  assert int(cache["index"]) == tokens.shape[1] + len(continuations[0])
  return [np.stack([s[b] for s in steps]) for b in range(len(prompts))]


_forward = jax.jit(models.forward, static_argnums=0)


def _check_against_forward(cfg, params, got, prompts, continuations):
  """One right-padded batch through the full forward (causal: padding after a row changes nothing)."""
  rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
  batch = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for b, r in enumerate(rows):
    batch[b, :len(r)] = r
  full = np.asarray(_forward(cfg, params, jnp.asarray(batch)))
  for b, (p, r) in enumerate(zip(prompts, rows)):
    want = full[b, len(p) - 1:len(r)]  # the prompt's last position, then one per fed token
    np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0, err_msg=f"row {b} (prompt of {len(p)})")
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decode_matches_full_forward(ckpts, kind):
  _, _, cfg, params = ckpts[kind]
  conts = hf_fixtures.random_tokens(cfg.vocab_size, len(PROMPTS), 6, seed=1)
  got = _teacher_forced(cfg, params, PROMPTS, conts, right_padded=True)
  _check_against_forward(cfg, params, got, PROMPTS, conts)


def test_chunked_prefill_and_scanned_stack_match_full_forward(ckpts):
  """Prefill in chunks of 4 columns (some chunks all padding for short rows), layers under lax.scan."""
  _, _, cfg, params = ckpts["moe"]
  conts = hf_fixtures.random_tokens(cfg.vocab_size, len(PROMPTS), 6, seed=2)
  got = _teacher_forced(cfg.replace(scan_layers=True), params, PROMPTS, conts, right_padded=False, chunk=4)
  _check_against_forward(cfg, params, got, PROMPTS, conts)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_generate(ckpts, kind):
  model, _, cfg, params = ckpts[kind]
  if kind == "latent":  # per-layer weights given (the other kinds: stacked, split by the generator)
    params = models.unstack_layers(params)
  new = 6
  ours = inference.generate_tokens(cfg, params, PROMPTS, max_new_tokens=new, max_len=MAX_LEN)  # one batch
  for p, c in zip(PROMPTS, ours):
    with torch.no_grad():
      want = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert c.token_ids == want[0, len(p):].tolist(), f"prompt {p}"
    assert c.finish_reason == "length"


def test_the_generator_decodes_from_per_layer_weights_with_fused_mamba_projections(ckpts):
  """Stacked weights are split once per call for the unrolled decoding step, and each Mamba layer's five
  input projections joined into one matrix; params already so, and configs that scan their layers, go
  through as they are."""
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top

  _, _, cfg, params = ckpts["moe"]
  split = _engine.decoding_params(cfg, params)
  assert all(isinstance(v, list) for v in split["layers"].values())
  fused = models.fuse_in_proj(cfg, params)
  for name, stack in fused["layers"].items():
    for i, layer in enumerate(split["layers"][name]):
      jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i]), layer, stack)
  in_proj = split["layers"]["mamba"][0]["mixer"]["in_proj"]
  m, p, j, q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
  assert in_proj.shape == (cfg.hidden_size, 2 * m * p + 2 * j * q + m)
  np.testing.assert_array_equal(in_proj[:, m * p:2 * m * p],  # HF's row order: z | x | B | C | dt
                                params["layers"]["mamba"]["mixer"]["in_proj_x"][0].reshape(cfg.hidden_size, -1))
  assert _engine.decoding_params(cfg, split) is split
  assert _engine.decoding_params(cfg.replace(scan_layers=True), params) is params
  assert _engine.decoding_config(cfg.replace(scan_layers=True)) == cfg.replace(scan_layers=False)  # generation unrolls
  per_layer = models.unstack_layers(params)  # e.g. read so from a checkpoint: only the projections are joined
  assert models.in_proj_fused(_engine.decoding_params(cfg, per_layer))
  on_host = _engine.decoding_layout(cfg, jax.tree.map(np.asarray, params))  # a checkpoint, before it is placed
  assert isinstance(on_host["layers"]["mamba"][0]["mixer"]["in_proj"], np.ndarray)
  np.testing.assert_array_equal(on_host["layers"]["mamba"][0]["mixer"]["in_proj"], in_proj)
  quantized = cfg.replace(quant="fp8")  # the recipe scales each projection on its own: split, not fused
  assert not models.in_proj_fused(_engine.decoding_params(quantized, params))
  assert _engine.decoding_params(quantized, per_layer) is per_layer
  with pytest.raises(ValueError, match="quant='fp8'"):
    models.apply(quantized, fused, jnp.zeros((1, 4), jnp.int32))


def test_the_generator_keeps_the_params_as_given_when_the_device_has_no_room_for_a_copy(ckpts, monkeypatch, caplog):
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top

  _, _, cfg, params = ckpts["moe"]
  monkeypatch.setattr(jax.Device, "memory_stats", lambda self: {"bytes_limit": 2000, "bytes_in_use": 1000},
                      raising=False)
  assert _engine.decoding_params(cfg, params) is params
  assert "decoding from the params as given" in caplog.text


def test_a_column_major_embedding_table_is_placed_row_major_for_decoding(ckpts):
  """A TPU places a [V, D] table with V minor when D is no multiple of 128, and XLA then copies all of it into
  rows for every gather of two rows or more (see `_engine._rows_contiguous`; checked on its v5e compile
  in tests/test_aot.py). Here the CPU holds the table column-major as that TPU would: generation re-places it
  row-major once, compiles its steps for that layout, and emits the same tokens."""
  from jax.experimental.layout import Format, Layout  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top

  _, _, cfg, params = ckpts["dense"]
  table = params["embedder"]["embedding"]
  column_major = {**params, "embedder": {"embedding": jax.device_put(table, Format(Layout((1, 0)), table.sharding))}}
  assert column_major["embedder"]["embedding"].format.layout.major_to_minor == (1, 0)
  placed = _engine.decoding_params(cfg, column_major)
  assert placed["embedder"]["embedding"].format.layout.major_to_minor == (0, 1)
  np.testing.assert_array_equal(placed["embedder"]["embedding"], table)
  assert _engine.decoding_params(cfg, placed)["embedder"]["embedding"] is placed["embedder"]["embedding"]
  assert _engine.decoding_params(cfg.replace(tie_word_embeddings=True), column_major)["embedder"]["embedding"] is (
      column_major["embedder"]["embedding"])  # also the LM head's matrix: kept as it is
  want = inference.generate_tokens(cfg, params, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  got = inference.generate_tokens(cfg, column_major, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_routed_expert_weights_are_placed_row_major_for_decoding(ckpts):
  """A TPU lays [E, D, F] expert weights out with D minor when F is no multiple of 128 (Nemotron 3 Nano's
  1856), and the Mosaic kernels that read them (grouped matmul, gathered experts) would have XLA copy them
  into rows every step (`_engine._rows_contiguous`; its v5e compile in tests/test_aot.py). Here the CPU holds
  them so: generation re-places them row-major once, stacked or per layer, and emits the same tokens."""
  from jax.experimental.layout import Format, Layout  # pylint: disable=g-import-not-at-top
  from n3jax.inference import _engine  # pylint: disable=g-import-not-at-top

  _, _, cfg, params = ckpts["moe"]
  names = ("experts_up_proj", "experts_down_proj")
  swap = lambda a: jax.device_put(a, Format(Layout((*range(a.ndim - 2), a.ndim - 1, a.ndim - 2)), a.sharding))
  column_major = jax.tree_util.tree_map_with_path(lambda p, a: swap(a) if p[-1].key in names else a, params)
  placed = _engine.decoding_params(cfg, column_major)
  experts = [(p, a) for p, a in jax.tree_util.tree_leaves_with_path(placed) if p[-1].key in names]
  assert len(experts) == 2 * cfg.count(n3jax.Block.MOE)  # one buffer per layer
  for _, a in experts:
    assert a.format.layout.major_to_minor == tuple(range(a.ndim))
  want = inference.generate_tokens(cfg, params, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  got = inference.generate_tokens(cfg, column_major, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  assert [c.token_ids for c in got] == [c.token_ids for c in want]


# --- Sampling ---------------------------------------------------------------------------------------
def test_sampling_filters_and_seeds():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  key = jax.random.key(0)
  sp = inference.sampling_params
  assert (inference.sample(logits, key, sp()) == 0).all()                        # greedy
  for one in (sp(temperature=1.0, top_k=1), sp(temperature=1.0, top_p=0.4), sp(temperature=1.0, min_p=0.9)):
    assert (inference.sample(logits, key, one) == 0).all(), one
  draws = np.asarray(inference.sample(logits, key, sp(temperature=1.0, top_k=2)))
  assert set(draws) == {0, 1} and abs((draws == 0).mean() - 0.5 / 0.8) < 0.05
  draws = np.asarray(inference.sample(logits, key, sp(temperature=1.0, top_p=0.85)))  # keeps 0, 1, 2
  assert set(draws) == {0, 1, 2}
  draws = np.asarray(inference.sample(logits, key, sp(temperature=1.0, min_p=0.2)))   # p >= 0.1: 0, 1, 2
  assert set(draws) == {0, 1, 2}
  free = sp(temperature=1.0)
  np.testing.assert_array_equal(inference.sample(logits, key, free), inference.sample(logits, key, free))
  assert abs((np.asarray(inference.sample(logits, key, sp(temperature=1e-3))) == 0).mean() - 1) < 1e-9
  seen = jnp.zeros((2000, 4), bool).at[:, 0].set(True)
  penalised = inference.sample(logits, key, sp(repetition_penalty=3.0), seen)  # log(.5)*3 < log(.3)
  assert (penalised == 1).all()


def test_sampling_distribution_matches_the_transformers_warpers():
  """Temperature, top-k (ties with the k-th kept), top-p and min-p as transformers' warpers compute them.
  (Which of several tied tokens top-p keeps at its boundary depends on the sort; the top-p cases use rows
  without ties.)"""
  from transformers import generation as hf  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  logits = np.concatenate([rng.randn(6, 50) * 2, np.round(rng.randn(2, 50))], 0).astype(np.float32)  # ties
  logits[6, :6] = [3, 2, 2, 2, 1, 0]
  cases = [dict(temperature=0.7, top_k=2), dict(temperature=1.0, top_k=5, top_p=0.8), dict(temperature=0.9, min_p=0.1),
           dict(temperature=1.3, top_p=0.9, min_p=0.05), dict(temperature=1.0, top_k=60), dict(temperature=0.5)]
  for case in cases:
    warpers = [hf.TemperatureLogitsWarper(case["temperature"])]
    if case.get("top_k"):
      warpers.append(hf.TopKLogitsWarper(case["top_k"]))
    if case.get("top_p"):
      warpers.append(hf.TopPLogitsWarper(case["top_p"]))
    if case.get("min_p"):
      warpers.append(hf.MinPLogitsWarper(case["min_p"]))
    rows = logits[:6] if case.get("top_p") else logits
    scores = torch.from_numpy(rows)
    for w in warpers:
      scores = w(None, scores)
    want = torch.softmax(scores, -1).numpy()
    got = np.asarray(inference.distribution(jnp.asarray(rows), inference.sampling_params(**case)))
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(case))
  tied = np.asarray(inference.distribution(jnp.asarray(logits[6:7]), inference.sampling_params(
      temperature=1.0, top_k=2)))[0, :6]
  assert (tied[1:4] > 0).all() and tied[4] == 0  # the three tokens tied with the 2nd all stay
  draws = np.asarray(inference.sample(jnp.asarray(np.repeat(logits[6:7, :6], 2000, 0)), jax.random.key(1),
                                      inference.sampling_params(temperature=1.0, top_k=2)))
  assert set(draws) == {0, 1, 2, 3}


def test_sampling_options_take_numpy_numbers_and_name_a_bad_type():
  got = inference.sampling_params(top_k=np.int64(5), seed=np.int32(3), temperature=np.float32(0.5))
  assert (got.top_k, got.seed, got.temperature) == (5, 3, 0.5) and type(got.top_k) is int
  for bad, match in [(dict(top_k=2.0), "top_k=2.0 must be an int"), (dict(seed=True), "seed=True must be an int"),
                     (dict(temperature="0.5"), "temperature='0.5' must be a number")]:
    with pytest.raises(ValueError, match="Invalid sampling option: " + match):
      inference.sampling_params(**bad)


def test_generation_config_of_the_checkpoint_gives_the_sampling_defaults(ckpts, tmp_path):
  """As transformers' generate: generation_config.json's do_sample / temperature / top_k / top_p (with
  transformers' defaults for what it leaves out) apply unless the call sets them."""
  _, ckpt, _, _ = ckpts["dense"]
  own = tmp_path / "ckpt"
  os.makedirs(own / "hf_assets")
  for name in ("config.json", "params", "hf_assets/tokenizer.json"):
    os.symlink(os.path.join(ckpt, name), own / name)
  (own / "hf_assets" / "generation_config.json").write_text(
      '{"do_sample": true, "temperature": 0.7, "top_p": 0.9, "eos_token_id": 2}')
  assert inference.checkpoint_sampling(str(own)) == dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0)
  assert inference.checkpoint_sampling(ckpt) == {}  # save_pretrained's file: no sampling, greedy
  kw = dict(reasoning=False, max_new_tokens=6, max_len=64, seed=3)
  got = n3jax.generate(str(own), "hello world", **kw)
  assert got.token_ids == n3jax.generate(ckpt, "hello world", temperature=0.7, top_k=50, top_p=0.9, **kw).token_ids
  greedy = n3jax.generate(str(own), "hello world", temperature=0.0, **kw)  # a call's option wins
  assert greedy.token_ids == n3jax.generate(ckpt, "hello world", **kw).token_ids


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(ckpts):
  _, _, cfg, params = ckpts["dense"]
  run = lambda seed: [c.token_ids for c in inference.generate_tokens(
      cfg, params, PROMPTS, max_new_tokens=6, max_len=MAX_LEN,
      sampling=inference.SamplingParams(temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, seed=seed,
                                        repetition_penalty=1.2))]
  first = run(0)
  assert first == run(0) and first != run(1)


# --- Chat template ----------------------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
                {"role": "assistant", "content": "Rayleigh scattering.", "reasoning_content": "Short light scatters."},
                {"role": "user", "content": "And sunsets?"}, {"role": "assistant", "content": "Longer path."}]


def test_chat_template_agrees_with_the_sft_renderer():
  # SFT: one example per user turn (the conversation has reasoning), each the template's text.
  first, second = (ByteTokenizer().decode(ids) for ids, _ in render_chat(CONVERSATION, ByteTokenizer()))
  assert first == chat.render(CONVERSATION[:3], add_generation_prompt=False)
  assert second == chat.render(CONVERSATION, add_generation_prompt=False)
  assert "Short light" not in second
  prompt = chat.render(CONVERSATION[:4])  # reasoning of turns before the last user turn is dropped
  assert "Short light" not in prompt and "<think></think>\nRayleigh scattering." in prompt
  assert prompt.endswith("<|im_start|>user\nAnd sunsets?<|im_end|>\n<|im_start|>assistant\n<think>\n")
  assert chat.render(CONVERSATION[:2], reasoning=False).endswith("<|im_start|>assistant\n<think></think>")


def test_chat_template_tools_and_tool_calls_round_trip():
  tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now.", "parameters": {
      "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
  call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}}
  msgs = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
          {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}]
  text = chat.render(msgs, tools=tools)
  assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                         "<function>\n<name>weather</name>\n<description>Weather now.</description>\n<parameters>\n"
                         "<parameter>\n<name>city</name>\n<type>string</type>\n</parameter>\n"
                         "<required>[\"city\"]</required>\n</parameters>\n</function>\n</tools>")
  calls = ("<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=weather>\n<parameter=city>\nParis\n"
           "</parameter>\n<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n")
  assert calls in text
  assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>\n"
          "<|im_end|>\n<|im_start|>assistant\n<think>\n") in text
  assert chat.parse_tool_calls(calls) == [{"name": "weather", "arguments": {"city": "Paris", "days": [1, 2]}}]
  assert chat.split_reasoning("a b\n</think>\n\nanswer") == ("a b", "answer")
  assert chat.split_reasoning("answer", started_in_thinking=False) == (None, "answer")


# --- Thinking budget, stop strings, streaming, CLI ------------------------------------------------------
def _chat_prompt(tok, text="hello world why is the sky blue", **kw):
  return chat.encode(tok, chat.render([{"role": "user", "content": text}], **kw))


def test_thinking_budget_closes_the_section_then_the_answer_follows(ckpts, tok):
  _, _, cfg, params = ckpts["dense"]
  close = tok.special("</think>")
  prompt = _chat_prompt(tok)
  assert prompt[-1] == tok.special("<think>")  # reasoning on: the prompt opens the section
  kw = dict(max_new_tokens=8, max_len=64, think_ids=(tok.special("<think>"), close))
  free = inference.generate_tokens(cfg, params, [prompt], **kw)[0].token_ids
  assert close not in free[:4]  # left alone, the model keeps thinking: the budget below is what closes it
  for budget in (0, 3):
    got = inference.generate_tokens(cfg, params, [prompt], thinking_budget=budget, **kw)[0]
    assert got.token_ids[:budget] == free[:budget] and got.token_ids[budget] == close
    assert got.thinking_tokens == budget and len(got.token_ids) == 8  # the answer continues after it
  out = n3jax.generate((cfg, params), "hello world", tokenizer=tok, thinking_budget=2, max_new_tokens=8, max_len=64)
  assert out.thinking_tokens <= 2 and (out.finish_reason == "stop" or "</think>" in out.text)
  with pytest.raises(ValueError, match="thinking_budget=-1"):
    inference.generate_tokens(cfg, params, [prompt], thinking_budget=-1, **kw)


def test_stop_strings_and_streaming(ckpts, tok):
  _, ckpt, cfg, params = ckpts["dense"]
  kw = dict(tokenizer=tok, reasoning=False, max_new_tokens=8, max_len=64)
  full = n3jax.generate((cfg, params), "hello world", **kw)
  words = full.text.split()
  assert full.finish_reason == "length" and len(words) >= 5, full
  stop = " ".join(words[3:5])
  seen = []
  cut = n3jax.generate((cfg, params), "hello world", stop=[stop], on_token=seen.append, **kw)
  assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
  assert "".join(d.text for d in seen) == cut.text and seen[-1].finish_reason == "stop"
  assert [d.token_id for d in seen] == cut.token_ids
  assert n3jax.generate((cfg, params), "hello world", stop=stop, **kw).text == cut.text  # a string: one stop string
  rows = []
  steps = list(inference.stream((cfg, params), ["hello world", "the sky"], rows_out=rows, **kw))
  assert len(steps) == 8 and [len(s) for s in steps] == [2] * 8
  assert rows[0].token_ids == full.token_ids  # batching does not change a row


def test_max_len_bounds_prompt_and_generated_tokens(ckpts):
  """The cache is allocated in whole blocks; generation still stops when prompt + generated reach max_len."""
  _, _, cfg, params = ckpts["dense"]
  got = inference.generate_tokens(cfg, params, [PROMPTS[1], PROMPTS[2]], max_new_tokens=40, max_len=MAX_LEN)
  assert [len(c.token_ids) for c in got] == [MAX_LEN - len(PROMPTS[1])] * 2
  assert all(c.finish_reason == "length" for c in got)
  _, _, cfg, params = ckpts["latent"]  # MTP heads: speculative rounds, then plain steps at the end
  got = inference.generate_tokens(cfg, params, [PROMPTS[1]], max_new_tokens=40, max_len=MAX_LEN, speculative_k=2)
  assert len(got[0].token_ids) == MAX_LEN - len(PROMPTS[1])


def test_raw_prompt_gets_the_tokenizers_bos(ckpts, tok, tmp_path):
  """A raw prompt is encoded as transformers' `tokenizer(prompt)` encodes it: with the BOS a base model's
  tokenizer.json adds. The chat template's text gets none (its markers say where turns start)."""
  _, _, cfg, params = ckpts["dense"]
  hf = tokenizers.Tokenizer.from_file(tok.path)
  bos = hf.token_to_id("<s>")
  hf.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
  hf.save(str(tmp_path / "tokenizer.json"))
  with_bos = load_tokenizer(str(tmp_path), bos_id=bos)
  kw = dict(max_new_tokens=3, max_len=64)
  raw = n3jax.generate((cfg, params), "hello world", tokenizer=with_bos, chat_mode=False, **kw)
  want = inference.generate_tokens(cfg, params, [[bos, *tok.encode("hello world").tolist()]], **kw)[0]
  assert raw.prompt_tokens == 3 and raw.token_ids == want.token_ids
  chat_kw = dict(reasoning=False, **kw)
  assert (n3jax.generate((cfg, params), "hello world", tokenizer=with_bos, **chat_kw).prompt_tokens
          == n3jax.generate((cfg, params), "hello world", tokenizer=tok, **chat_kw).prompt_tokens)


def test_system_turn_goes_before_messages(ckpts, tok):
  _, _, cfg, params = ckpts["dense"]
  kw = dict(tokenizer=tok, reasoning=False, max_new_tokens=2, max_len=64)
  msgs = [{"role": "user", "content": "why is the sky blue"}]
  with_system = n3jax.generate((cfg, params), messages=msgs, system="be brief", **kw)
  explicit = n3jax.generate((cfg, params), messages=[{"role": "system", "content": "be brief"}, *msgs], **kw)
  without = n3jax.generate((cfg, params), messages=msgs, **kw)
  assert with_system.prompt_tokens == explicit.prompt_tokens > without.prompt_tokens
  with pytest.raises(ValueError, match="already have a system turn"):
    n3jax.generate((cfg, params), messages=[{"role": "system", "content": "x"}, *msgs], system="y", **kw)


def test_cli_prints_reasoning_that_the_length_limit_cut(ckpts, capsys, run_cli):
  """A row that ends inside its thinking section: the CLI streams all of it (none held back for a marker)."""
  _, ckpt, _, _ = ckpts["dense"]
  want = n3jax.generate(ckpt, "hello world", max_new_tokens=4, max_len=64)
  assert want.finish_reason == "length" and "</think>" not in want.text and want.text
  assert run_cli("n3jax.generate", f"--ckpt={ckpt}", "--prompt=hello world", "--max_new_tokens=4",
                 "--max_len=64") == 0
  out, err = capsys.readouterr()
  assert err.startswith(want.text + "\n") and not out.strip()


def test_cli_streams_the_answer(ckpts, capsys, run_cli):
  _, ckpt, _, _ = ckpts["dense"]
  assert run_cli("n3jax.generate", f"--ckpt={ckpt}", "--prompt=hello world", "--reasoning=off",
                 "--max_new_tokens=8", "--max_len=64") == 0
  out, err = capsys.readouterr()
  assert out.strip() and "tokens" in err


# --- Bad input -------------------------------------------------------------------------------------
def test_bad_input_gives_one_clear_error(ckpts, tok, tmp_path):
  _, ckpt, cfg, params = ckpts["dense"]
  with pytest.raises(ValueError, match=r"longer than the cache \(max_len=8\)"):
    inference.generate_tokens(cfg, params, [list(range(12))], max_new_tokens=4, max_len=8)
  with pytest.raises(ValueError, match=r"Unknown sampling option\(s\) \['temprature'\]"):
    n3jax.generate(ckpt, "hello", temprature=0.7)
  with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
    n3jax.generate(ckpt, "hello", top_p=0.0)
  for bad, match in [(dict(max_new_tokens=2.0), "max_new_tokens=2.0 must be an int >= 1"),
                     (dict(prefill_chunk=-4), "prefill_chunk=-4 must be an int >= 1"),
                     (dict(thinking_budget=1.5), "thinking_budget=1.5 must be an int >= 0"),
                     (dict(max_len=4), r"longer than the cache \(max_len=4\)")]:
    with pytest.raises(ValueError, match=match):
      n3jax.generate(ckpt, "hello world why is the sky blue", **bad)
  for prompt in ([5, cfg.vocab_size], [5, -1]):
    with pytest.raises(ValueError, match=r"prompt 0 has token id -?\d+, outside the model's vocabulary"):
      inference.generate_tokens(cfg, params, [prompt], max_new_tokens=2, max_len=MAX_LEN)
  bare = tmp_path / "no_tokenizer"
  os.makedirs(bare)
  for name in ("config.json", "params"):
    os.symlink(os.path.join(ckpt, name), bare / name)
  with pytest.raises(FileNotFoundError, match="has no tokenizer"):
    n3jax.generate(str(bare), "hello")
  with pytest.raises(ValueError, match="no tokens"):
    inference.left_align([[1, 2], []])
