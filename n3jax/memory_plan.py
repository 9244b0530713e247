"""Memory and FLOPs plan of a training step, per device, before any hardware is touched.

The command line is `n3jax/plan.py`:

  python -m n3jax.plan --preset nemotron-3-nano-30b-a3b --mesh data=1,fsdp=8,expert=1,tensor=1 \
      --seq 4096 --batch 8 [--layout fsdp] [--remat full] [--device_gb 80]
  python -m n3jax.plan --preset nemotron-3-super-120b-a12b --devices 64 --seq 4096 --batch 64   # recommends

Per device: params (f32 master weights), AdamW moments (2 x f32), gradients (f32), the largest layer
gathered in the compute dtype (FSDP all-gathers one layer at a time), and activations under the remat
policy; plus the step's model FLOPs. Parameter bytes are exact (the model's own param tree and the
layout's rules, with `jax.eval_shape`); activation bytes are an estimate of what the layers keep for the
backward pass, documented term by term in `_activation_bytes_per_token`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

from n3jax import models, sharding
from n3jax.configs import Block, ModelConfig, _block_params, param_counts

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LAYOUT_ORDER = ("data_parallel", "fsdp", "fsdp_ep", "fsdp_tp_ep")  # least to most communication


@dataclasses.dataclass(frozen=True)
class Plan:
  preset: str
  layout: str
  mesh: dict[str, int]
  batch: int
  seq: int
  remat: str
  params_gb: float
  optimizer_gb: float
  grads_gb: float
  gathered_layer_gb: float
  activations_gb: float
  total_gb: float
  step_tflops: float
  device_gb: float

  @property
  def fits(self) -> bool:
    return self.total_gb <= 0.9 * self.device_gb  # leave 10% for XLA buffers and fragmentation

  def report(self) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
    verdict = "FITS" if self.fits else "DOES NOT FIT"
    return (f"{self.preset}  layout={self.layout}  mesh {mesh}  batch={self.batch} seq={self.seq} remat={self.remat}\n"
            f"  per device: params {self.params_gb:.2f} GB + AdamW {self.optimizer_gb:.2f} GB + grads "
            f"{self.grads_gb:.2f} GB + gathered layer {self.gathered_layer_gb:.2f} GB + activations "
            f"{self.activations_gb:.2f} GB = {self.total_gb:.2f} GB of {self.device_gb:.0f} GB -> {verdict}\n"
            f"  step: {self.step_tflops:.1f} model TFLOPs in all ({self.step_tflops / math.prod(self.mesh.values()):.2f} "
            f"per device)")


def _shard_factor(spec: PartitionSpec, mesh: dict[str, int]) -> int:
  n = 1
  for axes in spec:
    for a in (axes if isinstance(axes, tuple) else (axes,)) if axes else ():
      n *= mesh.get(a, 1)
  return n


@functools.lru_cache(maxsize=8)
def _model_shapes(cfg: ModelConfig) -> tuple[Any, Any]:
  """The model's param shapes and logical axes (two traces of its init; `recommend` asks for them per mesh)."""
  return jax.eval_shape(lambda: models.init(cfg, jax.random.key(0))), models.logical_axes(cfg)


def _param_bytes_per_device(cfg: ModelConfig, layout: str, mesh: dict[str, int]) -> tuple[float, float]:
  """(sharded param elements per device, elements per device of the largest single layer as it computes:
  gathered over the FSDP axes, still split over the tensor axis and, for the experts, the expert axis
  (`sharding.compute_spec`)). A mesh that does not divide a param is the trainer's ValueError
  (`sharding.param_specs`), not a fractional shard."""
  shapes, logical = _model_shapes(cfg)
  specs = sharding.param_specs(cfg, mesh, layout, shapes=shapes, logical=logical)
  is_spec = lambda x: isinstance(x, PartitionSpec)
  per_device = 0.0
  for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(shapes)):
    per_device += math.prod(leaf.shape) / _shard_factor(spec, mesh)
  largest_layer = 0.0
  for kind, stack in shapes["layers"].items():
    leaves = zip(jax.tree.leaves(specs["layers"][kind], is_leaf=is_spec),
                 jax.tree.leaves(logical["layers"][kind], is_leaf=is_spec), jax.tree.leaves(stack))
    n = sum(math.prod(x.shape) / _shard_factor(sharding.compute_spec(spec, tuple(axes)), mesh)
            for spec, axes, x in leaves)
    largest_layer = max(largest_layer, n / cfg.count(_KIND[kind]))
  return per_device, largest_layer


_KIND = {models.kind_name(k): k for k in Block}


def _activation_bytes_per_token(cfg: ModelConfig, kind: Block, tensor: int) -> float:
  """Bytes one layer keeps for its backward pass, per token, without remat (compute dtype c, f32 = 4).

  Mamba: in_proj outputs z, x, B, C, dt and the conv outputs (c each), the SSD's f32 copies of x, B, C per
  head (B/C expanded to heads in the reference scan) and its f32 output, the gated-norm f32 input. Attention:
  q, k, v, output (c) and the f32 probabilities of one row (T scores per head, counted by the caller).
  MLP / shared expert: up output and activation (c). MoE: router scores (f32), the R gathered token rows
  and their two expert hidden activations (c), plus the f32 combine.
  """
  c = _BYTES[cfg.dtype]
  d = cfg.hidden_size
  if kind == Block.MAMBA:
    di, jq, m = cfg.d_inner / tensor, cfg.n_groups * cfg.ssm_state_size / tensor, cfg.mamba_num_heads / tensor
    proj = (2 * di + 2 * jq + m) * c
    conv = (di + 2 * jq) * c
    ssd = 4 * (di + 2 * m * cfg.ssm_state_size + di)
    norm = 4 * di * 2
    return d * c + proj + conv + ssd + norm
  if kind == Block.ATTENTION:
    q = cfg.num_attention_heads * cfg.head_dim / tensor
    kv = cfg.num_key_value_heads * cfg.head_dim / max(1, min(tensor, cfg.num_key_value_heads))
    return d * c + (2 * q + 2 * kv) * c
  if kind == Block.MLP:
    return d * c + 2 * cfg.intermediate_size / tensor * c
  r, f, din = cfg.num_experts_per_tok, cfg.moe_intermediate_size / tensor, cfg.moe_input_size
  # `moe_seq_chunks`: the routed rows of one sequence piece at a time (each piece rematerialised).
  return (d * c + 4 * cfg.n_routed_experts + r * (din * c + 2 * f * c + 4 * din) / cfg.moe_seq_chunks
          + 2 * cfg.moe_shared_expert_intermediate_size / tensor * c + (2 * din * c if cfg.moe_latent_size else 0))


def _attention_score_bytes_per_token(cfg: ModelConfig, seq: int, tensor: int) -> float:
  """The materialised f32 softmax row of each query head (T keys), kept for the backward pass; blockwise
  and flash attention keep their f32 log-sum-exp instead (`attention_impl="blockwise"` or `"flash"`)."""
  keys = seq if cfg.attention_impl == "dense" else 1
  return 4 * keys * cfg.num_attention_heads / tensor


def estimate(cfg: ModelConfig, *, preset: str, layout: str, mesh: dict[str, int], batch: int, seq: int,
             remat: str = "full", device_gb: float = 80.0, mu_dtype: str | None = None, loss_chunk: int = 0,
             mtp_depths: int = 0) -> Plan:
  """One layout on one mesh. Optimizer: AdamW (optax) with the first moment in `mu_dtype` (None: the param
  dtype) and the second moment in the param dtype; gradients in the param dtype (as `n3jax.trainer` runs).
  loss_chunk: the trainer's `loss_chunk` (the f32 logits of that many positions at a time; 0: all).
  mtp_depths: the trainer's `mtp_depths` (0: the model's `num_nextn_predict_layers`)."""
  if mtp_depths < 0:
    raise ValueError(f"{mtp_depths=} must be >= 0")
  mesh = _checked_mesh(mesh)
  if unused := sharding.unused_mesh_axes(mesh, layout):
    raise ValueError(f"layout {layout!r} splits nothing over mesh axes {unused}: their devices would repeat each "
                     "other's work (the trainer refuses it)")
  batch_shards = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  if batch % batch_shards:
    raise ValueError(f"{batch=} must be a multiple of data*fsdp*expert={batch_shards}")
  tensor = mesh["tensor"]
  per_device, largest_layer = _param_bytes_per_device(cfg, layout, mesh)
  pbytes = _BYTES[cfg.param_dtype]
  tokens = batch // batch_shards * seq
  layer_bytes = lambda k: _activation_bytes_per_token(cfg, k, tensor) + (
      _attention_score_bytes_per_token(cfg, seq, tensor) if k == Block.ATTENTION else 0)
  per_layer = [layer_bytes(k) for k in cfg.blocks]
  residual = cfg.hidden_size * _BYTES[cfg.dtype]
  logits = 2 * 4 * cfg.vocab_size / (tensor if layout == "fsdp_tp_ep" else 1)  # f32 logits + log-softmax
  if loss_chunk:
    logits *= min(1.0, loss_chunk / seq)
  if remat == "none":
    act = tokens * (sum(per_layer) + logits)
  else:  # full / nothing_saveable: layer inputs are kept, one layer is recomputed at a time
    act = tokens * (len(per_layer) * residual + max(per_layer) + logits)
  depths = (mtp_depths or cfg.num_nextn_predict_layers) if cfg.num_nextn_predict_layers else 0  # as the trainer
  # MTP (not rematerialised): each depth keeps its [embedding; hidden] input, its blocks' activations and its
  # own logits.
  act += tokens * depths * (2 * residual + sum(layer_bytes(k) for k in cfg.mtp_blocks) + logits)
  # FSDP gathers one layer at a time (fwd/bwd copies in flight), over `fsdp` and, where experts are split, the
  # expert axis too (`sharding._FSDP_OVER_EXPERT`).
  at_rest = mesh["fsdp"] * (mesh["expert"] if layout in ("fsdp_ep", "fsdp_tp_ep") else 1)
  gathered = largest_layer * _BYTES[cfg.dtype] * (2 if at_rest > 1 else 0)
  flops = _step_flops(cfg, batch * seq, seq, depths)
  gb = 1e9
  params_gb, opt_gb = per_device * pbytes / gb, per_device * (_BYTES[mu_dtype or cfg.param_dtype] + pbytes) / gb
  grads_gb = per_device * pbytes / gb
  total = params_gb + opt_gb + grads_gb + gathered / gb + act / gb
  return Plan(preset, layout, mesh, batch, seq, remat, params_gb, opt_gb, grads_gb, gathered / gb, act / gb,
              total, flops / 1e12, device_gb)


def _checked_mesh(mesh: dict[str, int]) -> dict[str, int]:
  """`mesh` with every axis of `sharding.MESH_AXES` (missing ones 1); an unknown axis or a size below 1 is a
  ValueError (an unknown axis was dropped: `tp=8` planned one device)."""
  if unknown := sorted(set(mesh) - set(sharding.MESH_AXES)):
    raise ValueError(f"Unknown mesh axes {unknown}; known: {list(sharding.MESH_AXES)}")
  if bad := {a: v for a, v in mesh.items() if int(v) < 1}:
    raise ValueError(f"Mesh axis sizes must be >= 1, got {bad}")
  return {a: int(mesh.get(a, 1)) for a in sharding.MESH_AXES}


def parse_mesh(text: str, devices: int | None = None) -> dict[str, int]:
  """`--mesh data=..,fsdp=..,expert=..,tensor=..` -> axis sizes (missing axes 1). One size may be -1 (what
  `devices` leaves, as in `sharding.make_mesh`); given `devices`, the sizes must multiply to it. Anything
  else is one ValueError saying what is wrong."""
  mesh: dict[str, int] = {}
  for entry in text.split(","):
    name, eq, value = entry.partition("=")
    name = name.strip()
    if not eq or not name:
      raise ValueError(f"--mesh={text!r}: {entry!r} is not axis=size (axes: {', '.join(sharding.MESH_AXES)})")
    if name in mesh:
      raise ValueError(f"--mesh={text!r} gives {name!r} twice")
    try:
      mesh[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={text!r}: the size of {name!r} is {value!r}, not an integer") from None
  if unknown := sorted(set(mesh) - set(sharding.MESH_AXES)):
    raise ValueError(f"--mesh={text!r}: unknown mesh axes {unknown}; known: {list(sharding.MESH_AXES)}")
  wild = [a for a, v in mesh.items() if v == -1]
  if len(wild) > 1 or any(v < 1 and v != -1 for v in mesh.values()):
    raise ValueError(f"--mesh={text!r}: sizes must be >= 1, one of them may be -1")
  known = math.prod(v for v in mesh.values() if v != -1)
  if wild:
    if devices is None:
      raise ValueError(f"--mesh={text!r}: {wild[0]}=-1 needs --devices (the size it leaves)")
    if devices % known:
      raise ValueError(f"--mesh={text!r}: {devices} devices do not divide into the other axes' {known}")
    mesh[wild[0]] = devices // known
  elif devices is not None and known != devices:
    raise ValueError(f"--mesh={text!r} holds {known} devices, not --devices={devices}")
  return {a: mesh.get(a, 1) for a in sharding.MESH_AXES}


def _step_flops(cfg: ModelConfig, tokens: int, seq: int, mtp_depths: int = 0) -> float:
  """Model FLOPs of a training step, counted by hand: forward x 3 (the backward is two products per
  forward product), each product 2 FLOPs per multiply-add. Per token, forward:

    matmuls     2 x the active params (routed top-k experts; the head, not the embedding lookup)
    attention   QK^T and PV over seq / 2 keys on average (causal): 2 x 2 x seq / 2 x heads x head_dim
    SSD scan    as the chunked scan computes it (chunk l, groups J, heads M, head dim P, state N): C.B once
                per group (2 l J N), the decayed sum of x per head (2 l M P), the chunk's state and its
                output per head (2 x 2 M P N)
    MTP         each depth (`mtp_depths`): its eh_proj, its blocks (attention included) and the head again
  """
  counts = param_counts(cfg)
  d, head = cfg.hidden_size, cfg.vocab_size * cfg.hidden_size
  attention = 2 * 2 * seq / 2 * cfg.num_attention_heads * cfg.head_dim
  ssd = _ssd_flops_per_token(cfg)
  forward = (2 * (counts["active_without_embeddings"] + head) + cfg.count(Block.ATTENTION) * attention
             + cfg.count(Block.MAMBA) * ssd)
  if mtp_depths:
    blocks = cfg.mtp_blocks
    forward += mtp_depths * (2 * (2 * d * d + sum(_block_params(cfg, b)[1] for b in blocks) + head)
                             + sum(b == Block.ATTENTION for b in blocks) * attention
                             + sum(b == Block.MAMBA for b in blocks) * ssd)
  return 3 * forward * tokens


def _ssd_flops_per_token(cfg: ModelConfig) -> float:
  """Forward FLOPs per token of one Mamba layer's chunked scan (`_step_flops`; within the elementwise work of
  XLA's own count of `pallas_kernels.ssd.reference`, tested). C.B is per group, not per head."""
  l, n, p = cfg.chunk_size, cfg.ssm_state_size, cfg.mamba_head_dim
  return 2 * l * cfg.n_groups * n + cfg.mamba_num_heads * (2 * l * p + 2 * 2 * p * n)


def _meshes(devices: int):
  """Mesh shapes over `devices` (powers of two for each axis), data first."""
  sizes = [2**i for i in range(int(math.log2(devices)) + 1)]
  for fsdp, expert, tensor in itertools.product(sizes, sizes, sizes[:4]):
    if devices % (fsdp * expert * tensor) == 0:
      yield {"data": devices // (fsdp * expert * tensor), "fsdp": fsdp, "expert": expert, "tensor": tensor}


def recommend(cfg: ModelConfig, *, preset: str, devices: int, batch: int, seq: int, remat: str = "full",
              device_gb: float = 80.0, mu_dtype: str | None = None, loss_chunk: int = 0, mtp_depths: int = 0
              ) -> Plan | None:
  """The least-communication layout that fits: data parallel before FSDP before experts before tensor
  parallelism, and within a layout the smallest model-parallel degree. If none fits, the smallest plan."""
  smallest = None
  for layout in _LAYOUT_ORDER:
    candidates = []
    for mesh in _meshes(devices):
      uses = {"data_parallel": ("data",), "fsdp": ("data", "fsdp"), "fsdp_ep": ("data", "fsdp", "expert"),
              "fsdp_tp_ep": ("data", "fsdp", "expert", "tensor")}[layout]
      if any(mesh[a] > 1 for a in sharding.MESH_AXES if a not in uses):
        continue
      if mesh["expert"] > 1 and (not cfg.n_routed_experts or cfg.n_routed_experts % mesh["expert"]):
        continue
      try:
        plan = estimate(cfg, preset=preset, layout=layout, mesh=mesh, batch=batch, seq=seq, remat=remat,
                        device_gb=device_gb, mu_dtype=mu_dtype, loss_chunk=loss_chunk, mtp_depths=mtp_depths)
      except ValueError:
        continue
      if smallest is None or plan.total_gb < smallest.total_gb:
        smallest = plan
      if plan.fits:
        candidates.append((mesh["fsdp"] * mesh["expert"] * mesh["tensor"] ** 2, plan))
    if candidates:
      return min(candidates, key=lambda c: c[0])[1]
  return smallest




def default_layout(mesh: dict[str, int]) -> str:
  """The layout a mesh shape implies: tensor > 1 -> fsdp_tp_ep, expert > 1 -> fsdp_ep, fsdp > 1 -> fsdp."""
  if mesh.get("tensor", 1) > 1:
    return "fsdp_tp_ep"
  if mesh.get("expert", 1) > 1:
    return "fsdp_ep"
  return "fsdp" if mesh.get("fsdp", 1) > 1 else "data_parallel"
