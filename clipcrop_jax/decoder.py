"""DETR-like transformer decoder that turns OWL-ViT image tokens into crop offsets and qualities.

ClipCrop (Zhong et al. 2023, Eq. 1-3 and appendix B): M learned queries, each shifted by the
projected condition (the mean of the selected OWL-ViT tokens, or a query-image embedding), attend to
all image tokens through a DETR decoder; shared heads predict, per query, four offsets to the union
box of the selected tokens and a crop-quality score. In "base" mode there is no condition.

Structure follows DETR (`models/transformer.py`) and Scenic's `baselines/detr/model.py`:
  * content target starts at zeros (+ projected condition); the learned `query_embed` is the query
    positional embedding, added to q and k of self-attention and to q of cross-attention;
  * image tokens are projected (`input_proj`) and get a fixed 2-D sine position embedding, added to
    the keys (not the values) of cross-attention;
  * post-norm layers by default (`pre_norm=False`, DETR's default), pre-norm optionally;
  * one shared final LayerNorm (`decoder_norm`) and shared heads on every layer's output, so
    auxiliary losses come for free (DETR's `return_intermediate=True`).

Parameter tree of `CropDecoder` (W = width, C = image-token width, C' = condition width):
  input_proj/{kernel (C, W), bias}, query_embed (M, W), condition_proj/{kernel (C', W), bias}
  (only when a condition was given at init), layers_{i}/{self_attention, cross_attention}/
  {query, key, value, out}, layers_{i}/mlp/{fc1, fc2}, layers_{i}/{norm_1, norm_2, norm_3},
  decoder_norm, offset_head/{dense_0, dense_1, dense_2}, quality_head/{kernel (W, 1), bias},
  and role_embed (R, W) only when selection tokens were given at init (subject-aware union).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def sine_position_embedding_2d(
    h: int, w: int, dim: int, temperature: float = 10000.0, scale: float = 2 * np.pi
) -> np.ndarray:
  """DETR's normalised 2-D sine position embedding for an h x w grid, row-major: (h * w, dim).

  For grid cell (i, j) (row i, column j), y = (i + 1) / (h + 1e-6) * scale and
  x = (j + 1) / (w + 1e-6) * scale (DETR's cumsum normalisation without padding). With
  n = dim / 2 features per axis and d_k = temperature ** (2 * (k // 2) / n), the embedding is
  [y-part, x-part], each part interleaved [sin(v / d_0), cos(v / d_1), sin(v / d_2), ...].

  Args:
    h: grid height (rows).
    w: grid width (columns).
    dim: embedding width; must be divisible by 4.
    temperature: frequency base.
    scale: the normalised coordinate range (DETR: 2 pi).

  Returns:
    float32 NumPy array (h * w, dim); row r * w + c belongs to grid cell (r, c).
  """
  if dim % 4:
    raise ValueError(f'Sine position embedding width must be divisible by 4, got {dim}.')
  eps = 1e-6
  num_feats = dim // 2
  y = (np.arange(1, h + 1, dtype=np.float64) / (h + eps) * scale)[:, None]  # (h, 1)
  x = (np.arange(1, w + 1, dtype=np.float64) / (w + eps) * scale)[:, None]  # (w, 1)
  dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)  # (n,)

  def encode(v: np.ndarray) -> np.ndarray:  # (L, 1) -> (L, n), sin/cos interleaved
    v = v / dim_t
    return np.stack([np.sin(v[:, 0::2]), np.cos(v[:, 1::2])], axis=-1).reshape(v.shape[0], -1)

  pos_y = np.broadcast_to(encode(y)[:, None, :], (h, w, num_feats))
  pos_x = np.broadcast_to(encode(x)[None, :, :], (h, w, num_feats))
  return np.concatenate([pos_y, pos_x], axis=-1).reshape(h * w, dim).astype(np.float32)


def sine_box_embedding(boxes_xyxy: jax.Array, dim: int, temperature: float = 10000.0) -> jax.Array:
  """Sine embedding of boxes (as DETR's positions): (..., 4) xyxy in [0, 1] -> (..., dim).

  The box is described by (cx, cy, w, h); each of the four values v is embedded like one axis of
  `sine_position_embedding_2d` with n = dim / 4 features: v * 2 pi / d_k, d_k = temperature **
  (2 * (k // 2) / n), sin / cos interleaved; the four parts are concatenated (cx, cy, w, h).
  """
  if dim % 8:
    raise ValueError(f'Sine box embedding width must be divisible by 8, got {dim}.')
  x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(boxes_xyxy, jnp.float32), -1, 0)
  values = jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)  # (..., 4)
  n = dim // 4
  dim_t = jnp.asarray(temperature ** (2 * (np.arange(n) // 2) / n), jnp.float32)
  v = values[..., None] * (2 * np.pi) / dim_t  # (..., 4, n)
  emb = jnp.stack([jnp.sin(v[..., 0::2]), jnp.cos(v[..., 1::2])], axis=-1)  # (..., 4, n/2, 2)
  return emb.reshape(values.shape[:-1] + (dim,))


def _attention(
    num_heads: int, dropout_rate: float, dtype: Dtype, name: str
) -> nn.MultiHeadDotProductAttention:
  """DETR attention: xavier-uniform q/k/v/out kernels, zero biases, per-element weight dropout."""
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads,
      dtype=dtype,
      dropout_rate=dropout_rate,
      broadcast_dropout=False,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros,
      force_fp32_for_softmax=True,
      name=name,
  )


class MlpBlock(nn.Module):
  """Feed-forward block: fc1 (W -> mlp_dim), relu, dropout, fc2 (mlp_dim -> W).

  Attributes:
    mlp_dim: hidden width.
    dropout_rate: dropout after the activation.
    dtype: compute dtype.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """x: (..., W) -> (..., W)."""
    width = x.shape[-1]
    dense = lambda features, name: nn.Dense(  # pylint: disable=g-long-lambda
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=name
    )
    y = nn.relu(dense(self.mlp_dim, 'fc1')(x))
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return dense(width, 'fc2')(y)


class DecoderBlock(nn.Module):
  """One DETR decoder layer: self-attention, cross-attention to the image, MLP.

  Post-norm (DETR default) computes, with q_pos the query and m_pos the memory position embedding,
    t = norm_1(t + drop(self_attn(q = k = t + q_pos, v = t)))
    t = norm_2(t + drop(cross_attn(q = t + q_pos, k = mem + m_pos, v = mem)))
    t = norm_3(t + drop(mlp(t)))
  and pre-norm moves each norm onto the residual branch's input (t + sublayer(norm(t))).

  Attributes:
    num_heads: attention heads (width must be divisible by it).
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout on each residual branch and inside the MLP.
    attention_dropout_rate: dropout on the attention weights.
    pre_norm: LayerNorm before (True) or after (False) each sublayer.
    dtype: compute dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  pre_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      target: jax.Array,
      memory: jax.Array,
      *,
      query_pos: jax.Array,
      memory_pos: jax.Array,
      deterministic: bool,
      memory_mask: Optional[jax.Array] = None,
  ) -> jax.Array:
    """Applies the layer.

    Args:
      target: (B, M, W) query content.
      memory: (B, P, W) projected image tokens (and selection tokens, see `CropDecoder`).
      query_pos: (B or 1, M, W) query positional embedding.
      memory_pos: (B or 1, P, W) image-token positional embedding.
      deterministic: disables dropout.
      memory_mask: (B, P) bool, memory rows the queries may attend to; None = all.

    Returns:
      (B, M, W) updated query content.
    """
    drop = lambda x: nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    attention = lambda name: _attention(  # pylint: disable=g-long-lambda
        self.num_heads, self.attention_dropout_rate, self.dtype, name
    )
    self_attn, cross_attn = attention('self_attention'), attention('cross_attention')
    mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name='mlp')

    def self_attention(t: jax.Array) -> jax.Array:
      q = t + query_pos
      return self_attn(q, q, t, deterministic=deterministic)

    mask = None if memory_mask is None else memory_mask[:, None, None, :]  # (B, 1, 1, P)

    def cross_attention(t: jax.Array) -> jax.Array:
      return cross_attn(
          t + query_pos, memory + memory_pos, memory, mask=mask, deterministic=deterministic
      )

    sublayers = [
        ('norm_1', self_attention),
        ('norm_2', cross_attention),
        ('norm_3', lambda t: mlp(t, deterministic=deterministic)),
    ]
    for norm_name, sublayer in sublayers:
      if self.pre_norm:
        target = target + drop(sublayer(norm(norm_name)(target)))
      else:
        target = norm(norm_name)(target + drop(sublayer(target)))
    return target


class OffsetHead(nn.Module):
  """DETR box MLP: dense_0 (W -> W), relu, dense_1 (W -> W), relu, dense_2 (W -> 4).

  dense_2 is zero-initialised (kernel and bias), so a fresh model predicts offsets of exactly 0,
  i.e. every crop starts at the union box.

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., W) -> (..., 4)."""
    width = x.shape[-1]
    x = nn.relu(nn.Dense(width, dtype=self.dtype, name='dense_0')(x))
    x = nn.relu(nn.Dense(width, dtype=self.dtype, name='dense_1')(x))
    return nn.Dense(
        4,
        dtype=self.dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        name='dense_2',
    )(x)


class CropDecoder(nn.Module):
  """ClipCrop's decoder: M queries -> per-layer crop offsets and quality scores.

  Condition handling: `condition_proj` (Dense C' -> W) is applied only when a condition is given,
  and its output is added to the content of every query (the paper's t_qry + mean(t_sel), with the
  learned part acting as DETR's query positional embedding). Flax creates `condition_proj` lazily,
  so initialise with a condition (a dummy zeros array of the right width is enough) whenever the
  model will ever see one; such a model also runs with condition=None ("base" mode; the unused
  parameters are ignored). A model initialised without a condition has no `condition_proj` and
  fails with a missing-parameter error if given one.

  Offsets: additive deltas (dx0, dy0, dx1, dy1) in normalised units of the padded square, to be
  added by the caller to the union box in xyxy (then clipped, see `boxes.clip_boxes_xyxy`).

  Attributes:
    num_layers: decoder layers L.
    width: model width W.
    num_heads: attention heads.
    mlp_dim: hidden width of each layer's MLP.
    num_queries: number of queries / candidate crops M.
    dropout_rate: dropout on residual branches, inside MLPs and on the attention weights (as in
      DETR, whose PyTorch attention uses the same rate); inactive when train=False.
    pre_norm: pre-norm layers instead of DETR's default post-norm.
    num_roles: rows of `role_embed` (query roles, `features.ROLES`), used with `selections`.
    dtype: compute dtype (parameters stay float32; outputs are float32).
  """

  num_layers: int = 6
  width: int = 512
  num_heads: int = 8
  mlp_dim: int = 2048
  num_queries: int = 90
  dropout_rate: float = 0.1
  pre_norm: bool = False
  num_roles: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      image_tokens: jax.Array,
      grid_hw: tuple[int, int],
      condition: Optional[jax.Array] = None,
      train: bool = False,
      reference_xyxy: Optional[jax.Array] = None,
      selections: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
  ) -> dict[str, jax.Array]:
    """Decodes crops.

    Args:
      image_tokens: (B, P, C) OWL-ViT image features, P = h * w in row-major grid order.
      grid_hw: static (h, w) of the token grid.
      condition: (B, C') condition embedding (mean of selected tokens, or query-image embedding),
        or None for "base" mode.
      train: enables dropout (then `rngs={'dropout': key}` is required).
      reference_xyxy: (B, 4) the box the offsets are added to (ClipCrop's union box), or None.
        When given, `reference_proj(sine_box_embedding(reference))` is added to every query's
        content, so the decoder knows where its reference is (as Conditional DETR's reference
        points); created lazily like `condition_proj`.
      selections: (indices (B, Q) int32 into the P image tokens, roles (B, Q) int32 in
        [0, num_roles), mask (B, Q) bool) of the tokens the queries selected, or None. When
        given, each selected token is appended to the cross-attention memory a second time,
        tagged with a learned embedding of its query's role (`role_embed` (num_roles, W),
        created lazily like `condition_proj`) at its grid position; masked ones are not
        attended to. ClipCrop's subject-aware union uses it so that the decoder sees the
        context objects the union box leaves out.

    Returns:
      Dict of float32 arrays for every layer (the last layer is index -1):
        'offsets': (L, B, M, 4) additive xyxy deltas (dx0, dy0, dx1, dy1), normalised units.
        'quality_logits': (L, B, M) crop-quality logits.
        'quality': (L, B, M) sigmoid(quality_logits), in (0, 1).
    """
    if image_tokens.ndim != 3:
      raise ValueError(f'image_tokens must be (B, P, C), got shape {image_tokens.shape}.')
    h, w = grid_hw
    batch, num_tokens, _ = image_tokens.shape
    if h * w != num_tokens:
      raise ValueError(f'grid_hw {grid_hw} does not match {num_tokens} image tokens.')
    deterministic = not train

    memory = nn.Dense(self.width, dtype=self.dtype, name='input_proj')(image_tokens)  # (B, P, W)
    memory_pos = jnp.asarray(sine_position_embedding_2d(h, w, self.width), self.dtype)[None]
    query_pos = self.param(
        'query_embed',
        nn.initializers.normal(stddev=1.0),
        (self.num_queries, self.width),
        jnp.float32,
    )
    query_pos = jnp.asarray(query_pos, self.dtype)[None]  # (1, M, W)

    target = jnp.zeros((batch, self.num_queries, self.width), self.dtype)
    if condition is not None:
      if condition.ndim != 2 or condition.shape[0] != batch:
        raise ValueError(f"condition must be (B={batch}, C'), got shape {condition.shape}.")
      cond = nn.Dense(self.width, dtype=self.dtype, name='condition_proj')(condition)  # (B, W)
      target = target + cond[:, None, :]
    if reference_xyxy is not None:
      if reference_xyxy.shape != (batch, 4):
        raise ValueError(
            f'reference_xyxy must be (B={batch}, 4), got shape ' f'{reference_xyxy.shape}.'
        )
      ref = nn.Dense(self.width, dtype=self.dtype, name='reference_proj')(
          sine_box_embedding(reference_xyxy, self.width).astype(self.dtype)
      )  # (B, W)
      target = target + ref[:, None, :]

    memory_mask = None
    if selections is not None:
      indices, roles, selected = selections
      if (
          indices.shape != roles.shape
          or indices.shape != selected.shape
          or (indices.shape[0] != batch)
      ):
        raise ValueError(
            f'selections must be three (B={batch}, Q) arrays, got shapes '
            f'{indices.shape}, {roles.shape}, {selected.shape}.'
        )
      role_embed = self.param(
          'role_embed',
          nn.initializers.normal(stddev=1.0),
          (self.num_roles, self.width),
          jnp.float32,
      )
      picked = jnp.take_along_axis(memory, indices[..., None], axis=1)  # (B, Q, W)
      picked = picked + jnp.asarray(role_embed, self.dtype)[roles]
      picked_pos = jnp.broadcast_to(memory_pos, (batch,) + memory_pos.shape[1:])
      picked_pos = jnp.take_along_axis(picked_pos, indices[..., None], axis=1)
      memory = jnp.concatenate([memory, picked], axis=1)
      memory_pos = jnp.concatenate(
          [jnp.broadcast_to(memory_pos, (batch,) + memory_pos.shape[1:]), picked_pos], axis=1
      )
      memory_mask = jnp.concatenate(
          [jnp.ones((batch, num_tokens), bool), selected.astype(bool)], axis=1
      )

    outputs = []
    for i in range(self.num_layers):
      target = DecoderBlock(
          num_heads=self.num_heads,
          mlp_dim=self.mlp_dim,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.dropout_rate,
          pre_norm=self.pre_norm,
          dtype=self.dtype,
          name=f'layers_{i}',
      )(
          target,
          memory,
          query_pos=query_pos,
          memory_pos=memory_pos,
          deterministic=deterministic,
          memory_mask=memory_mask,
      )
      outputs.append(target)
    hidden = nn.LayerNorm(dtype=self.dtype, name='decoder_norm')(jnp.stack(outputs))  # (L, B, M, W)

    offsets = OffsetHead(dtype=self.dtype, name='offset_head')(hidden)
    quality_logits = nn.Dense(1, dtype=self.dtype, name='quality_head')(hidden)[..., 0]
    quality_logits = quality_logits.astype(jnp.float32)
    return {
        'offsets': offsets.astype(jnp.float32),
        'quality_logits': quality_logits,
        'quality': jax.nn.sigmoid(quality_logits),
    }
