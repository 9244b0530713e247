"""Logits parity with `transformers.NemotronHForCausalLM` 5.24 on tiny random models (float32, CPU).

Whole model and each block kind alone (each HF layer's actual input and output are captured with
forward hooks during the full forward, so attention sees exactly HF's causal masking).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import checkpoint_convert  # noqa: E402
from checkpoint_convert import _safetensors  # noqa: E402
from n3jax import models  # noqa: E402
from n3jax.configs import ModelConfig  # noqa: E402
from n3jax.nn import Layer  # noqa: E402
from tests import hf_fixtures  # noqa: E402

ATOL = 1e-4


def _load(hf_dir):
  cfg = ModelConfig.from_hf(checkpoint_convert.read_hf_config(hf_dir))
  infos = checkpoint_convert.read_hf_tensor_index(hf_dir)
  params = checkpoint_convert.hf_to_params(cfg, {k: (i.shape, i.dtype) for k, i in infos.items()},
                                           lambda k: _safetensors.read_tensor(infos[k]))
  return cfg, params


@pytest.fixture(scope="module", params=sorted(hf_fixtures.HF_CONFIGS))
def converted(request, tmp_path_factory):
  kind = request.param
  model = hf_fixtures.build_hf_model(kind)
  path = str(tmp_path_factory.mktemp(f"hf_{kind}"))
  hf_fixtures.save_hf_checkpoint(model, path, with_mtp=bool(model.config.num_nextn_predict_layers))
  cfg, params = _load(path)
  return kind, model, cfg, params


@pytest.mark.parametrize("batch,seq", [(2, 13), (3, 5), (1, 24), (2, 1)])
def test_logits_match_hf(converted, batch, seq):
  _, model, cfg, params = converted
  assert cfg.dtype == "float32"  # a float32 checkpoint computes in float32
  tokens = hf_fixtures.random_tokens(cfg.vocab_size, batch, seq, seed=seq)
  with torch.no_grad():
    want = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(models.forward(cfg, params, jnp.asarray(tokens)))
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  assert np.abs(want).max() > 0.1  # the comparison is not vacuous


def test_scanned_stack_matches_hf(converted):
  _, model, cfg, params = converted
  tokens = hf_fixtures.random_tokens(cfg.vocab_size, 2, 11, seed=7)
  with torch.no_grad():
    want = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
  got = np.asarray(models.forward(cfg.replace(scan_layers=True), params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_each_block_matches_hf(converted):
  _, model, cfg, params = converted
  captured = {}
  hooks = [layer.register_forward_hook(
      lambda mod, args, kwargs, out, i=i: captured.__setitem__(i, (args[0] if args else kwargs["hidden_states"], out)),
      with_kwargs=True) for i, layer in enumerate(model.model.layers)]
  tokens = hf_fixtures.random_tokens(cfg.vocab_size, 2, 13, seed=3)
  with torch.no_grad():
    model(torch.tensor(tokens, dtype=torch.long))
  for h in hooks:
    h.remove()
  seen_kinds = set()
  for i, (kind, slot) in enumerate(models.layer_slots(cfg)):
    x_in, y_out = (t.detach().float().numpy() for t in captured[i])
    p = jax.tree.map(lambda v, slot=slot: v[slot], params["layers"][models.kind_name(kind)])
    got, _ = Layer(cfg, kind).apply({"params": p}, jnp.asarray(x_in), jnp.zeros(x_in.shape[:2], jnp.int32))
    np.testing.assert_allclose(np.asarray(got), y_out, atol=ATOL, rtol=0, err_msg=f"layer {i} ({kind.name})")
    seen_kinds.add(kind)
  assert seen_kinds == set(cfg.blocks)
