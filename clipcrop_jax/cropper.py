"""ClipCropper: the inference API (text- or image-conditioned crops in original-image pixels).

  cropper = ClipCropper.init_random('tiny')            # or ClipCropper.load('ckpt_dir')
  crops = cropper.crop(image, text='three cute white dogs', top_k=5, aspect_ratio='16:9')
  crops[0].box, crops[0].score, crops[0].focal_point

  enc = cropper.encode(image)                           # run the image encoder once ...
  a = cropper.crop(enc, text='a dog'); b = cropper.crop(enc, text='the boat')   # ... ask twice

Two ways of producing crops:
* trained ClipCrop decoder (a ClipCrop checkpoint: `save` / `load`);
* zero-shot (only OWL-ViT weights, e.g. `ClipCropper.load('owl2-b16.msgpack')`): GAIC grid
  candidates containing the union box of the selected tokens, ranked by a composition score
  (`clipcrop_jax.zero_shot`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional, Union

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import keywords as keywords_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax import zero_shot
from clipcrop_jax.owlvit import checkpoints as owl_checkpoints
from clipcrop_jax.owlvit import heads as owl_heads
from clipcrop_jax.owlvit import detect
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import preprocessing as pp
from clipcrop_jax.owlvit import tokenizer

CONFIG_FILE = 'clipcrop_config.json'
PARAMS_FILE = 'params.msgpack'
FORMAT_VERSION = 1
DEFAULT_NMS_IOU = 0.7
QUERY_PAD = 4
ZERO_SHOT_OTHER_OBJECTS = 20  # top detections used for the cut-through penalty


@dataclasses.dataclass
class Crop:
  """One crop. `box` is (x0, y0, x1, y1) in original-image pixels; `focal_point` (x, y) pixels."""

  box: tuple[float, float, float, float]
  score: float
  aspect_ratio: float
  focal_point: tuple[float, float]


@dataclasses.dataclass
class Encoding:
  """A reusable image encoding: OWL-ViT's query-independent outputs plus the image size (H, W)."""

  image_hw: tuple[int, int]
  encoded: dict[str, Any]


class ClipCropper:
  """Crops images to a text or an example image.

  Attributes:
    config: the model's `ClipCropConfig`.
    variables: {'params': {'owlvit': ..., 'decoder': ...}} (decoder absent in zero-shot mode).
    zero_shot: True when only OWL-ViT weights are available.
    model_id: a human-readable description of where the weights came from.
  """

  def __init__(self, config: model_lib.ClipCropConfig, variables: dict[str, Any],
               zero_shot_mode: bool = False, model_id: str = '',
               keyword_pipeline: Optional[str] = keywords_lib.DEFAULT_PIPELINE,
               nms_iou: float = DEFAULT_NMS_IOU):
    self.config = config
    self.variables = variables
    self.zero_shot = zero_shot_mode
    self.model_id = model_id
    self.keyword_pipeline = keyword_pipeline
    self.nms_iou = nms_iou
    self.module = model_lib.ClipCrop(config)
    self.owl_module = owl_model.TextZeroShotDetectionModule(config.owlvit_config)
    self._owl_variables = {'params': variables['params']['owlvit']}
    self._decode = jax.jit(lambda v, enc, q, m, extent: self.module.apply(
        v, enc, q, m, None, extent, method=self.module.crop_from_encoding))

  # ------------------------------------------------------------------ construction / IO

  @classmethod
  def init_random(cls, config: Union[model_lib.ClipCropConfig, str] = 'tiny',
                  seed: int = 0, **kwargs) -> 'ClipCropper':
    """Random weights (for tests and demos); `config` is a ClipCropConfig or 'tiny'."""
    config = model_lib.TINY if config == 'tiny' else config
    return cls(config, model_lib.init_variables(config, seed), model_id=f'random-init seed {seed}',
               **kwargs)

  @classmethod
  def from_owlvit(cls, path: Union[str, pathlib.Path],
                  config: Optional[model_lib.ClipCropConfig] = None, seed: int = 0,
                  **kwargs) -> 'ClipCropper':
    """OWL-ViT weights from any checkpoint `load_checkpoint` reads + a new (untrained) decoder.

    The starting point for training; for cropping without a trained decoder use `load(path)`,
    which gives the zero-shot mode.
    """
    owl_module, owl_variables = owl_checkpoints.load_checkpoint(path)
    config = config or model_lib.ClipCropConfig(owlvit=_config_name(owl_module.config, path))
    variables = model_lib.init_from_owlvit(config, owl_variables, seed)
    return cls(config, variables, model_id=f'{path} + untrained decoder', **kwargs)

  def save(self, directory: Union[str, pathlib.Path]) -> pathlib.Path:
    """Writes `clipcrop_config.json` and `params.msgpack` (all parameters) to `directory`."""
    if self.zero_shot:
      raise ValueError('A zero-shot cropper has no decoder to save; save the OWL-ViT checkpoint.')
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {'format_version': FORMAT_VERSION, 'config': dataclasses.asdict(self.config)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    tmp = directory / (PARAMS_FILE + '.tmp')
    tmp.write_bytes(flax.serialization.msgpack_serialize(
        jax.tree_util.tree_map(np.asarray, self.variables)))
    tmp.replace(directory / PARAMS_FILE)
    return directory

  @classmethod
  def load(cls, path: Union[str, pathlib.Path], **kwargs) -> 'ClipCropper':
    """Loads a ClipCrop checkpoint directory, or any OWL-ViT checkpoint (-> zero-shot mode)."""
    path = pathlib.Path(path)
    if (path / CONFIG_FILE).is_file():
      try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        config = model_lib.ClipCropConfig(**meta['config'])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path / CONFIG_FILE}: not a valid ClipCrop config ({e})') from e
      params_path = path / PARAMS_FILE
      if not params_path.is_file():
        raise ValueError(f'{params_path}: missing (ClipCrop checkpoint without parameters)')
      try:
        restored = flax.serialization.msgpack_restore(params_path.read_bytes())
      except Exception as e:  # msgpack raises assorted types on corrupt input
        raise ValueError(f'{params_path}: corrupt checkpoint ({type(e).__name__}: {e})') from e
      variables = _check_against(restored, config, params_path)
      return cls(config, variables, model_id=str(path), **kwargs)
    owl_module, owl_variables = owl_checkpoints.load_checkpoint(path)
    config = model_lib.ClipCropConfig(owlvit=_config_name(owl_module.config, path))
    variables = {'params': {'owlvit': owl_variables['params']}}
    return cls(config, variables, zero_shot_mode=True, model_id=f'{path} (zero-shot)', **kwargs)

  # ------------------------------------------------------------------ inference

  def encode(self, image: Any) -> Encoding:
    """Runs the image encoder once; pass the result to `crop` for any number of queries.

    Args:
      image: uint8 (H, W, 3) array, a path, or a list of those (-> list of Encodings).
    """
    if isinstance(image, (list, tuple)):
      return [self.encode(im) for im in image]
    image = _as_uint8_image(image)
    pixels = pp.preprocess(image, self.config.owlvit_config.image_size)[None]
    encoded = owl_model.encode_images(self.owl_module, self._owl_variables, jnp.asarray(pixels))
    return Encoding(image.shape[:2], encoded)

  def _queries(self, text: Optional[str], query_image: Any, query_box: Any, mode: str):
    """(1, Q, D) embeddings and (1, Q) mask for the request, or (None, None) in base mode."""
    if mode == 'base':
      return None, None
    if mode == 'image' or query_image is not None:
      if query_image is None:
        raise ValueError("mode 'image' needs query_image")
      q_img = _as_uint8_image(query_image)
      box = None if query_box is None else tuple(float(v) for v in query_box)
      emb = detect.query_embeddings(self.owl_module, self._owl_variables,
                                    image_queries=[detect.ImageQuery('query', q_img, box)])
      return jnp.asarray(emb)[None], jnp.ones((1, 1), bool)
    if text is None or not str(text).strip():
      raise ValueError(f'mode {mode!r} needs a non-empty text (or pass query_image)')
    texts = keywords_lib.build_queries(text, mode=mode, pipeline=self.keyword_pipeline)
    tokens = tokenizer.tokenize(texts)
    # Pad the query count to a multiple of QUERY_PAD with all-zero (masked) rows, so that texts
    # with different keyword counts reuse one compiled decoder (as Scenic pads its queries).
    padded = -(-len(texts) // QUERY_PAD) * QUERY_PAD
    tokens = np.pad(tokens, ((0, padded - len(texts)), (0, 0)))[None]
    emb = owl_model.embed_texts(self.owl_module, self._owl_variables, jnp.asarray(tokens))
    return emb, jnp.asarray(tokens[..., 0] > 0)

  def crop(self, image: Any, text: Optional[str] = None, query_image: Any = None,
           top_k: int = 5, aspect_ratio: Any = None, min_size: Optional[float] = None,
           mode: Optional[str] = None, query_box: Any = None, fuse_top_k: Optional[int] = None
           ) -> Union[list[Crop], list[list[Crop]]]:
    """Ranked crops for one image (or a list of images -> list of lists).

    Args:
      image: uint8 (H, W, 3), a path, an `Encoding` from `encode`, or a list of those.
      text: the request ("a woman and three dogs on the boat").
      query_image: an example image (array or path) instead of text (one-shot embedding).
      top_k: number of crops returned (after NMS with IoU `nms_iou`).
      aspect_ratio: '16:9', '4/3', 1.5 or None; each crop becomes the largest box of exactly that
        ratio inside the image that contains it (or, if impossible, covers it best).
      min_size: drop crops whose shorter side is below this many pixels.
      mode: overrides the config's mode ('full', 'main', 'key', 'base', 'image').
      query_box: (x0, y0, x1, y1) pixels on the query image (image mode; default whole image).
      fuse_top_k: overrides the config's `fuse_top_k`: the first crop is then the mean of the k
        highest-quality predictions (box voting), the others follow as usual. Trained decoders
        only (ignored in zero-shot mode).

    Returns:
      list of `Crop`, best first.
    """
    if isinstance(image, (list, tuple)):
      return [self.crop(im, text, query_image, top_k, aspect_ratio, min_size, mode, query_box,
                        fuse_top_k) for im in image]
    if top_k < 1:
      raise ValueError(f'top_k must be >= 1, got {top_k}')
    fuse_top_k = self.config.fuse_top_k if fuse_top_k is None else fuse_top_k
    if int(fuse_top_k) != fuse_top_k or fuse_top_k < 1:
      raise ValueError(f'fuse_top_k must be an integer >= 1, got {fuse_top_k}')
    ratio = box_lib.parse_aspect_ratio(aspect_ratio)
    enc = image if isinstance(image, Encoding) else self.encode(image)
    mode = mode or self.config.mode
    if mode not in model_lib.MODES:
      raise ValueError(f'mode {mode!r}; expected one of {model_lib.MODES}')
    q, q_mask = self._queries(text, query_image, query_box, mode)
    h, w = enc.image_hw
    side = float(max(h, w))
    if self.zero_shot:
      boxes_px, scores = self._zero_shot(enc, q, q_mask, ratio)
    else:
      extent = jnp.asarray([[w / side, h / side]], jnp.float32)
      out = self._decode(self.variables, enc.encoded, q, q_mask, extent)
      boxes_px = np.asarray(out['pred_boxes'][0]) * side
      boxes_px = np.clip(boxes_px, 0, [w, h, w, h])
      scores = np.asarray(out['quality'][0])
      # Box voting: the fused crop (if any) is ranked first.
      boxes_px, scores = box_lib.with_fused_first_xyxy(boxes_px, scores, fuse_top_k)
    return self._finalise(boxes_px, scores, (w, h), ratio, top_k, min_size,
                          first_is_best=fuse_top_k > 1 and not self.zero_shot)

  def _zero_shot(self, enc: Encoding, q, q_mask, ratio):
    """Zero-shot crops (pixels) and scores from OWL-ViT detections alone (`zero_shot`)."""
    h, w = enc.image_hw
    to_image = np.array([w, h, w, h], np.float64)
    boxes = np.asarray(box_lib.cxcywh_to_xyxy(enc.encoded['pred_boxes'][0]), np.float64)
    boxes = np.clip(boxes * max(h, w), 0, to_image) / to_image  # [0, 1] of the image
    if q is None:
      return zero_shot.crops_from_detections(boxes, None, None, (w, h), ratio,
                                             other_objects=ZERO_SHOT_OTHER_OBJECTS)
    logits = np.asarray(owl_heads.logits_from_image_terms(
        enc.encoded['class_terms'], q, q_mask)[0])  # (P, Q)
    centres = np.asarray(enc.encoded['pred_boxes'][0, :, :2]) * max(h, w)
    in_image = (centres[:, 0] <= w) & (centres[:, 1] <= h)  # not a padding token
    logits = np.where(in_image[:, None], logits, -np.inf)
    picked = np.argmax(logits, axis=0)[np.asarray(q_mask[0])]
    best = 1 / (1 + np.exp(-logits.max(axis=1)))  # 0 for padding tokens
    return zero_shot.crops_from_detections(boxes, best, picked, (w, h), ratio,
                                           other_objects=ZERO_SHOT_OTHER_OBJECTS)

  def _finalise(self, boxes_px, scores, image_wh, ratio, top_k, min_size,
                first_is_best: bool = False) -> list[Crop]:
    """Aspect-ratio fitting, min size, NMS (by score; `first_is_best`: box 0 first), top-k,
    focal point."""
    w, h = image_wh
    if ratio is not None:
      boxes_px = np.array([box_lib.fit_aspect_ratio_xyxy(b, ratio, (w, h)) for b in boxes_px])
    keep = np.ones(len(boxes_px), bool)
    if min_size is not None:
      keep &= np.minimum(boxes_px[:, 2] - boxes_px[:, 0], boxes_px[:, 3] - boxes_px[:, 1]) >= min_size
    keep &= (boxes_px[:, 2] > boxes_px[:, 0]) & (boxes_px[:, 3] > boxes_px[:, 1])
    idx = np.nonzero(keep)[0]
    if len(idx) == 0:
      return []
    priority = np.asarray(scores, np.float64).copy()
    if first_is_best:
      priority[0] = np.inf
    order = box_lib.nms_xyxy(boxes_px[idx], priority[idx], self.nms_iou, max_outputs=top_k)
    crops = []
    for i in idx[order]:
      b = tuple(float(v) for v in boxes_px[i])
      crops.append(Crop(b, float(scores[i]), (b[2] - b[0]) / (b[3] - b[1]),
                        ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)))
    return crops


def _as_uint8_image(image: Any) -> np.ndarray:
  """A path (loaded, EXIF applied) or an array -> uint8 (H, W, 3); clear errors otherwise."""
  if isinstance(image, (str, pathlib.Path)):
    return pp.load_image(image)
  return pp.to_uint8_rgb(np.asarray(image))


def _config_name(owl_cfg, path) -> str:
  if owl_cfg.name == 'custom':
    raise ValueError(f'{path}: OWL-ViT architecture does not match a named config; convert it or '
                     'add a config.')
  return owl_cfg.name


def _check_against(restored: dict[str, Any], config: model_lib.ClipCropConfig,
                   source: pathlib.Path) -> dict[str, Any]:
  """Checks restored variables against the config's shapes; names the first mismatch."""
  model_lib.check_param_shapes(jax.eval_shape(lambda: model_lib.init_variables(config)),
                               restored, str(source))
  return jax.tree_util.tree_map(jnp.asarray, restored)
