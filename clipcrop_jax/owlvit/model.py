"""TextZeroShotDetectionModule: Scenic's OWL-ViT / OWLv2 detector, checkpoint-compatible.

Top-level parameters: `backbone` (CLIP + `merged_class_token` LayerNorm), `class_head`,
`obj_box_head`, and `objectness_head` for OWLv2. Images enter as float32 (B, S, S, 3) in [0, 1],
already padded and resized (see `preprocessing.py`); the CLIP mean/std normalisation happens inside.
Boxes leave as cxcywh in [0, 1] of that padded square.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipcrop_jax.owlvit import clip as clip_lib
from clipcrop_jax.owlvit import heads
from clipcrop_jax.owlvit.configs import IMAGE_MEAN, IMAGE_STD, OwlViTConfig

Dtype = Any
MERGED_CLASS_TOKEN_LN_EPS = 1e-6  # Flax default; HF uses 1e-5 here (spec §8.2).


class ClipImageTextEmbedder(nn.Module):
  """`backbone`: CLIP towers plus the 'mul-ln' class-token merge."""

  config: OwlViTConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    self.clip = clip_lib.CLIP(self.config, self.dtype, self.remat)
    self.merged_class_token = nn.LayerNorm(epsilon=MERGED_CLASS_TOKEN_LN_EPS)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) in [0, 1] -> feature map (B, h, w, W) after the class-token merge."""
    mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(IMAGE_STD, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    h, w = (-(-s // self.config.patch_size) for s in images.shape[1:3])
    tokens = self.clip.encode_image(x)  # (B, 1 + h·w, W)
    merged = tokens[:, 1:] * tokens[:, :1]
    merged = self.merged_class_token(merged)
    return merged.reshape(merged.shape[0], h, w, merged.shape[-1])

  def embed_text(self, text_queries: jax.Array) -> jax.Array:
    """text_queries int (..., L) -> unnormalised embeddings (..., D)."""
    lead = text_queries.shape[:-1]
    flat = text_queries.reshape(-1, text_queries.shape[-1])
    return self.clip.encode_text(flat).reshape(*lead, -1)

  def __call__(self, images: jax.Array, text_queries: jax.Array):
    return self.embed_images(images), self.embed_text(text_queries)


class TextZeroShotDetectionModule(nn.Module):
  """OWL-ViT detector with Scenic's parameter tree and methods.

  Attributes:
    config: architecture (`configs.get_config(name)`).
    dtype: compute dtype (float32 default; bfloat16 on accelerators). Parameters stay float32.
    remat: rematerialise the CLIP blocks in the backward pass (`clip.Transformer.remat`), for
      fine-tuning the encoder with less memory; same parameters, outputs and gradients.
  """

  config: OwlViTConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    self.backbone = ClipImageTextEmbedder(self.config, self.dtype, self.remat)
    self.class_head = heads.ClassPredictor(out_dim=self.config.embed_dim, dtype=self.dtype)
    self.obj_box_head = heads.PredictorMLP(out_dim=4, dtype=self.dtype)
    if self.config.objectness:
      self.objectness_head = heads.PredictorMLP(out_dim=1, dtype=self.dtype)

  def image_embedder(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images (B, H, W, 3) float in [0, 1] -> feature map (B, h, w, W)."""
    del train  # No dropout / stochastic depth at inference; kept for Scenic's signature.
    return self.backbone.embed_images(images)

  def text_embedder(self, text_queries: jax.Array, train: bool = False) -> jax.Array:
    """text_queries int32 (B, Q, L) -> unnormalised query embeddings (B, Q, D)."""
    del train
    return self.backbone.embed_text(text_queries)

  def class_predictor(
      self,
      image_features: jax.Array,
      query_embeddings: Optional[jax.Array] = None,
      query_mask: Optional[jax.Array] = None,
  ) -> dict[str, jax.Array]:
    """image_features (B, P, W) -> {'class_embeddings' (B, P, D), ['pred_logits' (B, P, Q)]}."""
    return self.class_head(image_features, query_embeddings, query_mask)

  def class_head_terms(self, image_features: jax.Array) -> dict[str, jax.Array]:
    """Query-independent class-head terms for (B, P, W) features; reuse them across many queries
    with `heads.logits_from_image_terms` so a new query costs only the text encoder."""
    return self.class_head.image_terms(image_features)

  def box_predictor(
      self, image_features: jax.Array, feature_map: jax.Array
  ) -> dict[str, jax.Array]:
    """image_features (B, P, W), feature_map (B, h, w, W) -> {'pred_boxes': (B, P, 4) cxcywh}."""
    _, h, w, _ = feature_map.shape
    logits = self.obj_box_head(image_features)
    bias = heads.compute_box_bias(h, w).astype(logits.dtype)
    return {'pred_boxes': jax.nn.sigmoid(logits + bias).astype(jnp.float32)}

  def objectness_predictor(self, image_features: jax.Array) -> dict[str, jax.Array]:
    """OWLv2 only: image_features (B, P, W) -> {'objectness_logits': (B, P)}."""
    if not self.config.objectness:
      raise ValueError(f'Config {self.config.name!r} has no objectness head (OWLv2 only).')
    x = jax.lax.stop_gradient(image_features)
    return {'objectness_logits': self.objectness_head(x)[..., 0]}

  def encode_image(self, images: jax.Array) -> dict[str, jax.Array]:
    """Everything query-independent for images (B, S, S, 3), to compute once and reuse.

    Returns {'feature_map' (B, g, g, W), 'image_features' (B, P, W), 'pred_boxes' (B, P, 4),
    'class_terms' (see `heads.ClassPredictor.image_terms`), and 'objectness_logits' for OWLv2}.
    Score queries against it with `heads.logits_from_image_terms(out['class_terms'], q)`.
    """
    feature_map = self.image_embedder(images)
    b, h, w, c = feature_map.shape
    image_features = feature_map.reshape(b, h * w, c)
    out = {
        'feature_map': feature_map,
        'image_features': image_features,
        'class_terms': self.class_head_terms(image_features),
    }
    out.update(self.box_predictor(image_features, feature_map))
    if self.config.objectness:
      out.update(self.objectness_predictor(image_features))
    return out

  def __call__(
      self, images: jax.Array, text_queries: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Full detector.

    Args:
      images: float32 (B, S, S, 3) in [0, 1], padded to square and resized.
      text_queries: int32 (B, Q, L) token ids, 0 = padding; an all-padding query is masked.
      train: unused (deterministic).

    Returns:
      dict with 'feature_map' (B, g, g, W), 'query_embeddings' (B, Q, D) unnormalised,
      'pred_logits' (B, P, Q), 'class_embeddings' (B, P, D) normalised, 'pred_boxes' (B, P, 4)
      cxcywh in [0, 1] of the padded square, and 'objectness_logits' (B, P) for OWLv2.
    """
    feature_map = self.image_embedder(images, train)
    b, h, w, c = feature_map.shape
    image_features = feature_map.reshape(b, h * w, c)
    query_embeddings = self.text_embedder(text_queries, train)
    query_mask = text_queries[..., 0] > 0
    out = {'feature_map': feature_map, 'query_embeddings': query_embeddings}
    out.update(self.class_predictor(image_features, query_embeddings, query_mask))
    out.update(self.box_predictor(image_features, feature_map))
    if self.config.objectness:
      out.update(self.objectness_predictor(image_features))
    return out


@functools.partial(jax.jit, static_argnums=0)
def encode_images(
    module: TextZeroShotDetectionModule, variables: Any, images: jax.Array
) -> dict[str, jax.Array]:
  """jit-compiled `module.encode_image` (compiled once per module config and image shape)."""
  return module.apply(variables, images, method=module.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def embed_texts(
    module: TextZeroShotDetectionModule, variables: Any, text_queries: jax.Array
) -> jax.Array:
  """jit-compiled `module.text_embedder`: int32 (..., L) -> (..., D) unnormalised."""
  return module.apply(variables, text_queries, method=module.text_embedder)


def dummy_inputs(
    config: OwlViTConfig, batch_size: int = 1, num_queries: int = 1
) -> tuple[jax.Array, jax.Array]:
  """(images, text_queries) to initialise a model built on `config`: float32 zeros
  (B, S, S, 3) and int32 (B, Q, L) queries whose first token is 1 (real, not padding, so that
  every conditioned path of a ClipCrop model creates its parameters). Parameter values depend
  only on the shapes, never on these values."""
  images = jnp.zeros((batch_size, config.image_size, config.image_size, 3), jnp.float32)
  text = jnp.zeros((batch_size, num_queries, config.max_query_length), jnp.int32)
  return images, text.at[..., 0].set(1)


def init_variables(
    config: OwlViTConfig, seed: int = 0, batch_size: int = 1, num_queries: int = 1
) -> dict[str, Any]:
  """Random variables for `config` ({'params': ...}), jit-compiled init (compiled once per
  config and input shapes; further seeds reuse it)."""
  return _jitted_init(config)(
      jax.random.PRNGKey(seed), *dummy_inputs(config, batch_size, num_queries)
  )


@functools.lru_cache(maxsize=8)
def _jitted_init(config: OwlViTConfig):
  """The jit-compiled `init` of a module on `config` (one per config)."""
  return jax.jit(TextZeroShotDetectionModule(config).init)


def param_shapes(config: OwlViTConfig) -> dict[str, Any]:
  """`jax.eval_shape` of the variables: a tree of ShapeDtypeStruct, no memory used."""
  module = TextZeroShotDetectionModule(config)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *dummy_inputs(config))
