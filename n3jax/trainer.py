"""`train_and_evaluate(config, workdir)`: the training loop the CLI, tests and notebooks share.

    config -> checks (config keys, model, numbers, tokenizer, data: all before any compile)
      -> restore the newest intact checkpoint, or init (random, or `init_from` a converted checkpoint)
      -> jitted `train_step(state, batch)` -> progress lines + TensorBoard -> periodic eval and async saves

Devices: with `config.mesh` all 1, state and batches live on `jax.local_devices()[0]`; otherwise on a mesh
over every process's devices under the layout `config.axis_rules` (`n3jax.sharding`), the state created or
restored directly in its shards and each host feeding its slice of the batch. Workdir layout:

    WORKDIR/config.json            the ModelConfig (as in n3jax checkpoints)
    WORKDIR/experiment.json        the full training config
    WORKDIR/checkpoints/<step>/    orbax: state (params, opt_state, step, rng) + meta (data state)
    WORKDIR/tensorboard/           event files
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from n3jax import _optim
from n3jax import _progress
from n3jax import _train_step
from n3jax import checkpointing
from n3jax import data as data_lib
from n3jax import models
from n3jax import sharding
from n3jax._train_config import build_model_config, default_config, merge_with_defaults

__all__ = ["InputError", "TrainResult", "build_model_config", "compile_train_step", "default_config",
           "train_and_evaluate"]


class InputError(ValueError):
  """A bad config, model override, tokenizer or data set, found by the checks before anything compiles.
  The original exception (e.g. FileNotFoundError) is its `__cause__`."""


@dataclasses.dataclass
class TrainResult:
  losses: dict[int, float]          # step -> train loss (main CE), for every step this call ran
  metrics: dict[int, dict[str, float]]  # step -> all step metrics (loss, grad_norm, lr, mtp_loss, ...)
  eval_losses: dict[int, float]     # step -> held-out loss
  restored_step: int | None         # the checkpoint this call resumed from
  last_step: int
  preempted: bool


def _check_numbers(config, cfg) -> None:
  def need(cond, msg):
    if not cond:
      raise ValueError(msg)
  d = config.data
  need(config.num_steps > 0, f"num_steps={config.num_steps} must be > 0")
  need(config.batch_size > 0, f"batch_size={config.batch_size} must be > 0")
  need(config.grad_accum_steps >= 1 and config.batch_size % config.grad_accum_steps == 0,
       f"batch_size={config.batch_size} must be a multiple of grad_accum_steps={config.grad_accum_steps}")
  need(d.seq_len > 0, f"data.seq_len={d.seq_len} must be > 0")
  need(d.seq_len <= cfg.max_position_embeddings,
       f"data.seq_len={d.seq_len} is longer than the model's maximum sequence length "
       f"max_position_embeddings={cfg.max_position_embeddings}; lower data.seq_len or raise "
       "model_overrides.max_position_embeddings")
  need(d.eval_batches >= 1, f"data.eval_batches={d.eval_batches} must be >= 1")
  need(config.log_every >= 1, f"log_every={config.log_every} must be >= 1")
  for name in ("stop_after_step", "eval_every", "mtp_depths"):
    need(config[name] >= 0, f"{name}={config[name]} must be >= 0")
  need(not config.mtp_depths or cfg.num_nextn_predict_layers,
       f"mtp_depths={config.mtp_depths} but the model has no MTP module (num_nextn_predict_layers=0); leave "
       "mtp_depths at 0")
  depths = config.mtp_depths or cfg.num_nextn_predict_layers
  need(d.seq_len > depths, f"data.seq_len={d.seq_len} leaves no position for MTP depth {depths}: it must be "
       f"> {depths}")
  need(config.checkpoint.every_steps >= 0 and config.checkpoint.keep >= 0,
       f"checkpoint.every_steps={config.checkpoint.every_steps} and keep={config.checkpoint.keep} must be >= 0")
  for name, value in (("loss_chunk", config.loss_chunk), ("mtp_loss_scale", config.mtp_loss_scale),
                      ("moe.bias_update_rate", config.moe.bias_update_rate),
                      ("moe.balance_loss_coef", config.moe.balance_loss_coef), ("data.prefetch", d.prefetch)):
    need(value >= 0, f"{name}={value} must be >= 0")
  need(d.validate_records >= 1, f"data.validate_records={d.validate_records} must be >= 1 (records of each split "
       "built up front)")


def _accumulation(config, batch_shards: int):
  """`config` with grad_accum_steps from `micro_batch_size` (when > 0) for a batch split `batch_shards` ways."""
  mbs = config.micro_batch_size
  if mbs <= 0:
    micro = config.batch_size // config.grad_accum_steps
    if micro % batch_shards:
      raise ValueError(f"batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} = {micro} "
                       f"sequences per micro-batch must be a multiple of the {batch_shards} devices splitting "
                       "the batch")
    return config
  per_step = batch_shards * mbs
  if config.grad_accum_steps != 1 or config.batch_size % per_step:
    raise ValueError(f"micro_batch_size={mbs} x {batch_shards} devices splitting the batch = {per_step} sequences "
                     f"per micro-batch must divide batch_size={config.batch_size} (and leave grad_accum_steps at 1, "
                     f"not {config.grad_accum_steps})")
  config = ml_collections.ConfigDict(config.to_dict())
  config.grad_accum_steps = config.batch_size // per_step
  return config


def _fresh_state(cfg, config, tx, init_key, rng, device, shardings=None) -> Any:
  """Step-0 state: random params (or `init_from` params cast to the param dtype) and optimizer state."""
  # NOTE: init runs once, so on CPU it is compiled at XLA optimisation level 0: the tiny presets' init
  # (a vmapped forward of every layer kind) compiles in ~1.5 s instead of ~15 s.
  fast = {"xla_backend_optimization_level": 0} if device.platform == "cpu" else None
  if not config.init_from:
    init = jax.jit(lambda k: _train_step.init_state(models.init(cfg, k), tx, rng), out_shardings=shardings)
    return init.lower(init_key).compile(compiler_options=fast)(init_key)
  want = jax.eval_shape(lambda: models.init(cfg, init_key))
  saved = checkpointing.params_metadata(config.init_from)  # shapes only: checked before any read
  want_paths = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(want)[0]}
  got_paths = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  if missing := sorted(set(want_paths) - set(got_paths)):
    raise ValueError(f"init_from={config.init_from!r} lacks params {missing[:5]} (of {len(missing)})")
  if extra := sorted(set(got_paths) - set(want_paths)):
    raise ValueError(f"init_from={config.init_from!r} has params the model does not: {extra[:5]}")
  for k, s in want_paths.items():
    if got_paths[k].shape != s.shape:
      raise ValueError(f"init_from param {k} has shape {got_paths[k].shape}, the model wants {s.shape}")
  # Cast to the training param dtype while reading (a bf16 checkpoint trains with f32 master params); on a
  # mesh each process reads only its shards.
  dtypes = jax.tree.map(lambda s: s.dtype, want)
  params = checkpointing.load_params(config.init_from, dtypes=dtypes,
                                     shardings=None if shardings is None else shardings["params"])
  return jax.jit(lambda p: _train_step.init_state(p, tx, rng), out_shardings=shardings)(params)


class _Preemption:
  """SIGTERM (a scheduler's notice) or a first Ctrl-C sets a flag; the loop then saves and returns. A
  second Ctrl-C interrupts at once. Handlers can only be installed from the main thread.

  With several processes every host must stop at the same step (the save is a collective): JAX's
  preemption service (`jax.distributed`, on by default) catches SIGTERM on any host and
  `reached_preemption_sync_point(step)` agrees on the step, so no Python handler replaces its own. Where
  that service is off, the hosts' flags are gathered every step instead."""

  def __init__(self, process_count: int = 1, step: int = 0):
    self.requested = False
    self._previous = {}
    self._hosts = process_count
    self._step = step  # the step the loop starts from: the service's steps must only grow
    self._service = False

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT)
    if self._hosts > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        multihost_utils.reached_preemption_sync_point(self._step)
        self._service, signals = True, ()
      except RuntimeError:  # the preemption service is disabled: our handler and a gather per step
        pass
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if signum == signal.SIGINT:  # the next Ctrl-C is a KeyboardInterrupt again
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def stop_at(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every host)."""
    if self._hosts == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if self._service:
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
    else:
      self.requested = bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.requested

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _prepare(config):
  """Config, model config, optimizer and data, all checked (see `InputError`)."""
  config = merge_with_defaults(config)
  cfg = build_model_config(config)
  _check_numbers(config, cfg)
  tx, schedule = _optim.make_optimizer(config.optimizer, config.num_steps)
  eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer, pad_id=cfg.pad_token_id or 0,
                                      bos_id=cfg.bos_token_id or 1, eos_id=eos if eos is not None else 2)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} ids, more than the "
                     f"model's vocab_size={cfg.vocab_size}")
  devices = _Devices(config, cfg)
  shard, host_batch = devices.host_rows(config.batch_size)
  data = data_lib.make_data(config.data, tokenizer=tokenizer, vocab_size=cfg.vocab_size, batch_size=host_batch,
                            seed=config.seed, shard=shard)
  return config, cfg, tx, schedule, data, devices


def _state_shardings(cfg, mesh, rules: str, abstract_state, tx):
  """Params by the layout's rules; optimizer moments like their params; scalars replicated."""
  params = sharding.param_shardings(cfg, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], params,
                              transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": params, "opt_state": opt, "rng": replicated}


class _Devices:
  """Where the state lives: one local device, or a mesh over every process's devices (`config.mesh`)."""

  def __init__(self, config, cfg):
    sizes = {k: int(v) for k, v in config.mesh.items()}
    self.mesh = None if all(v == 1 for v in sizes.values()) else sharding.make_mesh(sizes)
    if self.mesh is None and jax.process_count() > 1:  # each host would train its own copy, never synced
      raise ValueError(f"config.mesh is all 1 (one device) but {jax.process_count()} processes run: size it over "
                       f"the {jax.device_count()} devices of all hosts, e.g. --config.mesh.fsdp=-1")
    self.rules = config.axis_rules
    self.device = jax.local_devices()[0]
    self.cfg = cfg
    self.batch_size = config.batch_size
    self.batch_shards = 1
    if self.mesh is not None:
      self.batch_shards = shards = math.prod(self.mesh.shape[a] for a in ("data", "fsdp", "expert"))
      if config.batch_size % shards:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of data*fsdp*expert={shards} "
                         f"(mesh {dict(self.mesh.shape)})")
      if unused := sharding.unused_mesh_axes(self.mesh, self.rules):
        raise ValueError(f"axis_rules={self.rules!r} splits nothing over mesh axes {unused} (mesh "
                         f"{dict(self.mesh.shape)}): their devices would repeat each other's work; pick a layout "
                         f"that uses them (fsdp_tp_ep for tensor) or size them 1")
      sharding.param_shardings(cfg, self.mesh, self.rules)  # checks divisibility before any compile

  def host_rows(self, batch_size: int) -> tuple[tuple[int, int], int]:
    """((data shard index, shard count), rows) of the batch this process reads: the rows its devices hold.
    Processes whose devices hold the same rows (a tensor axis across hosts) read the same shard, as the
    replicas of an array must; reading one shard per process made them differ, silently."""
    if self.mesh is None:
      return (0, 1), batch_size
    held: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.batch_sharding(self.mesh).devices_indices_map((batch_size, 1)).items():
      held.setdefault(device.process_index, set()).add((index[0].start or 0, index[0].stop or batch_size))
    groups = sorted({tuple(sorted(rows)) for rows in held.values()})
    if len({r for g in groups for r in g}) != sum(len(g) for g in groups):
      raise ValueError(f"mesh {dict(self.mesh.shape)}: processes hold overlapping but different rows of the batch; "
                       "order the mesh so that each host's devices hold whole rows of their own")
    mine = tuple(sorted(held[jax.process_index()]))
    return (groups.index(mine), len(groups)), sum(stop - start for start, stop in mine)

  def all(self) -> list:
    """Every device the step runs on (MFU's peak is theirs: one per process counted 1 of a host's 8 GPUs)."""
    return [self.device] if self.mesh is None else list(self.mesh.devices.flat)

  def context(self):
    return sharding.use_mesh(self.mesh, self.rules) if self.mesh else contextlib.nullcontext()

  def state_shardings(self, abstract_state, tx):
    return None if self.mesh is None else _state_shardings(self.cfg, self.mesh, self.rules, abstract_state, tx)

  def place_state(self, state, shardings):
    return jax.device_put(state, self.device if shardings is None else shardings)

  def place_batch(self, batch):
    """This host's rows -> one global array per key, the batch split over data/fsdp/expert."""
    if self.mesh is None:
      return batch
    spec = sharding.batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(spec, np.asarray(v), (self.batch_size, *np.shape(v)[1:]))
            for k, v in batch.items()}


def _stored_experiment(workdir: str) -> dict[str, Any] | None:
  """The training config a previous run wrote in `workdir` (None: none, or unreadable)."""
  try:
    with open(os.path.join(workdir, "experiment.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _restore_data_state(data, data_state, config, previous: dict[str, Any] | None, step: int, log) -> None:
  """Puts the train iterator where the checkpoint left it. A data config that changed since the checkpoint
  is named: a warning when the saved position still fits the pipeline, an `InputError` when it does not."""
  changed = []
  if previous is not None and isinstance(previous.get("data"), dict):
    now = config.data.to_dict()
    changed = [f"data.{k}: {previous['data'].get(k)!r} -> {now[k]!r}" for k in sorted(now)
               if k not in ("eval_batches", "validate_records", "prefetch") and previous["data"].get(k) != now[k]]
    changed += [f"{k}: {previous.get(k)!r} -> {config[k]!r}" for k in ("batch_size", "seed")
                if k in previous and previous[k] != config[k]]
  try:
    data.train_iter.set_state(data_state)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"the data-iterator state saved at step {step} does not fit this run's data pipeline"
                     + (f" (changed since: {'; '.join(changed)})" if changed else "")
                     + f": {type(e).__name__}: {e}. Resume with the data config it was saved with, or use a "
                     "new workdir") from e
  if changed:
    log(f"WARNING: the data config changed since the checkpoint ({'; '.join(changed)}); the data iterator "
        f"resumes at the position saved at step {step} in the new pipeline")


def _same_eval_batch_count(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
  """Every host evaluates as many batches as the host with the most (an eval step is a collective over all
  hosts): the others add batches of empty rows, which count no tokens."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
  return pad_eval_batches(batches, most)


def pad_eval_batches(batches: list[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
  """`batches` and `count - len(batches)` batches of empty rows (zeros: loss_mask 0, padding segments)."""
  empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
  return list(batches) + [empty] * (count - len(batches))


def _initialize_distributed() -> None:
  """`jax.distributed.initialize()` (once per process) for `config.distributed`, before anything starts
  JAX's backends: it refuses to run after that, and asking `jax.process_count()` first starts them.
  SLURM, Open MPI's mpirun and Cloud TPU VMs are detected by JAX. Elsewhere set JAX_COORDINATOR_ADDRESS
  (read by JAX), JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here: JAX reads neither)."""
  if jax.distributed.is_initialized():
    return
  kw = {}
  for env, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kw[name] = int(os.environ[env])
  jax.distributed.initialize(**kw)


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains `config` (a `default_config()`-shaped ConfigDict) in `workdir`, resuming if it has checkpoints."""
  t_start = time.perf_counter()
  if config.get("distributed", False):
    _initialize_distributed()
  # --- Checks: every bad input fails here, before any compile. ---
  try:
    if "://" in workdir:  # os.path would make gs://b/run the local directory ./gs:/b/run on every host
      raise ValueError(f"workdir={workdir!r} is a URL; the trainer writes with local file calls: give a directory "
                       "every host sees (NFS, Lustre, Filestore, or a bucket mounted with gcsfuse)")
    config, cfg, tx, schedule, data, devices = _prepare(config)
    config = _accumulation(config, devices.batch_shards)
  except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
    raise InputError(str(e).strip("'\"")) from e
  is_chief = jax.process_index() == 0
  log = print if is_chief else (lambda *_: None)
  if jax.process_count() > 1:
    data.eval_batches = _same_eval_batch_count(data.eval_batches)

  # --- Workdir, checkpoints, state. ---
  os.makedirs(workdir, exist_ok=True)
  device = jax.local_devices()[0]
  ckpt = checkpointing.TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
  init_key, rng = jax.random.split(jax.random.key(config.seed))
  abstract = jax.eval_shape(lambda: _train_step.init_state(models.init(cfg, init_key), tx, rng))
  shardings = devices.state_shardings(abstract, tx)
  if shardings is not None:  # restore and create directly in the shards
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  previous = _stored_experiment(workdir)
  try:
    ckpt.check_fits(abstract)  # another model's checkpoints: an error, before this run writes anything
    restored = ckpt.restore_latest(abstract, log=log)
    if restored is not None:
      restored_step, state, data_state = restored
      _restore_data_state(data, data_state, config, previous, restored_step, log)
      log(f"Resumed from {ckpt.directory}/{restored_step}")
  except (checkpointing.CheckpointMismatch, InputError) as e:
    ckpt.close()
    if isinstance(e, InputError):
      raise
    raise InputError(f"workdir {workdir}: {e}") from e
  if is_chief:  # after the checks: a run refused above leaves the workdir's files as they were
    with open(os.path.join(workdir, checkpointing.CONFIG_FILE), "w") as f:
      f.write(cfg.to_json())
    with open(os.path.join(workdir, "experiment.json"), "w") as f:
      f.write(config.to_json(indent=2))
  if restored is None:
    with devices.context():
      restored_step, state = None, _fresh_state(cfg, config, tx, init_key, rng, device, shardings)
  state = devices.place_state(state, shardings)
  step = int(state["step"])

  # --- Compile. ---
  train_step = jax.jit(_train_step.make_train_step(cfg, config, tx, schedule), donate_argnums=0)
  eval_step = jax.jit(_train_step.make_eval_step(cfg, config))
  t0 = time.perf_counter()
  if step >= config.num_steps:
    log(f"{ckpt.directory} is already at step {step} >= num_steps={config.num_steps}: nothing to train")
    ckpt.close()
    return TrainResult({}, {}, {}, restored_step, step, False)
  first = devices.place_batch(next(data.train_iter))
  with devices.context():
    train_step = train_step.lower(state, first).compile()
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  log(f"Model {config.model_preset if not config.init_from else config.init_from}: {n_params / 1e6:.2f}M params "
      f"({cfg.pattern}), {config.batch_size} x {config.data.seq_len} tokens per step, "
      f"{data.num_train_records} train / {data.num_eval_records} held-out records; compiled in "
      f"{time.perf_counter() - t0:.1f} s")

  progress = _progress.Progress(workdir, cfg=cfg, num_steps=config.num_steps,
                                tokens_per_step=config.batch_size * config.data.seq_len, first_step=step,
                                devices=devices.all(), enabled=is_chief)
  eval_losses: dict[int, float] = {}

  def evaluate(at: int):
    t = time.perf_counter()
    with devices.context():
      sums = [eval_step(state["params"], devices.place_batch(b)) for b in data.eval_batches]
    ce, n = (float(np.sum([float(s[i]) for s in sums])) for i in range(2))
    eval_losses[at] = ce / max(n, 1.0)
    progress.eval(at, eval_losses[at], int(n))
    progress.exclude(time.perf_counter() - t)

  saved = [restored_step]

  def save(at: int):
    if saved[0] != at:
      ckpt.save(at, state, data.train_iter.get_state())
      saved[0] = at

  preempted = False
  try:
    with _Preemption(jax.process_count(), step) as preemption:
      while step < config.num_steps:
        batch = first if first is not None else devices.place_batch(next(data.train_iter))
        first = None
        state, metrics = train_step(state, batch)
        step += 1
        progress.record(step, metrics)
        last = step == config.num_steps
        if step % config.log_every == 0 or last:
          progress.flush(step)
        if (config.eval_every and step % config.eval_every == 0) or last:
          evaluate(step)
        every = config.checkpoint.every_steps
        if (every and step % every == 0) or last:
          save(step)
        if preemption.stop_at(step) or step == config.stop_after_step:
          preempted = True
          progress.flush(step)
          save(step)
          log(f"Stopped at step {step} ({'signal' if preemption.requested else 'stop_after_step'}); "
              f"checkpoint saved in {ckpt.directory}")
          break
  finally:
    progress.close()
    ckpt.close()
  losses = {s: m["loss"] for s, m in progress.history.items()}
  if losses:
    held = f", held-out {eval_losses[max(eval_losses)]:.3f}" if eval_losses else ""
    log(f"Done at step {step}: train loss {losses[min(losses)]:.3f} (step {min(losses)}) -> "
        f"{progress.last_interval_loss:.3f}{held}; {time.perf_counter() - t_start:.0f} s in all")
  return TrainResult(losses=losses, metrics=dict(progress.history), eval_losses=eval_losses,
                     restored_step=restored_step, last_step=step, preempted=preempted)


def compile_train_step(config, devices, compiler_options=None) -> jax.stages.Compiled:
  """The training step of `config` compiled ahead of time for `devices` (a list of `config.mesh`'s size,
  e.g. compile-only ones from `n3jax.aot.devices("h100", 8)`), from abstract state and batch: no weights
  are allocated and no data is read. The same step, sharding and donation as `train_and_evaluate`;
  `n3jax.aot.memory(compiled)` is then XLA's per-device memory for it. compiler_options: for XLA
  (`n3jax.aot.compiler_options(target)` for compile-only devices)."""
  config = merge_with_defaults(config)
  cfg = build_model_config(config)
  _check_numbers(config, cfg)
  tx, schedule = _optim.make_optimizer(config.optimizer, config.num_steps)
  mesh = sharding.make_mesh({k: int(v) for k, v in config.mesh.items()}, devices=devices)
  config = _accumulation(config, math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert")))
  keys = jax.random.split(jax.random.key(config.seed))
  # The model is traced for the target devices, whose kernels (e.g. Mosaic GPU) may not trace for this host.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    abstract = jax.eval_shape(lambda: _train_step.init_state(models.init(cfg, keys[0]), tx, keys[1]))
    shardings = _state_shardings(cfg, mesh, config.axis_rules, abstract, tx)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  rows = jax.ShapeDtypeStruct((config.batch_size, config.data.seq_len), np.int32,
                              sharding=sharding.batch_sharding(mesh))
  batch = {k: rows for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
  step = jax.jit(_train_step.make_train_step(cfg, config, tx, schedule), donate_argnums=0)
  with sharding.use_mesh(mesh, config.axis_rules):
    return step.trace(state, batch).lower().compile(compiler_options)
