"""End-to-end training on tiny presets: loss falls, exact resume, damaged checkpoints, SFT, MTP, bad inputs.

Runs compile through a persistent compilation cache in a temporary directory (set for this module only),
so the several identical runs of the resume tests compile once.
"""

import functools
import glob
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from n3jax import _moe_balance
from n3jax import _optim
from n3jax import _train_step
from n3jax import checkpointing
from n3jax import configs
from n3jax import data as data_lib
from n3jax import models
from n3jax import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(keys[1], 0.0)
  jax.config.update(keys[2], 0)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fast_jit(fn, *args):
  """Compiles at XLA optimisation level 0: tiny test programs compile in a fraction of the time."""
  return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


@functools.cache
def _params(preset: str, seed: int = 0):
  cfg = configs.PRESETS[preset]
  return _fast_jit(lambda k: models.init(cfg, k), jax.random.key(seed))


def _small(**kw) -> ml_collections.ConfigDict:
  """tiny-moe, 4 x 64 tokens, 8 steps, checkpoints every 2 steps."""
  c = trainer.default_config()
  c.num_steps, c.batch_size, c.data.seq_len = 8, 4, 64
  c.log_every, c.eval_every, c.checkpoint.every_steps = 4, 0, 2
  c.optimizer.lr, c.optimizer.warmup_steps = 3e-3, 2
  for key, value in kw.items():
    node = c
    *path, leaf = key.split("__")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# --- The quickstart learns ---
def test_tiny_config_loss_falls(tmp_path):
  """configs/tiny_cpu.py shortened to 40 steps of 8 x 128: the loss falls from ln(256) = 5.5 by > 2 nats."""
  c = _load_config("tiny_cpu")
  c.num_steps, c.batch_size, c.data.seq_len = 40, 8, 128
  c.log_every, c.eval_every, c.checkpoint.every_steps, c.optimizer.warmup_steps = 20, 0, 0, 5
  r = trainer.train_and_evaluate(c, str(tmp_path))
  first, last = np.mean([r.losses[s] for s in (1, 2, 3)]), np.mean([r.losses[s] for s in range(31, 41)])
  assert first > 5.0 and last < first - 2.0, (first, last)
  assert r.eval_losses[40] < 3.8
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert configs.ModelConfig.from_json((tmp_path / "config.json").read_text()) == configs.PRESETS["tiny-moe"]


# --- Resume ---
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """(workdir, result) of the run that is never interrupted."""
  workdir = tmp_path_factory.mktemp("full")
  return workdir, trainer.train_and_evaluate(_small(), str(workdir))


@pytest.fixture(scope="module")
def uninterrupted(full_run):
  return full_run[1]


def test_resume_after_kill_is_bit_exact(tmp_path, uninterrupted):
  first = trainer.train_and_evaluate(_small(stop_after_step=5), str(tmp_path))
  assert first.preempted and first.last_step == 5
  second = trainer.train_and_evaluate(_small(), str(tmp_path))
  assert second.restored_step == 5 and second.last_step == 8
  for s in range(1, 6):
    assert first.losses[s] == uninterrupted.losses[s], s
  for s in range(6, 9):
    assert second.losses[s] == uninterrupted.losses[s], s  # bit for bit on CPU
  assert second.eval_losses[8] == uninterrupted.eval_losses[8]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's failed-read threads
def test_damaged_checkpoint_is_skipped(tmp_path, uninterrupted):
  trainer.train_and_evaluate(_small(stop_after_step=5), str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2", "4", "5"]
  for f in glob.glob(str(ckpts / "5" / "state" / "d" / "*")):  # a save cut short: its data files are gone
    os.remove(f)
  (ckpts / "7.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # a kill mid-save
  r = trainer.train_and_evaluate(_small(), str(tmp_path))
  assert r.restored_step == 4
  assert [r.losses[s] for s in range(5, 9)] == [uninterrupted.losses[s] for s in range(5, 9)]
  assert os.listdir(tmp_path / checkpointing.DAMAGED_DIR)[0].startswith("5-")
  assert not glob.glob(str(ckpts / "*tmp*"))


def test_checkpointer_rejects_state_that_differs_from_its_fingerprint(tmp_path):
  ckpt = checkpointing.TrainCheckpointer(str(tmp_path / "c"), keep=3, async_save=False)
  state = {"w": jnp.arange(6.0), "step": jnp.int32(1)}
  ckpt.save(1, state, {"pos": 1})
  ckpt.save(2, {"w": jnp.arange(6.0) * 2, "step": jnp.int32(2)}, {"pos": 2})
  ckpt.close()
  meta_file = tmp_path / "c" / "2" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["fingerprint"][1][0] += 1  # the saved sum of "w" no longer matches its values
  meta_file.write_text(json.dumps(meta))
  ckpt = checkpointing.TrainCheckpointer(str(tmp_path / "c"), keep=3)
  step, restored, data_state = ckpt.restore_latest(jax.eval_shape(lambda: state), log=lambda *_: None)
  assert step == 1 and data_state == {"pos": 1}
  np.testing.assert_array_equal(restored["w"], np.arange(6.0))


def test_the_state_fingerprint_is_exact_and_the_same_on_any_mesh():
  """Integer sums of the bit patterns: one changed bit or two swapped elements show; the sharding does not."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (64, 96), jnp.bfloat16)
  tree = {"x": x, "step": jnp.int32(7), "f": jnp.linspace(-1, 1, 1000, dtype=jnp.float32)}
  base = checkpointing._fingerprint_list(tree)  # pylint: disable=protected-access
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  sharded = dict(tree, x=jax.device_put(x, NamedSharding(mesh, PartitionSpec("d"))))
  assert checkpointing._fingerprint_list(sharded) == base  # pylint: disable=protected-access
  for leaf, want in zip(jax.tree.leaves(tree), base):  # the host (numpy, chunked) version agrees
    assert checkpointing._numpy_fingerprint(np.asarray(leaf), chunk=1000) == want  # pylint: disable=protected-access
  flipped = jax.lax.bitcast_convert_type(x, jnp.uint16).at[5, 7].add(1)
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  for changed in (jax.lax.bitcast_convert_type(flipped, jnp.bfloat16), swapped):
    assert checkpointing._fingerprint_list(dict(tree, x=changed)) != base  # pylint: disable=protected-access


def test_a_workdir_of_another_model_or_data_pipeline_is_refused_untouched(tmp_path, full_run, monkeypatch):
  """Resuming in a workdir whose checkpoints another config made: one InputError naming what differs, before
  any compile, and the checkpoints, config.json and experiment.json stay as they were (nothing is moved to
  damaged_checkpoints)."""
  import shutil  # pylint: disable=g-import-not-at-top
  def no_compile(*a, **k):
    raise AssertionError("reached the train step: the mismatch was not caught up front")
  monkeypatch.setattr(trainer._train_step, "make_train_step", no_compile)
  workdir = tmp_path / "w"
  shutil.copytree(full_run[0], workdir)
  before = {p: (workdir / p).read_bytes() for p in ("config.json", "experiment.json")}
  steps = sorted(os.listdir(workdir / "checkpoints"))
  with pytest.raises(trainer.InputError, match=r"holds another model's state than this run's \(\d+ leaves differ; "
                                               r".*Use a new workdir"):
    trainer.train_and_evaluate(_small(model_preset="tiny-dense"), str(workdir))
  with pytest.raises(trainer.InputError, match=r"does not fit this run's data pipeline \(changed since: "
                                               r"data.overlong: 'error' -> 'truncate'; data.packing: 'concat' -> "
                                               r"'first_fit'\): KeyError"):
    trainer.train_and_evaluate(_small(data__packing="first_fit", data__overlong="truncate"), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == steps
  assert not (workdir / checkpointing.DAMAGED_DIR).exists()
  assert {p: (workdir / p).read_bytes() for p in ("config.json", "experiment.json")} == before


def test_each_host_saves_and_restores_its_own_data_position(tmp_path, monkeypatch):
  """The data item holds one iterator state per process (each host reads its own shard of the data); a run
  with another host count is refused, not given another host's position."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  handler = checkpointing._DataStateHandler()  # pylint: disable=protected-access
  directory = epath.Path(tmp_path)
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    handler.save(directory, checkpointing.DataStateSave({"next_index": index}))
  assert sorted(os.listdir(tmp_path)) == ["process_0-of-2.json", "process_1-of-2.json"]
  for index in (1, 0):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    assert handler.restore(directory) == {"next_index": index}
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  with pytest.raises(checkpointing.CheckpointMismatch, match=r"another host count .* this run has 1 process"):
    handler.restore(directory)


def test_hosts_evaluate_the_same_number_of_batches():
  """A host with fewer held-out batches adds empty ones (every eval step is a collective over all hosts)."""
  batch = {"tokens": np.ones((2, 4), np.int32), "loss_mask": np.ones((2, 4), np.int32)}
  padded = trainer.pad_eval_batches([batch], 3)
  assert len(padded) == 3 and padded[0] is batch
  assert all(not b["loss_mask"].any() and b["tokens"].shape == (2, 4) for b in padded[1:])


def test_hosts_stop_at_the_same_step_on_a_preemption(monkeypatch):
  """With several processes the stop step comes from JAX's preemption sync point (no Python SIGTERM
  handler then replaces its own); where that service is off, from the hosts' gathered flags."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
  before = signal.getsignal(signal.SIGTERM)
  with trainer._Preemption(2) as preemption:  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGTERM) is before
    assert [preemption.stop_at(s) for s in (1, 2, 3)] == [False, False, True]

  def disabled(step):
    raise RuntimeError("preemption sync manager is not initialized")
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", disabled)
  flags = {"other": 0}
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([int(x), flags["other"]]))
  with trainer._Preemption(2) as preemption:  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGTERM) is not before
    assert not preemption.stop_at(1)
    flags["other"] = 1  # SIGTERM reached the other host
    assert preemption.stop_at(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
  real_record = trainer._progress.Progress.record

  def record(self, step, metrics):
    real_record(self, step, metrics)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption notice

  monkeypatch.setattr(trainer._progress.Progress, "record", record)
  r = trainer.train_and_evaluate(_small(), str(tmp_path))
  assert r.preempted and r.last_step == 3
  assert "3" in os.listdir(tmp_path / "checkpoints")


# --- SFT ---
def test_sft_lowers_assistant_token_loss(tmp_path):
  """configs/tiny_sft_cpu.py shortened to 40 steps: the assistant-token loss falls by > 1.5 nats."""
  c = _load_config("tiny_sft_cpu")
  c.num_steps, c.batch_size, c.data.seq_len = 40, 4, 128
  c.log_every, c.eval_every, c.checkpoint.every_steps = 20, 0, 0
  r = trainer.train_and_evaluate(c, str(tmp_path))
  first, last = np.mean([r.losses[s] for s in (1, 2)]), np.mean([r.losses[s] for s in range(31, 41)])
  assert last < first - 1.5, (first, last)


# --- MTP, bf16 compute, gradient accumulation, balance loss ---
def test_mtp_bf16_accumulated_run(tmp_path):
  c = _small(model_preset="tiny-latent-moe", grad_accum_steps=2, mtp_depths=2, num_steps=3, data__seq_len=32,
             data__eval_batches=1)
  c.model_overrides = ml_collections.ConfigDict({"dtype": "bfloat16", "param_dtype": "float32"})
  r = trainer.train_and_evaluate(c, str(tmp_path))
  assert r.last_step == 3 and all(np.isfinite(m["loss"]) and np.isfinite(m["mtp_loss"]) for m in r.metrics.values())
  assert r.metrics[3]["mtp_loss"] > 0 and r.metrics[3]["expert_imbalance"] >= 1.0


def test_grad_accumulation_matches_one_big_batch():
  cfg = configs.PRESETS["tiny-dense"]
  c = _small(batch_size=4, data__seq_len=32)
  tx = optax.sgd(0.1)  # updates proportional to the gradients, so they compare tightly
  d = data_lib.make_data(c.data, tokenizer=data_lib.ByteTokenizer(), vocab_size=256, batch_size=4, seed=0)
  batch = next(d.train_iter)
  state = _train_step.init_state(_params("tiny-dense"), tx, jax.random.key(1))
  outs = []
  for accum in (1, 2):
    c.grad_accum_steps = accum
    outs.append(_fast_jit(_train_step.make_train_step(cfg, c, tx, optax.constant_schedule(0.1)), state, batch))
  (s1, m1), (s2, m2) = outs
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  # tok/s counts real tokens: the packed rows' padding (segment id 0) is left out.
  assert m1["tokens"] == m2["tokens"] == np.sum(np.asarray(batch["segment_ids"]) > 0)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batches_stay_on_the_devices_that_hold_their_rows():
  """Batch split over 8 devices (fsdp), 2 micro-batches: each takes rows from every device's share, so
  the step moves no rows nor activations between devices (it moved them with consecutive micro-batches:
  collective-permutes of the logits, hidden states and masks, all-gathers of the token rows)."""
  c = _small(model_preset="tiny-dense", batch_size=32, micro_batch_size=2, data__seq_len=64)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, expert=1, tensor=1))
  hlo = trainer.compile_train_step(c, jax.devices()[:8]).as_text()
  assert "collective-permute(" not in hlo
  assert not re.findall(r"= s32\[[^ ]* all-gather\(", hlo)


def test_evaluation_runs_in_the_training_micro_batches_and_loss_pieces():
  """The eval batch is the training batch's size; with the training config it runs in the same micro-batches
  and cross-entropy pieces: the same CE sum and token count as whole, in under half the temporaries (whole,
  configs/nemotron_h_8b.py's eval step took 156 GB per H100 by XLA's count, its training step 36.8 GB)."""
  cfg, params = configs.PRESETS["tiny-dense"], _params("tiny-dense")
  c = _small(batch_size=8, data__seq_len=64, grad_accum_steps=4, loss_chunk=16)
  d = data_lib.make_data(c.data, tokenizer=data_lib.ByteTokenizer(), vocab_size=256, batch_size=8, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(d.train_iter).items()}
  whole, pieces = (jax.jit(_train_step.make_eval_step(cfg, config)).lower(params, batch)
                   .compile({"xla_backend_optimization_level": 0}) for config in (None, c))
  (want_ce, want_n), (got_ce, got_n) = whole(params, batch), pieces(params, batch)
  np.testing.assert_allclose(got_ce, want_ce, rtol=1e-6)
  assert got_n == want_n == np.sum(np.asarray(batch["loss_mask"]))
  temp = lambda compiled: compiled.memory_analysis().temp_size_in_bytes
  assert temp(pieces) < 0.5 * temp(whole), (temp(pieces), temp(whole))


def test_mtp_losses_of_packed_rows_are_those_of_each_document_alone():
  """Depth k at position i predicts token i + k + 1, counted only inside the document of position i (not
  across the boundary, not into padding): the CE sums and token counts of the main head and both MTP depths
  of a packed row (documents of 6 and 7 tokens, then padding) equal those of each document alone."""
  cfg, params = configs.PRESETS["tiny-latent-moe"], _params("tiny-latent-moe")
  rng = np.random.RandomState(0)
  lens, t = (6, 7), 16
  docs = [rng.randint(1, cfg.vocab_size, n) for n in lens]
  row = np.concatenate([*docs, np.zeros(t + 1 - sum(lens), int)])
  seg = np.repeat([1, 2, 0], [*lens, t + 1 - sum(lens)])
  batch = {"tokens": jnp.asarray(row[None, :-1], jnp.int32), "targets": jnp.asarray(row[None, 1:], jnp.int32),
           "segment_ids": jnp.asarray(seg[None, :-1], jnp.int32),
           "loss_mask": jnp.asarray(((seg[1:] == seg[:-1]) & (seg[:-1] > 0))[None], jnp.int32)}
  got = jax.jit(lambda p: _train_step._forward_losses(cfg, p, batch, 2, 0.0)[0])(params)
  alone = np.stack([np.pad(d, (0, t - len(d))) for d in docs])  # one document per row; causal: its tail is unseen
  out = jax.jit(lambda p: models.apply(cfg, p, jnp.asarray(alone, jnp.int32), mtp_depths=2))(params)
  want, count = [], []
  for k, logits in enumerate([out["logits"], *out["mtp_logits"]]):
    logp = np.asarray(jax.nn.log_softmax(logits))
    terms = [-logp[j, i, d[i + k + 1]] for j, d in enumerate(docs) for i in range(len(d) - k - 1)]
    want.append(np.sum(terms))
    count.append(len(terms))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_array_equal(_train_step._denominators(batch, 2), count)  # [11, 9, 7]


def test_loss_in_pieces_equals_the_whole():
  """`loss_chunk`: the cross-entropy of the main head and both MTP depths from the hidden states in
  pieces (7 positions: four pieces, the last padded) gives the whole-logits sums and gradients (packed
  rows, masked targets)."""
  chunk = 7
  cfg = configs.PRESETS["tiny-latent-moe"]
  params = _params("tiny-latent-moe")
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 24)), jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1),
           "segment_ids": jnp.ones((2, 24), jnp.int32).at[:, 15:].set(2),
           "loss_mask": jnp.asarray(rng.rand(2, 24) > 0.2, jnp.int32)}

  def sums(params, loss_chunk):
    s, _ = _train_step._forward_losses(cfg, params, batch, 2, 0.0, loss_chunk=loss_chunk)
    return jnp.sum(s * jnp.asarray([1.0, 0.3, 0.7])), s

  (_, want), want_g = jax.jit(jax.value_and_grad(lambda p: sums(p, 0), has_aux=True))(params)
  (_, got), got_g = jax.jit(jax.value_and_grad(lambda p: sums(p, chunk), has_aux=True))(params)
  assert want.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got_g)[0], jax.tree.leaves(want_g)):
    # f32 sums in another order: to 1e-6 of the leaf's largest gradient.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())),
                               err_msg=jax.tree_util.keystr(path))


def test_balance_loss_adds_a_linear_gradient_to_the_router():
  cfg = configs.PRESETS["tiny-moe"]
  params = _params("tiny-moe")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)

  def gate_grads(coefs):
    def grad(coef):
      def loss(p):
        return models.apply(cfg, p, tokens, balance_loss_coef=coef)["logits"].mean()
      return jax.grad(loss)(params)["layers"]["moe"]["mixer"]["gate"]
    return [grad(c) for c in coefs]

  base, g1, g2 = _fast_jit(lambda: gate_grads((0.0, 0.5, 1.0)))
  d1, d2 = g1 - base, g2 - base
  assert float(jnp.abs(d1).max()) > 1e-4
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-3, atol=1e-6)
  # A perfectly balanced router scores L = 1 (f_e = 1, P_e = 1 / E).
  ids = jnp.tile(jnp.arange(8).reshape(4, 2), (1, 4, 1)).reshape(1, 16, 2)
  assert float(_moe_balance.sequence_balance_loss(jnp.zeros((1, 16, 8)), ids, 8)) == pytest.approx(1.0)


def test_expert_bias_moves_toward_balance_outside_the_optimizer():
  cfg = configs.PRESETS["tiny-moe"]
  params = _params("tiny-moe")
  counts = jnp.asarray([[10, 0, 5, 5, 5, 5, 5, 5]] * cfg.count(configs.Block.MOE), jnp.int32)
  new = _moe_balance.update_expert_bias(params, counts, 1e-3)
  delta = new["layers"]["moe"]["mixer"]["e_score_correction_bias"] - params["layers"]["moe"]["mixer"][
      "e_score_correction_bias"]
  np.testing.assert_allclose(delta[0], [-1e-3, 1e-3, 0, 0, 0, 0, 0, 0], atol=1e-9)
  frozen = _optim.frozen_mask(params)
  assert frozen["layers"]["moe"]["mixer"]["e_score_correction_bias"]
  assert not frozen["layers"]["moe"]["mixer"]["gate"]


def test_weight_decay_mask_and_wsd_schedule():
  params = _params("tiny-moe")
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      _optim.decay_mask(params))[0]}
  no_decay = {k.split("'")[-2] for k, v in flat.items() if not v}
  assert no_decay == {"scale", "norm", "A_log", "D", "dt_bias", "e_score_correction_bias",
                      "conv1d_x_bias", "conv1d_B_bias", "conv1d_C_bias"}
  assert flat["['embedder']['embedding']"] and flat["['layers']['moe']['mixer']['gate']"]
  opt = trainer.default_config().optimizer
  opt.lr, opt.warmup_steps, opt.decay_fraction, opt.min_lr_ratio = 1.0, 10, 0.2, 0.01
  lr = _optim.lr_schedule(opt, 100)
  got = [float(lr(s - 1)) for s in (1, 10, 11, 80, 90, 100)]  # 1-based steps
  np.testing.assert_allclose(got, [0.1, 1.0, 1.0, 1.0, 0.505, 0.01], rtol=1e-5)


# --- Fine-tuning from a converted checkpoint ---
def test_init_from_checkpoint(tmp_path):
  """Fine-tuning starts from the converted checkpoint: step 1's loss is that of its params."""
  cfg = configs.PRESETS["tiny-moe"]
  params = dict(_params("tiny-moe", seed=7))
  params["lm_head"] = params["lm_head"] * 30.0  # sharp logits: far from a fresh init's ln(256)
  checkpointing.save_params(str(tmp_path / "ckpt"), cfg, params)
  c = _small(init_from=str(tmp_path / "ckpt"), stop_after_step=1)
  r = trainer.train_and_evaluate(c, str(tmp_path / "work"))
  d = data_lib.make_data(c.data, tokenizer=data_lib.ByteTokenizer(), vocab_size=256, batch_size=4, seed=0)
  batch = next(d.train_iter)
  ce, n = _fast_jit(_train_step.make_eval_step(cfg), params, batch)
  assert r.losses[1] == pytest.approx(float(ce) / float(n), rel=1e-5)
  assert r.losses[1] > 6.0  # ln(256) = 5.55 would mean fresh params


# --- Bad input: one clear error each, before anything compiles ---
def test_micro_batch_size_sets_the_accumulation_from_the_devices():
  c = _small(batch_size=16, micro_batch_size=2)
  assert trainer._accumulation(c, 4).grad_accum_steps == 2  # 16 / (4 devices x 2)
  assert trainer._accumulation(c, 8).grad_accum_steps == 1
  assert trainer._accumulation(_small(batch_size=16), 4).grad_accum_steps == 1  # 0: off
  with pytest.raises(ValueError, match=r"batch_size=16 / grad_accum_steps=4 = 4 sequences per micro-batch must be "
                                       r"a multiple of the 8 devices splitting the batch"):
    trainer._accumulation(_small(batch_size=16, grad_accum_steps=4), 8)


def test_bad_inputs_fail_before_compiling(tmp_path, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("reached the train step: the bad input was not caught up front")
  monkeypatch.setattr(trainer._train_step, "make_train_step", no_compile)
  monkeypatch.setattr(trainer, "_fresh_state", no_compile)
  (tmp_path / "empty.jsonl").write_text("")
  long_chat = tmp_path / "long.jsonl"
  long_chat.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 300},
                                                {"role": "assistant", "content": "y"}]}) + "\n")
  cases = [
      (dict(data__source=str(tmp_path / "missing.jsonl")), r"Data file .*missing.jsonl' does not exist"),
      (dict(data__source=str(tmp_path / "empty.jsonl")), r"is empty: no records"),
      (dict(data__seq_len=4096), r"data.seq_len=4096 is longer than the model's maximum sequence length "
                                 r"max_position_embeddings=2048"),
      (dict(data__source=str(long_chat), data__format="chat", data__packing="first_fit",
            data__eval_source=str(long_chat)), r"record 0 is \d+ tokens, longer than data.seq_len \+ 1 = 65"),
      (dict(model_preset="tiny-mo"), r"Unknown model_preset='tiny-mo' \(did you mean 'tiny-moe'\?\)"),
      (dict(grad_accum_steps=3), r"batch_size=4 must be a multiple of grad_accum_steps=3"),
      (dict(micro_batch_size=3), r"micro_batch_size=3 x 1 devices splitting the batch = 3 sequences per "
                                 r"micro-batch must divide batch_size=4"),
      (dict(optimizer__mu_dtype="float16"), r"optimizer.mu_dtype='float16' must be"),
      (dict(data__tokenizer=str(tmp_path / "tok.json")), r"no such tokenizer.json"),
      (dict(loss_chunk=-1), r"loss_chunk=-1 must be >= 0"),
      (dict(mtp_depths=2), r"mtp_depths=2 but the model has no MTP module"),
      (dict(model_preset="tiny-latent-moe", mtp_depths=2, data__seq_len=2),
       r"data.seq_len=2 leaves no position for MTP depth 2"),
      (dict(moe__bias_update_rate=-1e-3), r"moe.bias_update_rate=-0.001 must be >= 0"),
      (dict(data__validate_records=0), r"data.validate_records=0 must be >= 1"),
      (dict(optimizer__warmup_steps=7), r"optimizer.warmup_steps=7 runs into the decay, which starts after step 6"),
      (dict(optimizer__schedule="cosine", optimizer__warmup_steps=8), r"warmup_steps=8 leaves no cosine phase"),
      (dict(data__source=str(tmp_path / "five.jsonl")), r"the held-out split has no records: data.source=.* has 5 "
                                                         r"records and data.eval_fraction=0.05 holds out none"),
  ]
  (tmp_path / "five.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
  for overrides, pattern in cases:
    with pytest.raises(trainer.InputError, match=pattern):
      trainer.train_and_evaluate(_small(**overrides), str(tmp_path / "w"))
  typo = _small()
  typo.optimizer.lrr = 1e-4  # a typo in a config file or notebook
  with pytest.raises(trainer.InputError, match=r"Unknown config key\(s\): 'optimizer.lrr' \(did you mean "
                                               r"'optimizer.lr'\?\)"):
    trainer.train_and_evaluate(typo, str(tmp_path / "w"))
  bad_override = _small()
  bad_override.model_overrides = ml_collections.ConfigDict({"hidden_sise": 8})
  with pytest.raises(trainer.InputError, match=r"model_overrides has unknown ModelConfig field\(s\) \['hidden_sise'\]"):
    trainer.train_and_evaluate(bad_override, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_cli_reports_a_config_typo_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "n3jax.train", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}",
       "--config.optimizer.lrr=1e-4"], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "Unknown config key 'lrr' in --config.optimizer.lrr=1e-4; did you mean 'lr'?" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_cli_model_overrides_take_any_model_field(tmp_path):
  """`--config.model_overrides.FIELD=VALUE` reaches the model config even where the config file leaves
  `model_overrides` empty; a wrong field name is one error naming it, before any compile."""
  proc = subprocess.run(
      [sys.executable, "-m", "n3jax.train", "--config=configs/tiny_cpu.py", f"--workdir={tmp_path}",
       "--config.model_overrides.quant=fp8", "--config.model_overrides.hidden_sise=32"], cwd=REPO,
      capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "model_overrides has unknown ModelConfig field(s) ['hidden_sise']" in proc.stderr
  from absl import flags  # pylint: disable=g-import-not-at-top
  from n3jax import train  # pylint: disable=g-import-not-at-top
  try:
    rest = train._take_model_overrides(["prog", "--config=c.py", "--config.model_overrides.quant=fp8",
                                        "--config.model_overrides.quant_bf16_layers_at_end=1", "--config.seed=3"])
    assert rest == ["prog", "--config=c.py", "--config.seed=3"]
    assert train._model_overrides == {"quant": "fp8", "quant_bf16_layers_at_end": 1}
  finally:  # importing n3jax.train defined its required flags: later in-process CLIs must not inherit them
    for flag in list(flags.FLAGS.flags_by_module_dict().get(train.__name__, [])):
      delattr(flags.FLAGS, flag.name)
