"""HF hub checkpoint <-> n3jax checkpoint, streaming tensor by tensor through the `_keymap` table.

Guarantees:
  * every input tensor is consumed exactly once; an unknown, missing, wrongly shaped or mixed-dtype
    tensor, or one in a dtype no n3jax param holds (float64, integer, bool), is an error naming it, raised
    from the headers before any data is read; so is a `*.safetensors` file that the index does not list;
  * values are never cast: each n3jax leaf keeps the checkpoint's dtype, so HF -> n3jax -> HF is
    byte-identical (transposes, reshapes and row splits only). The one exception is a ModelOpt FP8 / NVFP4
    checkpoint, whose quantized weights are dequantized to the checkpoint's dtype (`_quantized`);
  * host memory holds the output arrays plus one tensor (about one copy of the weights);
  * the output appears atomically: everything is written to a sibling temp dir that is renamed onto
    `out` at the end, and removed on any error, so a failed run leaves nothing at `out`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from checkpoint_convert import _keymap, _quantized, _safetensors
from checkpoint_convert._errors import ConversionError
from n3jax import checkpointing, models
from n3jax.configs import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Non-tensor files of a hub checkpoint carried verbatim both ways (tokenizer, generation settings).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "tokenizer.model")
ASSETS_DIR = "hf_assets"
# The dtypes an n3jax param leaf can hold bit-exactly (`ModelConfig.param_dtype`); JAX without x64 narrows
# float64 / int64 / uint64, and no leaf is an integer or bool tensor.
_PARAM_DTYPES = frozenset(np.dtype(d) for d in (np.float32, ml_dtypes.bfloat16, np.float16))


# ---------------------------------------------------------------------------------------------------
# Reading a hub directory
# ---------------------------------------------------------------------------------------------------
def _read_json_object(path: str, what: str, *, unique_keys: bool = False) -> dict[str, Any]:
  """One JSON object from `path`; broken JSON (or, with `unique_keys`, a repeated key) is a ConversionError."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    value = _safetensors.loads_unique(data) if unique_keys else json.loads(data)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a repeated key
    raise ConversionError(f"{path}: {what} is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ConversionError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}")
  return value


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json as a dict (a repeated key keeps the last value, as transformers reads it)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{hf_dir}: no config.json")
  return _read_json_object(path, "the HF config")


def _read_weight_map(index_path: str) -> dict[str, str]:
  """The index's `weight_map`: tensor name -> shard file name (normalised: "./a.safetensors" is "a.safetensors")."""
  weight_map = _read_json_object(index_path, "the shard index", unique_keys=True).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{index_path}: no 'weight_map' object")
  out = {}
  for key, name in weight_map.items():
    if not isinstance(name, str) or not name:
      raise ConversionError(f"{index_path}: weight_map[{key!r}] must be a file name, got {name!r}")
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm.split(os.sep)[0] == os.pardir:
      raise ConversionError(f"{index_path}: weight_map[{key!r}] = {name!r} is outside the checkpoint directory")
    out[key] = norm
  return out


def read_hf_tensor_index(hf_dir: str) -> dict[str, _safetensors.TensorInfo]:
  """name -> where its bytes are, from `model.safetensors.index.json` or a single `model.safetensors`.

  Every `*.safetensors` file in `hf_dir` must be read: one the index does not list (or one beside the single
  `model.safetensors`) is an error, never silently skipped.
  """
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index_path):
    weight_map = _read_weight_map(index_path)
    files = sorted(set(weight_map.values()))
  elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
    weight_map, files = None, [SINGLE_FILE]
  else:
    raise ConversionError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")
  present = {f for f in os.listdir(hf_dir) if f.endswith(".safetensors") and os.path.isfile(os.path.join(hf_dir, f))}
  if stray := sorted(present - set(files)):
    why = f"not listed in {INDEX_FILE}" if weight_map is not None else f"beside {SINGLE_FILE}, with no {INDEX_FILE}"
    raise ConversionError(f"{hf_dir}: safetensors file(s) {stray} {why}; their tensors would be ignored. Remove "
                          "them or list them in the index")
  infos: dict[str, _safetensors.TensorInfo] = {}
  file_of: dict[str, str] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.exists(path):
      raise ConversionError(f"{INDEX_FILE} lists {name}, which is missing from {hf_dir}")
    for key, info in _safetensors.read_header(path).items():
      if key in infos:
        raise ConversionError(f"Tensor {key!r} appears in both {infos[key].path} and {path}")
      infos[key], file_of[key] = info, name
  if weight_map is not None:
    if missing := sorted(k for k in weight_map if k not in infos):
      raise ConversionError(f"{INDEX_FILE} lists tensors absent from their files: {missing[:10]}")
    if unlisted := sorted(k for k in infos if k not in weight_map):
      raise ConversionError(f"Tensors in the shards but not in {INDEX_FILE}: {unlisted[:10]}")
    for k, info in infos.items():
      if file_of[k] != weight_map[k]:
        raise ConversionError(f"{INDEX_FILE} puts {k!r} in {weight_map[k]} but it is in {info.path}")
  return infos


# ---------------------------------------------------------------------------------------------------
# The table, applied
# ---------------------------------------------------------------------------------------------------
def _expected_leaves(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(lambda: models.init(cfg, jax.random.key(0)))
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _check_names(names, targets: Mapping[str, Any], what: str) -> None:
  if unknown := sorted(set(names) - set(targets)):
    raise ConversionError(f"{len(unknown)} unknown tensor(s) in {what} (not in the key table for this config): "
                          f"{unknown[:20]}")
  if missing := sorted(set(targets) - set(names)):
    raise ConversionError(f"{len(missing)} tensor(s) missing from {what}: {missing[:20]}")


def hf_to_params(cfg: ModelConfig, names_shapes_dtypes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 read: Any) -> dict[str, Any]:
  """Builds the n3jax param tree (numpy) from HF tensors. `read(name)` returns one tensor's array."""
  targets = dict(_keymap.hf_targets(cfg))
  _check_names(names_shapes_dtypes, targets, "the HF checkpoint")
  expected = _expected_leaves(cfg)
  leaf_dtype: dict[str, tuple[np.dtype, str, int]] = {}  # leaf -> (dtype, first tensor, slot rank)
  for name, target in targets.items():  # validate every header before reading any data
    shape, dtype = names_shapes_dtypes[name]
    if np.dtype(dtype) not in _PARAM_DTYPES:
      raise ConversionError(f"Tensor {name!r} is stored as {np.dtype(dtype)}; n3jax holds parameters only as "
                            f"{', '.join(sorted(d.name for d in _PARAM_DTYPES))} and will not cast it (float64 "
                            "would silently become float32 without jax x64)")
    if tuple(shape) != target.rule.hf_shape:
      raise ConversionError(f"Tensor {name!r} has shape {list(shape)}, the config implies "
                            f"{list(target.rule.hf_shape)}")
    for piece in target.rule.pieces:
      leaf = _keymap.leaf_path(target, piece)
      if leaf not in expected:
        raise ConversionError(f"Key table maps {name!r} to {leaf!r}, which the model does not have")
      first = leaf_dtype.setdefault(leaf, (np.dtype(dtype), name, len(target.index)))
      if first[0] != np.dtype(dtype):
        raise ConversionError(f"Tensors {first[1]!r} ({first[0]}) and {name!r} ({np.dtype(dtype)}) share the n3jax "
                              f"leaf {leaf!r} but differ in dtype")
  if unfilled := sorted(set(expected) - set(leaf_dtype)):
    raise ConversionError(f"Key table leaves model params unset: {unfilled}")
  leaves = {leaf: _aligned_empty(expected[leaf], dt) for leaf, (dt, _, _) in leaf_dtype.items()}
  filled = {leaf: 0 for leaf in leaves}
  for name, target in targets.items():
    for leaf, value in _keymap.split_hf(target, name, read(name)):
      leaves[leaf][target.index] = value
      filled[leaf] += 1
  for leaf, arr in leaves.items():  # each slot of each leaf written exactly once
    slots = int(np.prod(arr.shape[: leaf_dtype[leaf][2]]))
    if filled[leaf] != slots:
      raise ConversionError(f"n3jax leaf {leaf!r} received {filled[leaf]} tensors for {slots} slots")
  return _unflatten(leaves)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
  """np.empty with a 64-byte aligned buffer: XLA's CPU client then adopts it without a copy when
  `checkpointing.save_params` hands the leaves to orbax, so the weights stay one copy in host memory."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + align, np.uint8)
  start = (-buf.ctypes.data) % align
  return buf[start:start + nbytes].view(dtype).reshape(shape)


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
  """The HF tensors of `params`, one at a time, in the order transformers writes them."""
  flat = _flatten(params)
  expected = _expected_leaves(cfg)
  if unknown := sorted(set(flat) - set(expected)):
    raise ConversionError(f"Unknown n3jax params for this config: {unknown[:20]}")
  if missing := sorted(set(expected) - set(flat)):
    raise ConversionError(f"n3jax params missing for this config: {missing[:20]}")
  for leaf, shape in expected.items():
    if tuple(np.shape(flat[leaf])) != shape:
      raise ConversionError(f"n3jax param {leaf!r} has shape {list(np.shape(flat[leaf]))}, expected {list(shape)}")
  get = lambda leaf: np.asarray(flat[leaf])
  for name, target in _keymap.hf_targets(cfg):
    yield name, _keymap.join_hf(target, get)


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


# ---------------------------------------------------------------------------------------------------
# Directories, atomically
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_dir(out_dir: str, overwrite: bool):
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not overwrite) and os.listdir(out_dir):
    raise ConversionError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)


def convert_from_hf(hf_dir: str, out_dir: str, *, overwrite: bool = False, **config_overrides) -> ModelConfig:
  """Hub checkpoint directory -> n3jax checkpoint (orbax params + config.json + carried assets).

  NVIDIA ModelOpt FP8 / NVFP4 checkpoints (`hf_quant_config.json` or a config.json `quantization_config`) are
  detected and dequantized to the checkpoint's dtype on load; the result is unquantized (see `_quantized`).
  """
  hf_config = read_hf_config(hf_dir)
  quant = _quantized.read_modelopt_config(hf_dir, hf_config)
  hf_config.pop("quantization_config", None)  # the n3jax checkpoint (and its HF export) is unquantized
  cfg = ModelConfig.from_hf(hf_config, **config_overrides)
  infos = read_hf_tensor_index(hf_dir)
  tensors = {k: (i.shape, i.dtype) for k, i in infos.items()}
  read = lambda name: _safetensors.read_tensor(infos[name])
  if quant is None:
    _quantized.reject_unconfigured(tensors)
  else:
    tensors, read = _quantized.dequantizing_view(quant, tensors, read, _quantized.compute_dtype(hf_config))
  params = hf_to_params(cfg, tensors, read)
  with _atomic_dir(out_dir, overwrite) as tmp:
    checkpointing.save_params(tmp, cfg, params)
    _copy_assets(hf_dir, os.path.join(tmp, ASSETS_DIR))
  return cfg


def convert_to_hf(ckpt_dir: str, out_dir: str, *, overwrite: bool = False,
                  max_shard_bytes: int = 5 * 1024**3) -> ModelConfig:
  """n3jax checkpoint -> hub layout that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
  cfg = checkpointing.load_config(ckpt_dir)
  params = checkpointing.load_params(ckpt_dir, as_numpy=True)
  flat = _flatten(params)
  specs = []
  for name, target in _keymap.hf_targets(cfg):  # shapes and dtypes from the table, no data touched
    piece_leaf = _keymap.leaf_path(target, target.rule.pieces[0])
    if piece_leaf not in flat:
      raise ConversionError(f"n3jax param {piece_leaf!r} (for {name!r}) is missing from {ckpt_dir}")
    specs.append((name, target.rule.hf_shape, flat[piece_leaf].dtype))
  tensors = params_to_hf(cfg, params)
  shards = _safetensors.plan_shards(specs, max_shard_bytes)
  with _atomic_dir(out_dir, overwrite) as tmp:
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
      fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"

      def produce(name):
        got, array = next(tensors)
        assert got == name, (got, name)
        return array

      _safetensors.write_file(os.path.join(tmp, fname), shard, produce)
      for name, shape, dtype in shard:
        weight_map[name] = fname
        total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_hf(), f, indent=2, sort_keys=True)
    _copy_assets(os.path.join(ckpt_dir, ASSETS_DIR), tmp)
  return cfg


def _copy_assets(src_dir: str, dst_dir: str) -> None:
  if not os.path.isdir(src_dir):
    return
  for name in ASSET_FILES:
    if os.path.exists(os.path.join(src_dir, name)):
      os.makedirs(dst_dir, exist_ok=True)
      shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
