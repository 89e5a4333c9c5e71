"""OWL-ViT detection heads with Scenic's names (`scenic/projects/owl_vit/layers.py`, `utils.py`).

* `ClassPredictor` (`class_head`): Dense_0 to the query space D, cosine similarity with the queries,
  a learned per-token shift and scale (`logit_shift`, `logit_scale`), padding queries set to -1e6.
* `PredictorMLP` (`obj_box_head`, `objectness_head`): 3 Dense layers with tanh-approximate GELU.
* `compute_box_bias`: Scenic's 'both' box bias (grid corners + patch size, in logit space).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NORM_EPS = 1e-6
PADDING_QUERY_LOGIT = -1e6
BOX_BIAS_EPS = 1e-4


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / (‖x‖₂ + 1e-6) over the last axis (epsilon on the norm, as Scenic)."""
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + NORM_EPS)


def token_in_image(pred_boxes_cxcywh: Any, image_extent: Any) -> jax.Array:
  """(..., P) bool: the token's box centre lies in the real image, not in the padding.

  Images are padded at the bottom / right to a square; a token whose predicted box centre
  (cx, cy) is beyond the real image's extent (w, h) sees only padding and is never selected.

  Args:
    pred_boxes_cxcywh: (..., P, 4) token boxes, cxcywh in [0, 1] of the padded square.
    image_extent: (..., 2) the real image's (width, height) in [0, 1] of the padded square,
      (W / max(H, W), H / max(H, W)); NumPy or jnp.
  """
  centres = jnp.asarray(pred_boxes_cxcywh)[..., :2]
  extent = jnp.asarray(image_extent, centres.dtype)[..., None, :]
  return jnp.all(centres <= extent, axis=-1)


def logits_from_image_terms(
    terms: dict[str, jax.Array], query_embeddings: jax.Array, query_mask: Optional[jax.Array] = None
) -> jax.Array:
  """Class logits from precomputed image-side terms (see `ClassPredictor.image_terms`).

  Args:
    terms: {'class_embeddings' (B, P, D) L2-normalised, 'logit_shift' (B, P, 1),
      'logit_scale' (B, P, 1) already ELU+1}; other keys are ignored.
    query_embeddings: (B, Q, D), unnormalised.
    query_mask: (B, Q), zero = padding query -> logit -1e6.

  Returns:
    (B, P, Q) logits = (cos(e, q) + shift) * scale.
  """
  e = terms['class_embeddings']
  q = _l2_normalize(query_embeddings).astype(e.dtype)
  logits = (jnp.einsum('bpd,bqd->bpq', e, q) + terms['logit_shift']) * terms['logit_scale']
  if query_mask is not None:
    logits = jnp.where(query_mask[:, None, :] == 0, PADDING_QUERY_LOGIT, logits)
  return logits


class ClassPredictor(nn.Module):
  """Open-vocabulary class head (normalize=True, as in every released OWL-ViT).

  Parameters: `Dense_0` (W -> D), `logit_shift` (W -> 1), `logit_scale` (W -> 1).

  Attributes:
    out_dim: D, the query embedding size.
    dtype: compute dtype.
  """

  out_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.Dense_0 = nn.Dense(self.out_dim, dtype=self.dtype)  # pylint: disable=invalid-name
    self.logit_shift = nn.Dense(1, dtype=self.dtype)
    self.logit_scale = nn.Dense(1, dtype=self.dtype)

  def image_terms(self, x: jax.Array) -> dict[str, jax.Array]:
    """The query-independent part for image features x (B, P, W), reusable across queries.

    Returns {'class_embeddings' (B, P, D) L2-normalised, 'raw_class_embeddings' (B, P, D) the
    Dense_0 outputs (what Scenic returns without queries; used by the one-shot rule),
    'logit_shift' (B, P, 1), 'logit_scale' (B, P, 1) = ELU(.) + 1}.
    """
    raw = self.Dense_0(x)
    return {
        'class_embeddings': _l2_normalize(raw),
        'raw_class_embeddings': raw,
        'logit_shift': self.logit_shift(x),
        'logit_scale': jax.nn.elu(self.logit_scale(x)) + 1,
    }

  def __call__(
      self,
      x: jax.Array,
      query_embeddings: Optional[jax.Array] = None,
      query_mask: Optional[jax.Array] = None,
  ) -> dict[str, jax.Array]:
    """Scores image tokens against queries.

    Args:
      x: image features (B, P, W).
      query_embeddings: (B, Q, D) or None.
      query_mask: (B, Q), nonzero = real query; zero entries get logit -1e6.

    Returns:
      {'class_embeddings': (B, P, D)} — unnormalised when no queries are given (Scenic), L2-normalised
      (norm + 1e-6) otherwise — plus 'pred_logits' (B, P, Q) when queries are given.
    """
    if query_embeddings is None:
      if self.is_initializing():  # create every parameter, as Scenic's init does
        self.image_terms(x)
      return {'class_embeddings': self.Dense_0(x)}
    terms = self.image_terms(x)
    return {
        'pred_logits': logits_from_image_terms(terms, query_embeddings, query_mask),
        'class_embeddings': terms['class_embeddings'],
    }


class PredictorMLP(nn.Module):
  """Dense(W) -> gelu -> Dense(W) -> gelu -> Dense(out_dim); gelu is tanh-approximate (Flax default).

  Attributes:
    out_dim: output size (4 for boxes, 1 for objectness).
    num_layers: number of Dense layers (3).
    hidden_dim: hidden width; None = input width (Scenic).
    dtype: compute dtype.
  """

  out_dim: int
  num_layers: int = 3
  hidden_dim: Optional[int] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.hidden_dim or x.shape[-1]
    for i in range(self.num_layers - 1):
      x = nn.gelu(nn.Dense(hidden, dtype=self.dtype, name=f'Dense_{i}')(x), approximate=True)
    return nn.Dense(
        self.out_dim,
        kernel_init=nn.initializers.zeros,
        dtype=self.dtype,
        name=f'Dense_{self.num_layers - 1}',
    )(x)


def compute_box_bias(grid_h: int, grid_w: int) -> jax.Array:
  """Scenic's 'both' box bias for an h×w feature map, (h·w, 4) float32 in logit space.

  Token (r, c) (row-major) gets centre bias logit((c+1)/w), logit((r+1)/h) — the grid *corners*, as
  Scenic — and size bias logit(1/w) for both width and height (Scenic uses the grid width for both).
  logit(z) = log(z + 1e-4) - log1p(-z + 1e-4).
  """
  xs = jnp.arange(1, grid_w + 1, dtype=jnp.float32) / grid_w
  ys = jnp.arange(1, grid_h + 1, dtype=jnp.float32) / grid_h
  xx, yy = jnp.meshgrid(xs, ys)  # (h, w) each; row-major flattening below
  coords = jnp.clip(jnp.stack([xx, yy], axis=-1).reshape(-1, 2), 0.0, 1.0)
  logit = lambda z: jnp.log(z + BOX_BIAS_EPS) - jnp.log1p(-z + BOX_BIAS_EPS)
  xy_bias = logit(coords)
  wh_bias = logit(jnp.full_like(xy_bias, 1.0 / grid_w))
  return jnp.concatenate([xy_bias, wh_bias], axis=-1)
