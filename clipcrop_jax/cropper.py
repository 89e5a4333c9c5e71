"""ClipCropper: the inference API (text- or image-conditioned crops in original-image pixels).

  cropper = ClipCropper.init_random('tiny')            # or ClipCropper.load('model_dir')
  crops = cropper.crop(image, text='three cute white dogs', top_k=5, aspect_ratio='16:9')
  crops[0].box, crops[0].score, crops[0].focal_point

  enc = cropper.encode(image)                           # run the image encoder once ...
  a = cropper.crop(enc, text='a dog'); b = cropper.crop(enc, text='the boat')   # ... ask twice

  encs = cropper.encode_batch([im1, im2, im3])          # one batched encoder forward
  request = cropper.check_request(text='a dog')         # validate + embed once ...
  crops = [cropper.crop_checked(e, request) for e in encs]   # ... crop many (a service)

  for r in cropper.iter_crops(paths, text='a dog', batch_size=16):   # a folder of photos:
    r.index, r.crops, r.error                           # in input order, bad files kept as errors

Batched inference (`crop` / `encode` on a list, `iter_crops`): images are decoded and
preprocessed in a thread pool that runs ahead of the device; the encoder and the decoder run on
batches padded to a few static sizes (powers of two times the local device count, so nothing is
recompiled per image), split over the local devices on the 'data' axis of a
`sharding.make_mesh` mesh; results come back in input order, a failing file as an error of its
own. `dtype='bfloat16'` computes in bfloat16 (parameters stay float32).

Two ways of producing crops:
* trained ClipCrop decoder (a model directory, `clipcrop_jax.export`: `save` / `load`);
* zero-shot (only OWL-ViT weights, e.g. `ClipCropper.load('owl2-b16.msgpack')`): GAIC grid
  candidates containing the union box of the selected tokens, ranked by a composition score
  (`clipcrop_jax.zero_shot`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax import boxes as box_lib
from clipcrop_jax import crop_request
from clipcrop_jax.data import features
from clipcrop_jax import default_config
from clipcrop_jax import errors as errors_lib
from clipcrop_jax import export
from clipcrop_jax import keywords as keywords_lib
from clipcrop_jax import model as model_lib
from clipcrop_jax.owlvit import checkpoints as owl_checkpoints
from clipcrop_jax.owlvit import configs as owl_configs
from clipcrop_jax.owlvit import heads as owl_heads
from clipcrop_jax.owlvit import image_query
from clipcrop_jax.owlvit import model as owl_model
from clipcrop_jax.owlvit import preprocessing as pp
from clipcrop_jax.owlvit import tokenizer
from clipcrop_jax import sharding as sharding_lib
from clipcrop_jax import zero_shot

DEFAULT_NMS_IOU = 0.7
QUERY_PAD = 4
ZERO_SHOT_OTHER_OBJECTS = 20  # top detections used for the cut-through penalty
MIN_CROP_SIDE = 1.0  # pixels: no crop is ever thinner than one pixel
QUERY_CACHE_SIZE = 64  # query embeddings kept per cropper (text or example image -> embedding)
# Images per forward in batched inference (per cropper / per call: batch_size), by platform.
# CPU: 1. A real encoder saturates the cores at batch 1 (B/32, 2 cores: batch 2 / 4 / 8 gave
# 0.99x / 0.94x / 0.86x the images/s of batch 1, `tools/benchmark_clipcrop.py --mode folder`);
# reading still runs ahead in threads. Accelerators: 8 (raise it for throughput).
DEFAULT_BATCH_SIZE = {'cpu': 1}
ACCELERATOR_BATCH_SIZE = 8
DTYPES = {name: getattr(jnp, name) for name in default_config.DTYPES}  # name -> jnp dtype
IMAGE_QUERY_TEXT = '<example image>'  # `QueryUse.text` of an example-image query
# What the decoder's batched forward brings back to the host (selections: for `Crop.queries`).
_DECODER_OUTPUTS = (
    'pred_boxes',
    'quality',
    'selected_boxes',
    'selected_logits',
    'selected_mask',
    'union_mask',
)


@dataclasses.dataclass(frozen=True)
class QueryUse:
  """What one query of a request found in the image: why a crop came out as it did.

  Attributes:
    text: the query text (the caption or a keyword); '<example image>' for an image query.
    role: 'caption', 'subject' or 'context' (`features.ROLES`, `keywords.build_query_roles`).
    box: the box of the image token the query selected, (x0, y0, x1, y1) original-image pixels
      (clipped to the image); None when it selected nothing.
    score: the detector's confidence in that selection (sigmoid of the class logit), in [0, 1].
    in_union: whether the box is part of the union box the crops start from
      (`ClipCropConfig.selection_union`).
  """

  text: str
  role: str
  box: Optional[tuple[float, float, float, float]]
  score: float
  in_union: bool

  def to_json(self) -> dict[str, Any]:
    return {
        'text': self.text,
        'role': self.role,
        'box': None if self.box is None else [round(v, 3) for v in self.box],
        'score': round(self.score, 6),
        'in_union': self.in_union,
    }


@dataclasses.dataclass
class Crop:
  """One crop. `box` is (x0, y0, x1, y1) in original-image pixels; `focal_point` (x, y) pixels.

  `queries` are the request's queries with what each selected (the same for every crop of an
  image; empty in 'base' mode); `fused` is True for a crop that is the mean box of the
  `fuse_top_k` highest-quality predictions (box voting), which is ranked first whatever its own
  `score` (the mean of theirs).
  """

  box: tuple[float, float, float, float]
  score: float
  aspect_ratio: float
  focal_point: tuple[float, float]
  queries: tuple[QueryUse, ...] = ()
  fused: bool = False


@dataclasses.dataclass
class Encoding:
  """A reusable image encoding: OWL-ViT's query-independent outputs plus the image size (H, W).

  `encoder` identifies the cropper that made it; another cropper refuses it (its tokens would be
  meaningless to a different OWL-ViT).
  """

  image_hw: tuple[int, int]
  encoded: dict[str, Any]
  encoder: str = ''


@dataclasses.dataclass
class ModelInput:
  """An image prepared for the encoder (`ClipCropper.prepare`): `pixels` float32 (S, S, 3) in
  [0, 1] (padded to a square at the bottom/right and resized, `preprocessing.preprocess`) and the
  original image size `image_hw` (H, W)."""

  pixels: np.ndarray
  image_hw: tuple[int, int]


@dataclasses.dataclass
class BatchResult:
  """The outcome for one input of batched inference (`ClipCropper.iter_crops`).

  Attributes:
    index: position of the input in the list given.
    source: the input's path, or 'images[<index>]' for an array / file object / Encoding.
    crops: the ranked crops (as `crop` returns them), or None when the input failed.
    error: one line naming the input and what went wrong (None on success).
    exception: the exception behind `error` (None on success).
    payload: what the caller's `prepare` returned next to the model input (e.g. the decoded
      full-resolution image a command line writes crops from); None without `prepare`.
    image_hw: the original image size (H, W), when known.
  """

  index: int
  source: str
  crops: Optional[list[Crop]]
  error: Optional[str] = None
  exception: Optional[BaseException] = None
  payload: Any = None
  image_hw: Optional[tuple[int, int]] = None


class ClipCropper:
  """Crops images to a text or an example image.

  Attributes:
    config: the model's `ClipCropConfig`.
    variables: {'params': {'owlvit': ..., 'decoder': ...}} (decoder absent in zero-shot mode).
    zero_shot: True when only OWL-ViT weights are available.
    model_id: a human-readable description of where the weights came from.
    keyword_pipeline: the keyword extractor of text queries: a spaCy pipeline name or path, or
      `keywords.RULES` (the rule-based extractor). The constructor takes a name (None, an old
      spelling of the rule-based extractor, is refused); the factories (`load`, `init_random`,
      `from_owlvit`) read None as the recorded pipeline (`_pipeline_or_recorded`).
  """

  def __init__(
      self,
      config: model_lib.ClipCropConfig,
      variables: dict[str, Any],
      zero_shot_mode: bool = False,
      model_id: str = '',
      keyword_pipeline: str = keywords_lib.DEFAULT_PIPELINE,
      nms_iou: float = DEFAULT_NMS_IOU,
      max_pixels: Optional[int] = None,
      dtype: Any = 'float32',
      batch_size: Optional[int] = None,
      devices: Optional[Sequence[jax.Device]] = None,
  ):
    """See the class docstring; `dtype` is the compute dtype ('float32' or 'bfloat16'; the
    parameters stay float32), `batch_size` the default images per forward of batched inference
    (None: `DEFAULT_BATCH_SIZE` of the devices' platform, 1 on CPU, else 8) and `devices` the
    devices a batch is split over (default: `jax.local_devices()`)."""
    self.config = config
    self.zero_shot = zero_shot_mode
    self.model_id = model_id
    self.keyword_pipeline = keywords_lib.check_pipeline(keyword_pipeline)
    self.nms_iou = nms_iou
    self.max_pixels = max_pixels  # decoded-pixel limit for paths (None: CLIPCROP_MAX_PIXELS/120 MP)
    self.dtype = _check_dtype(dtype)
    # One ('data', 'model') mesh over the local devices: batches are split on 'data', the
    # parameters are replicated (placed once here).
    self.mesh = sharding_lib.make_mesh((-1, 1), jax.local_devices() if devices is None else devices)
    platform = self.mesh.devices.flat[0].platform
    self.batch_size = crop_request.check_int(
        'batch_size',
        DEFAULT_BATCH_SIZE.get(platform, ACCELERATOR_BATCH_SIZE)
        if batch_size is None
        else batch_size,
    )
    self.num_devices = self.mesh.devices.size
    self._batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.variables = jax.device_put(variables, sharding_lib.replicated(self.mesh))
    self.module = model_lib.ClipCrop(config, dtype=self.dtype)
    self.owl_module = owl_model.TextZeroShotDetectionModule(config.owlvit_config, self.dtype)
    self._owl_variables = {'params': self.variables['params']['owlvit']}
    self._encoder_key = f'{config.owlvit}:{uuid.uuid4().hex}'
    self._query_cache: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
    self._query_cache_lock = threading.Lock()  # a service calls check_request from many threads
    self._decode = jax.jit(
        lambda v, enc, q, m, extent, roles: self.module.apply(
            v, enc, q, m, None, extent, False, roles, method=self.module.crop_from_encoding
        )
    )

  # ------------------------------------------------------------------ construction / IO

  @classmethod
  def init_random(
      cls,
      config: Union[model_lib.ClipCropConfig, str] = 'tiny',
      seed: int = 0,
      keyword_pipeline: Optional[str] = None,
      **kwargs,
  ) -> 'ClipCropper':
    """Random weights (for tests and demos).

    Args:
      config: a ClipCropConfig, 'tiny' (tiny OWL-ViT + small decoder) or an OWL-ViT config name
        (`clipcrop_jax.owlvit.CONFIGS`, e.g. 'clip_b32') with the paper's decoder.
      seed: PRNG seed.
      keyword_pipeline: the keyword extractor; None = `keywords.DEFAULT_PIPELINE`.
      **kwargs: passed to the constructor (nms_iou, ...).
    """
    config = _named_config(config)
    return cls(
        config,
        model_lib.init_variables(config, seed),
        model_id=f'random-init seed {seed}',
        keyword_pipeline=_pipeline_or_recorded(keyword_pipeline),
        **kwargs,
    )

  @classmethod
  def from_owlvit(
      cls,
      path: Union[str, pathlib.Path],
      config: Optional[model_lib.ClipCropConfig] = None,
      seed: int = 0,
      keyword_pipeline: Optional[str] = None,
      **kwargs,
  ) -> 'ClipCropper':
    """OWL-ViT weights from any checkpoint `load_checkpoint` reads + a new (untrained) decoder.

    The starting point for training; for cropping without a trained decoder use `load(path)`,
    which gives the zero-shot mode. `keyword_pipeline` None = `keywords.DEFAULT_PIPELINE`.
    """
    owl_module, owl_variables = owl_checkpoints.load_checkpoint(path)
    config = config or model_lib.ClipCropConfig(owlvit=_config_name(owl_module.config, path))
    variables = model_lib.init_from_owlvit(config, owl_variables, seed)
    return cls(
        config,
        variables,
        model_id=f'{path} + untrained decoder',
        keyword_pipeline=_pipeline_or_recorded(keyword_pipeline),
        **kwargs,
    )

  def save(self, directory: Union[str, pathlib.Path]) -> pathlib.Path:
    """Writes the model directory (`export.save_model`: atomic; a folder holding anything but a
    model is refused), recording this cropper's `keyword_pipeline`."""
    if self.zero_shot:
      raise ValueError('A zero-shot cropper has no decoder to save; save the OWL-ViT checkpoint.')
    return export.save_model(
        directory, self.config, self.variables['params'], self.keyword_pipeline
    )

  @classmethod
  def load(
      cls, path: Union[str, pathlib.Path], keyword_pipeline: Optional[str] = None, **kwargs
  ) -> 'ClipCropper':
    """Loads a model directory (or a training workdir holding one, `export.load_model`), or any
    OWL-ViT checkpoint or checkpoint name (-> zero-shot mode).

    Args:
      path: the model directory, training workdir or OWL-ViT checkpoint; or an OWL-ViT checkpoint
        name `owlvit.load_checkpoint` resolves (`owlvit.hub`: a Hugging Face id such as
        'google/owlv2-base-patch16-ensemble', or a Scenic release such as
        'clip_vit_b32_b0203fc'), downloaded once into a cache. An existing path wins.
      keyword_pipeline: the keyword extractor; None = the one recorded with the model
        (`keywords.DEFAULT_PIPELINE` for an OWL-ViT checkpoint).
      **kwargs: passed to the constructor (nms_iou, max_pixels).
    """
    checkpoint, path = path, pathlib.Path(path)  # a str may be a name (`owlvit.hub`)
    if export.is_model_dir(path) or export.is_model_dir(path / export.EXPORT_DIR):
      exported = export.load_model(path)
      return cls(
          exported.config,
          {'params': exported.params},
          model_id=str(path),
          keyword_pipeline=_pipeline_or_recorded(keyword_pipeline, exported.keyword_pipeline),
          **kwargs,
      )
    owl_module, owl_variables = owl_checkpoints.load_checkpoint(checkpoint)
    config = model_lib.ClipCropConfig(
        owlvit=_config_name(owl_module.config, path), selection_union=zero_shot.ZERO_SHOT_UNION
    )
    variables = {'params': {'owlvit': owl_variables['params']}}
    return cls(
        config,
        variables,
        zero_shot_mode=True,
        model_id=f'{path} (zero-shot)',
        keyword_pipeline=_pipeline_or_recorded(keyword_pipeline),
        **kwargs,
    )

  # ------------------------------------------------------------------ inference

  def prepare(self, image: Any) -> ModelInput:
    """The encoder's input for one image, without running the model.

    A path or a binary file object is decoded straight to the model's resolution
    (`preprocessing.load_for_model`: JPEG draft decoding, EXIF orientation, the `max_pixels`
    limit checked on the header before decoding; errors are `preprocessing.ImageError` naming
    the file); an array is preprocessed with the fast (pixel-bounded) default of
    `preprocessing.preprocess`; a `ModelInput` is returned as it is.

    Args:
      image: uint8 (H, W, 3) array, a path, a binary file object or a `ModelInput`.
    """
    if isinstance(image, ModelInput):
      return image
    size = self.config.owlvit_config.image_size
    if isinstance(image, (str, pathlib.Path)) or hasattr(image, 'read'):
      pixels, image_hw = pp.load_for_model(image, size, max_pixels=self.max_pixels)
    else:
      image = pp.to_uint8_rgb(np.asarray(image))
      pixels, image_hw = pp.preprocess(image, size), image.shape[:2]
    return ModelInput(pixels, tuple(int(v) for v in image_hw))

  def encode(self, image: Any) -> Union[Encoding, list[Encoding]]:
    """Runs the image encoder once; pass the result to `crop` for any number of queries.

    Args:
      image: what `prepare` takes, or a list of those (-> list of Encodings, encoded in batches
        of `batch_size` by `encode_batch`; a bad input raises, naming it).
    """
    if isinstance(image, (list, tuple)):
      return self.encode_batch(image)
    return self.encode_batch([image])[0]

  def bucket_size(self, n: int) -> int:
    """The static batch size a batch of `n` images is padded to: the local device count times
    the next power of two of n / device count (1, 2, 4, 8, ... on one device), so that only a
    few shapes are ever compiled and every device gets the same share."""
    per_device = -(-max(int(n), 1) // self.num_devices)
    return self.num_devices * (1 << (per_device - 1).bit_length())

  def _encode_inputs(self, inputs: Sequence[ModelInput]) -> dict[str, jax.Array]:
    """One encoder forward over `inputs` stacked and zero-padded to `bucket_size`, the batch
    split over the local devices: OWL-ViT's encoding with a leading (padded) batch axis."""
    size = self.config.owlvit_config.image_size
    pixels = np.zeros((self.bucket_size(len(inputs)), size, size, 3), np.float32)
    for i, model_input in enumerate(inputs):
      pixels[i] = model_input.pixels
    return owl_model.encode_images(
        self.owl_module, self._owl_variables, jax.device_put(pixels, self._batch_sharding)
    )

  def encode_batch(self, images: Sequence[Any], batch_size: Optional[int] = None) -> list[Encoding]:
    """Encodes several images, `batch_size` (default: the cropper's) per encoder forward.

    The inputs (see `prepare`) are stacked into (B, S, S, 3) batches, padded with zero images to
    `bucket_size`. Each Encoding equals the one `encode` makes for that image up to float32
    rounding (XLA may order the sums of a batched matmul differently; ~2e-6 on the tiny model).

    Returns:
      one `Encoding` per image, in order (arrays with a leading batch dimension of 1).
    """
    batch_size = (
        self.batch_size if batch_size is None else crop_request.check_int('batch_size', batch_size)
    )
    inputs = [self.prepare(im) for im in images]
    encodings = []
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start : start + batch_size]
      encoded = self._encode_inputs(chunk)
      encodings += [
          Encoding(
              model_input.image_hw,
              jax.tree.map(lambda x, i=i: x[i : i + 1], encoded),
              self._encoder_key,
          )
          for i, model_input in enumerate(chunk)
      ]
    return encodings

  def _cached(self, key: Any, compute) -> tuple[Any, Any]:
    """`compute()` memoised under `key` (LRU, QUERY_CACHE_SIZE entries; thread-safe, `compute`
    runs outside the lock)."""
    with self._query_cache_lock:
      if key in self._query_cache:
        self._query_cache.move_to_end(key)
        return self._query_cache[key]
    value = compute()
    with self._query_cache_lock:
      self._query_cache[key] = value
      while len(self._query_cache) > QUERY_CACHE_SIZE:
        self._query_cache.popitem(last=False)
    return value

  def _queries(self, text: Optional[str], query_image: Any, query_box: Any, mode: str):
    """(1, Q, D) embeddings, (1, Q) mask, (1, Q) int32 roles and the (text, role) of each real
    query for the request; (None, None, None, ()) in base mode."""
    if mode == 'base':
      return None, None, None, ()
    if mode == 'image':
      q_img = _as_uint8_image(query_image, self.max_pixels)
      box = None if query_box is None else tuple(float(v) for v in query_box)
      key = ('image', hashlib.sha1(q_img.tobytes()).hexdigest(), q_img.shape, box)

      def embed_image():
        emb = image_query.query_embeddings(
            self.owl_module,
            self._owl_variables,
            image_queries=[image_query.ImageQuery('query', q_img, box)],
        )
        return (
            jnp.asarray(emb)[None],
            jnp.ones((1, 1), bool),
            jnp.zeros((1, 1), jnp.int32),
            ((IMAGE_QUERY_TEXT, 'caption'),),
        )

      return self._cached(key, embed_image)

    def embed_text():
      found = keywords_lib.build_query_roles(text, mode=mode, pipeline=self.keyword_pipeline)
      tokens = tokenizer.tokenize([q.text for q in found])
      # Pad the query count to a multiple of QUERY_PAD with all-zero (masked) rows, so that texts
      # with different keyword counts reuse one compiled decoder (as Scenic pads its queries).
      padded = -(-len(found) // QUERY_PAD) * QUERY_PAD
      tokens = np.pad(tokens, ((0, padded - len(found)), (0, 0)))[None]
      roles = np.zeros((1, padded), np.int32)
      roles[0, : len(found)] = [features.ROLE_IDS[q.role] for q in found]
      emb = owl_model.embed_texts(self.owl_module, self._owl_variables, jnp.asarray(tokens))
      return (
          emb,
          jnp.asarray(tokens[..., 0] > 0),
          jnp.asarray(roles),
          tuple((q.text, q.role) for q in found),
      )

    return self._cached(('text', mode, text), embed_text)

  def check_request(
      self,
      text: Optional[str] = None,
      query_image: Any = None,
      top_k: int = crop_request.DEFAULT_TOP_K,
      aspect_ratio: Any = None,
      min_size: Optional[float] = None,
      mode: Optional[str] = None,
      query_box: Any = None,
      fuse_top_k: Optional[int] = None,
  ) -> crop_request.CropRequest:
    """Validates `crop`'s arguments (no image needed) and embeds the query (cached).

    A command line calls it once before a folder of images, so that a bad argument is reported
    once, before any image is encoded. Raises ValueError / TypeError naming the argument.
    """
    args = crop_request.check_arguments(
        text,
        query_image,
        top_k,
        aspect_ratio,
        min_size,
        mode,
        query_box,
        fuse_top_k,
        default_mode=self.config.mode,
        default_fuse_top_k=self.config.fuse_top_k,
    )
    queries, query_mask, roles, texts = self._queries(text, query_image, query_box, args.mode)
    return crop_request.CropRequest(
        args.mode,
        queries,
        query_mask,
        args.top_k,
        args.ratio,
        args.min_size,
        args.fuse_top_k,
        roles,
        texts,
    )

  def crop(
      self,
      image: Any,
      text: Optional[str] = None,
      query_image: Any = None,
      top_k: int = crop_request.DEFAULT_TOP_K,
      aspect_ratio: Any = None,
      min_size: Optional[float] = None,
      mode: Optional[str] = None,
      query_box: Any = None,
      fuse_top_k: Optional[int] = None,
      *,
      errors: str = 'raise',
      batch_size: Optional[int] = None,
  ) -> Union[list[Crop], list[Union[list[Crop], BatchResult]]]:
    """Ranked crops for one image (or a list of images -> one list of crops per image, computed
    in batches by `iter_crops`).

    Every argument is validated once, before any image is encoded: bad values raise ValueError
    (TypeError for a wrong type) naming the argument.

    Args:
      image: uint8 (H, W, 3), a path, an `Encoding` from this cropper's `encode`, or a list of
        those.
      text: the request ("a woman and three dogs on the boat").
      query_image: an example image (array or path) instead of text (one-shot embedding); giving
        both is an error.
      top_k: number of crops returned (after NMS with IoU `nms_iou`), an integer >= 1.
      aspect_ratio: '16:9', '4/3', 1.5 or None, within [1/100, 100]; each crop becomes the largest
        box of exactly that ratio inside the image that contains it (or, if impossible, covers it
        best).
      min_size: drop crops whose shorter side is below this many pixels (a number >= 0). Crops
        are never thinner than 1 pixel: smaller predictions are widened to 1 pixel, and
        aspect-ratio boxes that cannot be 1 pixel wide are dropped.
      mode: overrides the config's mode ('full', 'main', 'key', 'base', 'image').
      query_box: (x0, y0, x1, y1) pixels on the query image (image mode; default whole image).
      fuse_top_k: overrides the config's `fuse_top_k`: the first crop is then the mean of the k
        highest-quality predictions (box voting), the others follow as usual. Trained decoders
        only (ignored in zero-shot mode).
      errors: for a list: 'raise' (the first failing image raises its error, naming it) or
        'return' (a failing image's entry is its `BatchResult`, with `error` set; the others
        are lists of crops).
      batch_size: images per forward for a list (default: the cropper's `batch_size`).

    Returns:
      list of `Crop`, best first; possibly empty (e.g. when `min_size` exceeds the image).
    """
    if errors not in ('raise', 'return'):
      raise ValueError(f"errors={errors!r}; expected 'raise' or 'return'")
    request = self.check_request(
        text, query_image, top_k, aspect_ratio, min_size, mode, query_box, fuse_top_k
    )
    if not isinstance(image, (list, tuple)):
      return self._crop_one(image, request)
    results = []
    for result in self.iter_crops_checked(image, request, batch_size=batch_size):
      if result.exception is not None and errors == 'raise':
        raise result.exception
      results.append(result if result.exception is not None else result.crops)
    return results

  def iter_crops(
      self,
      images: Iterable[Any],
      text: Optional[str] = None,
      query_image: Any = None,
      top_k: int = crop_request.DEFAULT_TOP_K,
      aspect_ratio: Any = None,
      min_size: Optional[float] = None,
      mode: Optional[str] = None,
      query_box: Any = None,
      fuse_top_k: Optional[int] = None,
      *,
      batch_size: Optional[int] = None,
      num_workers: Optional[int] = None,
      prepare: Optional[Callable[[Any], tuple[ModelInput, Any]]] = None,
  ) -> Iterator[BatchResult]:
    """Crops many images to one request in batches; yields a `BatchResult` per image, in input
    order, as soon as its batch is done.

    The request is checked once, before any image is read (errors raise as in `crop`). Images
    are read and preprocessed by `num_workers` threads running up to two batches ahead of the
    device; each batch of `batch_size` goes through the encoder and the decoder in one forward
    each (padded to `bucket_size`, split over the local devices). An image that cannot be read
    or cropped gives a result with `error` and the run goes on.

    Args:
      images: what `crop` takes per image (arrays, paths, file objects, `ModelInput`s or
        `Encoding`s; an Encoding skips the encoder), or anything `prepare` takes.
      text ... fuse_top_k: the request, as in `crop`.
      batch_size: images per forward (default: the cropper's `batch_size`).
      num_workers: reading threads (default: min(8, CPU count)).
      prepare: item -> (ModelInput, payload), run in the reading threads instead of
        `self.prepare`; the payload comes back in the result (a command line returns the decoded
        image here, to write the crops from it without decoding twice).
    """
    request = self.check_request(
        text, query_image, top_k, aspect_ratio, min_size, mode, query_box, fuse_top_k
    )
    return self.iter_crops_checked(
        images, request, batch_size=batch_size, num_workers=num_workers, prepare=prepare
    )

  def iter_crops_checked(
      self,
      images: Iterable[Any],
      request: crop_request.CropRequest,
      *,
      batch_size: Optional[int] = None,
      num_workers: Optional[int] = None,
      prepare: Optional[Callable[[Any], tuple[ModelInput, Any]]] = None,
  ) -> Iterator[BatchResult]:
    """`iter_crops` under a request `check_request` already validated."""
    batch_size = (
        self.batch_size if batch_size is None else crop_request.check_int('batch_size', batch_size)
    )
    num_workers = (
        min(8, os.cpu_count() or 1)
        if num_workers is None
        else crop_request.check_int('num_workers', num_workers)
    )

    def read(index: int, item: Any) -> BatchResult:
      source = str(item) if isinstance(item, (str, pathlib.Path)) else f'images[{index}]'
      try:
        if isinstance(item, Encoding):
          return BatchResult(index, source, None, payload=item, image_hw=item.image_hw)
        model_input, payload = prepare(item) if prepare else (self.prepare(item), None)
        return BatchResult(
            index, source, None, payload=(model_input, payload), image_hw=model_input.image_hw
        )
      except Exception as e:  # pylint: disable=broad-except  # one bad image never ends a run
        return _failed(index, source, e)

    pool = concurrent.futures.ThreadPoolExecutor(num_workers, 'clipcrop-read')
    try:
      pending = collections.deque()
      items = iter(enumerate(images))
      exhausted = False
      while True:
        # Two batches in flight: one on the device, the next being read.
        while not exhausted and len(pending) < 2 * batch_size + num_workers:
          nxt = next(items, None)
          if nxt is None:
            exhausted = True
          else:
            pending.append(pool.submit(read, *nxt))
        if not pending:
          return
        batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
        yield from self._crop_batch(batch, request)
    finally:  # also when the caller stops early (break, Ctrl-C): reads not started are dropped
      pool.shutdown(wait=True, cancel_futures=True)

  def _crop_batch(
      self, batch: list[BatchResult], request: crop_request.CropRequest
  ) -> Iterator[BatchResult]:
    """Crops the read items of `batch` (one forward; Encodings and failures pass through)."""
    to_encode = [r for r in batch if r.exception is None and not isinstance(r.payload, Encoding)]
    outputs = self._forward([r.payload[0] for r in to_encode], request) if to_encode else None
    position = {id(r): i for i, r in enumerate(to_encode)}
    for r in batch:
      if r.exception is not None:
        yield r
        continue
      try:
        if isinstance(r.payload, Encoding):
          crops, payload = self._crop_one(r.payload, request), None
        else:
          model_input, payload = r.payload
          crops = self._crops_from_outputs(outputs, position[id(r)], model_input.image_hw, request)
        yield BatchResult(r.index, r.source, crops, payload=payload, image_hw=r.image_hw)
      except Exception as e:  # pylint: disable=broad-except
        yield _failed(r.index, r.source, e)

  def _forward(
      self, inputs: Sequence[ModelInput], request: crop_request.CropRequest
  ) -> dict[str, Any]:
    """Encoder (+ decoder) on one batch: host arrays with a leading (padded) batch axis.

    Trained decoder: 'pred_boxes' (B, M, 4) xyxy of the padded square and 'quality' (B, M).
    Zero-shot: the encoding's 'pred_boxes' (B, P, 4) cxcywh and 'class_terms'.
    """
    encoded = self._encode_inputs(inputs)
    if self.zero_shot:
      return jax.device_get({k: encoded[k] for k in ('pred_boxes', 'class_terms')})
    n = encoded['image_features'].shape[0]
    extent = np.ones((n, 2), np.float32)
    for i, model_input in enumerate(inputs):
      h, w = model_input.image_hw
      extent[i] = (w / max(h, w), h / max(h, w))
    q, q_mask, roles = request.queries, request.query_mask, request.query_roles
    if q is not None:
      q = jnp.broadcast_to(q, (n,) + q.shape[1:])
      q_mask = jnp.broadcast_to(q_mask, (n,) + q_mask.shape[1:])
      roles = jnp.broadcast_to(roles, (n,) + roles.shape[1:])
    out = self._decode(
        self.variables, encoded, q, q_mask, jax.device_put(extent, self._batch_sharding), roles
    )
    return jax.device_get({k: out[k] for k in _DECODER_OUTPUTS if k in out})

  def _crops_from_outputs(
      self,
      outputs: dict[str, Any],
      i: int,
      image_hw: tuple[int, int],
      request: crop_request.CropRequest,
  ) -> list[Crop]:
    """The crops of row `i` of a batched `_forward`."""
    row = jax.tree.map(lambda v: v[i : i + 1], outputs)
    if self.zero_shot:
      return self._crop_encoding(Encoding(image_hw, row, self._encoder_key), request)
    return self._crops_from_decoder(row, image_hw, request)

  def crop_checked(self, image: Any, request: crop_request.CropRequest) -> list[Crop]:
    """`crop` for one image (array, path, file object, `ModelInput` or `Encoding`) under a request
    that `check_request` already validated and embedded: a service checks each request once,
    when it arrives, and crops it later, e.g. after a batched `encode_batch`."""
    return self._crop_one(image, request)

  def _crop_one(self, image: Any, request: crop_request.CropRequest) -> list[Crop]:
    """Crops for one image (array, path or Encoding) under a validated request."""
    if isinstance(image, Encoding):
      if image.encoder != self._encoder_key:
        raise ValueError(
            'this Encoding was made by another ClipCropper (its image tokens belong '
            'to another OWL-ViT); encode the image with this cropper'
        )
      enc = image
    else:
      enc = self.encode(image)
    return self._crop_encoding(enc, request)

  def _crop_encoding(self, enc: Encoding, request: crop_request.CropRequest) -> list[Crop]:
    """Crops of one encoded image (zero-shot rule or the decoder on its own)."""
    q, q_mask = request.queries, request.query_mask
    h, w = enc.image_hw
    if self.zero_shot:
      boxes_px, scores, uses = self._zero_shot(enc, request)
      return self._finalise(
          boxes_px, scores, (w, h), request.ratio, request.top_k, request.min_size, queries=uses
      )
    side = float(max(h, w))
    extent = jnp.asarray([[w / side, h / side]], jnp.float32)
    out = self._decode(self.variables, enc.encoded, q, q_mask, extent, request.query_roles)
    return self._crops_from_decoder(out, enc.image_hw, request)

  def _crops_from_decoder(
      self, out: dict[str, Any], image_hw: tuple[int, int], request: crop_request.CropRequest
  ) -> list[Crop]:
    """Crops from the decoder's outputs of one image ('pred_boxes' (1, M, 4) xyxy of the
    padded square, 'quality' (1, M), and the selections): pixels, box voting, `_finalise`."""
    h, w = image_hw
    side = float(max(h, w))
    boxes_px = np.asarray(out['pred_boxes'][0], np.float32) * side
    boxes_px = np.clip(boxes_px, 0, [w, h, w, h])
    scores = np.asarray(out['quality'][0], np.float32)
    uses = ()
    if 'selected_boxes' in out:
      uses = _query_uses(
          request.query_texts,
          np.asarray(out['selected_boxes'][0]) * side,
          np.asarray(out['selected_logits'][0]),
          np.asarray(out['selected_mask'][0]),
          np.asarray(out['union_mask'][0]),
          image_hw,
      )
    # Box voting: the fused crop (if any) is ranked first.
    boxes_px, scores = box_lib.with_fused_first_xyxy(boxes_px, scores, request.fuse_top_k)
    return self._finalise(
        boxes_px,
        scores,
        (w, h),
        request.ratio,
        request.top_k,
        request.min_size,
        first_is_best=request.fuse_top_k > 1,
        queries=uses,
    )

  def _zero_shot(self, enc: Encoding, request: crop_request.CropRequest):
    """Zero-shot crops (pixels), scores and `QueryUse`s from OWL-ViT detections alone
    (`zero_shot`): the union of the selections of `selection_union`'s roles is the target, the
    other (context) selections count as objects not to cut through."""
    q, q_mask = request.queries, request.query_mask
    h, w = enc.image_hw
    side = max(h, w)
    to_image = np.array([w, h, w, h], np.float64)
    boxes = np.asarray(box_lib.cxcywh_to_xyxy(enc.encoded['pred_boxes'][0]), np.float64)
    boxes = np.clip(boxes * side, 0, to_image) / to_image  # [0, 1] of the image
    if q is None:
      crops, scores = zero_shot.crops_from_detections(
          boxes, None, None, (w, h), request.ratio, other_objects=ZERO_SHOT_OTHER_OBJECTS
      )
      return crops, scores, ()
    raw_logits = owl_heads.logits_from_image_terms(enc.encoded['class_terms'], q, q_mask)[0]
    in_image = owl_heads.token_in_image(  # not padding
        enc.encoded['pred_boxes'][0], (w / side, h / side)
    )
    best = np.asarray(zero_shot.token_scores(raw_logits, in_image, q_mask[0]))  # (P,)
    logits = np.where(np.asarray(in_image)[:, None], np.asarray(raw_logits), -np.inf)  # (P, Q)
    selected = np.asarray(q_mask[0])
    picks = np.argmax(logits, axis=0)
    in_union = np.asarray(
        model_lib.union_selection_mask(
            jnp.asarray(selected[None]), request.query_roles, self.config.selection_union
        )
    )[0]
    crops, scores = zero_shot.crops_from_detections(
        boxes,
        best,
        picks[in_union],
        (w, h),
        request.ratio,
        other_objects=ZERO_SHOT_OTHER_OBJECTS,
        context=picks[selected & ~in_union],
    )
    picked_logits = logits[picks, np.arange(logits.shape[1])]
    uses = _query_uses(
        request.query_texts,
        boxes[picks] * to_image,
        picked_logits,
        selected,
        in_union,
        (h, w),
        square=False,
    )
    return crops, scores, uses

  def _finalise(
      self,
      boxes_px,
      scores,
      image_wh,
      ratio,
      top_k,
      min_size,
      first_is_best: bool = False,
      queries: tuple[QueryUse, ...] = (),
  ) -> list[Crop]:
    """Aspect-ratio fitting, min size, NMS (by score; `first_is_best`: box 0, the fused crop,
    first), top-k, focal point; every crop carries `queries`."""
    w, h = image_wh
    boxes_px = box_lib.widen_to_min_side_xyxy(
        np.asarray(boxes_px, np.float64), (w, h), MIN_CROP_SIDE
    )
    if ratio is not None:
      boxes_px = np.array([box_lib.fit_aspect_ratio_xyxy(b, ratio, (w, h)) for b in boxes_px])
    sides = np.minimum(boxes_px[:, 2] - boxes_px[:, 0], boxes_px[:, 3] - boxes_px[:, 1])
    # 1e-9: a box widened to exactly 1 px (or fitted to one) may be a rounding step short.
    keep = sides >= max(min_size, MIN_CROP_SIDE) - 1e-9
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
      crops.append(
          Crop(
              b,
              float(scores[i]),
              (b[2] - b[0]) / (b[3] - b[1]),
              ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2),
              queries,
              fused=bool(first_is_best and i == 0),
          )
      )
    return crops


def _query_uses(
    texts: Sequence[tuple[str, str]],
    boxes_px: np.ndarray,
    logits: np.ndarray,
    selected: np.ndarray,
    in_union: np.ndarray,
    image_hw: tuple[int, int],
    square: bool = True,
) -> tuple[QueryUse, ...]:
  """`QueryUse`s of the real queries (rows of `texts`).

  Args:
    texts: (text, role) of each real query, in row order.
    boxes_px: (Q, 4) each query's selected box in pixels (`square`: of the padded square,
      clipped here to the image; else already in original-image pixels).
    logits: (Q,) the selected token's class logit.
    selected, in_union: (Q,) bool.
    image_hw: (H, W) of the original image.
  """
  h, w = image_hw
  uses = []
  for row, (text, role) in enumerate(texts):
    box = None
    if selected[row]:
      b = (
          np.clip(np.asarray(boxes_px[row], np.float64), 0, [w, h, w, h])
          if square
          else (np.asarray(boxes_px[row], np.float64))
      )
      box = tuple(float(v) for v in b)
    score = float(1 / (1 + np.exp(-float(logits[row])))) if selected[row] else 0.0
    uses.append(QueryUse(text, role, box, score, bool(selected[row] and in_union[row])))
  return tuple(uses)


def _check_dtype(dtype: Any) -> Any:
  """'float32' / 'bfloat16' (or the jnp dtypes) -> the jnp dtype; ValueError naming `dtype`."""
  for name, value in DTYPES.items():
    if dtype == name or dtype is value or np.dtype(value) == _np_dtype(dtype):
      return value
  raise ValueError(f'dtype={dtype!r}; expected one of {sorted(DTYPES)}')


def _np_dtype(dtype: Any) -> Optional[np.dtype]:
  try:
    return np.dtype(dtype)
  except TypeError:
    return None


def _pipeline_or_recorded(
    keyword_pipeline: Optional[str], recorded: str = keywords_lib.DEFAULT_PIPELINE
) -> str:
  """The factories' reading of `keyword_pipeline`: None = the recorded pipeline (the default
  when nothing is recorded)."""
  return recorded if keyword_pipeline is None else keyword_pipeline


def _failed(index: int, source: str, error: Exception) -> BatchResult:
  """A failed `BatchResult` whose `error` is one line naming `source`."""
  reason = errors_lib.one_line(error)
  return BatchResult(
      index,
      source,
      None,
      error=reason if source in reason else f'{source}: {reason}',
      exception=error,
  )


def _named_config(config: Union[model_lib.ClipCropConfig, str]) -> model_lib.ClipCropConfig:
  """A ClipCropConfig, 'tiny', or an OWL-ViT config name (paper decoder) -> ClipCropConfig."""
  if isinstance(config, model_lib.ClipCropConfig):
    return config
  if config == 'tiny':
    return model_lib.TINY
  if isinstance(config, str) and config in owl_configs.CONFIGS:
    return model_lib.ClipCropConfig(owlvit=config)
  raise ValueError(
      f'unknown config {config!r} for a random model; expected a ClipCropConfig, '
      f"'tiny' or an OWL-ViT config name ({', '.join(sorted(owl_configs.CONFIGS))})"
  )


def _as_uint8_image(image: Any, max_pixels: Optional[int] = None) -> np.ndarray:
  """A path (loaded, EXIF applied) or an array -> uint8 (H, W, 3); clear errors otherwise."""
  if isinstance(image, (str, pathlib.Path)):
    return pp.load_image(image, max_pixels=max_pixels)
  return pp.to_uint8_rgb(np.asarray(image))


def _config_name(owl_cfg, path) -> str:
  if owl_cfg.name == 'custom':
    raise ValueError(
        f'{path}: OWL-ViT architecture does not match a named config; convert it or '
        'add a config.'
    )
  return owl_cfg.name
