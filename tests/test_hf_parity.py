"""Numerical parity with Hugging Face OWL-ViT / OWLv2 on tiny random models (CPU, no network).

A tiny random HF model is saved with `save_pretrained(..., safe_serialization=True)` and loaded
with `load_checkpoint`. HF is switched to Scenic's two numerical conventions first (spec §8):
tanh-approximate GELU in the box / objectness MLPs and eps 1e-6 in the merged-class-token
LayerNorm. Every output is then required to agree to 1e-4 in float32 ('highest' matmul
precision). The observed maxima are printed (`pytest -s`) and collected in `OBSERVED`.

Note: HF's class head outputs `text_config.hidden_size` features while its text projection
outputs `projection_dim`; detection only works when both are equal, so the tiny HF models use
projection_dim = text hidden size = 64 (our config is then inferred as 'custom').
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from clipcrop_jax.owlvit import checkpoints as ck  # pylint: disable=g-import-not-at-top
from clipcrop_jax.owlvit.configs import IMAGE_MEAN, IMAGE_STD  # pylint: disable=g-import-not-at-top

TOLERANCE = 1e-4
SOT, EOT = 49406, 49407
BATCH, QUERIES, LENGTH, SIZE = 2, 3, 16, 96
OBSERVED: dict[str, dict[str, float]] = {}


def _hf_config(version: str):
  text = dict(
      hidden_size=64,
      num_attention_heads=1,
      num_hidden_layers=2,
      intermediate_size=256,
      max_position_embeddings=LENGTH,
      vocab_size=49408,
      layer_norm_eps=1e-5,
  )
  vision = dict(
      hidden_size=64,
      num_attention_heads=1,
      num_hidden_layers=2,
      intermediate_size=256,
      patch_size=16,
      image_size=SIZE,
      layer_norm_eps=1e-5,
  )
  cls = transformers.Owlv2Config if version == 'v2' else transformers.OwlViTConfig
  return cls(text_config=text, vision_config=vision, projection_dim=64)


def _hf_model(version: str, seed: int):
  """Random HF detector with every parameter perturbed, in Scenic's numerical conventions."""
  torch.manual_seed(seed)
  cls = (
      transformers.Owlv2ForObjectDetection
      if version == 'v2'
      else transformers.OwlViTForObjectDetection
  )
  model = cls(_hf_config(version)).eval()
  with torch.no_grad():
    # HF initialises the head Linears with std 1, which gives logits in the hundreds (released
    # models: about -20..10) where float32 rounding alone exceeds 1e-4. Use 1/sqrt(fan_in).
    for name, layer in model.named_modules():
      if name.split('.')[0] in ('class_head', 'box_head', 'objectness_head') and isinstance(
          layer, torch.nn.Linear
      ):
        layer.weight.normal_(0.0, layer.in_features**-0.5)
    # Perturb everything (LayerNorm scales are ones and biases zeros after init).
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  model.box_head.gelu = torch.nn.GELU(approximate='tanh')
  if version == 'v2':
    model.objectness_head.gelu = torch.nn.GELU(approximate='tanh')
  model.layer_norm.eps = 1e-6
  return model


def _inputs(seed: int):
  """Images in [0, 1] NHWC and token ids (B, Q, 16) with EOT as the largest id; one pad query."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  ids = np.zeros((BATCH, QUERIES, LENGTH), np.int64)
  for b in range(BATCH):
    for q in range(QUERIES):
      n = int(rng.integers(1, LENGTH - 1))  # number of BPE tokens; n + 2 <= 16
      ids[b, q, 0] = SOT
      ids[b, q, 1 : n + 1] = rng.integers(1, SOT, size=n)
      ids[b, q, n + 1] = EOT
  ids[1, 2] = 0  # padding query: masked in the logits
  return images, ids


def _hf_pixels(images: np.ndarray):
  mean, std = np.asarray(IMAGE_MEAN, np.float32), np.asarray(IMAGE_STD, np.float32)
  return torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _load(version: str, seed: int, tmp_path):
  model = _hf_model(version, seed)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  module, variables = ck.load_checkpoint(tmp_path)
  return model, module, variables


@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_text_conditioned_parity(version, tmp_path):
  model, module, variables = _load(version, seed=0 if version == 'v1' else 1, tmp_path=tmp_path)
  config = module.config
  assert config.objectness == (version == 'v2')
  assert (config.vision_width, config.text_width, config.embed_dim) == (64, 64, 64)
  images, ids = _inputs(seed=2)
  flat_ids = torch.from_numpy(ids.reshape(BATCH * QUERIES, LENGTH))
  with torch.no_grad():
    hf = model(
        input_ids=flat_ids, pixel_values=_hf_pixels(images), attention_mask=(flat_ids > 0).long()
    )
    projection = model.get_submodule(f'{"owlv2" if version == "v2" else "owlvit"}.text_projection')
    hf_text_raw = projection(hf.text_model_output.pooler_output).reshape(BATCH, QUERIES, -1)
  with jax.default_matmul_precision('highest'):
    ours = jax.jit(module.apply)(variables, jnp.asarray(images), jnp.asarray(ids, jnp.int32))
  ours = jax.tree.map(np.asarray, ours)
  valid = ids[..., 0] > 0  # (B, Q)

  diffs = {
      'pred_boxes': _max_diff(ours['pred_boxes'], hf.pred_boxes),
      'pred_logits': _max_diff(
          ours['pred_logits'][:, :, valid[0]][:1], hf.logits[:, :, valid[0]][:1].numpy()
      ),
      'pred_logits[b=1]': _max_diff(
          ours['pred_logits'][1][:, valid[1]], hf.logits[1][:, valid[1]].numpy()
      ),
      'class_embeddings': _max_diff(ours['class_embeddings'], hf.class_embeds),
      'feature_map': _max_diff(ours['feature_map'], hf.image_embeds),
      'query_embeddings (raw)': _max_diff(ours['query_embeddings'][valid], hf_text_raw[valid]),
      'query_embeddings (L2-normalised)': _max_diff(
          _normalize(ours['query_embeddings'])[valid], hf.text_embeds.numpy()[valid]
      ),
  }
  if version == 'v2':
    diffs['objectness_logits'] = _max_diff(ours['objectness_logits'], hf.objectness_logits)
  else:
    assert 'objectness_logits' not in ours
  OBSERVED[version] = diffs
  print(
      f'\nOWL {version} vs HF max abs diff: ' + ', '.join(f'{k}={v:.2e}' for k, v in diffs.items())
  )
  # Padding queries are masked (Scenic: -1e6; HF: float32 min).
  assert np.all(ours['pred_logits'][1, :, 2] <= -1e6 + 1)
  assert np.all(hf.logits[1, :, 2].numpy() < -1e6)
  # The comparison is meaningful: outputs vary across tokens and queries.
  assert np.std(ours['pred_logits'][0]) > 1e-2 and np.std(ours['pred_boxes']) > 1e-3
  for name, diff in diffs.items():
    assert diff <= TOLERANCE, f'{version} {name}: max abs diff {diff:.3e} > {TOLERANCE}'


def test_objectness_query_token_parity(tmp_path):
  """OWLv2 HF one-shot rule (highest-objectness token) equals ours on the same outputs."""
  model, module, variables = _load('v2', seed=3, tmp_path=tmp_path)
  images, _ = _inputs(seed=4)
  with torch.no_grad():
    feature_map = model.image_embedder(pixel_values=_hf_pixels(images[:1]))[0]
    feats = feature_map.reshape(1, -1, feature_map.shape[-1])
    hf_embeds, hf_index, _ = model.embed_image_query(feats, feature_map)

  def fn(mdl, x):
    fmap = mdl.image_embedder(x)
    flat = fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
    return (
        mdl.class_predictor(flat)['class_embeddings'],
        mdl.objectness_predictor(flat)['objectness_logits'],
    )

  with jax.default_matmul_precision('highest'):
    class_embeddings, objectness = module.apply(variables, jnp.asarray(images[:1]), method=fn)
  index = int(np.argmax(objectness[0]))
  assert index == int(hf_index[0, 0])
  diff = _max_diff(class_embeddings[0, index], hf_embeds[0, 0])
  OBSERVED.setdefault('v2', {})['objectness query embedding'] = diff
  print(f'\nOWL v2 objectness-selected query embedding max abs diff: {diff:.2e}')
  assert diff <= TOLERANCE


def test_image_guided_query_parity_v1(tmp_path):
  """Our `embed_image_query` (whole-image box) equals HF OWL-ViT's `embed_image_query`."""
  if importlib.util.find_spec('clipcrop_jax.owlvit.image_query') is None:
    pytest.skip('clipcrop_jax.owlvit.image_query does not exist yet')
  from clipcrop_jax.owlvit import image_query  # pylint: disable=g-import-not-at-top

  model, module, variables = _load('v1', seed=5, tmp_path=tmp_path)
  images, _ = _inputs(seed=6)
  query, target = images[:1], images[1:]
  with torch.no_grad():
    feature_map = model.image_embedder(pixel_values=_hf_pixels(query))[0]
    feats = feature_map.reshape(1, -1, feature_map.shape[-1])
    hf_embeds, hf_index, _ = model.embed_image_query(feats, feature_map)
    hf_guided = model.image_guided_detection(
        pixel_values=_hf_pixels(target), query_pixel_values=_hf_pixels(query)
    )
  with jax.default_matmul_precision('highest'):
    embedding, index = image_query.embed_image_query(module, variables, query[0])

    def fn(mdl, x, q):
      fmap = mdl.image_embedder(x)
      flat = fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])
      return mdl.class_predictor(flat, q)['pred_logits']

    logits = module.apply(variables, jnp.asarray(target), embedding[None, None], method=fn)
  assert index == int(hf_index[0])
  diffs = {
      'image query embedding': _max_diff(embedding, hf_embeds[0]),
      'image-guided logits': _max_diff(logits, hf_guided.logits),
  }
  OBSERVED.setdefault('v1', {}).update(diffs)
  print(
      '\nOWL v1 image-guided vs HF max abs diff: '
      + ', '.join(f'{k}={v:.2e}' for k, v in diffs.items())
  )
  for name, diff in diffs.items():
    assert diff <= TOLERANCE, f'{name}: max abs diff {diff:.3e} > {TOLERANCE}'
