"""NVIDIA ModelOpt FP8 / NVFP4 hub checkpoints, dequantized on load (HF -> n3jax only).

Detected automatically by `convert_from_hf` (no flag): a directory is quantized when it has
`hf_quant_config.json` and/or `config.json` has a `quantization_config`. Each quantized linear weight is
dequantized to the checkpoint's own dtype (`config.json` `dtype` / `torch_dtype`, bfloat16 for NVIDIA's
releases) and then goes through the ordinary key table as if it had been stored that way. The n3jax
checkpoint is unquantized: its `config.json` keeps no `quantization_config`, and `convert_to_hf` exports
plain bf16 (the compute dtype) safetensors that transformers loads without ModelOpt. Re-quantizing for
deployment is ModelOpt's job, on the exported model.

Covered (`quant_algo`; tensors beside `<m>.weight` [N, K]; `n3jax.quant._modelopt` has the arithmetic):
  FP8, FP8_PER_CHANNEL_PER_TOKEN   weight float8_e4m3fn [N, K]; weight_scale f32 [] / [1] (per tensor) or
                                   [N] / [N, 1] (per output channel); input_scale f32 [] / [1] if present.
                                   weight = weight.f32 * weight_scale.
  NVFP4, W4A16_NVFP4               weight uint8 [N, K/2] (two E2M1 codes a byte, low nibble first);
                                   weight_scale float8_e4m3fn [N, K/16]; weight_scale_2 f32 [] / [1];
                                   input_scale f32 [] / [1] if present (none for W4A16). group_size 16.
                                   weight = e2m1 * (weight_scale.f32 * weight_scale_2).
  MIXED_PRECISION                  each quantized module's algo (one of the above) from `quantized_layers`.
  kv_cache_quant_algo FP8 / NVFP4  `<attn>.k_proj.k_scale`, `<attn>.v_proj.v_scale` f32 [] / [1].
`input_scale`, `k_scale` and `v_scale` (static activation / KV-cache scales for quantized inference) are
validated from the headers and dropped: they do not change the weights, and n3jax's own FP8 / NVFP4 recipes
(`n3jax.quant`) compute their scales themselves.

Which modules are quantized is read from the tensors, not guessed from names: a module is quantized when
its weight is stored as float8_e4m3fn / uint8 or it has a `weight_scale`; it must then have every tensor its
algo requires, with the documented dtype and shape. Every other auxiliary tensor, a module listed in
`exclude_modules` / `ignore` (ModelOpt prefix wildcards, matched with fnmatch) but stored quantized, a
quantized module that `quantized_layers` does not list, an unknown config field, and a quantized dtype in a
directory without a quantization config are each one error naming them. Excluded and never-quantized
modules (norms, conv1d, A_log, the fp32 router, lm_head, embeddings) pass through unchanged.

Not covered, one error naming the algo: FP8_PB_WO / FP8_PB_REAL (128x128 block FP8), MXFP8, MXFP4,
NVFP4_AWQ, W4A16_AWQ, W4A8_AWQ, W4A8_NVFP4_FP8, W4A8_MXFP4_FP8, W8A8_SQ_PER_CHANNEL; kv_cache_quant_algo
INT8 / NVFP4_AFFINE (their `k_bias` / `v_bias`); TensorRT-LLM's swizzled block-scale layout; NVFP4 with a
group size other than 16; any other `quant_method` (compressed-tensors, HF fine-grained fp8, GPTQ, AWQ,
bitsandbytes).

Sources (public, read for this module; no NVIDIA checkpoint was available offline, so the exact
`exclude_modules` of nvidia/NVIDIA-Nemotron-Nano-9B-v2-FP8, -3-Nano-30B-A3B-FP8 / -NVFP4 etc. are not
reproduced here):
  * NVIDIA/TensorRT-Model-Optimizer `modelopt/torch/export/unified_export_hf.py` (`_export_quantized_weight`:
    tensor names and scalar `.squeeze()`d scales; `exclude_modules` gets "lm_head"; writes
    hf_quant_config.json and config.json `quantization_config`), `modelopt/torch/export/quant_utils.py`
    (`to_quantized_weight`, `process_layer_quant_config`: the quant_algo names, `quantized_layers` for
    MIXED_PRECISION, prefix-wildcard `exclude_modules`; `postprocess_state_dict`: `k_proj.k_scale` /
    `v_proj.v_scale`), `modelopt/torch/export/convert_hf_config.py` (config.json flavour: `quant_method:
    "modelopt"`, `ignore`, `kv_cache_scheme`), `modelopt/torch/quantization/qtensor/nvfp4_tensor.py`.
  * vllm-project/vllm `vllm/model_executor/layers/quantization/modelopt.py` (QUANT_ALGOS, both config
    flavours, fnmatch on `exclude_modules`, W4A16_NVFP4 without input_scale, MIXED_PRECISION),
    `vllm/model_executor/model_loader/weight_utils.py` (`maybe_remap_kv_scale_name`: ModelOpt KV scales).
  * Public model cards / NVIDIA docs (docs.nvidia.com/nemotron .../super3/quantization.html): the Nemotron
    FP8 / NVFP4 releases quantize MoE and Mamba GEMMs, keep attention, conv1d, router (fp32), embeddings
    and lm_head in BF16, and some (Nemotron 3 Ultra / Super NVFP4) mix NVFP4 experts with FP8 elsewhere.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from checkpoint_convert._errors import ConversionError
from n3jax.quant import _modelopt

QUANT_CONFIG_FILE = "hf_quant_config.json"
NVFP4_GROUP = 16

_F32 = np.dtype(np.float32)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_U8 = np.dtype(np.uint8)
# Storage dtypes that only a quantized checkpoint has.
_QUANTIZED_DTYPES = frozenset({_E4M3, np.dtype(ml_dtypes.float8_e5m2), _U8})
_COMPUTE_DTYPES = {"float32": _F32, "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


# ---------------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------------
Shapes = Callable[[int, int], tuple[tuple[int, ...], ...]]  # weight [N, K] (K unpacked) -> allowed shapes
_SCALAR: Shapes = lambda n, k: ((), (1,))


@dataclasses.dataclass(frozen=True)
class Aux:
  """One auxiliary tensor `<module>.<suffix>` beside a quantized `<module>.weight`."""
  suffix: str
  dtype: np.dtype
  shapes: Shapes
  required: bool
  used: bool          # True: an argument of the dequantization; False: validated, then dropped


@dataclasses.dataclass(frozen=True)
class Format:
  """How one quant_algo stores a linear weight, and how to get it back."""
  weight_dtype: np.dtype
  pack: int                               # input features per stored element (K = pack * stored K)
  block: int                              # K must be a multiple of this (0: any K)
  aux: tuple[Aux, ...]
  dequantize: Callable[..., np.ndarray]   # (weight, *used aux in order, dtype=) -> [N, K]


FP8 = Format(_E4M3, 1, 0, (
    Aux("weight_scale", _F32, lambda n, k: ((), (1,), (n,), (n, 1)), required=True, used=True),
    Aux("input_scale", _F32, _SCALAR, required=False, used=False),
), _modelopt.dequantize_modelopt_fp8)
NVFP4 = Format(_U8, 2, NVFP4_GROUP, (
    Aux("weight_scale", _E4M3, lambda n, k: ((n, k // NVFP4_GROUP),), required=True, used=True),
    Aux("weight_scale_2", _F32, _SCALAR, required=True, used=True),
    Aux("input_scale", _F32, _SCALAR, required=False, used=False),
), _modelopt.dequantize_modelopt_nvfp4)
WEIGHT_FORMATS: dict[str, Format] = {
    "FP8": FP8, "FP8_PER_CHANNEL_PER_TOKEN": FP8, "NVFP4": NVFP4, "W4A16_NVFP4": NVFP4}
MIXED = "MIXED_PRECISION"
KV_CACHE_ALGOS = frozenset({"FP8", "NVFP4"})
# KV-cache scales `<attn>.<proj>.<scale>`, accepted beside an existing `<attn>.<proj>.weight`.
KV_SCALES = (("k_proj", "k_scale"), ("v_proj", "v_scale"))
KV_SCALE = Aux("", _F32, _SCALAR, required=False, used=False)
AUX_SUFFIXES = frozenset({a.suffix for f in WEIGHT_FORMATS.values() for a in f.aux} | {s for _, s in KV_SCALES})

# Config fields read here; any other is an error.
_FILE_FIELDS = frozenset({"producer", "quantization"})                 # hf_quant_config.json
_SECTION_FIELDS = frozenset({"quant_algo", "kv_cache_quant_algo", "exclude_modules", "group_size",
                             "quantized_layers"})                      # its "quantization"
_FLAT_FIELDS = frozenset({"quant_method", "quant_algo", "kv_cache_scheme", "ignore", "group_size",
                          "quantized_layers", "producer",
                          "config_groups"})                            # config.json; config_groups restates quant_algo
_NESTED_FIELDS = frozenset({"quant_method", "producer", "quantization"})  # config.json, older ModelOpt
_LAYER_FIELDS = frozenset({"quant_algo", "group_size"})                # a quantized_layers entry


# ---------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelOptConfig:
  quant_algo: str | None                        # a WEIGHT_FORMATS key, MIXED, or None (KV cache only)
  kv_cache_quant_algo: str | None
  exclude_modules: tuple[str, ...]              # fnmatch patterns over module names
  quantized_layers: tuple[tuple[str, str], ...]  # (module, algo), MIXED only
  source: str                                   # where it was read, for messages

  def algo_for(self, module: str) -> str:
    if self.quant_algo == MIXED:
      algo = dict(self.quantized_layers).get(module)
      if algo is None:
        raise ConversionError(f"{module}.weight is stored quantized but {self.source} quantized_layers does not "
                              "list it")
      return algo
    if self.quant_algo is None:
      raise ConversionError(f"{module}.weight is stored quantized but {self.source} has quant_algo null "
                            "(KV-cache quantization only)")
    return self.quant_algo

  def exclusion(self, module: str) -> str | None:
    return next((p for p in self.exclude_modules if fnmatch.fnmatchcase(module, p)), None)


def compute_dtype(hf_config: Mapping[str, Any]) -> np.dtype:
  """The dtype dequantized weights get: the checkpoint's (`dtype`, or `torch_dtype` in older files)."""
  name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
  if name not in _COMPUTE_DTYPES:
    raise ConversionError(f"config.json dtype {name!r} is not one of {sorted(_COMPUTE_DTYPES)}")
  return _COMPUTE_DTYPES[name]


def read_modelopt_config(hf_dir: str, hf_config: Mapping[str, Any]) -> ModelOptConfig | None:
  """The ModelOpt quantization of a hub directory, or None when it is not quantized."""
  path = os.path.join(hf_dir, QUANT_CONFIG_FILE)
  parts = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        parts.append(_parse_file(json.load(f), QUANT_CONFIG_FILE))
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from None
  if hf_config.get("quantization_config") is not None:
    parts.append(_parse_config_json(hf_config["quantization_config"], "config.json quantization_config"))
  if not parts:
    return None
  return _validate(_merge(parts))


def _section(d: dict, allowed: frozenset, where: str) -> dict:
  if not isinstance(d, dict):
    raise ConversionError(f"{where} must be a JSON object, got {type(d).__name__}")
  algo = d.get("quant_algo")
  if algo is not None and str(algo).upper() not in {*WEIGHT_FORMATS, MIXED}:
    raise ConversionError(f"{where}: quant_algo {algo!r} is not supported; n3jax dequantizes ModelOpt "
                          f"{sorted({*WEIGHT_FORMATS, MIXED})} (see checkpoint_convert/_quantized.py)")
  if unknown := sorted(set(d) - allowed):
    raise ConversionError(f"{where}: unknown field(s) {unknown}; teach checkpoint_convert/_quantized.py about "
                          "them (handled, or ignored with a reason)")
  return d


def _parse_file(d: Any, where: str) -> dict:
  _section(d, _FILE_FIELDS, where)
  producer = d.get("producer") or {}
  if isinstance(producer, dict) and producer.get("name", "modelopt") != "modelopt":
    raise ConversionError(f"{where}: producer {producer.get('name')!r} is not NVIDIA ModelOpt")
  if "quantization" not in d:
    raise ConversionError(f"{where}: no 'quantization' section")
  q = _section(d["quantization"], _SECTION_FIELDS, f"{where} quantization")
  return dict(algo=q.get("quant_algo"), kv=q.get("kv_cache_quant_algo"), exclude=q.get("exclude_modules"),
              group_size=q.get("group_size"), layers=q.get("quantized_layers"), where=where)


def _parse_config_json(d: Any, where: str) -> dict:
  if not isinstance(d, dict):
    raise ConversionError(f"{where} must be a JSON object, got {type(d).__name__}")
  method = str(d.get("quant_method", ""))
  if not method.lower().startswith("modelopt"):
    raise ConversionError(f"{where}: quant_method {d.get('quant_method')!r} is not supported; n3jax reads only "
                          "NVIDIA ModelOpt checkpoints (quant_method 'modelopt', hf_quant_config.json)")
  if "quantization" in d:  # older ModelOpt copied hf_quant_config.json here
    _section(d, _NESTED_FIELDS, where)
    return {**_parse_file({k: v for k, v in d.items() if k != "quant_method"}, where), "where": where}
  _section(d, _FLAT_FIELDS, where)
  return dict(algo=d.get("quant_algo"), kv=_kv_from_scheme(d.get("kv_cache_scheme"), where), exclude=d.get("ignore"),
              group_size=d.get("group_size"), layers=d.get("quantized_layers"), where=where)


def _kv_from_scheme(scheme: Any, where: str) -> str | None:
  if scheme is None or isinstance(scheme, str):
    return scheme
  if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") in (8, 4):
    return {8: "FP8", 4: "NVFP4"}[scheme["num_bits"]]
  raise ConversionError(f"{where}: kv_cache_scheme {scheme!r} is not supported (FP8 or NVFP4 KV cache only)")


def _merge(parts: list[dict]) -> dict:
  """hf_quant_config.json and config.json describe one quantization: they must agree where both speak."""
  out = dict(parts[0])
  for other in parts[1:]:
    for key, field in (("algo", "quant_algo"), ("kv", "kv_cache_quant_algo"), ("group_size", "group_size"),
                       ("layers", "quantized_layers")):
      a, b = (str(v).upper() if key in ("algo", "kv") and v is not None else v for v in (out[key], other[key]))
      if a not in (None, {}) and b not in (None, {}) and a != b:
        raise ConversionError(f"{out['where']} and {other['where']} disagree on {field}: {a!r} vs {b!r}")
      out[key] = a if a not in (None, {}) else b
    out["exclude"] = list(dict.fromkeys([*(out["exclude"] or []), *(other["exclude"] or [])]))
    out["where"] = f"{out['where']} + {other['where']}"
  return out


def _validate(p: dict) -> ModelOptConfig:
  where = p["where"]
  algo = str(p["algo"]).upper() if p["algo"] is not None else None
  kv = str(p["kv"]).upper() if p["kv"] is not None else None
  if kv is not None and kv not in KV_CACHE_ALGOS:
    raise ConversionError(f"{where}: kv_cache_quant_algo {kv!r} is not supported; n3jax reads "
                          f"{sorted(KV_CACHE_ALGOS)} KV-cache scales")
  _check_group_size(p["group_size"], where)
  exclude = p["exclude"] or []
  if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
    raise ConversionError(f"{where}: exclude_modules / ignore must be a list of strings, got {exclude!r}")
  layers = p["layers"] or {}
  if not isinstance(layers, dict):
    raise ConversionError(f"{where}: quantized_layers must be an object, got {type(layers).__name__}")
  if algo == MIXED and not layers:
    raise ConversionError(f"{where}: quant_algo MIXED_PRECISION needs a non-empty quantized_layers")
  if algo != MIXED and layers:
    raise ConversionError(f"{where}: quantized_layers is only meaningful with quant_algo MIXED_PRECISION, not {algo!r}")
  per_layer = []
  for module, entry in sorted(layers.items()):
    at = f"{where} quantized_layers[{module!r}]"
    _section(entry, _LAYER_FIELDS, at)
    if entry.get("quant_algo") is None or str(entry["quant_algo"]).upper() not in WEIGHT_FORMATS:
      raise ConversionError(f"{at}: quant_algo {entry.get('quant_algo')!r} is not supported; per-layer algos "
                            f"must be one of {sorted(WEIGHT_FORMATS)}")
    _check_group_size(entry.get("group_size"), at)
    per_layer.append((module, str(entry["quant_algo"]).upper()))
  return ModelOptConfig(algo, kv, tuple(exclude), tuple(per_layer), where)


def _check_group_size(group_size: Any, where: str) -> None:
  if group_size not in (None, NVFP4_GROUP):
    raise ConversionError(f"{where}: group_size {group_size!r} is not supported (NVFP4 blocks are "
                          f"{NVFP4_GROUP} elements)")


def reject_unconfigured(tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
  """A plain (no quantization config) checkpoint must not hold quantized tensors."""
  if odd := sorted(n for n, (_, dt) in tensors.items() if np.dtype(dt) in _QUANTIZED_DTYPES):
    raise ConversionError(f"{len(odd)} tensor(s) are stored in a quantized dtype but the checkpoint has neither "
                          f"{QUANT_CONFIG_FILE} nor a config.json quantization_config: {odd[:10]}")


# ---------------------------------------------------------------------------------------------------
# The view the key table sees
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Quantized:
  module: str
  algo: str
  fmt: Format


def dequantizing_view(quant: ModelOptConfig, tensors: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      read: Callable[[str], np.ndarray], dtype: np.dtype
                      ) -> tuple[dict[str, tuple[tuple[int, ...], np.dtype]], Callable[[str], np.ndarray]]:
  """(names -> (shape, dtype), read) as if every quantized weight had been stored dequantized in `dtype`.

  Checks every header first (nothing is read); auxiliary tensors are consumed here and absent from the view.
  """
  tensors = {n: (tuple(s), np.dtype(dt)) for n, (s, dt) in tensors.items()}
  modules = sorted({n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale")}
                   | {n[: -len(".weight")] for n, (_, dt) in tensors.items()
                      if n.endswith(".weight") and dt in _QUANTIZED_DTYPES})
  consumed: set[str] = set()
  plan: dict[str, _Quantized] = {}
  view: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
  for module in modules:
    weight = f"{module}.weight"
    if weight not in tensors:
      raise ConversionError(f"{module}.weight_scale has no {weight} beside it")
    if pattern := quant.exclusion(module):
      raise ConversionError(f"{module} is excluded from quantization ({quant.source} pattern {pattern!r}) but "
                            f"{weight} is stored quantized ({tensors[weight][1]})")
    algo = quant.algo_for(module)
    fmt = WEIGHT_FORMATS[algo]
    shape, dt = tensors[weight]
    if dt != fmt.weight_dtype:
      raise ConversionError(f"{weight} is {dt}{list(shape)} but {algo} stores weights as {fmt.weight_dtype}")
    if len(shape) != 2:
      raise ConversionError(f"{weight} has shape {list(shape)}; quantized weights must be 2-D [out, in]")
    n, k = shape[0], shape[1] * fmt.pack
    if fmt.block and k % fmt.block:
      raise ConversionError(f"{weight}: {k} input features are not a multiple of the {algo} block {fmt.block}")
    for aux in fmt.aux:
      name = f"{module}.{aux.suffix}"
      if name not in tensors:
        if aux.required:
          raise ConversionError(f"{weight} is quantized ({algo}) but {name} is missing")
        continue
      _check_aux(name, tensors[name], aux, aux.shapes(n, k), f"{algo} weight [{n}, {k}]")
      consumed.add(name)
    plan[weight] = _Quantized(module, algo, fmt)
    view[weight] = ((n, k), np.dtype(dtype))
  for module, algo in quant.quantized_layers:  # MIXED: what the config lists must be stored quantized
    if f"{module}.weight" in tensors and f"{module}.weight" not in plan:
      raise ConversionError(f"{quant.source} quantized_layers lists {module} as {algo} but {module}.weight is "
                            f"stored as {tensors[f'{module}.weight'][1]}")
  for proj, suffix in KV_SCALES:
    for name in [n for n in tensors if n.endswith(f".{proj}.{suffix}")]:
      owner = name[: -len(suffix)] + "weight"
      if quant.kv_cache_quant_algo is None:
        raise ConversionError(f"KV-cache scale {name} but {quant.source} sets no kv_cache_quant_algo")
      if owner not in tensors:
        raise ConversionError(f"KV-cache scale {name} has no {owner} beside it")
      _check_aux(name, tensors[name], KV_SCALE, KV_SCALE.shapes(0, 0), "a KV-cache scale")
      consumed.add(name)
  if orphans := sorted(n for n in tensors if n not in consumed and n.rsplit(".", 1)[-1] in AUX_SUFFIXES):
    raise ConversionError(f"{len(orphans)} quantization tensor(s) belong to no quantized weight: {orphans[:20]}")
  for name, spec in tensors.items():
    if name not in consumed and name not in plan:
      view[name] = spec

  def read_view(name: str) -> np.ndarray:
    if (q := plan.get(name)) is None:
      return read(name)
    used = [read(f"{q.module}.{a.suffix}") for a in q.fmt.aux if a.used]
    for a, value in zip([a for a in q.fmt.aux if a.used], used):
      if not np.all(np.isfinite(value.astype(np.float32))):
        raise ConversionError(f"{q.module}.{a.suffix} has non-finite values")
    return q.fmt.dequantize(read(name), *used, dtype=dtype)

  return view, read_view


def _check_aux(name: str, spec: tuple[tuple[int, ...], np.dtype], aux: Aux, shapes, what: str) -> None:
  shape, dt = spec
  if dt != aux.dtype:
    raise ConversionError(f"{name} is {dt}, expected {aux.dtype}")
  if tuple(shape) not in shapes:
    raise ConversionError(f"{name} has shape {list(shape)}; {what} needs one of {[list(s) for s in shapes]}")


def describe(quant: ModelOptConfig) -> str:
  """One line for the CLI."""
  algo = quant.quant_algo
  if algo == MIXED:
    algo = f"{MIXED} ({', '.join(sorted({a for _, a in quant.quantized_layers}))})"
  return (f"NVIDIA ModelOpt checkpoint ({quant.source}): quant_algo {algo}, kv_cache_quant_algo "
          f"{quant.kv_cache_quant_algo}; weights dequantized on load, KV-cache and activation scales dropped")
