"""Generation on a device mesh: params and caches sharded, the same greedy tokens as on one device, the
cache keeping its layout through decoding, decode compiled once, and clear errors for shapes that do not split.

A tiny random hybrid (Mamba, attention, MLP) on the 8 fake CPU devices of `conftest.py`.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from n3jax import models, sharding
from n3jax.configs import PRESETS, Block
from n3jax.inference import SamplingParams, _engine, generate_tokens, prefill

CFG = PRESETS["tiny-dense"]  # 8 Mamba heads, 2 groups, 2 KV heads: all split over tensor=2
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
LAYOUT = "fsdp_tp_ep"
PROMPTS = [[5, 17, 9, 33], [40, 2, 71, 8, 8, 19], [7], [3, 3, 100, 4, 200]]  # 4 rows over 4 batch shards
NEW, MAX_LEN = 6, 16


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh(MESH)
  params = jax.jit(lambda k: models.init(CFG, k))(jax.random.key(0))
  return mesh, params


def test_cache_logical_axes_mirror_init_cache():
  shapes = jax.eval_shape(lambda: models.init_cache(CFG, 4, MAX_LEN))
  axes = models.cache_logical_axes(CFG)
  is_spec = lambda x: isinstance(x, P)
  assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_spec)
  for a, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_spec)):
    assert len(spec) == a.ndim


def test_greedy_on_mesh_matches_one_device(setup):
  mesh, params = setup
  one = generate_tokens(CFG, params, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN)
  split = generate_tokens(CFG, params, PROMPTS, max_new_tokens=NEW, max_len=MAX_LEN, mesh=mesh,
                          layout=LAYOUT)  # params placed with `sharding.param_shardings` on the way in
  assert [c.token_ids for c in split] == [c.token_ids for c in one]
  assert all(len(c.token_ids) == NEW for c in split)
  # the compiled decode step of this shape was traced and compiled once for all NEW - 1 steps
  steps = _engine.sharded_steps(CFG, mesh, LAYOUT, len(PROMPTS), MAX_LEN)
  assert steps._decode_sample._cache_size() == 1


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_greedy_on_mesh_with_the_conv_ssm_decode_kernels(setup, monkeypatch, backend):
  """The one-token kernels (`ssd_backend="pallas"`, interpreted on CPU: the GPU's Triton conv + SSM kernel,
  the TPU's Mosaic SSM kernel) run per batch and head shard (`sharding.per_shard`: heads, groups, their
  windows and conv weights split over tensor) and give the one-device tokens."""
  from n3jax.nn import _mamba2  # pylint: disable=g-import-not-at-top
  from pallas_kernels.ssd import ops_decode  # pylint: disable=g-import-not-at-top
  shapes = []
  name = "_conv_decode_call" if backend == "triton" else "_ssd_decode_tpu"
  call = getattr(ops_decode, name)

  def kernel(state, *args, **kw):
    shapes.append(state.shape)
    return call(state, *args, **kw)

  monkeypatch.setattr(ops_decode, name, kernel)
  monkeypatch.setitem(_mamba2.DECODE_BACKENDS, "pallas", dict(backend=backend, interpret=True))
  _engine.sharded_steps.cache_clear()  # the steps trace the backend they are first called with
  mesh, params = setup
  one = generate_tokens(CFG, params, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  split = generate_tokens(CFG.replace(ssd_backend="pallas"), params, PROMPTS, max_new_tokens=3, max_len=MAX_LEN,
                          mesh=mesh, layout=LAYOUT)
  assert [c.token_ids for c in split] == [c.token_ids for c in one]
  m, p, q = CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.ssm_state_size
  assert set(shapes) == {(1, m // 2, p, q)}  # 4 rows over 4 batch shards, heads over tensor=2


@pytest.mark.parametrize("gather_rows", [0, 4])
def test_moe_greedy_on_a_tensor_mesh_splits_the_experts_hidden_width(monkeypatch, gather_rows):
  """A MoE model decoding on a mesh whose `tensor` axis splits the experts' hidden width: each device runs
  its F-slice of every expert (`expert_parallel_moe(tensor_axis=)`; before, XLA gathered every expert weight
  whole onto each device, every step, around the opaque kernels) and the partial products meet in a psum.
  Through the sorted dispatch (ragged_dot), and with `moe_gather_max_rows` through the gathered-expert kernels
  (Triton, interpreted) for the one-token steps: the one-device greedy tokens."""
  from pallas_kernels.moe import gathered, reference  # pylint: disable=g-import-not-at-top
  cfg = PRESETS["tiny-moe"].replace(moe_gather_max_rows=gather_rows,
                                    moe_backend="pallas" if gather_rows else "ragged_dot")
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})  # 2 KV heads
  params = jax.jit(lambda k: models.init(cfg, k))(jax.random.key(1))
  prompts = PROMPTS
  widths = []
  real = reference.sorted_dispatch
  monkeypatch.setattr(reference, "sorted_dispatch",
                      lambda *a, **kw: (widths.append(a[3].shape[-1]), real(*a, **kw))[1])
  gathered_widths = []
  rows_call = gathered._rows_call_triton  # pylint: disable=protected-access
  monkeypatch.setattr(gathered, "_rows_call_triton", lambda ids, x, w, **kw: (
      gathered_widths.append(w.shape[2]) if kw["activation"] else None, rows_call(ids, x, w, **kw))[1])
  one = generate_tokens(cfg.replace(moe_gather_max_rows=0, moe_backend="ragged_dot"), params, prompts,
                        max_new_tokens=4, max_len=MAX_LEN)
  widths.clear()
  split = generate_tokens(cfg, params, prompts, max_new_tokens=4, max_len=MAX_LEN, mesh=mesh, layout=LAYOUT)
  assert [c.token_ids for c in split] == [c.token_ids for c in one]
  # the params' init traces the whole experts first; then prefill's sorted dispatch and, with gather_rows,
  # the decoding steps' gathered kernels see half of each expert's hidden width
  assert widths[-1] == cfg.moe_intermediate_size // 2, widths
  assert set(gathered_widths) == ({cfg.moe_intermediate_size // 2} if gather_rows else set()), gathered_widths


def test_a_column_major_embedding_table_is_placed_row_major_on_the_mesh(setup):
  """As on one device (tests/test_inference.py), for the table's shards: a TPU keeps [V / n, D] shards with
  V minor when D is no multiple of 128; placing the params for the mesh puts them row-major, in the table's
  sharding, and the mesh still gives the one-device tokens."""
  from jax.experimental.layout import Format, Layout  # pylint: disable=g-import-not-at-top
  mesh, params = setup
  table = params["embedder"]["embedding"]
  column_major = {**params, "embedder": {"embedding": jax.device_put(table, Format(Layout((1, 0)), table.sharding))}}
  placed = _engine.place_params(CFG, column_major, mesh, LAYOUT)
  want = sharding.param_shardings(CFG, mesh, LAYOUT)["embedder"]["embedding"]
  assert placed["embedder"]["embedding"].format.layout.major_to_minor == (0, 1)
  assert placed["embedder"]["embedding"].sharding.is_equivalent_to(want, 2)
  np.testing.assert_array_equal(placed["embedder"]["embedding"], table)
  one = generate_tokens(CFG, params, PROMPTS, max_new_tokens=3, max_len=MAX_LEN)
  split = generate_tokens(CFG, placed, PROMPTS, max_new_tokens=3, max_len=MAX_LEN, mesh=mesh, layout=LAYOUT)
  assert [c.token_ids for c in split] == [c.token_ids for c in one]


def test_cache_keeps_its_shardings(setup):
  mesh, params = setup
  steps = _engine.sharded_steps(CFG, mesh, LAYOUT, len(PROMPTS), MAX_LEN)  # the steps of the test above
  params = steps.place(params)
  tokens, segments = _engine.left_align(PROMPTS, length=8)
  logits, cache = prefill(CFG, params, tokens, segments, max_len=MAX_LEN, mesh=mesh, layout=LAYOUT)
  sampling = SamplingParams()
  state = _engine.sampling_state(CFG, tokens, segments, sampling)
  forced = np.full((len(PROMPTS),), -1, np.int32)
  token, state = steps.choose(logits, state, forced, sampling=sampling)
  for _ in range(2):
    token, cache, state = steps.decode_sample(params, cache, token, state, forced, sampling=sampling)
  # One buffer per layer (`models.unstack_cache`), each sharded like its slice of the stack; weights likewise.
  expected = sharding.cache_shardings(CFG, mesh, LAYOUT, batch=len(PROMPTS), max_len=MAX_LEN, per_layer=True)
  assert jax.tree.structure(cache) == jax.tree.structure(expected)
  for a, s in zip(jax.tree.leaves(cache), jax.tree.leaves(expected)):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
  batch = ("data", "fsdp", "expert")
  assert len(cache["mamba"]) == CFG.count(Block.MAMBA) and len(cache["attention"]) == CFG.count(Block.ATTENTION)
  assert cache["mamba"][0]["ssm"].sharding.spec == P(batch, "tensor", None, None)
  assert cache["mamba"][0]["conv_B"].sharding.spec == P(batch, None, "tensor", None)
  assert cache["attention"][0]["k"].sharding.spec == P(batch, "tensor", None, None)
  stacked = sharding.param_shardings(CFG, mesh, LAYOUT)["layers"]["attention"]["mixer"]["k_proj"]
  assert params["layers"]["attention"][0]["mixer"]["k_proj"].sharding.spec == P(*stacked.spec[1:])
  assert cache["segment_ids"].sharding.spec == P(batch, None)
  assert int(cache["index"]) == 10
  assert steps._decode_sample._cache_size() == 1  # still the one compiled decode step


def test_shapes_that_do_not_split(setup):
  mesh, params = setup
  with pytest.raises(ValueError, match=r"a batch of 3 rows cannot be split .* 3 % 4 != 0"):
    generate_tokens(CFG, params, PROMPTS[:3], max_new_tokens=2, max_len=MAX_LEN, mesh=mesh, layout=LAYOUT)
  odd = CFG.replace(num_key_value_heads=1, num_attention_heads=1)
  with pytest.raises(ValueError, match=r"1 kv_heads cannot be split .*tensor.* 1 % 2 != 0"):
    _engine.sharded_steps(odd, mesh, LAYOUT, 4, MAX_LEN)
  with pytest.raises(ValueError, match="needs both mesh= and layout="):
    generate_tokens(CFG, params, PROMPTS, max_new_tokens=2, mesh=mesh)


def test_checkpoint_is_read_into_its_shards(setup, tmp_path):
  """`n3jax.generate(ckpt_dir, mesh=, layout=)` restores each param straight into its shards (and casts on
  the way, as fine-tuning from a bf16 checkpoint does); the tokens are those of the in-memory params."""
  import n3jax  # pylint: disable=g-import-not-at-top
  from n3jax import checkpointing, data  # pylint: disable=g-import-not-at-top
  mesh, params = setup
  checkpointing.save_params(str(tmp_path), CFG, params)
  shardings = sharding.param_shardings(CFG, mesh, LAYOUT)
  restored = checkpointing.load_params(str(tmp_path), shardings=shardings, dtypes=np.float32)
  for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="shardings do not match the params"):
    checkpointing.load_params(str(tmp_path), shardings={"embedder": shardings["embedder"]})
  text = ["ab", "cd", "ef", "gh"]
  tok = data.ByteTokenizer()
  kw = dict(tokenizer=tok, chat_mode=False, max_new_tokens=3, max_len=MAX_LEN)
  on_mesh = n3jax.generate(str(tmp_path), text, mesh=mesh, layout=LAYOUT, **kw)
  assert [g.token_ids for g in on_mesh] == [g.token_ids for g in n3jax.generate((CFG, params), text, **kw)]
