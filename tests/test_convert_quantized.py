"""Import of NVIDIA ModelOpt FP8 / NVFP4 hub checkpoints: dequantized on load, bit-exact, one error per bad input.

The quantized checkpoints are made here from tiny random HF models, in ModelOpt's unified-HF layout
(checkpoint_convert/_quantized.py lists the format and its sources), with numpy: e4m3 by ml_dtypes, E2M1 codes
packed by `n3jax.quant.pack_e2m1`. The expected params come from an independent numpy dequantization fed
through the plain (unquantized) key table.
"""

import fnmatch
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import checkpoint_convert
from checkpoint_convert import _safetensors
from n3jax import checkpointing
from n3jax.quant import pack_e2m1
from tests import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

E4M3, BF16 = ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
LINEARS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head")
# NVFP4 needs input widths that are multiples of 16; the fixture's MoE widths (24, 40) are not.
MOE = {**hf_fixtures.HF_CONFIGS["moe"], "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 48}
DENSE = hf_fixtures.HF_CONFIGS["dense"]
NVFP4_EXCLUDE = ["lm_head", "*mixer.gate*", "backbone.layers.0.mixer*", "backbone.layers.2.mixer*"]


# --- Quantizing like ModelOpt, and dequantizing independently ---------------------------------------
def _fp8(w, per_channel):
  amax = np.abs(w).max(axis=1) if per_channel else np.abs(w).max()
  scale = np.asarray(amax / 448, np.float32)  # [N] or []
  q = (w / (scale[:, None] if per_channel else scale)).astype(E4M3)
  want = (q.astype(np.float32) * (scale[:, None] if per_channel else scale)).astype(BF16)
  return q, scale, want


def _nvfp4(w):
  n, k = w.shape
  s2 = np.float32(np.abs(w).max() / (6 * 448))
  blocks = w.reshape(n, k // 16, 16)
  block_scale = (np.abs(blocks).max(-1) / 6 / s2).astype(E4M3)  # [N, K/16]
  v = blocks / (block_scale.astype(np.float32) * s2)[..., None]
  v = np.sign(v) * E2M1[:8][np.abs(np.abs(v)[..., None] - E2M1[:8]).argmin(-1)]
  packed = pack_e2m1(v.reshape(n, k))
  codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k)
  want = (E2M1[codes] * np.repeat(block_scale.astype(np.float32) * s2, 16, axis=1)).astype(BF16)
  return packed, block_scale, s2, want


def _build(hf_config: dict, path: str) -> dict:
  """Saves a seeded bf16 HF model; returns its tensors."""
  torch.manual_seed(0)
  model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**hf_config)).eval().to(torch.bfloat16)
  model.save_pretrained(path)
  return {k: _safetensors.read_tensor(i) for k, i in checkpoint_convert.read_hf_tensor_index(path).items()}


def _quantize(src: str, dst: str, algo_for, *, hf_quant_config=None, quantization_config=None, kv=False):
  """Rewrites `src` into ModelOpt layout at `dst`; returns (HF tensors as the converter should see them, quantized
  module names). `algo_for(module)` gives each linear module's algo (or None: left as it is)."""
  os.makedirs(dst)
  infos = checkpoint_convert.read_hf_tensor_index(src)
  out, want, quantized = {}, {}, []
  rng = np.random.default_rng(0)
  for name, info in infos.items():
    a = _safetensors.read_tensor(info)
    module = name[: -len(".weight")]
    algo = algo_for(module) if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS else None
    want[name] = a
    if algo is None:
      out[name] = a
      continue
    quantized.append(module)
    w = a.astype(np.float32)
    if algo.startswith("FP8"):
      per_channel = algo == "FP8_PER_CHANNEL_PER_TOKEN" or "up_proj" in module
      out[name], scale, want[name] = _fp8(w, per_channel)
      out[f"{module}.weight_scale"] = scale[:, None] if per_channel and "mixer.up_proj" in module else scale
    else:
      out[name], out[f"{module}.weight_scale"], out[f"{module}.weight_scale_2"], want[name] = _nvfp4(w)
    if algo in ("FP8", "NVFP4"):  # static activation scale; none for weight-only / dynamic recipes
      out[f"{module}.input_scale"] = np.float32(rng.uniform(0.01, 1))
    if kv and module.endswith((".k_proj", ".v_proj")):
      out[f"{module}.{module[-6]}_scale"] = np.float32(1.0)
  specs = [(k, np.shape(v), np.asarray(v).dtype) for k, v in out.items()]
  _safetensors.write_file(os.path.join(dst, "model.safetensors"), specs, lambda k: np.asarray(out[k]))
  hf = checkpoint_convert.read_hf_config(src)
  if quantization_config is not None:
    hf["quantization_config"] = quantization_config
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf, f)
  if hf_quant_config is not None:
    with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
      json.dump(hf_quant_config, f)
  return want, quantized


def _excluded(module, patterns):
  return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def _mixed_algo(module):
  if ".experts." in module:
    return "NVFP4"
  if ".shared_experts." in module:
    return "W4A16_NVFP4"
  if module.endswith(("in_proj", "out_proj")):
    return "FP8"
  if module.endswith(("up_proj", "down_proj")):
    return "FP8_PER_CHANNEL_PER_TOKEN"
  return None  # attention and lm_head stay bf16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("modelopt")
  out = {}
  _build(DENSE, str(root / "dense"))
  _build(MOE, str(root / "moe"))
  fp8_cfg = {"producer": {"name": "modelopt", "version": "0.33.0"},
             "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
  out["fp8"] = _quantize(str(root / "dense"), str(root / "fp8"),
                         lambda m: None if _excluded(m, ["lm_head"]) else "FP8", hf_quant_config=fp8_cfg, kv=True)
  nvfp4_cfg = {"producer": {"name": "modelopt", "version": "0.29.0"},
               "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                                "exclude_modules": NVFP4_EXCLUDE}}
  nvfp4_config_json = {"quant_method": "modelopt", "quant_algo": "NVFP4", "ignore": NVFP4_EXCLUDE,
                       "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
                       "producer": {"name": "modelopt", "version": "0.29.0"},
                       "config_groups": {"group_0": {"targets": ["Linear"]}}}
  out["nvfp4"] = _quantize(str(root / "moe"), str(root / "nvfp4"),
                           lambda m: None if _excluded(m, NVFP4_EXCLUDE) else "NVFP4",
                           hf_quant_config=nvfp4_cfg, quantization_config=nvfp4_config_json)
  want, quantized = _quantize(str(root / "moe"), str(root / "mixed_tmp"), _mixed_algo)
  layers = {m: {"quant_algo": _mixed_algo(m), **({"group_size": 16} if "NVFP4" in _mixed_algo(m) else {})}
            for m in quantized}
  shutil.rmtree(root / "mixed_tmp")
  out["mixed"] = _quantize(str(root / "moe"), str(root / "mixed"), _mixed_algo, quantization_config={
      "quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "ignore": ["lm_head"], "quantized_layers": layers})
  out["dirs"] = {k: str(root / k) for k in ("dense", "moe", "fp8", "nvfp4", "mixed")}
  return out


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params_of(cfg, tensors):
  return _leaves(checkpoint_convert.hf_to_params(cfg, {k: (v.shape, v.dtype) for k, v in tensors.items()},
                                                 tensors.__getitem__))


@pytest.mark.parametrize("kind", ["fp8", "nvfp4", "mixed"])
def test_quantized_checkpoint_dequantizes_bit_exactly(checkpoints, kind, tmp_path):
  want_tensors, quantized = checkpoints[kind]
  hf_dir = checkpoints["dirs"][kind]
  cfg = checkpoint_convert.convert_from_hf(hf_dir, str(tmp_path / "n3"))
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  assert "quantization_config" not in dict(cfg.hf_extra)  # the n3jax checkpoint is unquantized
  got = _leaves(checkpointing.load_params(str(tmp_path / "n3"), as_numpy=True))
  want = _params_of(cfg, want_tensors)
  assert sorted(got) == sorted(want)
  for path in want:
    assert got[path].dtype == want[path].dtype and got[path].tobytes() == want[path].tobytes(), path
  # Excluded and never-quantized modules pass through unchanged; quantized ones really were quantized.
  source = "moe" if kind != "fp8" else "dense"
  original = _params_of(cfg, {k: _safetensors.read_tensor(i) for k, i in
                              checkpoint_convert.read_hf_tensor_index(checkpoints["dirs"][source]).items()})
  unchanged = {p for p in got if got[p].tobytes() == original[p].tobytes()}
  assert {"['lm_head']", "['embedder']['embedding']", "['final_norm']['scale']"} <= unchanged
  if kind != "fp8":
    assert "['layers']['moe']['mixer']['gate']" in unchanged
    assert "['layers']['moe']['mixer']['experts_up_proj']" not in unchanged
  if kind == "nvfp4":  # attention excluded; Mamba layer 0 excluded, layer 2 quantized, in one stacked leaf
    assert "['layers']['attention']['mixer']['q_proj']" in unchanged
    in_proj = "['layers']['mamba']['mixer']['in_proj_x']"
    assert got[in_proj][0].tobytes() == original[in_proj][0].tobytes()
    assert got[in_proj][1].tobytes() != original[in_proj][1].tobytes()
  assert len(quantized) == {"fp8": 12, "nvfp4": 2 * (2 * 8 + 2) + 2 + 2, "mixed": 2 * (2 * 8 + 2) + 6}[kind]


def test_export_of_a_dequantized_checkpoint_is_plain_bf16(checkpoints, tmp_path):
  want_tensors, _ = checkpoints["nvfp4"]
  checkpoint_convert.convert_from_hf(checkpoints["dirs"]["nvfp4"], str(tmp_path / "n3"))
  checkpoint_convert.convert_to_hf(str(tmp_path / "n3"), str(tmp_path / "hf"))
  assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
  assert not (tmp_path / "hf" / "hf_quant_config.json").exists()
  exported = {k: _safetensors.read_tensor(i) for k, i in
              checkpoint_convert.read_hf_tensor_index(str(tmp_path / "hf")).items()}
  assert sorted(exported) == sorted(want_tensors)  # no scales, same names as the BF16 release
  for k, v in want_tensors.items():
    assert exported[k].dtype == v.dtype and exported[k].tobytes() == v.tobytes(), k


def test_all_three_config_spellings_read_the_same(tmp_path):
  section = {"quant_algo": "nvfp4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": ["lm_head"]}
  producer = {"name": "modelopt", "version": "0.29.0"}
  (tmp_path / "file").mkdir()
  (tmp_path / "file" / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": section}))
  spellings = {
      "hf_quant_config.json": checkpoint_convert.read_modelopt_config(str(tmp_path / "file"), {}),
      "config.json, nested": checkpoint_convert.read_modelopt_config(str(tmp_path), {"quantization_config": {
          "quant_method": "modelopt", "producer": producer, "quantization": section}}),
      "config.json, flat": checkpoint_convert.read_modelopt_config(str(tmp_path), {"quantization_config": {
          "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"],
          "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"}, "producer": producer}}),
  }
  for where, got in spellings.items():
    assert (got.quant_algo, got.kv_cache_quant_algo, got.exclude_modules) == ("NVFP4", "FP8", ("lm_head",)), where
  assert checkpoint_convert.read_modelopt_config(str(tmp_path), {}) is None


# --- Bad input: one clear error, and nothing at --out ------------------------------------------------
def _edit_json(name, edit):
  def damage(d):
    path = os.path.join(d, name)
    with open(path) as f:
      cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
      json.dump(cfg, f)
  return damage


def _edit_tensors(edit):
  def damage(d):
    path = os.path.join(d, "model.safetensors")
    tensors = {k: _safetensors.read_tensor(i) for k, i in _safetensors.read_header(path).items()}
    edit(tensors)
    _safetensors.write_file(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
  return damage


def _set(section, **kv):
  return lambda cfg: (cfg["quantization"] if section else cfg).update(kv)


UP = "backbone.layers.1.mixer.up_proj"
EXPERT = "backbone.layers.1.mixer.experts.3.down_proj"
_QUANT_JSON, _CONFIG_JSON = "hf_quant_config.json", "config.json"


def _layers(edit):
  return _edit_json(_CONFIG_JSON, lambda c: edit(c["quantization_config"]["quantized_layers"]))


BAD_INPUTS = {  # case: (checkpoint, damage, error message)
    "unknown_quant_algo": ("fp8", _edit_json(_QUANT_JSON, _set(True, quant_algo="FP8_PB_WO")),
                           r"quant_algo 'FP8_PB_WO' is not supported"),
    "unknown_layer_algo": ("mixed", _layers(lambda q: q[EXPERT].update(quant_algo="NVFP4_AWQ")),
                           rf"quantized_layers\['{EXPERT}'\]: quant_algo 'NVFP4_AWQ' is not supported"),
    "missing_weight_scale": ("fp8", _edit_tensors(lambda t: t.pop(f"{UP}.weight_scale")),
                             rf"{UP}.weight is quantized \(FP8\) but {UP}.weight_scale is missing"),
    "missing_expert_scale_2": ("nvfp4", _edit_tensors(lambda t: t.pop(f"{EXPERT}.weight_scale_2")),
                               rf"{EXPERT}.weight is quantized \(NVFP4\) but {EXPERT}.weight_scale_2 is missing"),
    "wrong_block_scale_shape": ("nvfp4", _edit_tensors(lambda t: t.update(
        {f"{EXPERT}.weight_scale": t[f"{EXPERT}.weight_scale"][:, :1]})),
                                rf"{EXPERT}.weight_scale has shape \[32, 1\]; NVFP4 weight \[32, 32\] needs one of "
                                r"\[\[32, 2\]\]"),
    "wrong_fp8_scale_shape": ("fp8", _edit_tensors(lambda t: t.update({f"{UP}.weight_scale": np.ones(3, np.float32)})),
                              rf"{UP}.weight_scale has shape \[3\]"),
    "wrong_scale_dtype": ("fp8", _edit_tensors(lambda t: t.update(
        {f"{UP}.weight_scale": t[f"{UP}.weight_scale"].astype(BF16)})),
                          rf"{UP}.weight_scale is bfloat16, expected float32"),
    "weight_not_quantized": ("fp8", _edit_tensors(lambda t: t.update({f"{UP}.weight": t[f"{UP}.weight"].astype(BF16)})),
                             rf"{UP}.weight is bfloat16\[48, 32\] but FP8 stores weights as float8_e4m3fn"),
    "listed_but_not_quantized": ("mixed", _layers(lambda q: q.update({"backbone.layers.2.mixer.q_proj": {
        "quant_algo": "FP8"}})), r"lists backbone.layers.2.mixer.q_proj as FP8 but .* stored as bfloat16"),
    "excluded_but_quantized": ("fp8", _edit_json(_QUANT_JSON, _set(True, exclude_modules=[
        "lm_head", "backbone.layers.1.mixer*"])),
                               r"backbone.layers.1.mixer.\w+ is excluded from quantization "
                               r".*'backbone.layers.1.mixer\*'"),
    "not_in_quantized_layers": ("mixed", _layers(lambda q: q.pop(EXPERT)),
                                rf"{EXPERT}.weight is stored quantized but .* quantized_layers does not list"),
    "orphan_input_scale": ("fp8", _edit_tensors(lambda t: t.update({"backbone.norm_f.input_scale": np.float32(1)})),
                           r"belong to no quantized weight: \['backbone.norm_f.input_scale'\]"),
    "kv_scale_without_kv_algo": ("fp8", _edit_json(_QUANT_JSON, _set(True, kv_cache_quant_algo=None)),
                                 r"KV-cache scale backbone.layers.2.mixer.k_proj.k_scale but .* no "
                                 r"kv_cache_quant_algo"),
    "unsupported_kv_algo": ("fp8", _edit_json(_QUANT_JSON, _set(True, kv_cache_quant_algo="INT8")),
                            r"kv_cache_quant_algo 'INT8' is not supported"),
    "nvfp4_group_size": ("nvfp4", _edit_json(_QUANT_JSON, _set(True, group_size=32)),
                         r"group_size 32 is not supported"),
    "unknown_config_field": ("fp8", _edit_json(_QUANT_JSON, _set(True, sparsity="2:4")),
                             r"unknown field\(s\) \['sparsity'\]"),
    "configs_disagree": ("nvfp4", _edit_json(_CONFIG_JSON, lambda c: c["quantization_config"].update(quant_algo="FP8")),
                         r"disagree on quant_algo: 'NVFP4' vs 'FP8'"),
    "not_modelopt": ("fp8", _edit_json(_CONFIG_JSON, lambda c: c.update(quantization_config={
        "quant_method": "compressed-tensors"})), r"quant_method 'compressed-tensors' is not supported"),
    "quantized_without_config": ("fp8", lambda d: os.remove(os.path.join(d, _QUANT_JSON)),
                                 r"stored in a quantized dtype but the checkpoint has neither hf_quant_config.json"),
    "non_finite_scale": ("fp8", _edit_tensors(lambda t: t.update({f"{UP}.weight_scale": np.full_like(
        t[f"{UP}.weight_scale"], np.nan)})), rf"{UP}.weight_scale has non-finite values"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_quantized_input_is_one_clear_error(checkpoints, tmp_path, case):
  kind, damage, match = BAD_INPUTS[case]
  hf_dir = str(tmp_path / "hf")
  shutil.copytree(checkpoints["dirs"][kind], hf_dir)
  damage(hf_dir)
  with pytest.raises(checkpoint_convert.ConversionError, match=match):
    checkpoint_convert.convert_from_hf(hf_dir, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_cli_detects_a_quantized_checkpoint(checkpoints, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [f"--hf_dir={checkpoints['dirs']['mixed']}", f"--out={tmp_path / 'n3'}"]
  r = subprocess.run([sys.executable, "-m", "checkpoint_convert.hf_to_n3jax", *args], capture_output=True, text=True,
                     cwd=repo, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "quant_algo MIXED_PRECISION (FP8, FP8_PER_CHANNEL_PER_TOKEN, NVFP4, W4A16_NVFP4)" in r.stdout
  assert checkpointing.load_config(str(tmp_path / "n3")).dtype == "bfloat16"
