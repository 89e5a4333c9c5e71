"""Scenic-compatible OWL-ViT / OWLv2 in Flax: model, checkpoints, tokenizer, preprocessing.

from clipcrop_jax import owlvit
module, variables = owlvit.load_checkpoint('owl2-b16-960-st-ngrams_c7e1b9a')  # Scenic release,
# or 'google/owlv2-base-patch16-ensemble' (HF id), a Scenic msgpack file or an HF directory
pixels = owlvit.preprocess(owlvit.load_image('cat.jpg'), module.config.image_size)[None]
tokens = owlvit.tokenize(['a cat', 'a remote'])[None]
out = module.apply(variables, pixels, tokens)   # pred_boxes, pred_logits, ...
q = owlvit.query_embeddings(module, variables, ['a cat'],      # (Q, D): texts, then examples
                            [owlvit.ImageQuery('cat', owlvit.load_image('example.jpg'))])
"""

import importlib

# Public name -> the submodule defining it. Imported on first use, so that the light modules
# (configs, fileio, box_ops, tokenizer) import without jax / flax.
_EXPORTS = {
    'CheckpointError': 'checkpoints',
    'load_checkpoint': 'checkpoints',
    'save_scenic_checkpoint': 'checkpoints',
    'CONFIGS': 'configs',
    'get_config': 'configs',
    'OwlViTConfig': 'configs',
    'embed_image_query': 'image_query',
    'ImageQuery': 'image_query',
    'query_embeddings': 'image_query',
    'init_variables': 'model',
    'TextZeroShotDetectionModule': 'model',
    'boxes_cxcywh_to_pixels_xyxy': 'preprocessing',
    'DEFAULT_MAX_PIXELS': 'preprocessing',
    'ImageError': 'preprocessing',
    'load_for_model': 'preprocessing',
    'load_image': 'preprocessing',
    'preprocess': 'preprocessing',
    'tokenize': 'tokenizer',
}


def __getattr__(name):
  if name == 'hub':
    return importlib.import_module('clipcrop_jax.owlvit.hub')
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'clipcrop_jax.owlvit.{_EXPORTS[name]}'), name)
  raise AttributeError(f"module 'clipcrop_jax.owlvit' has no attribute {name!r}")


__all__ = [
    'CheckpointError',
    'load_checkpoint',
    'save_scenic_checkpoint',
    'hub',
    'CONFIGS',
    'get_config',
    'OwlViTConfig',
    'embed_image_query',
    'ImageQuery',
    'query_embeddings',
    'init_variables',
    'TextZeroShotDetectionModule',
    'boxes_cxcywh_to_pixels_xyxy',
    'DEFAULT_MAX_PIXELS',
    'ImageError',
    'load_for_model',
    'load_image',
    'preprocess',
    'tokenize',
]
