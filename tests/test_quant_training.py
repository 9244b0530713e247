"""The low-precision recipes inside the model: `ModelConfig.quant` = fp8 | nvfp4 trains like bf16."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from n3jax import models, trainer
from n3jax.configs import PRESETS, parse_pattern

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Stated distance from the BF16 run's loss at every step of a 30-step tiny run (measured: < 0.01 for both).
MAX_LOSS_GAP = {"fp8": 0.05, "nvfp4": 0.1}


def _tiny_config(quant: str):
  spec = importlib.util.spec_from_file_location("tiny_cpu", os.path.join(REPO, "configs", "tiny_cpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.num_steps, c.batch_size, c.data.seq_len, c.eval_every, c.log_every, c.checkpoint.every_steps = 30, 8, 128, 0, 30, 0
  c.model_preset = "tiny-dense"
  # The published tables keep 2+2 (FP8) or the last 14 (NVFP4) layers in BF16; on 7 layers keep 1+1.
  c.model_overrides = {"quant": quant, "blocks": "M-M*-M-", "quant_bf16_layers_at_start": 1,
                       "quant_bf16_layers_at_end": 1}
  return c


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
  return trainer.train_and_evaluate(_tiny_config("none"), str(tmp_path_factory.mktemp("none"))).losses


@pytest.mark.parametrize("mode", ["fp8", "nvfp4"])
def test_quantized_training_tracks_bf16(mode, bf16_losses, tmp_path):
  losses = trainer.train_and_evaluate(_tiny_config(mode), str(tmp_path)).losses
  gap = max(abs(losses[k] - bf16_losses[k]) for k in bf16_losses)
  assert gap < MAX_LOSS_GAP[mode], gap
  assert any(losses[k] != bf16_losses[k] for k in bf16_losses)  # the recipe really changed the numerics
  assert losses[30] < losses[1] - 1.5  # and it learns


def test_scanned_runs_match_unrolled_under_fp8():
  """The scan splits where the recipe's BF16 table changes; values equal the unrolled stack."""
  cfg = PRESETS["tiny-dense"].replace(quant="fp8")  # 7 layers: 0-1 BF16, 2-4 FP8, 5-6 BF16
  assert models._precision_runs(cfg) == [(0, 2), (2, 5), (5, 7)]
  params = models.init(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  key = jax.random.key(3)
  unrolled = models.apply(cfg, params, tokens, quant_key=key)["logits"]
  scanned = models.apply(cfg.replace(scan_layers=True), params, tokens, quant_key=key)["logits"]
  plain = models.apply(cfg.replace(quant="none"), params, tokens)["logits"]
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
  assert not np.allclose(unrolled, plain, atol=1e-6)


def test_scanned_gradients_match_unrolled_under_nvfp4():
  """The RHT signs of the wgrad products and the SR draws are the same whether the layers are scanned or not
  (the signs were drawn per layer from the run's first layer index in a scan, and per layer unrolled)."""
  cfg = PRESETS["tiny-dense"].replace(quant="nvfp4", blocks=parse_pattern("---"), quant_bf16_layers_at_start=0,
                                      quant_bf16_layers_at_end=0)
  assert models._precision_runs(cfg) == [(0, 3)]
  params = models.init(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 32)), jnp.int32)

  def grads(c):
    loss = lambda p: jnp.mean(models.apply(c, p, tokens, quant_key=jax.random.key(3))["logits"] ** 2)
    return jax.grad(loss)(params)

  unrolled, scanned = grads(cfg), grads(cfg.replace(scan_layers=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scanned, unrolled)


def test_routed_experts_follow_the_recipe(monkeypatch):
  """The routed experts' grouped GEMMs are quantized too (per-expert scales), and gradients flow."""
  plain = PRESETS["tiny-moe"].replace(blocks=parse_pattern("E"))
  cfg = plain.replace(quant="nvfp4", quant_bf16_layers_at_start=0, quant_bf16_layers_at_end=0)
  params = jax.jit(models.init, static_argnums=0)(plain, jax.random.key(0))  # quantization keeps the tree
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  key = jax.random.key(3)

  def loss(p):
    return jnp.mean(models.apply(cfg, p, tokens, quant_key=key)["logits"] ** 2)

  quantized, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  from n3jax.nn import _moe  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_moe.quant, "make_grouped_matmul", lambda *a, **k: None)  # experts in BF16
  assert abs(float(jax.jit(loss)(params)) - float(quantized)) > 1e-6


@pytest.mark.parametrize("field,value", [("quant_bf16_layers_at_end", -3), ("quant_bf16_layers_at_start", 1.5),
                                         ("quant_bf16_layers_at_start", True)])
def test_bad_bf16_layer_counts_fail_when_the_config_is_built(field, value):
  """STYLE §4: a bad config fails when it is built; these reached `n3jax.quant.QuantConfig` only when the
  first linear layer was traced."""
  with pytest.raises(ValueError, match=f"Invalid ModelConfig: {field}={value!r} must be None or an int >= 0"):
    PRESETS["tiny-dense"].replace(quant="fp8", **{field: value})
  assert PRESETS["tiny-dense"].replace(quant="fp8", **{field: 0}).quant == "fp8"
