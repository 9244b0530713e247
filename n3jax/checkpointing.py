"""Orbax checkpoints of n3jax models: `DIR/config.json` (the `ModelConfig`) beside `DIR/params/` and
`DIR/fingerprint.json` (one exact fingerprint per param, checked on load).

The params tree is the module tree (see `n3jax.models`); the config is saved with the weights so that a
checkpoint never has to be guessed from its shapes.

`TrainCheckpointer` (below) holds the trainer's full state instead: `WORKDIR/checkpoints/<step>/state`
(params, optimizer state, step, RNG), `.../meta` (a fingerprint of the state) and `.../data` (each host's
data-iterator state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from n3jax.configs import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FINGERPRINT_FILE = "fingerprint.json"  # per param, see `_bits_fingerprint`


# Bytes orbax may have in flight while writing / reading: bounds host memory above one copy of the params.
_CONCURRENT_GB = 0.25


def _host_array(x):
  """A jax array on the host CPU device (zero-copy for aligned numpy), so orbax's concurrency limit applies and
  a GPU/TPU host never stages the weights on the accelerator."""
  return jax.device_put(x, jax.devices("cpu")[0])


def _bits_fingerprint(x: jax.Array) -> jax.Array:
  """[2] uint32: the sums, modulo 2^32, of the leaf's bit patterns and of the bits times the (1-based) flat
  index. Integer sums wrap exactly in any order, so the numbers do not depend on the sharding (other partial
  sums), and any changed element, or two swapped, shows."""
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
  index, stride = jnp.ones(x.shape, jnp.uint32), 1  # flat index + 1, wrapping like the sums
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return jnp.stack([u.sum(dtype=jnp.uint32), (u * index).sum(dtype=jnp.uint32)])


_leaf_fingerprint = jax.jit(_bits_fingerprint)


def _numpy_fingerprint(x: np.ndarray, chunk: int = 1 << 20) -> list[int]:
  """`_bits_fingerprint` of a host array in numpy, a chunk at a time (no copy of the array): uint64 sums wrap
  modulo 2^64, a multiple of 2^32, so the result modulo 2^32 is the same."""
  flat = np.ascontiguousarray(x).reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
  plain = weighted = np.uint64(0)
  with np.errstate(over="ignore"):
    for start in range(0, flat.size, chunk):
      u = flat[start:start + chunk].astype(np.uint64)
      index = np.arange(start + 1, start + 1 + u.size, dtype=np.uint64) % np.uint64(2**32)
      plain += u.sum(dtype=np.uint64)
      weighted += (u * index).sum(dtype=np.uint64)
  return [int(plain) % 2**32, int(weighted) % 2**32]


def _param_fingerprint(x) -> list[int]:
  """`_bits_fingerprint` of one param: a jax array where it lies, a numpy one in numpy (bounded memory)."""
  if isinstance(x, jax.Array):
    return np.asarray(_leaf_fingerprint(x)).astype(np.int64).tolist()
  return _numpy_fingerprint(np.asarray(x))


def save_params(directory: str, cfg: ModelConfig, params: Any) -> None:
  """Writes config and params (numpy or jax leaves) under `directory`, and each param's fingerprint
  (`_bits_fingerprint`), which `load_params` checks: a bit changed on disk is an error, not other weights."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(cfg.to_json())
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=_CONCURRENT_GB)
  ocp.Checkpointer(handler).save(os.path.join(directory, PARAMS_DIR),
                                 args=ocp.args.PyTreeSave(jax.tree.map(_host_array, params)))
  prints = {jax.tree_util.keystr(p): _param_fingerprint(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  tmp = os.path.join(directory, FINGERPRINT_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(prints, f)
  os.replace(tmp, os.path.join(directory, FINGERPRINT_FILE))


def _check_fingerprints(directory: str, params: Any, metadata: Any) -> None:
  """Compares loaded params with the fingerprints `save_params` wrote (checkpoints without the file, from
  before it, are not checked). A param read into a wider float dtype is compared after casting back (exact);
  one read into a narrower dtype is not compared."""
  path = os.path.join(directory, FINGERPRINT_FILE)
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f"{directory} is a damaged n3jax checkpoint: {path} is not valid JSON ({e})") from e
  dtypes = {jax.tree_util.keystr(p): np.dtype(m.dtype) for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  bad = []
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(p)
    if key not in saved:
      bad.append(key)
      continue
    if np.dtype(x.dtype) != dtypes[key]:
      if np.dtype(x.dtype).itemsize <= dtypes[key].itemsize:
        continue
      x = x.astype(dtypes[key])
    if _param_fingerprint(x) != saved[key]:
      bad.append(key)
  if bad:
    raise ValueError(f"{directory} is a damaged n3jax checkpoint: {len(bad)} param(s) differ from the fingerprints "
                     f"saved with them ({FINGERPRINT_FILE}): {bad[:5]}")


def load_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {CONFIG_FILE} is missing")
  with open(path) as f:
    return ModelConfig.from_json(f.read())


def _params_path(directory: str) -> str:
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} is not an n3jax checkpoint: {PARAMS_DIR}/ is missing")
  return path


def _params_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=_CONCURRENT_GB))


def _saved_tree(checkpointer: ocp.Checkpointer, directory: str) -> Any:
  """The params tree's metadata, or one error naming the checkpoint when its tree metadata is unreadable."""
  path = _params_path(directory)
  try:
    item = checkpointer.metadata(path).item_metadata
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{directory} is a damaged n3jax checkpoint: the metadata of {path} cannot be read "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from e
  if item is None or getattr(item, "tree", None) is None:
    raise ValueError(f"{directory} is a damaged n3jax checkpoint: {path} has no readable tree metadata "
                     "(its _METADATA file is missing or truncated)")
  return item.tree


def params_metadata(directory: str) -> Any:
  """The saved params tree as `jax.ShapeDtypeStruct`s (reads no array data)."""
  tree = _saved_tree(_params_checkpointer(), directory)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def load_params(directory: str, *, as_numpy: bool = False, shardings: Any = None, dtypes: Any = None) -> Any:
  """The params tree: jax arrays on the default device, host numpy arrays with `as_numpy`, or jax arrays
  read straight into their shards with `shardings` (a tree of `jax.sharding.Sharding` like the params:
  each process reads only its shards, so a model larger than one host's memory loads).

  `dtypes` (a tree of dtypes like the params, or one dtype) casts while reading, e.g. a bf16 checkpoint
  into f32 master params. A tree that does not match the checkpoint's is one error naming the params.
  """
  path = _params_path(directory)
  checkpointer = _params_checkpointer()
  metadata = _saved_tree(checkpointer, directory)
  for name, tree in (("shardings", shardings), ("dtypes", dtypes)):
    if tree is None or not isinstance(tree, dict):
      continue
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if want != got:
      raise ValueError(f"{name} do not match the params of {directory}: missing {sorted(want - got)[:5]}, "
                       f"unknown {sorted(got - want)[:5]}")
  if dtypes is not None and not isinstance(dtypes, dict):
    dtypes = jax.tree.map(lambda _: dtypes, metadata)
  if shardings is not None:
    if as_numpy:
      raise ValueError("load_params: as_numpy and shardings exclude each other")
    restore_args = jax.tree.map(
        lambda m, s, d: ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(m.shape), dtype=d),
        metadata, shardings, dtypes if dtypes is not None else jax.tree.map(lambda _: None, metadata))
  else:
    restore_type = np.ndarray if as_numpy else jax.Array
    restore_args = jax.tree.map(
        lambda _, d: ocp.RestoreArgs(restore_type=restore_type, dtype=d), metadata,
        dtypes if dtypes is not None else jax.tree.map(lambda _: None, metadata))
  params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  _check_fingerprints(directory, params, metadata)
  return params


def load(directory: str, **overrides) -> tuple[ModelConfig, Any]:
  """`cfg, params = load(dir)`; `overrides` replace config fields (e.g. `dtype="bfloat16"`)."""
  cfg = load_config(directory)
  if overrides:
    cfg = cfg.replace(**overrides)
  return cfg, load_params(directory)


# ---------------------------------------------------------------------------------------------------
# Train-state checkpoints (params, optimizer state, step, RNG, data-iterator state) for n3jax.trainer.
# ---------------------------------------------------------------------------------------------------
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointMismatch(ValueError):
  """A checkpoint that is intact but does not fit this run (another model, param dtype or host count)."""


@jax.jit
def _fingerprint(tree: Any) -> Any:
  return jax.tree.map(_bits_fingerprint, tree)


def _fingerprint_list(tree: Any) -> list[list[int]]:
  return [np.asarray(v).astype(np.int64).tolist() for v in jax.tree.leaves(jax.device_get(_fingerprint(tree)))]


class _DataStateHandler(ocp.CheckpointHandler):
  """Each process's data-iterator state (JSON) in `process_<i>-of-<n>.json`: with several hosts every host
  reads its own shard of the data, so every host saves and restores its own position. (Orbax's JSON
  handler writes on the primary host only.)"""

  def save(self, directory, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(args.state))

  def restore(self, directory, args: "DataStateRestore | None" = None):
    del args
    count = jax.process_count()
    path = directory / f"process_{jax.process_index()}-of-{count}.json"
    if not path.exists():
      written = sorted(p.name for p in directory.iterdir() if p.name.startswith("process_"))
      if written and not any(name.endswith(f"-of-{count}.json") for name in written):
        raise CheckpointMismatch(f"its data-iterator states were written by a run of another host count "
                                 f"({written[0]} ...), this run has {count} process(es); resume with as many hosts")
      raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())

  def metadata(self, directory):
    del directory
    return None

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(_DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(_DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _path_name(path) -> str:
  """A tree path as "a/b/0/count", whatever the node types (orbax's metadata has dicts for namedtuples)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


class TrainCheckpointer:
  """An orbax `CheckpointManager` over `directory`/<step>/{state, meta, data}: async saves, keep-last-K, and a
  restore that takes the newest *intact* step.

    state   params, optimizer state, step, RNG (orbax arrays; each host writes its shards)
    meta    the step and a fingerprint of the state (JSON, primary host)
    data    each host's data-iterator state (`process_<i>-of-<n>.json`)

  Orbax writes each step into a temporary directory and renames it when complete, so a kill mid-save
  leaves a `*.orbax-checkpoint-tmp-*` directory that is never listed as a step (and is cleaned up).
  On restore, a listed step that fails to read, or whose state does not match the fingerprint saved
  with it, is reported, moved to `<workdir>/damaged_checkpoints/`, and the next older step is tried. A
  checkpoint that is intact but made for another run (`check_fits`, `CheckpointMismatch`) and running out of
  memory while reading are errors, not damage: nothing is moved.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=self._options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(), "data": _DataStateHandler()})

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_state: Any) -> None:
    """Starts an (async) save of `state` and this host's JSON-able `data_state` at `step`."""
    if step in self._mgr.all_steps():
      return
    meta = {"step": int(step), "fingerprint": _fingerprint_list(state)}
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                                                 data=DataStateSave(data_state)), force=True)

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def check_fits(self, abstract_state: Any) -> None:
    """Raises `CheckpointMismatch` naming the leaves whose paths, shapes or dtypes differ when the newest
    step whose tree can be read was saved from another state than `abstract_state` (a workdir of another
    model or param dtype). Reads metadata only; a step whose metadata cannot be read is left to
    `restore_latest`."""
    for step in sorted(self._mgr.all_steps(), reverse=True):
      try:
        tree = self._mgr.item_metadata(step)["state"].tree
      except Exception:  # pylint: disable=broad-except
        continue
      if tree is None:
        continue
      saved = {_path_name(p): (tuple(m.shape), np.dtype(m.dtype))
               for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
      want = {_path_name(p): (tuple(a.shape), np.dtype(a.dtype))
              for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
      if saved == want:
        return
      missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
      differ = [f"{k}: saved {saved[k][0]} {saved[k][1]}, now {want[k][0]} {want[k][1]}"
                for k in sorted(set(want) & set(saved)) if saved[k] != want[k]]
      parts = ([f"missing from it: {missing[:4]}"] if missing else []) + (
          [f"not in this run: {extra[:4]}"] if extra else []) + differ[:4]
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.directory} holds another model's state than this run's "
          f"({len(missing) + len(extra) + len(differ)} leaves differ; " + "; ".join(parts) + "). Use a new workdir "
          "(init_from= starts from an n3jax checkpoint's params), or the model config the checkpoint was made with")

  def _quarantine(self, step: int, reason: str, log) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, f"{step}-{int(time.time())}")
    log(f"Checkpoint step {step} in {self.directory} is damaged ({reason}); moved to {dst}, "
        "trying an older one")
    if jax.process_index() == 0 and os.path.exists(src):
      shutil.move(src, dst)
    self._mgr.reload()

  def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any, Any] | None:
    """-> (step, state, data_state) of the newest intact checkpoint, or None when there is none."""
    for step in sorted(self._mgr.all_steps(), reverse=True):
      try:
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(), data=DataStateRestore()))
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or "fingerprint" not in meta:
          raise ValueError("its meta item is missing")
        if meta["fingerprint"] != _fingerprint_list(state):
          raise ValueError("restored values differ from the fingerprint saved with them")
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if _out_of_memory(e):
          raise
        self._quarantine(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", log)
        continue
      return step, state, out["data"]
    return None
