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

from clipcrop_jax.owlvit import hub
from clipcrop_jax.owlvit.checkpoints import CheckpointError
from clipcrop_jax.owlvit.checkpoints import load_checkpoint
from clipcrop_jax.owlvit.checkpoints import save_scenic_checkpoint
from clipcrop_jax.owlvit.configs import CONFIGS
from clipcrop_jax.owlvit.configs import get_config
from clipcrop_jax.owlvit.configs import OwlViTConfig
from clipcrop_jax.owlvit.image_query import embed_image_query
from clipcrop_jax.owlvit.image_query import ImageQuery
from clipcrop_jax.owlvit.image_query import query_embeddings
from clipcrop_jax.owlvit.model import init_variables
from clipcrop_jax.owlvit.model import TextZeroShotDetectionModule
from clipcrop_jax.owlvit.preprocessing import boxes_cxcywh_to_pixels_xyxy
from clipcrop_jax.owlvit.preprocessing import DEFAULT_MAX_PIXELS
from clipcrop_jax.owlvit.preprocessing import ImageError
from clipcrop_jax.owlvit.preprocessing import load_for_model
from clipcrop_jax.owlvit.preprocessing import load_image
from clipcrop_jax.owlvit.preprocessing import preprocess
from clipcrop_jax.owlvit.tokenizer import tokenize

__all__ = [
    'CheckpointError', 'load_checkpoint', 'save_scenic_checkpoint', 'hub', 'CONFIGS', 'get_config',
    'OwlViTConfig', 'embed_image_query', 'ImageQuery', 'query_embeddings', 'init_variables',
    'TextZeroShotDetectionModule', 'boxes_cxcywh_to_pixels_xyxy', 'DEFAULT_MAX_PIXELS',
    'ImageError', 'load_for_model', 'load_image', 'preprocess', 'tokenize',
]
