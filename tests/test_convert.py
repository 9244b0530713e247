"""HF <-> n3jax conversion: bit-exact round trips, sharded layouts, bad input, CLIs, peak host memory."""

import json
import os
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
from n3jax.configs import PRESETS, ModelConfig
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
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_writes_nothing(hf_checkpoints, tmp_path, case):
  damage, error, match = BAD_INPUTS[case]
  hf_dir = _copy_hf(hf_checkpoints, tmp_path)
  damage(hf_dir)
  out = tmp_path / "out"
  with pytest.raises(error, match=match):
    n3jax.convert_from_hf(str(hf_dir), str(out))
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp leftovers


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
