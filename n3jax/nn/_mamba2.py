"""The Mamba-2 mixer (HF `NemotronHMamba2Mixer`, Megatron `MambaMixer`, state-spaces `Mamba2`).

    z, x, B, C, dt = in_proj(u)                  # HF fuses these rows as [z | x | B | C | dt]
    x, B, C = silu(causal_depthwise_conv1d([x | B | C]))
    dt = clamp(softplus(dt + dt_bias), dt_limit); A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D x_t      (chunked SSD scan)
    out = out_proj(GroupRMSNorm(y * silu(z)) * scale)

d_inner = mamba_num_heads * mamba_head_dim (never `expand * hidden_size`, ARCHITECTURE.md §10).

Parameters are stored split by meaning (`in_proj/{z,x,B,C,dt}`, `conv1d/{x,B,C}`) with heads and groups
as their own axes, so that tensor parallelism splits heads and groups and the conv, the scan and the
gated norm stay local to a shard (as Megatron does). The converter splits HF's fused `in_proj.weight`
and `conv1d.weight` rows into these pieces and joins them back bit-exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from n3jax import sharding as shd
from n3jax.configs import ModelConfig
from n3jax.nn import _common
from n3jax.nn import _norms
from pallas_kernels.ssd import ops as ssd_ops
from pallas_kernels.ssd import ops_decode as ssd_decode
from pallas_kernels.ssd import reference as ssd_ref

# `cfg.ssd_backend` -> chunked scan with the signature of `pallas_kernels.ssd.reference.ssd_reference`.
# "pallas": the Pallas kernels (forward and backward): Triton on GPU, Mosaic on TPU, the reference on CPU. The
# default stays "reference" until the compiled kernel tests have run on a GPU / TPU (pallas_kernels/ssd/ops_test.py,
# owed; on CPU the kernels are checked in interpret mode and by lowering for abstract H100 / TPU targets).
# "pallas_mgpu": the Mosaic GPU kernels for Hopper (wgmma + TMA; bf16 / f16 compute dtype, GPU only).
SSD_BACKENDS = {"reference": ssd_ref.ssd_reference,
                "pallas": functools.partial(ssd_ops.ssd, backend="auto"),
                "pallas_mgpu": functools.partial(ssd_ops.ssd, backend="mosaic_gpu")}


def _ssd(cfg: ModelConfig):
  if cfg.ssd_backend not in SSD_BACKENDS:
    raise ValueError(f"Unknown {cfg.ssd_backend=}; known: {sorted(SSD_BACKENDS)}")
  return SSD_BACKENDS[cfg.ssd_backend]


# The scan's arguments (x, dt, A, B, C, D, dt_bias, initial state, doc ids) and outputs (y, final state) by
# the dimensions it treats independently: batch rows, and heads split with their B/C groups (Megatron's
# tensor-parallel Mamba), so that a shard's head m still reads its group m // (M / J).
_ROWS, _HEADS, _GROUPS = shd.ACT_BATCH, shd.SSM_HEADS, shd.SSM_GROUPS
_SSD_IN_AXES = (P(_ROWS, None, _HEADS, None), P(_ROWS, None, _HEADS), P(_HEADS), P(_ROWS, None, _GROUPS, None),
                P(_ROWS, None, _GROUPS, None), P(_HEADS), P(_HEADS), P(_ROWS, _HEADS, None, None), P(_ROWS, None))
_SSD_OUT_AXES = (P(_ROWS, None, _HEADS, None), P(_ROWS, _HEADS, None, None))


def _ssd_per_shard(cfg: ModelConfig):
  """The chunked scan, run per batch and head shard under a mesh (`shd.per_shard`: a Pallas kernel is one
  custom call that XLA's partitioner would otherwise feed every shard's rows)."""
  scan, (dt_min, dt_max) = _ssd(cfg), cfg.dt_limit

  def run(x, dt, a, b, c, d, dt_bias, initial_state, doc_ids):
    return scan(x, dt, a, b, c, d, dt_bias, initial_state=initial_state, doc_ids=doc_ids,
                chunk_size=cfg.chunk_size, dt_softplus=True, dt_min=dt_min, dt_max=dt_max)

  return shd.per_shard(run, _SSD_IN_AXES, _SSD_OUT_AXES)


# `cfg.ssd_backend` -> the backend of the one-token conv + SSM update of decoding
# (`pallas_kernels.ssd.ops_decode.conv_ssd_decode_step[_packed]`): with either Pallas backend its Triton kernel on
# GPU (dt, the three conv windows and the SSM state in one launch, the state read once and written once, in
# place), on TPU the jnp conv windows and its Mosaic SSM kernel (the state read once and written once, in
# place), the jnp reference elsewhere; "reference": the jnp `conv_ssd_decode_step_reference` (three
# `causal_conv1d_update_reference` + `ssd_decode_step_reference`). Values: keyword arguments of those functions.
DECODE_BACKENDS = {"reference": dict(backend="reference"), "pallas": dict(backend="auto"),
                   "pallas_mgpu": dict(backend="auto")}
_HEAD_ROWS, _GROUP_ROWS = P(_ROWS, _HEADS, None), P(_ROWS, _GROUPS, None)         # [B, M, P], [B, J, Q]
_HEAD_WINDOW, _GROUP_WINDOW = P(_ROWS, None, _HEADS, None), P(_ROWS, None, _GROUPS, None)  # [B, W-1, ...]
_STATE = P(_ROWS, _HEADS, None, None)
_CONV_AXES = (P(None, _HEADS, None), P(None, _GROUPS, None), P(None, _GROUPS, None),  # conv weights [W, ...]
              P(_HEADS, None), P(_GROUPS, None), P(_GROUPS, None))                    # conv biases
_DECODE_IN_AXES = (_STATE, _HEAD_WINDOW, _GROUP_WINDOW, _GROUP_WINDOW,                 # state, windows
                   _HEAD_ROWS, P(_ROWS, _HEADS), P(_HEADS), _GROUP_ROWS, _GROUP_ROWS,  # x, dt, A, B, C
                   P(_HEADS), P(_HEADS), *_CONV_AXES, P(_ROWS))                        # D, dt_bias, conv, keep
_DECODE_OUT_AXES = (_HEAD_ROWS, _STATE, _HEAD_WINDOW, _GROUP_WINDOW, _GROUP_WINDOW)
# The packed inputs [B, N] interleave heads and groups: split by rows only.
_PACKED_IN_AXES = (P(_ROWS), P(_ROWS), P(_ROWS), P(_ROWS), P(_ROWS), None, None, None, *(None,) * 6, P(_ROWS))
_PACKED_OUT_AXES = (P(_ROWS),) * 5


def _decode_step(cfg: ModelConfig, packed_offset: int | None = None):
  """The decode update of `cfg.ssd_backend` from the new token's raw inputs; the kernel runs per batch and
  head shard under a mesh, as the scan does. Split inputs: (state, conv_x, conv_B, conv_C windows, x, dt, A,
  B, C, D, dt_bias, conv weights x / B / C, conv biases x / B / C (or None), keep); with `packed_offset`:
  (state, windows, xbcdt [B, N] (x, B, C, dt from that column), A_log, D, dt_bias, conv weights, conv biases,
  keep). -> (y, new state, new conv_x, conv_B, conv_C)."""
  if cfg.ssd_backend not in DECODE_BACKENDS:
    raise ValueError(f"Unknown {cfg.ssd_backend=}; known: {sorted(DECODE_BACKENDS)}")
  dt_min, dt_max = cfg.dt_limit
  kw = dict(dt_softplus=True, dt_min=dt_min, dt_max=dt_max, activation="silu", **DECODE_BACKENDS[cfg.ssd_backend])
  biases = lambda bx, bb, bc: None if bx is None else (bx, bb, bc)

  def split(state, win_x, win_b, win_c, x, dt, a, b, c, d, dt_bias, w_x, w_b, w_c, bias_x, bias_b, bias_c, keep):
    y, new_state, windows = ssd_decode.conv_ssd_decode_step(
        state, (win_x, win_b, win_c), x, dt, a, b, c, d, dt_bias, (w_x, w_b, w_c), biases(bias_x, bias_b, bias_c),
        keep=keep, **kw)
    return (y, new_state, *windows)

  def packed(state, win_x, win_b, win_c, xbcdt, a_log, d, dt_bias, w_x, w_b, w_c, bias_x, bias_b, bias_c, keep):
    y, new_state, windows = ssd_decode.conv_ssd_decode_step_packed(
        state, (win_x, win_b, win_c), xbcdt, a_log, d, dt_bias, (w_x, w_b, w_c), biases(bias_x, bias_b, bias_c),
        offset=packed_offset, keep=keep, **kw)
    return (y, new_state, *windows)

  run, in_axes, out_axes = ((split, _DECODE_IN_AXES, _DECODE_OUT_AXES) if packed_offset is None
                            else (packed, _PACKED_IN_AXES, _PACKED_OUT_AXES))
  return run if cfg.ssd_backend == "reference" else shd.per_shard(run, in_axes, out_axes)


def _a_log_init(key, shape, dtype):
  """A = U(1, 16), stored as log (Megatron `MambaMixer` init)."""
  return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def _dt_bias_init(cfg: ModelConfig):
  """softplus^-1 of dt ~ logU(time_step_min, time_step_max), floored (HF / Megatron init)."""
  def init(key, shape, dtype):
    lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), cfg.time_step_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _conv_init(width: int):
  bound = 1.0 / math.sqrt(width)  # torch Conv1d default for a depthwise conv (fan_in = width)
  return nn.initializers.uniform(2 * bound), bound


def _states_after_each_position(cfg: ModelConfig, raw: dict[str, jax.Array], convolved: dict[str, jax.Array],
                                dt: jax.Array, a: jax.Array, d_skip: jax.Array, dt_bias: jax.Array,
                                before: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The state after each position of a one-document chunk continuing `before` -> {name: [B, T, ...]}.

  Conv windows: the last W-1 raw inputs after each position; SSM states: the decoding recurrence
  (`ssd_decode_step_reference`) run over the chunk's convolved inputs. The numbers equal those of decoding
  the chunk one token at a time (speculative decoding keeps the state after the last accepted token).
  """
  bsz, t = dt.shape[:2]
  w = cfg.conv_kernel
  out = {}
  for name in ("x", "B", "C"):
    shape = raw[name].shape[2:]
    window = jnp.concatenate([before[f"conv_{name}"].astype(raw[name].dtype), raw[name]], axis=1)  # [B, W-1+T, ...]
    kept = jnp.arange(t)[:, None] + jnp.arange(1, w)[None, :]                  # [T, W-1]: inputs kept after t
    out[f"conv_{name}"] = window[:, kept].reshape(bsz, t, w - 1, *shape)
  dt_min, dt_max = cfg.dt_limit

  def step(h, xs):
    x, dt_t, b, c = xs
    _, h = ssd_ref.ssd_decode_step_reference(h, x, dt_t, a, b, c, d_skip, dt_bias, dt_softplus=True,
                                             dt_min=dt_min, dt_max=dt_max)
    return h, h

  xs = tuple(jnp.moveaxis(v, 1, 0) for v in (convolved["x"], dt, convolved["B"], convolved["C"]))
  _, ssm = jax.lax.scan(step, before["ssm"].astype(jnp.float32), xs)            # [T, B, M, P, Q] f32
  out["ssm"] = jnp.moveaxis(ssm, 0, 1)
  return out


IN_PROJ = "in_proj"  # the fused input projection of the decoding layout (`fuse_in_proj`)


def in_proj_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The input projections' output shapes, in HF's row order of the fused `in_proj` (z | x | B | C | dt)."""
  m, p, j, q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
  return {"z": (m, p), "x": (m, p), "B": (j, q), "C": (j, q), "dt": (m,)}


def fuse_in_proj(cfg: ModelConfig, mixer: dict[str, Any]) -> dict[str, Any]:
  """A Mamba mixer's params with `in_proj_{z,x,B,C,dt}` (and their biases) joined into one `in_proj`
  [..., D, 2MP + 2JQ + M] (HF's fused order; leading stack axes kept), numpy or jax arrays alike.

  The decoding layout on one device (`inference` applies it): the mixer then projects with one matrix
  product per token. Split, the five products become separate kernels at batch 1, and in XLA's H100 compile of
  the Nemotron-3-Nano-4B step, its dot merger joined dt, B and C by writing a fresh concatenation of their
  weights (13 MB per layer) every token, because dt's 96 columns do not tile. Unquantized configs only; a
  mesh keeps the split params, whose heads and groups its tensor axis splits.
  """
  if cfg.quant != "none":
    raise ValueError(f"fuse_in_proj: quant={cfg.quant!r} scales each projection on its own; keep the split params")
  names = [f"in_proj_{n}" for n in in_proj_shapes(cfg)]
  if missing := [n for n in names if n not in mixer]:
    raise ValueError(f"fuse_in_proj: the mixer params lack {missing} (already fused: {IN_PROJ in mixer})")
  xp = np if all(isinstance(mixer[n], np.ndarray) for n in names) else jnp
  flat = lambda a, k: a.reshape(*a.shape[:a.ndim - k], -1)  # the output axes (k of them) into one
  ranks = {n: len(s) for n, s in zip(names, in_proj_shapes(cfg).values())}
  out = {k: v for k, v in mixer.items() if k not in names and k not in [f"{n}_bias" for n in names]}
  out[IN_PROJ] = xp.concatenate([flat(mixer[n], ranks[n]) for n in names], axis=-1)
  if cfg.use_bias:
    out[f"{IN_PROJ}_bias"] = xp.concatenate([flat(mixer[f"{n}_bias"], ranks[n]) for n in names], axis=-1)
  return out


class Mamba2Mixer(nn.Module):
  cfg: ModelConfig
  layer_index: int | None = None  # static, for the low-precision recipe's BF16 table

  def _proj(self, name: str, u: jax.Array, out_shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """u [B,T,D] @ kernel [D, *out_shape] (+ bias) -> [B, T, *out_shape] in f32."""
    cfg = self.cfg
    pdtype = _common.dtype_of(cfg.param_dtype)
    w = _common.param(self, f"in_proj_{name}", _common.dense_init(cfg), (u.shape[-1], *out_shape),
                      (shd.EMBED, *axes), pdtype)
    letters = "XY"[: len(out_shape)]
    out = _common.linear(self, cfg, "mamba_proj", f"BTD,D{letters}->BT{letters}", u, w.astype(u.dtype))
    if cfg.use_bias:
      out = out + _common.param(self, f"in_proj_{name}_bias", nn.initializers.zeros, out_shape, axes, pdtype)
    return out.astype(u.dtype)

  def _fused_proj(self, u: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """u [B,T,D] @ the fused `in_proj` [D, 2MP + 2JQ + M] (+ bias) -> (the product [B, T, 2MP + 2JQ + M],
    [z, x, B, C, dt] as `_proj` gives them)."""
    cfg = self.cfg
    if cfg.quant != "none":
      raise ValueError(f"a fused in_proj (models.fuse_in_proj) is a layout for unquantized decoding; quant="
                       f"{cfg.quant!r} scales each projection on its own: use the split params")
    w = self.get_variable("params", IN_PROJ)
    shapes = in_proj_shapes(cfg)
    width = sum(math.prod(s) for s in shapes.values())
    if w.shape != (u.shape[-1], width):
      raise ValueError(f"fused in_proj has shape {w.shape}, expected {(u.shape[-1], width)} for this config")
    out = _common.linear(self, cfg, "mamba_proj", "BTD,DX->BTX", u, w.astype(u.dtype))
    if cfg.use_bias:
      out = out + self.get_variable("params", f"{IN_PROJ}_bias")
    out = out.astype(u.dtype)
    bounds = np.cumsum([math.prod(s) for s in shapes.values()])[:-1]
    return out, [piece.reshape(*u.shape[:2], *shape)
                 for piece, shape in zip(jnp.split(out, bounds, axis=-1), shapes.values())]

  def _conv_params(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> tuple[jax.Array, Any]:
    cfg = self.cfg
    pdtype = _common.dtype_of(cfg.param_dtype)
    init, bound = _conv_init(cfg.conv_kernel)
    shifted = lambda k, s, d: init(k, s, d) - jnp.asarray(bound, d)  # U(-bound, bound)
    w = _common.param(self, f"conv1d_{name}", shifted, (cfg.conv_kernel, *shape), (shd.CONV_WIDTH, *axes), pdtype)
    b = None
    if cfg.use_conv_bias:
      b = _common.param(self, f"conv1d_{name}_bias", shifted, shape, axes, pdtype)
    return w, b

  @nn.compact
  def __call__(self, u: jax.Array, segment_ids: jax.Array, state: dict[str, jax.Array] | None = None,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """u [B,T,D], segment_ids [B,T] -> (out [B,T,D], final state).

    `state` (optional) continues a sequence: {"conv_x": [B,W-1,M,P], "conv_B"/"conv_C": [B,W-1,J,Q],
    "ssm": [B,M,P,Q] f32}; the returned state has the same structure (the generation caches). One token
    after a state (T == 1, decoding) takes the recurrent update instead of a chunk padded to `chunk_size`;
    the numbers are those of the sequence path.

    A state whose leaves carry a position axis ([B, T, ...], entry 0 the state before the chunk) asks for
    the state after every position of a one-document chunk, returned with the same axis (speculative
    decoding verifies T tokens at once and resumes after the last accepted one).
    """
    cfg = self.cfg
    dtype, pdtype = _common.dtype_of(cfg.dtype), _common.dtype_of(cfg.param_dtype)
    bsz, t, _ = u.shape
    m, p, j, q = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    u = u.astype(dtype)
    head_axes = (shd.SSM_HEADS, shd.SSM_HEAD_DIM)
    group_axes = (shd.SSM_GROUPS, shd.SSM_STATE)

    fused = None  # the fused projection's product [B, T, 2MP + 2JQ + M] (z | x | B | C | dt)
    if self.has_variable("params", IN_PROJ):  # the decoding layout (`fuse_in_proj`)
      fused, (z, x, b_in, c_in, dt) = self._fused_proj(u)
    else:
      z = self._proj("z", u, (m, p), head_axes)          # [B, T, M, P]
      x = self._proj("x", u, (m, p), head_axes)          # [B, T, M, P]
      b_in = self._proj("B", u, (j, q), group_axes)      # [B, T, J, Q]
      c_in = self._proj("C", u, (j, q), group_axes)      # [B, T, J, Q]
      dt = self._proj("dt", u, (m,), (shd.SSM_HEADS,))   # [B, T, M]

    # Depthwise causal conv + SiLU on x, B, C (one channel set each; equal to HF's conv over [x|B|C]).
    keep = None  # [B] rows whose state carries on (the caches' new-document reset, `models._layer_cache`)
    if state is not None and "continues" in state:
      state = dict(state)
      keep = state.pop("continues")
    per_position = state is not None and state["ssm"].ndim == 5  # [B, T, M, P, Q]: every position's state
    if per_position:
      state = {name: v[:, 0] for name, v in state.items()}  # the state before the chunk
    decode = t == 1 and state is not None and not per_position  # a single new token continuing its document
    if keep is not None and not decode:  # a chunk: the conv and the scan start from the reset state
      state = {k: jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v)) for k, v in state.items()}
      keep = None
    state = state or {}
    channel_sets = (("x", x, (m, p), head_axes), ("B", b_in, (j, q), group_axes), ("C", c_in, (j, q), group_axes))
    conv = {name: self._conv_params(name, shape, axes) for name, _, shape, axes in channel_sets}  # [W, ...], [...]
    conv = {name: (w.astype(dtype), None if bias is None else bias.astype(dtype)) for name, (w, bias) in conv.items()}

    a_log = _common.param(self, "A_log", _a_log_init, (m,), (shd.SSM_HEADS,), pdtype)
    d_skip = _common.param(self, "D", nn.initializers.ones, (m,), (shd.SSM_HEADS,), pdtype)
    dt_bias = _common.param(self, "dt_bias", _dt_bias_init(cfg), (m,), (shd.SSM_HEADS,), pdtype)
    a = -jnp.exp(a_log.astype(jnp.float32))  # [M]; the decay is computed in f32 on purpose
    dt_min, dt_max = cfg.dt_limit
    new_state = {}
    if decode:  # one token after a state: the windows shift and the recurrence h = exp(dt A) h + dt x B^T runs
      windows = (state["conv_x"], state["conv_B"], state["conv_C"])
      conv_args = (*(conv[n][0] for n in "xBC"), *(conv[n][1] for n in "xBC"), keep)
      if fused is not None:  # the kernel reads x, B, C, dt where the fused projection put them (after z)
        y, ssm_state, *windows = _decode_step(cfg, packed_offset=m * p)(
            state["ssm"], *windows, fused[:, 0], a_log, d_skip, dt_bias, *conv_args)
      else:
        y, ssm_state, *windows = _decode_step(cfg)(
            state["ssm"], *windows, x[:, 0], dt[:, 0], a, b_in[:, 0], c_in[:, 0], d_skip, dt_bias, *conv_args)
      y = y[:, None]                                                             # [B, 1, M, P]
      new_state.update({f"conv_{n}": w for n, w in zip("xBC", windows)})
    else:
      convolved = {}
      for name, val, shape, _ in channel_sets:
        w, bias = conv[name]
        ch = math.prod(shape)
        init_state = state.get(f"conv_{name}")
        init_state = None if init_state is None else init_state.reshape(bsz, cfg.conv_kernel - 1, ch)
        y, fin = ssd_ref.causal_conv1d_reference(val.reshape(bsz, t, ch), w.reshape(cfg.conv_kernel, ch),
                                                 None if bias is None else bias.reshape(ch), initial_state=init_state,
                                                 doc_ids=segment_ids, activation="silu")
        convolved[name] = y.reshape(bsz, t, *shape)
        new_state[f"conv_{name}"] = fin.reshape(bsz, cfg.conv_kernel - 1, *shape)
      y, ssm_state = _ssd_per_shard(cfg)(
          convolved["x"], dt, a, convolved["B"], convolved["C"], d_skip.astype(jnp.float32),
          dt_bias.astype(jnp.float32), state.get("ssm"), segment_ids)
    new_state["ssm"] = ssm_state  # [B, M, P, Q] f32
    if per_position:
      new_state = _states_after_each_position(cfg, {"x": x, "B": b_in, "C": c_in}, convolved, dt, a,
                                              d_skip.astype(jnp.float32), dt_bias.astype(jnp.float32), state)

    scale = _common.param(self, "norm", nn.initializers.ones, (m, p), head_axes, pdtype)
    y = _norms.gated_group_rms_norm(y, z, scale, groups=j, eps=cfg.layer_norm_epsilon)  # [B, T, M, P] f32
    w_out = _common.param(self, "out_proj", _common.out_proj_init(cfg), (m, p, u.shape[-1]), (*head_axes, shd.EMBED),
                          pdtype)
    out = _common.linear(self, cfg, "mamba_proj", "BTMP,MPD->BTD", y.astype(dtype), w_out.astype(dtype))
    if cfg.use_bias:
      out = out + _common.param(self, "out_proj_bias", nn.initializers.zeros, (u.shape[-1],), (shd.NORM,), pdtype)
    return out.astype(dtype), new_state
