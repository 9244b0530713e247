"""HF <-> n3jax conversion: bit-exact round trips, sharded layouts, bad input, CLIs, peak host memory."""

import json
import os
import re
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_convert
import n3jax
from checkpoint_convert import _keymap, _safetensors
from n3jax import checkpointing, models
from n3jax.configs import PRESETS, ModelConfig, parse_pattern
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(hf_dir):
  infos = checkpoint_convert.read_hf_tensor_index(hf_dir)
  return {k: _safetensors.read_tensor(i) for k, i in infos.items()}


def _assert_same_bytes(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
  out = {}
  for kind in sorted(hf_fixtures.HF_CONFIGS):
    model = hf_fixtures.build_hf_model(kind)
    path = str(tmp_path_factory.mktemp(f"hf_{kind}"))
    hf_fixtures.save_hf_checkpoint(model, path, with_mtp=bool(model.config.num_nextn_predict_layers),
                                   max_shard_size="20KB" if kind == "moe" else None)
    out[kind] = (model, path)
  return out


@pytest.mark.parametrize("kind", sorted(hf_fixtures.HF_CONFIGS))
def test_hf_to_n3jax_to_hf_is_byte_identical(hf_checkpoints, kind, tmp_path):
  model, hf_dir = hf_checkpoints[kind]
  n3jax.convert_from_hf(hf_dir, str(tmp_path / "n3"))
  n3jax.convert_to_hf(str(tmp_path / "n3"), str(tmp_path / "hf"), max_shard_bytes=30_000)
  original, exported = _tensors(hf_dir), _tensors(str(tmp_path / "hf"))
  _assert_same_bytes(original, exported)
  if model.config.num_nextn_predict_layers:
    assert any(k.startswith("mtp.") for k in exported)  # MTP tensors are kept, not dropped
  assert len({os.path.basename(i.path) for i in checkpoint_convert.read_hf_tensor_index(str(tmp_path / "hf")).values()
              }) > 1  # sharded, with an index
  # The exported directory loads in transformers and gives the same logits.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = torch.tensor(hf_fixtures.random_tokens(model.config.vocab_size, 2, 9), dtype=torch.long)
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy())
  # n3jax's own load API serves the converted checkpoint.
  cfg, params = n3jax.load(str(tmp_path / "n3"))
  with torch.no_grad():
    want = model(tokens).logits.numpy()
  np.testing.assert_allclose(np.asarray(n3jax.forward(cfg, params, jnp.asarray(tokens.numpy()))), want, atol=1e-4)


def test_bf16_checkpoint_keeps_every_dtype(tmp_path):
  model = hf_fixtures.build_hf_model("moe").to(torch.bfloat16)
  for layer in model.model.layers:  # hub BF16 files keep the router correction biases in fp32 (§6)
    if hasattr(layer.mixer, "gate"):
      layer.mixer.gate.e_score_correction_bias.data = layer.mixer.gate.e_score_correction_bias.data.float()
  hf_fixtures.save_hf_checkpoint(model, str(tmp_path / "hf"))
  original = _tensors(str(tmp_path / "hf"))
  cfg = n3jax.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "n3"))
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  params = checkpointing.load_params(str(tmp_path / "n3"), as_numpy=True)
  assert params["layers"]["mamba"]["mixer"]["in_proj_x"].dtype.name == "bfloat16"
  n3jax.convert_to_hf(str(tmp_path / "n3"), str(tmp_path / "back"))
  _assert_same_bytes(original, _tensors(str(tmp_path / "back")))


@pytest.mark.parametrize("preset", ["tiny-latent-moe", "tiny-moe"])
def test_n3jax_to_hf_to_n3jax_is_identical(preset, tmp_path):
  cfg = PRESETS[preset].replace(param_dtype="bfloat16")
  params = jax.tree.map(np.asarray, models.init(cfg, jax.random.key(1)))
  checkpointing.save_params(str(tmp_path / "a"), cfg, params)
  checkpoint_convert.convert_to_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
  checkpoint_convert.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "b"))
  back = checkpointing.load_params(str(tmp_path / "b"), as_numpy=True)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(back)):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)
  back_cfg = checkpointing.load_config(str(tmp_path / "b"))
  assert back_cfg.dtype == "bfloat16"  # HF configs carry one dtype: the checkpoint's, which becomes the compute dtype
  assert back_cfg.replace(hf_extra=(), dtype=cfg.dtype) == cfg.replace(hf_extra=())


def test_every_hf_tensor_consumed_exactly_once():
  for name, cfg in PRESETS.items():
    targets = list(_keymap.hf_targets(cfg))
    names = [n for n, _ in targets]
    assert len(names) == len(set(names)), name
  # ARCHITECTURE.md §5.3: the Super BF16 checkpoint has 42,683 tensors.
  assert len(list(_keymap.hf_targets(PRESETS["nemotron-3-super-120b-a12b"]))) == 42_683


# --- Bad input: one clear error, and nothing at --out ---
def _copy_hf(hf_checkpoints, tmp_path, kind="dense"):
  import shutil
  dst = tmp_path / "hf"
  shutil.copytree(hf_checkpoints[kind][1], dst)
  return dst


def _single_file(d):
  return os.path.join(d, "model.safetensors")


def _rewrite(path, edit):
  """Rewrites a safetensors file with `edit(dict of arrays)` applied."""
  tensors = {k: _safetensors.read_tensor(i) for k, i in _safetensors.read_header(path).items()}
  edit(tensors)
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  _safetensors.write_file(path, specs, lambda k: tensors[k])


def _set_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))


def _set_legacy_pattern(d, pattern):
  cfg = json.loads((d / "config.json").read_text())
  cfg.pop("layers_block_type")
  cfg["hybrid_override_pattern"] = pattern
  (d / "config.json").write_text(json.dumps(cfg))


_K, _K2 = "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D"
_SE, _CE = checkpoint_convert.SafetensorsError, checkpoint_convert.ConversionError


def _raw_header(path):
  """(header dict, data section bytes) of a safetensors file."""
  blob = open(path, "rb").read()
  (n,) = struct.unpack("<Q", blob[:8])
  return json.loads(blob[8:8 + n]), blob[8 + n:]


def _put_header(path, header, data):
  """Writes `header` (a JSON-able value, or the JSON text itself) and `data` as a safetensors file."""
  blob = (header if isinstance(header, str) else json.dumps(header)).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(path, edit):
  header, data = _raw_header(path)
  got = edit(header, data)
  _put_header(path, header, data if got is None else got)


def _negative_offset(header, data):
  begin, end = header[_K]["data_offsets"]
  header[_K]["data_offsets"] = [-(end - begin), 0]


def _name_twice(d):
  """A_log listed a second time, with D's offsets: plain json.loads keeps the last entry."""
  header, data = _raw_header(_single_file(d))
  items = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in [*header.items(), (_K, header[_K2])]]
  _put_header(_single_file(d), "{" + ",".join(items) + "}", data)


def _index(d):
  return d / "model.safetensors.index.json"


def _edit_index(d, edit):
  index = json.loads(_index(d).read_text())
  edit(index, index["weight_map"])
  _index(d).write_text(json.dumps(index))


def _shard_of(d, key=_K):
  return json.loads(_index(d).read_text())["weight_map"][key]


def _index_key_twice(d):
  """The index names A_log's shard twice, first wrongly; plain json.loads keeps the last (right) one."""
  text, right = _index(d).read_text(), _shard_of(d)
  other = min(set(json.loads(text)["weight_map"].values()) - {right})
  _index(d).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{_K}": "{other}", ', 1))


def _extra_shard(d, name):
  _safetensors.write_file(str(d / name), [("backbone.layers.0.mixer.foo", (3,), np.dtype(np.float32))],
                          lambda k: np.zeros(3, np.float32))


BAD_INPUTS = {
    "truncated": (lambda d: os.truncate(_single_file(d), os.path.getsize(_single_file(d)) - 100),
                  checkpoint_convert.SafetensorsError, "truncated file"),
    "garbage_header": (lambda d: open(_single_file(d), "r+b").write(struct.pack("<Q", 10**12)),
                       checkpoint_convert.SafetensorsError, "corrupted or truncated safetensors header"),
    "missing_tensor": (lambda d: _rewrite(_single_file(d), lambda t: t.pop("backbone.layers.2.mixer.k_proj.weight")),
                       checkpoint_convert.ConversionError, r"missing .*backbone.layers.2.mixer.k_proj.weight"),
    "unknown_tensor": (lambda d: _rewrite(_single_file(d), lambda t: t.update(stray=np.zeros(3, np.float32))),
                       checkpoint_convert.ConversionError, r"unknown tensor.*stray"),
    "wrong_shape": (lambda d: _rewrite(_single_file(d), lambda t: t.update(
        {"backbone.layers.1.mixer.up_proj.weight": np.zeros((47, 32), np.float32)})),
                    checkpoint_convert.ConversionError, r"backbone.layers.1.mixer.up_proj.weight.*\[47, 32\]"),
    "unknown_config_field": (lambda d: _set_config(d, mystery_knob=3), ValueError, r"mystery_knob"),
    "unknown_block_symbol": (lambda d: _set_legacy_pattern(d, "M-*X-"), ValueError, r"unknown symbol\(s\) \['X'\]"),
    # Damaged safetensors headers that used to convert silently into wrong tensors.
    "st_negative_offset": (lambda d: _edit_header(_single_file(d), _negative_offset), _SE,
                           rf"model.safetensors: tensor '{_K}' has a malformed header entry .*-32, 0"),
    "st_offsets_alias_another_tensor": (
        lambda d: _edit_header(_single_file(d), lambda h, _: h[_K].update(data_offsets=h[_K2]["data_offsets"])),
        _SE, rf"model.safetensors: corrupted safetensors header: tensor '{_K}' begins at"),
    "st_name_twice": (_name_twice, _SE,
                      rf"model.safetensors: corrupted safetensors header \(key '{_K}' appears more than once\)"),
    "st_trailing_bytes": (lambda d: _edit_header(_single_file(d), lambda h, data: data + bytes(1000)),
                          _SE, r"model.safetensors: .* \(1000 trailing\)"),
    "st_float_shape": (lambda d: _edit_header(_single_file(d), lambda h, _: h[_K].update(shape=[8.7])),
                       _SE, rf"model.safetensors: tensor '{_K}' has a malformed header"),
    "st_header_is_a_list": (lambda d: _put_header(_single_file(d), [1], b""), _SE,
                            r"model.safetensors: corrupted safetensors header \(a JSON list, not an object\)"),
    # A dtype n3jax cannot hold bit-exactly (JAX without x64 would narrow it to float32).
    "float64_tensor": (lambda d: _rewrite(_single_file(d), lambda t: t.update({_K: t[_K].astype(np.float64)})),
                       _CE, rf"Tensor '{_K}' is stored as float64"),
    # Safetensors files that would be ignored.
    "stray_shard_beside_index": (lambda d: _extra_shard(d, "model-extra.safetensors"), _CE,
                                 r"\['model-extra.safetensors'\] not listed in model.safetensors.index.json", "moe"),
    "single_file_beside_index": (lambda d: _extra_shard(d, "model.safetensors"), _CE,
                                 r"\['model.safetensors'\] not listed in model.safetensors.index.json", "moe"),
    "stray_file_beside_single_file": (lambda d: _extra_shard(d, "extra.safetensors"), _CE,
                                      r"\['extra.safetensors'\] beside model.safetensors"),
    # Damaged or odd JSON: an error naming the file.
    "index_is_a_list": (lambda d: _index(d).write_text("[1, 2]"), _CE,
                        r"model.safetensors.index.json: the shard index must be a JSON object, got a list", "moe"),
    "index_truncated": (lambda d: _index(d).write_text("{"), _CE,
                        r"model.safetensors.index.json: the shard index is not valid JSON", "moe"),
    "index_value_null": (lambda d: _edit_index(d, lambda j, wm: wm.update({_K: None})), _CE,
                         rf"model.safetensors.index.json: weight_map\['{_K}'\] must be a file name, got None", "moe"),
    "index_value_number": (lambda d: _edit_index(d, lambda j, wm: wm.update({_K: 1})), _CE,
                           rf"model.safetensors.index.json: weight_map\['{_K}'\] must be a file name, got 1", "moe"),
    "index_weight_map_is_a_list": (lambda d: _edit_index(d, lambda j, wm: j.update(weight_map=list(wm))), _CE,
                                   r"model.safetensors.index.json: no 'weight_map' object", "moe"),
    "index_key_twice": (_index_key_twice, _CE,
                        rf"model.safetensors.index.json: .*key '{_K}' appears more than once", "moe"),
    "config_truncated": (lambda d: (d / "config.json").write_text("{"), _CE,
                         r"config.json: the HF config is not valid JSON"),
    "config_is_a_list": (lambda d: (d / "config.json").write_text("[]"), _CE,
                         r"config.json: the HF config must be a JSON object, got a list"),
    # Legacy and 5.x spellings that disagree (transformers 5.24 silently takes mamba_n_groups).
    "config_legacy_spelling_disagrees": (lambda d: _set_config(d, mamba_n_groups=1), ValueError,
                                         r"both mamba_n_groups=1 and n_groups=2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(hf_checkpoints, tmp_path, case):
  damage, error, match, *kind = BAD_INPUTS[case]
  hf_dir = _copy_hf(hf_checkpoints, tmp_path, *kind)
  damage(hf_dir)
  out = tmp_path / "out"
  with pytest.raises(error, match=match):
    n3jax.convert_from_hf(str(hf_dir), str(out))
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp leftovers


def test_index_value_with_dot_slash_is_the_same_file(hf_checkpoints, tmp_path):
  hf_dir = _copy_hf(hf_checkpoints, tmp_path, "moe")
  _edit_index(hf_dir, lambda j, wm: wm.update({k: "./" + v for k, v in wm.items()}))
  got = checkpoint_convert.read_hf_tensor_index(str(hf_dir))
  want = checkpoint_convert.read_hf_tensor_index(hf_checkpoints["moe"][1])
  assert {k: (i.offset, os.path.basename(i.path)) for k, i in got.items()} == {
      k: (i.offset, os.path.basename(i.path)) for k, i in want.items()}


def _tiny_file(path):
  """Two small tensors written by our writer; returns the path."""
  _safetensors.write_file(str(path), [("a", (2, 3), np.dtype(np.float32)), ("b", (4,), np.dtype(np.float16))],
                          lambda k: np.ones((2, 3), np.float32) if k == "a" else np.ones(4, np.float16))
  return str(path)


@pytest.mark.parametrize("entry", [
    dict(dtype="F32", shape=[2.0, 3], data_offsets=[0, 24]),        # float dim (int() would accept it)
    dict(dtype="F32", shape=[True, 2, 3], data_offsets=[0, 24]),    # bool dim (int(True) == 1)
    dict(dtype="F32", shape=[2, 3], data_offsets=[0.0, 24]),        # float offset
    dict(dtype="F32", shape=[2, 3], data_offsets=[False, 24]),      # bool offset
    dict(dtype="F32", shape=[2, 3], data_offsets=["0", "24"]),      # string offsets
    dict(dtype="F32", shape=[-2, -3], data_offsets=[0, 24]),        # negative dims, product still 6
    dict(dtype="F32", shape=[2, 3], data_offsets=[0, 24, 32]),      # three offsets
    dict(dtype="F32", shape=[2, 3], data_offsets=[24, 0]),          # end before begin
    dict(dtype="F32", shape=(2, 3)),                                # no offsets
    dict(dtype="U16", shape=[2, 3], data_offsets=[0, 24]),          # unknown dtype
    "F32",                                                          # not an object
])
def test_read_header_rejects_malformed_entries(tmp_path, entry):
  path = _tiny_file(tmp_path / "x.safetensors")
  _edit_header(path, lambda h, _: h.update(a=entry))
  with pytest.raises(_SE, match=r"x.safetensors: tensor 'a' has a malformed header"):
    _safetensors.read_header(path)


@pytest.mark.parametrize("header, match", [
    ('"ab"', r"a JSON str, not an object"),
    ("7", r"a JSON int, not an object"),
    ('{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "a": {"dtype": "F16", "shape": [4], '
     '"data_offsets": [24, 32]}}', r"key 'a' appears more than once"),
    ({"__metadata__": ["pt"]}, r"__metadata__ must map str to str"),
    ({"__metadata__": {"format": 1}}, r"__metadata__ must map str to str"),
])
def test_read_header_rejects_malformed_headers(tmp_path, header, match):
  path = _tiny_file(tmp_path / "x.safetensors")
  _, data = _raw_header(path)
  if isinstance(header, dict):
    h, _ = _raw_header(path)
    header = json.dumps({**h, **header})
  _put_header(path, header, data)
  with pytest.raises(_SE, match="x.safetensors: .*" + match):
    _safetensors.read_header(path)


@pytest.mark.parametrize("offsets, match", [
    ({"a": [8, 32]}, r"tensor 'a' begins at byte 8 of the data section but the data section starts at 0 \(gap\)"),
    ({"b": [16, 24]}, r"tensor 'b' begins at byte 16 .* previous tensor 'a' ends at 24 \(overlap\)"),
    ({"b": [0, 8]}, r"tensor 'a' begins at byte 0 .* previous tensor 'b' ends at 8 \(overlap\)"),
])
def test_read_header_requires_tensors_to_tile_the_data(tmp_path, offsets, match):
  path = _tiny_file(tmp_path / "x.safetensors")
  header, data = _raw_header(path)
  for k, v in offsets.items():
    header[k]["data_offsets"] = v
  _put_header(path, header, data)
  with pytest.raises(_SE, match="x.safetensors: corrupted safetensors header: " + match):
    _safetensors.read_header(path)


def test_read_header_accepts_reference_files(tmp_path):
  """Files from the reference writer (metadata, an empty tensor, several dtypes) read back exactly."""
  stnp = pytest.importorskip("safetensors.numpy")
  tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 4), np.float16),
             "i": np.arange(3, dtype=np.int64), "flag": np.array([True, False])}
  stnp.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "np"})
  infos = _safetensors.read_header(str(tmp_path / "ref.safetensors"))
  assert sorted(infos) == sorted(tensors)
  for k, v in tensors.items():
    got = _safetensors.read_tensor(infos[k])
    assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes(), k
  _edit_header(str(tmp_path / "ref.safetensors"), lambda h, _: h.update(__metadata__=None))  # null: allowed too
  assert sorted(_safetensors.read_header(str(tmp_path / "ref.safetensors"))) == sorted(tensors)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint64, np.int32, np.bool_])
def test_hf_to_params_rejects_dtypes_it_cannot_hold(dtype):
  """Checked from the headers: nothing is read, and the error names the tensor and its dtype."""
  cfg = PRESETS["tiny-dense"]
  tensors = {n: (t.rule.hf_shape, np.dtype(np.float32)) for n, t in _keymap.hf_targets(cfg)}
  name = next(n for n in tensors if n.endswith("mixer.D"))
  tensors[name] = (tensors[name][0], np.dtype(dtype))

  def read(n):
    raise AssertionError(f"read {n} before the dtype check")

  with pytest.raises(_CE, match=rf"'{name}' is stored as {np.dtype(dtype).name}"):
    checkpoint_convert.hf_to_params(cfg, tensors, read)


def test_existing_output_is_not_clobbered(hf_checkpoints, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(checkpoint_convert.ConversionError, match="exists and is not empty"):
    n3jax.convert_from_hf(hf_checkpoints["dense"][1], str(tmp_path / "out"))
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_damaged_n3jax_checkpoint_is_reported(tmp_path):
  cfg = PRESETS["tiny-dense"]
  checkpointing.save_params(str(tmp_path / "ck"), cfg, jax.tree.map(np.asarray, models.init(cfg, jax.random.key(0))))
  os.remove(tmp_path / "ck" / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    n3jax.convert_to_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_changed_bytes_in_an_n3jax_checkpoint_are_reported(tmp_path):
  """Orbax reads back whatever bytes are on disk; the fingerprints save_params writes catch a change."""
  import glob  # pylint: disable=g-import-not-at-top
  cfg = PRESETS["tiny-dense"]
  params = jax.tree.map(np.asarray, models.init(cfg, jax.random.key(0)))
  checkpointing.save_params(str(tmp_path / "ck"), cfg, params)
  f32 = checkpointing.load_params(str(tmp_path / "ck"), dtypes=jnp.float32)  # a wider read is checked too
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(f32), params)
  largest = max(glob.glob(str(tmp_path / "ck" / "params" / "**" / "d" / "*"), recursive=True), key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0x55
  open(largest, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=r"is a damaged n3jax checkpoint: 1 param\(s\) differ from the fingerprints"):
    n3jax.convert_to_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# --- config.json: a legacy spelling beside its 5.x name must agree (transformers 5.24 silently picks one) ---
_LEGACY_PAIRS = [  # (legacy, 5.x name, a value different from tiny-moe's)
    ("mamba_n_groups", "n_groups", 1), ("mamba_d_conv", "conv_kernel", 2), ("mamba_expand", "expand", 3),
    ("mamba_dt_min", "time_step_min", 0.01), ("mamba_dt_max", "time_step_max", 0.2),
    ("mamba_dt_limit", "time_step_limit", [0.0, 5.0]), ("mamba_dt_init_floor", "time_step_floor", 1e-3),
    ("mamba_conv_bias", "use_conv_bias", False), ("mamba_chunk_size", "chunk_size", 4),
    ("num_local_experts", "n_routed_experts", 4), ("layer_types", "layers_block_type", ["mlp"] * 6),
]


def _tiny_moe_hf():
  hf = PRESETS["tiny-moe"].replace(num_nextn_predict_layers=1, mtp_blocks=parse_pattern("*E")).to_hf()
  hf["expand"] = 2  # carried verbatim
  return hf


@pytest.mark.parametrize("legacy, new, other", _LEGACY_PAIRS, ids=[p[0] for p in _LEGACY_PAIRS])
def test_hf_config_legacy_and_new_spelling_must_agree(legacy, new, other):
  hf = _tiny_moe_hf()
  with pytest.raises(ValueError, match=re.escape(f"both {legacy}={other!r} and {new}={hf[new]!r}")):
    ModelConfig.from_hf({**hf, legacy: other})
  assert ModelConfig.from_hf({**hf, legacy: hf[new]}) == ModelConfig.from_hf(hf)  # agreeing: accepted


def test_hf_config_agreeing_spellings_compare_by_meaning():
  hf = _tiny_moe_hf()
  old_names = {"linear_attention": "mamba", "full_attention": "attention"}  # transformers <= 5.10
  legacy_names = [old_names.get(t, t) for t in hf["layers_block_type"]]
  same = {**hf, "mamba_dt_limit": [0.0, float("inf")], "layer_types": legacy_names,
          "hybrid_override_pattern": PRESETS["tiny-moe"].pattern, "mtp_hybrid_override_pattern": "*E"}
  assert hf["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
  assert ModelConfig.from_hf(same) == ModelConfig.from_hf(hf)


@pytest.mark.parametrize("list_field, pattern_field, pattern", [
    ("layers_block_type", "hybrid_override_pattern", "MMMMMM"),
    # transformers 5.24 takes the MTP pattern when the list is its default ['full_attention', 'moe'].
    ("mtp_layers_block_type", "mtp_hybrid_override_pattern", "*E*E"),
])
def test_hf_config_block_list_and_pattern_must_agree(list_field, pattern_field, pattern):
  hf = _tiny_moe_hf()
  match = rf"both {list_field}=\[.*\] \(pattern '.*'\) and {pattern_field}='{re.escape(pattern)}'"
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf({**hf, pattern_field: pattern})


# --- CLIs ---
def _run(args, **kw):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=300, **kw)


def test_cli_round_trip_and_error(hf_checkpoints, tmp_path):
  hf_dir = hf_checkpoints["latent"][1]
  r = _run(["checkpoint_convert.hf_to_n3jax", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'n3'}"])
  assert r.returncode == 0, r.stderr
  r = _run(["checkpoint_convert.n3jax_to_hf", f"--ckpt={tmp_path / 'n3'}", f"--out={tmp_path / 'hf'}"])
  assert r.returncode == 0, r.stderr
  _assert_same_bytes(_tensors(hf_dir), _tensors(str(tmp_path / "hf")))
  r = _run(["checkpoint_convert.hf_to_n3jax", f"--hf_dir={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}"])
  assert r.returncode != 0 and "no config.json" in r.stderr and not (tmp_path / "x").exists()


# --- Peak host memory: about one copy of the weights ---
# Imports and the JAX backend start first; then the kernel's high-water mark is reset (Linux clear_refs
# value 5) so VmHWM measures the conversion alone, relative to the resident size just before it.
_MEASURE = """
import runpy, sys
import jax, orbax.checkpoint, checkpoint_convert, n3jax
jax.devices()
def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1])
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print("DELTA_KB", status("VmHWM:") - before)
"""


def _peak_delta_mb(module, *args):
  r = subprocess.run([sys.executable, "-c", _MEASURE, module, *args], capture_output=True, text=True, cwd=REPO,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return int(r.stdout.split("DELTA_KB")[1].split()[0]) / 1024


def _write_random_hf(cfg: ModelConfig, path):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf(), f)
  rng = np.random.default_rng(0)
  specs = [(n, t.rule.hf_shape, np.dtype(np.float32)) for n, t in _keymap.hf_targets(cfg)]
  weight_map = {}
  for i, shard in enumerate(_safetensors.plan_shards(specs, 64 * 1024**2)):
    name = f"model-{i:05d}.safetensors"
    shapes = {n: s for n, s, _ in shard}
    _safetensors.write_file(os.path.join(path, name), shard, lambda n: rng.standard_normal(shapes[n], np.float32))
    weight_map.update({n: name for n, _, _ in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return sum(int(np.prod(s)) * 4 for _, s, _ in specs)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_conversion_peak_memory_is_about_one_copy(tmp_path):
  mid = PRESETS["tiny-moe"].replace(
      hidden_size=512, vocab_size=32768, intermediate_size=2048, n_routed_experts=16, moe_intermediate_size=512,
      moe_shared_expert_intermediate_size=1024, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64,
      num_attention_heads=8, head_dim=64)
  size_mb = _write_random_hf(mid, str(tmp_path / "hf")) / 2**20
  assert size_mb > 250
  import_mb = _peak_delta_mb("checkpoint_convert.hf_to_n3jax", f"--hf_dir={tmp_path / 'hf'}", f"--out={tmp_path / 'n3'}")
  export_mb = _peak_delta_mb("checkpoint_convert.n3jax_to_hf", f"--ckpt={tmp_path / 'n3'}", f"--out={tmp_path / 'back'}")
  print(f"checkpoint {size_mb:.0f} MB; peak above start: import {import_mb:.0f} MB, export {export_mb:.0f} MB")
  # One copy of the weights, plus orbax's in-flight write/read window (a fixed cap, not a multiple of the model)
  # and one tensor in flight.
  bound = size_mb + checkpointing._CONCURRENT_GB * 1e9 / 2**20 + 64
  assert size_mb * 0.9 < import_mb < bound  # the lower bound shows the measurement sees the weights
  assert export_mb < bound


def test_tied_embeddings_have_no_lm_head_and_round_trip(tmp_path):
  cfg = PRESETS["tiny-dense"].replace(tie_word_embeddings=True)
  params = jax.tree.map(np.asarray, models.init(cfg, jax.random.key(0)))
  assert "lm_head" not in params
  names = [n for n, _ in _keymap.hf_targets(cfg)]
  assert "lm_head.weight" not in names and "backbone.embeddings.weight" in names
  logits = models.forward(cfg, params, jnp.zeros((1, 5), jnp.int32))
  emb = params["embedder"]["embedding"]
  hidden = models.apply(cfg, params, jnp.zeros((1, 5), jnp.int32))["hidden"]
  np.testing.assert_allclose(logits, np.asarray(hidden) @ emb.T, rtol=1e-5, atol=1e-5)
  checkpointing.save_params(str(tmp_path / "a"), cfg, params)
  checkpoint_convert.convert_to_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
  checkpoint_convert.convert_from_hf(str(tmp_path / "hf"), str(tmp_path / "b"))
  back = checkpointing.load_params(str(tmp_path / "b"), as_numpy=True)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert x.tobytes() == y.tobytes()
