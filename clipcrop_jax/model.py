"""ClipCrop: OWL-ViT query selection + union box + DETR-like crop decoder (paper §3.2, Eq. 1-3).

Data flow for one image (all boxes normalised to the padded square the model sees):
  image -> OWL-ViT image encoder -> image tokens t_img (P, W) and their boxes b (P, 4)
  queries (full text + keywords, or an example image's one-shot embedding) -> e (Q, D)
  per query: the token with the highest class logit -> t_sel (Q, W), b_sel (Q, 4)
  union box b_u = smallest box enclosing b_sel
  decoder(queries = learned (M) + proj(mean(t_sel)), keys/values = all t_img) -> offsets, quality
  crops = clip(sigmoid(logit(b_u in cxcywh) + offsets)), ranked by quality (`apply_offsets`).
Mode 'base' (no condition): no selection, b_u = the whole image, the decoder gets no condition.

Parameters: {'owlvit': Scenic's OWL-ViT tree, 'decoder': CropDecoder's}. An OWL-ViT checkpoint is
placed under 'owlvit' (`clipcrop_jax.owlvit.load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipcrop_jax import boxes as box_lib
from clipcrop_jax.data import features
from clipcrop_jax import decoder as decoder_lib
from clipcrop_jax.owlvit import configs as owl_configs
from clipcrop_jax.owlvit import heads as owl_heads
from clipcrop_jax.owlvit import model as owl_model

MODES = features.QUERY_MODES  # 'full', 'main', 'key', 'base', 'image'
# Which selections form the union box (`ClipCropConfig.selection_union`): the roles they come from.
SELECTION_UNIONS = {
    'all': features.ROLES,  # the paper's Eq. 3: every selection
    'subject': ('caption', 'subject'),  # the whole request and the subject keywords
    'caption': ('caption',),  # the whole request alone
}
OFFSET_SPACES = ('logit_cxcywh', 'additive_xyxy')
_LOGIT_EPS = 1e-4
WHOLE_IMAGE_XYXY = (0.0, 0.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ClipCropConfig:
  """Architecture of a ClipCrop model.

  Attributes:
    owlvit: OWL-ViT config name (`clipcrop_jax.owlvit.get_config`).
    mode: query mode: 'full' (text + keywords), 'main' (text only), 'key' (keywords only),
      'base' (no condition) or 'image' (example-image query).
    decoder_layers: number of decoder blocks (paper: 6).
    decoder_width: decoder width (512).
    decoder_heads: attention heads (8).
    decoder_mlp_dim: decoder MLP width (2048).
    num_queries: learned crop queries M (90, the size of a GAIC candidate set).
    dropout_rate: decoder dropout (training only).
    freeze_encoder: stop gradients into OWL-ViT (the optimizer may also mask it).
    remat_encoder: rematerialise OWL-ViT's transformer blocks (`nn.remat`) so a trainable encoder
      stores no per-block activations for the backward pass (larger batches, ~1/3 more encoder
      compute); the parameter tree is unchanged (Scenic checkpoints load). No effect on a frozen
      encoder's step, whose encoder has no backward pass.
    reference_embedding: give the decoder the union box it predicts offsets from (a sine
      embedding added to every query, see `CropDecoder`); the paper does not say how its decoder
      learns where the union box is. Without it, conditioned modes cannot regress offsets from a
      box they do not see (measured: their loss stalls while 'base' learns).
    offset_space: how the decoder's 4 offsets move the union box: 'logit_cxcywh' (default, as
      Deformable / Conditional DETR and Jia et al.: crop = sigmoid(logit(union cxcywh) + offsets),
      so a move scales with the box: a small union grows in proportion to its size) or
      'additive_xyxy' (crop = union xyxy + offsets, in units of the padded square).
    fuse_top_k: how the top crop is chosen at inference: the mean box of the `fuse_top_k`
      highest-quality predictions (box voting, `boxes.fuse_top_k_xyxy`), ranked before the
      others; 1 = the single highest-quality prediction (the paper). Training ignores it.
    selection_union: which selections make the union box the crops start from (and whose
      tokens' mean conditions the decoder), by the role of their query (`features.ROLES`,
      `keywords.build_query_roles`): 'all' (the paper's Eq. 3: every selection), 'subject'
      (the caption and its subject keywords: "the dog next to the bench" starts from the dog,
      not from dog + bench) or 'caption' (the caption alone). With 'subject' / 'caption' every
      selected token also reaches the decoder's memory tagged with a learned embedding of its
      role (`CropDecoder` `selections`), so the decoder can widen the crop to the context the
      union leaves out. When no selection of the union's roles survives, the union is that of
      every selection.
  """

  owlvit: str = 'clip_b32'
  mode: str = 'full'
  decoder_layers: int = 6
  decoder_width: int = 512
  decoder_heads: int = 8
  decoder_mlp_dim: int = 2048
  num_queries: int = 90
  dropout_rate: float = 0.1
  freeze_encoder: bool = True
  remat_encoder: bool = False
  reference_embedding: bool = True
  offset_space: str = 'logit_cxcywh'
  fuse_top_k: int = 1
  selection_union: str = 'all'

  def __post_init__(self):
    for field in dataclasses.fields(self):  # types first: a wrong type fails here, not in JAX
      _check_field_type(field.name, getattr(self, field.name), field.default)
    for name in (
        'decoder_layers',
        'decoder_width',
        'decoder_heads',
        'decoder_mlp_dim',
        'num_queries',
    ):
      if getattr(self, name) < 1:
        raise ValueError(f'ClipCropConfig.{name}={getattr(self, name)!r}; expected >= 1.')
    if self.decoder_width % self.decoder_heads:
      raise ValueError(
          f'ClipCropConfig.decoder_width={self.decoder_width} is not divisible by '
          f'decoder_heads={self.decoder_heads}.'
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'ClipCropConfig.dropout_rate={self.dropout_rate!r}; expected [0, 1).')
    if self.mode not in MODES:
      raise ValueError(f'ClipCropConfig.mode={self.mode!r}; expected one of {MODES}.')
    if self.offset_space not in OFFSET_SPACES:
      raise ValueError(
          f'ClipCropConfig.offset_space={self.offset_space!r}; expected one of ' f'{OFFSET_SPACES}.'
      )
    if self.fuse_top_k < 1:
      raise ValueError(f'ClipCropConfig.fuse_top_k={self.fuse_top_k!r}; expected an integer >= 1.')
    if self.selection_union not in SELECTION_UNIONS:
      raise ValueError(
          f'ClipCropConfig.selection_union={self.selection_union!r}; expected one of '
          f'{tuple(SELECTION_UNIONS)}.'
      )
    owl_configs.get_config(self.owlvit)  # raises on an unknown name

  @classmethod
  def from_dict(cls, fields: Any, source: str = 'config') -> 'ClipCropConfig':
    """A config from a JSON-like dict; ValueError naming `source` and the bad or unknown field."""
    if not isinstance(fields, dict):
      raise ValueError(
          f'{source}: expected a mapping of ClipCropConfig fields, got ' f'{type(fields).__name__}'
      )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'{source}: unknown ClipCropConfig field(s) {", ".join(unknown)}')
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{source}: {e}') from None

  @property
  def owlvit_config(self) -> owl_configs.OwlViTConfig:
    return owl_configs.get_config(self.owlvit)

  def replace(self, **changes) -> 'ClipCropConfig':
    return dataclasses.replace(self, **changes)


def _check_field_type(name: str, value: Any, default: Any) -> None:
  """TypeError unless `value` has the type of the field's default (int for float is fine)."""
  kind = type(default)
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    raise TypeError(
        f'ClipCropConfig.{name}={value!r} has type {type(value).__name__}; expected '
        f'{kind.__name__}.'
    )


TINY = ClipCropConfig(
    owlvit='tiny',
    decoder_layers=2,
    decoder_width=32,
    decoder_heads=2,
    decoder_mlp_dim=64,
    num_queries=12,
)


def select_query_tokens(
    pred_logits: jax.Array,
    query_mask: Optional[jax.Array] = None,
    token_valid: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """For each query, the image token with the highest class logit (paper Eq. 2).

  Args:
    pred_logits: (B, P, Q) class logits.
    query_mask: (B, Q) bool, True = real query; None = all real.
    token_valid: (B, P) bool, tokens allowed to be selected (e.g. box centre inside the real image,
      not in the padding); None = all.

  Returns:
    (indices (B, Q) int32, mask (B, Q) bool).
  """
  if token_valid is not None:
    pred_logits = jnp.where(token_valid[..., None], pred_logits, -jnp.inf)
  indices = jnp.argmax(pred_logits, axis=1).astype(jnp.int32)
  if query_mask is None:
    query_mask = jnp.ones(indices.shape, bool)
  return indices, query_mask.astype(bool)


def query_mask_for_mode(text_queries: jax.Array, mode: str) -> Optional[jax.Array]:
  """(B, Q) bool: which rows of 'full'-mode queries [full text, keywords...] a mode uses.

  'full': every real row; 'main': the full text (row 0); 'key': the keywords (rows 1..), or the
  full text when there is no keyword (as `keywords.build_queries`); 'base' / 'image': None.

  Args:
    text_queries: int32 (B, Q, L) tokens built in 'full' mode, all-zero rows = padding.
    mode: a ClipCrop mode.
  """
  if mode not in MODES:
    raise ValueError(f'mode {mode!r}; expected one of {MODES}')
  real = text_queries[..., 0] > 0
  if mode in ('base', 'image'):
    return None
  row = jnp.arange(real.shape[-1])[None, :]
  if mode == 'main':
    return real & (row == 0)
  if mode == 'key':
    keywords = real & (row > 0)
    return jnp.where(jnp.any(keywords, axis=-1, keepdims=True), keywords, real & (row == 0))
  return real


def union_selection_mask(
    selected_mask: jax.Array, query_roles: Optional[jax.Array], selection_union: str
) -> jax.Array:
  """(B, Q) bool: the selections the union box is made of (`ClipCropConfig.selection_union`).

  Args:
    selected_mask: (B, Q) bool, the valid selections.
    query_roles: (B, Q) int32 role ids (`features.ROLE_IDS`), or None: every query is the
      caption's (an example image, or a text without roles), so every union takes them all.
    selection_union: a key of `SELECTION_UNIONS`.

  Returns:
    The selections of the union's roles; where an image has none, all of its selections.
  """
  if selection_union not in SELECTION_UNIONS:
    raise ValueError(
        f'selection_union {selection_union!r}; expected one of ' f'{tuple(SELECTION_UNIONS)}'
    )
  if selection_union == 'all' or query_roles is None:
    return selected_mask
  ids = jnp.asarray([features.ROLE_IDS[r] for r in SELECTION_UNIONS[selection_union]])
  inside = selected_mask & jnp.isin(query_roles, ids)
  return jnp.where(jnp.any(inside, axis=-1, keepdims=True), inside, selected_mask)


def gather_tokens(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x (B, P, ...) gathered at indices (B, Q) -> (B, Q, ...)."""
  idx = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def filter_selected_boxes(
    selected_xyxy: jax.Array,
    mask: jax.Array,
    target_xyxy: jax.Array,
    min_inside_fraction: float = 0.5,
) -> jax.Array:
  """Training-time filter of selected boxes (paper §3.3).

  A selected box is kept when at least `min_inside_fraction` of its own area lies inside the target
  crop; this drops boxes far from the target (no overlap) and boxes mostly outside it ("less than
  half its area"). Our reading of the paper's rule.

  Args:
    selected_xyxy: (B, Q, 4) selected boxes.
    mask: (B, Q) bool, currently valid selections.
    target_xyxy: (B, 4) the target (ground-truth) crop.
    min_inside_fraction: threshold on inside-area / own-area.

  Returns:
    The new (B, Q) bool mask.
  """
  lt = jnp.maximum(selected_xyxy[..., :2], target_xyxy[:, None, :2])
  rb = jnp.minimum(selected_xyxy[..., 2:], target_xyxy[:, None, 2:])
  inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
  area = box_lib.area_xyxy(selected_xyxy)
  return mask & (inter >= min_inside_fraction * area) & (area > 0)


def apply_offsets(reference_xyxy: jax.Array, offsets: jax.Array, offset_space: str) -> jax.Array:
  """Crops from a reference box and decoder offsets (see `ClipCropConfig.offset_space`).

  Args:
    reference_xyxy: (..., 4) xyxy in [0, 1] (broadcast against `offsets`).
    offsets: (..., 4) decoder offsets; zeros give back the reference box.
    offset_space: 'logit_cxcywh' or 'additive_xyxy'.

  Returns:
    (..., 4) xyxy crops (not yet ordered / clipped).
  """
  if offset_space == 'additive_xyxy':
    return reference_xyxy + offsets
  ref = jnp.clip(box_lib.xyxy_to_cxcywh(reference_xyxy), _LOGIT_EPS, 1 - _LOGIT_EPS)
  logits = jnp.log(ref) - jnp.log1p(-ref)
  return box_lib.cxcywh_to_xyxy(jax.nn.sigmoid(logits + offsets))


def _extent_or_square(image_extent: Optional[jax.Array], batch: int) -> jax.Array:
  if image_extent is None:
    return jnp.ones((batch, 2), jnp.float32)
  return jnp.asarray(image_extent, jnp.float32)


def select_and_union(
    encoded: dict[str, jax.Array],
    query_embeddings: jax.Array,
    query_mask: Optional[jax.Array] = None,
    target_xyxy: Optional[jax.Array] = None,
    image_extent: Optional[jax.Array] = None,
    query_roles: Optional[jax.Array] = None,
    selection_union: str = 'all',
) -> dict[str, jax.Array]:
  """Query selection (paper Eq. 2) and union box (Eq. 3) on an encoded image; no parameters.

  Args:
    encoded: `ClipCrop.encode_image` / `TextZeroShotDetectionModule.encode_image` output.
    query_embeddings: (B, Q, D) query embeddings.
    query_mask: (B, Q) bool, True = real query; None = all real.
    target_xyxy: (B, 4) training target for `filter_selected_boxes`, or None.
    image_extent: (B, 2) real image extent in the padded square; None = the whole square. Tokens
      whose box centre lies in the padding are never selected.
    query_roles: (B, Q) int32 role ids, or None (see `union_selection_mask`).
    selection_union: which selections the union is made of (`ClipCropConfig.selection_union`);
      'all' is Eq. 3.

  Returns:
    dict with 'selected_tokens' (B, Q) int32, 'selected_boxes' (B, Q, 4) xyxy, 'selected_mask'
    (B, Q) bool, 'selected_logits' (B, Q) (the selected token's class logit, -inf for padded
    queries), 'union_mask' (B, Q) bool (the selections in the union) and 'union_box' (B, 4) xyxy
    clipped to the image (the whole image when nothing is selected).
  """
  extent = _extent_or_square(image_extent, query_embeddings.shape[0])
  logits = owl_heads.logits_from_image_terms(encoded['class_terms'], query_embeddings, query_mask)
  token_valid = owl_heads.token_in_image(encoded['pred_boxes'], extent)
  indices, mask = select_query_tokens(logits, query_mask, token_valid)
  selected = box_lib.cxcywh_to_xyxy(gather_tokens(encoded['pred_boxes'], indices))
  if target_xyxy is not None:
    mask = filter_selected_boxes(selected, mask, target_xyxy)
  in_union = union_selection_mask(mask, query_roles, selection_union)
  union = jax.vmap(box_lib.union_box_xyxy)(selected, in_union)  # nothing selected: whole square
  union = jnp.clip(union, 0.0, jnp.concatenate([extent, extent], axis=-1))
  picked = jnp.take_along_axis(logits, indices[:, None, :], axis=1)[:, 0]
  return dict(
      selected_tokens=indices,
      selected_boxes=selected,
      selected_mask=mask,
      selected_logits=jnp.where(mask, picked, -jnp.inf),
      union_mask=in_union,
      union_box=union,
  )


class ClipCrop(nn.Module):
  """The ClipCrop model.

  Attributes:
    config: `ClipCropConfig`.
    dtype: compute dtype (parameters stay float32).
  """

  config: ClipCropConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.owlvit = owl_model.TextZeroShotDetectionModule(
        cfg.owlvit_config, self.dtype, cfg.remat_encoder
    )
    self.decoder = decoder_lib.CropDecoder(
        num_layers=cfg.decoder_layers,
        width=cfg.decoder_width,
        num_heads=cfg.decoder_heads,
        mlp_dim=cfg.decoder_mlp_dim,
        num_queries=cfg.num_queries,
        dropout_rate=cfg.dropout_rate,
        dtype=self.dtype,
    )

  # ------------------------------------------------------------------ encoder side

  def encode_image(self, images: jax.Array) -> dict[str, jax.Array]:
    """images (B, S, S, 3) in [0, 1] -> OWL-ViT's query-independent outputs (see
    `TextZeroShotDetectionModule.encode_image`). Reusable across any number of queries."""
    encoded = self.owlvit.encode_image(images)
    if self.config.freeze_encoder:
      encoded = jax.lax.stop_gradient(encoded)
    return encoded

  def embed_text(self, text_queries: jax.Array) -> jax.Array:
    """int32 (B, Q, L) -> (B, Q, D) unnormalised query embeddings."""
    embeddings = self.owlvit.text_embedder(text_queries)
    if self.config.freeze_encoder:
      embeddings = jax.lax.stop_gradient(embeddings)
    return embeddings

  # ------------------------------------------------------------------ decoder side

  def crop_from_encoding(
      self,
      encoded: dict[str, jax.Array],
      query_embeddings: Optional[jax.Array] = None,
      query_mask: Optional[jax.Array] = None,
      target_xyxy: Optional[jax.Array] = None,
      image_extent: Optional[jax.Array] = None,
      train: bool = False,
      query_roles: Optional[jax.Array] = None,
  ) -> dict[str, jax.Array]:
    """Query selection, union box and decoder on an encoded image.

    Args:
      encoded: output of `encode_image`.
      query_embeddings: (B, Q, D) or None for 'base' mode (no condition).
      query_mask: (B, Q) bool, True = real query.
      target_xyxy: (B, 4) ground-truth crop; when given (training), selected boxes are filtered
        with `filter_selected_boxes`.
      image_extent: (B, 2) the real image's (width, height) in [0, 1] of the padded square
        (W / max(H, W), H / max(H, W)); tokens whose box centre lies in the padding are not
        selected, and crops are clipped to the image. None = the whole square.
      train: enables dropout (needs the 'dropout' rng).
      query_roles: (B, Q) int32 role ids of the queries (`features.ROLE_IDS`), for
        `ClipCropConfig.selection_union`; None = every query is the caption's.

    Returns:
      dict with 'pred_boxes' (B, M, 4) xyxy in [0, 1] of the padded square, 'quality' (B, M),
      'quality_logits' (B, M), per-layer 'aux_boxes' (L, B, M, 4) and 'aux_quality_logits'
      (L, B, M), 'union_box' (B, 4) xyxy, and (with queries) 'selected_tokens' (B, Q),
      'selected_boxes' (B, Q, 4) xyxy, 'selected_mask' (B, Q), 'selected_logits' (B, Q) and
      'union_mask' (B, Q) (see `select_and_union`).
    """
    features = encoded['image_features']  # (B, P, W)
    grid_hw = encoded['feature_map'].shape[1:3]
    extent = _extent_or_square(image_extent, features.shape[0])
    selections = None
    if query_embeddings is None:
      union = jnp.concatenate([jnp.zeros_like(extent), extent], axis=-1)
      condition, out = None, {}
    else:
      union_kind = self.config.selection_union
      out = select_and_union(
          encoded, query_embeddings, query_mask, target_xyxy, extent, query_roles, union_kind
      )
      union = out.pop('union_box')
      weights = out['union_mask'].astype(features.dtype)[..., None]
      t_sel = gather_tokens(features, out['selected_tokens'])  # (B, Q, W)
      condition = jnp.sum(t_sel * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
      if union_kind != 'all':
        roles = (
            jnp.zeros(out['selected_tokens'].shape, jnp.int32)
            if query_roles is None
            else jnp.asarray(query_roles, jnp.int32)
        )
        selections = (out['selected_tokens'], roles, out['selected_mask'])

    dec = self.decoder(
        features,
        grid_hw,
        condition,
        train=train,
        reference_xyxy=union if self.config.reference_embedding else None,
        selections=selections,
    )
    hi = jnp.concatenate([extent, extent], axis=-1)[None, :, None, :]  # (1, B, 1, 4)
    boxes = jnp.clip(
        box_lib.clip_boxes_xyxy(
            apply_offsets(union[None, :, None, :], dec['offsets'], self.config.offset_space)
        ),
        0.0,
        hi,
    )
    out.update(
        pred_boxes=boxes[-1],
        quality=dec['quality'][-1],
        quality_logits=dec['quality_logits'][-1],
        aux_boxes=boxes,
        aux_quality_logits=dec['quality_logits'],
        union_box=union,
    )
    return out

  def __call__(
      self,
      images: jax.Array,
      text_queries: Optional[jax.Array] = None,
      query_embeddings: Optional[jax.Array] = None,
      target_xyxy: Optional[jax.Array] = None,
      image_extent: Optional[jax.Array] = None,
      train: bool = False,
      query_mask: Optional[jax.Array] = None,
      query_roles: Optional[jax.Array] = None,
  ) -> dict[str, jax.Array]:
    """Full model.

    Args:
      images: float32 (B, S, S, 3) in [0, 1], padded and resized (OWL-ViT preprocessing).
      text_queries: int32 (B, Q, L) token ids ([full text, keywords...]); 0 rows = padding.
      query_embeddings: (B, Q, D) precomputed queries (image mode); overrides text_queries.
      target_xyxy: (B, 4) training-time target crop for the selection filter.
      image_extent: (B, 2) real image extent in the padded square (see `crop_from_encoding`).
      train: enables dropout.
      query_mask: (B, Q) bool, the queries to use (e.g. `query_mask_for_mode`); default: the
        non-padding rows of `text_queries` (all rows of `query_embeddings`).
      query_roles: (B, Q) int32 role ids of the queries (`keywords.build_query_roles`,
        `features.ROLE_IDS`); None = every query is the caption's.

    Returns:
      See `crop_from_encoding`.
    """
    encoded = self.encode_image(images)
    if self.config.mode == 'base':
      query_embeddings = query_mask = None
    elif query_embeddings is None and text_queries is not None:
      query_embeddings = self.embed_text(text_queries)
      real = text_queries[..., 0] > 0
      query_mask = real if query_mask is None else real & query_mask
    if self.is_initializing() and query_embeddings is None:
      # Create the text tower's parameters too, so one init serves every mode.
      self.embed_text(jnp.zeros((images.shape[0], 1, features.MAX_QUERY_LENGTH), jnp.int32))
    return self.crop_from_encoding(
        encoded, query_embeddings, query_mask, target_xyxy, image_extent, train, query_roles
    )

  def init_decoder(self, image_features: jax.Array, grid_hw: tuple[int, int]) -> None:
    """Creates the decoder's parameters only (no OWL-ViT); for `init(..., method=...)`.

    Called under `init` with the rng `ClipCrop.__call__` would get, it creates exactly the
    decoder parameters a full init creates (Flax derives a submodule's rng from its name), so
    `init_decoder_params` equals the 'decoder' part of a full init, without the encoder's cost.

    Args:
      image_features: (B, P, W) (zeros; only the shape matters).
      grid_hw: the feature map's (rows, columns), rows * columns = P.
    """
    extent = _extent_or_square(None, image_features.shape[0])
    union = jnp.concatenate([jnp.zeros_like(extent), extent], axis=-1)
    condition = selections = None
    if self.config.mode != 'base':
      condition = image_features[:, 0]
      if self.config.selection_union != 'all':
        zeros = jnp.zeros((image_features.shape[0], 1), jnp.int32)
        selections = (zeros, zeros, jnp.ones(zeros.shape, bool))
    self.decoder(
        image_features,
        grid_hw,
        condition,
        train=False,
        reference_xyxy=union if self.config.reference_embedding else None,
        selections=selections,
    )


def dummy_inputs(config: ClipCropConfig) -> tuple[jax.Array, jax.Array]:
  """(images, text_queries) that create every parameter of a ClipCrop model under `init`."""
  return owl_model.dummy_inputs(config.owlvit_config)


def init_params(model: ClipCrop, rng: jax.Array) -> Any:
  """A full random init of `model`: {'owlvit': ..., 'decoder': ...} (the 'params' collection)."""
  return model.init(rng, *dummy_inputs(model.config))['params']


def init_decoder_params(model: ClipCrop, rng: jax.Array) -> Any:
  """The 'decoder' parameters `init_params(model, rng)` would create, without initialising (or
  even tracing) OWL-ViT's encoders: what training from pretrained OWL-ViT weights needs."""
  owl = model.config.owlvit_config
  grid = owl.image_size // owl.patch_size
  features = jnp.zeros((1, grid * grid, owl.vision_width), jnp.float32)
  return model.init(rng, features, (grid, grid), method=ClipCrop.init_decoder)['params']['decoder']


def init_variables(config: Union[ClipCropConfig, str], seed: int = 0) -> dict[str, Any]:
  """Random variables for a ClipCrop config (jit-compiled init, condition path included; the
  compiled init is kept per config, so further seeds do not compile again)."""
  return {'params': _jitted_init(TINY if config == 'tiny' else config)(jax.random.PRNGKey(seed))}


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ClipCropConfig):
  """rng -> `init_params` of a ClipCrop model on `config`, jit-compiled (one per config)."""
  model = ClipCrop(config)
  return jax.jit(lambda rng: init_params(model, rng))


def check_param_shapes(expected: Any, got: Any, source: str) -> None:
  """Raises ValueError naming the first leaf of `expected` that `got` lacks or has another shape.

  Args:
    expected: a tree of arrays or ShapeDtypeStructs (e.g. `jax.eval_shape` of an init).
    got: the tree to check (extra leaves are allowed).
    source: what is being checked, for the message (a file name, 'OWL-ViT weights ...').
  """
  got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if path not in got_flat:
      raise ValueError(f'{source}: parameter {name} missing, expected shape {tuple(leaf.shape)}')
    if tuple(jnp.shape(got_flat[path])) != tuple(leaf.shape):
      raise ValueError(
          f'{source}: parameter {name} has shape {tuple(jnp.shape(got_flat[path]))},'
          f' expected {tuple(leaf.shape)}'
      )


def init_from_owlvit(
    config: ClipCropConfig, owlvit_variables: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
  """ClipCrop variables with OWL-ViT weights from a checkpoint and a freshly initialised decoder.

  The decoder is initialised alone (`init_decoder_params`); its values equal those of
  `init_variables(config, seed)`.

  Args:
    config: the ClipCrop config; its `owlvit` architecture must match the weights.
    owlvit_variables: {'params': Scenic OWL-ViT tree} (from `clipcrop_jax.owlvit.load_checkpoint`).
    seed: decoder initialisation seed.

  Raises:
    ValueError naming the first parameter whose shape differs.
  """
  owl = owlvit_variables.get('params', owlvit_variables)
  check_param_shapes(
      owl_model.param_shapes(config.owlvit_config)['params'],
      owl,
      f'OWL-ViT weights for config {config.owlvit!r}',
  )
  model = ClipCrop(config)
  decoder = jax.jit(lambda r: init_decoder_params(model, r))(jax.random.PRNGKey(seed))
  return {'params': {'owlvit': owl, 'decoder': decoder}}
