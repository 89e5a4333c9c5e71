"""CLIP image and text towers with Scenic's parameter names (`scenic/projects/baselines/clip/layers.py`).

Parameter tree (B/32 example, see the spec §1.2):
  visual/conv1/kernel (32, 32, 3, 768), visual/class_embedding (768,),
  visual/positional_embedding (577, 768), visual/ln_pre, visual/transformer/resblocks_{i}/
  {ln_0, attn/{query,key,value,out}, ln_1, mlp/{c_fc,c_proj}}, visual/ln_post;
  text/token_embedding/embedding (49408, 512), text/positional_embedding (16, 512),
  text/transformer/resblocks_{i}/..., text/ln_final, text/text_projection/kernel (512, 512);
  logit_scale ().

Numerics follow Scenic exactly: all CLIP LayerNorms use epsilon 1e-5 (Flax's fast variance), the MLP uses
quick_gelu, attention scales the queries by 1/sqrt(64) and takes the softmax in float32.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipcrop_jax.owlvit.configs import HEAD_DIM

Dtype = Any
CLIP_LN_EPS = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation x·sigmoid(1.702·x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class _KernelAndBias(nn.Module):
  """Holds one projection's `kernel` and `bias` (Flax DenseGeneral layout) without applying it.

  Used so that the attention can choose its own matmul layout while the parameter tree keeps
  Scenic's `attn/{query,key,value,out}/{kernel,bias}` names and shapes.
  """

  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  in_axis: Any
  out_axis: Any

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    init = nn.initializers.lecun_normal(in_axis=self.in_axis, out_axis=self.out_axis)
    kernel = self.param('kernel', init, self.kernel_shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, self.bias_shape, jnp.float32)
    return kernel, bias


class MultiHeadAttention(nn.Module):
  """Self-attention equal to Flax's `nn.SelfAttention` (params query/key/value/out).

  Attributes:
    num_heads: number of 64-wide heads.
    dtype: compute dtype of the projections.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """x: (B, N, W); mask: bool broadcastable to (B, 1, N, N), True = attend. Returns (B, N, W)."""
    width = x.shape[-1]
    heads, depth = self.num_heads, HEAD_DIM
    proj = lambda name: _KernelAndBias(  # pylint: disable=g-long-lambda
        (width, heads, depth), (heads, depth), 0, (1, 2), name=name
    )()
    (wq, bq), (wk, bk), (wv, bv) = proj('query'), proj('key'), proj('value')
    wo, bo = _KernelAndBias((heads, depth, width), (width,), (0, 1), 2, name='out')()

    # Layout matters on XLA:CPU (measured with tools/benchmark_owlvit.py, B/32 @ 768 px): plain 2-D
    # matmuls per projection and heads in (B, H, N, 64) order rather than (B, N, H, 64) einsums
    # (1.7x slower per block), and one attention per head. A concatenated QKV kernel was no faster.
    batch, length = x.shape[:2]
    x = x.astype(self.dtype)

    def project(w, b):  # (B, N, W) -> (B, H, N, 64)
      y = x @ w.reshape(width, heads * depth).astype(self.dtype) + b.reshape(-1).astype(self.dtype)
      return y.reshape(batch, length, heads, depth).transpose(0, 2, 1, 3)

    q, k, v = project(wq, bq), project(wk, bk), project(wv, bv)
    q = q / jnp.sqrt(depth).astype(self.dtype)
    y = dot_product_attention(q, k, v, mask, per_head=jax.default_backend() == 'cpu')
    y = y.transpose(0, 2, 1, 3).reshape(batch, length, heads * depth)
    return y @ wo.reshape(heads * depth, width).astype(self.dtype) + bo.astype(self.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
    per_head: bool = False,
) -> jax.Array:
  """softmax(q·kᵀ)·v with the softmax in float32; q, k, v (B, H, N, 64), q already scaled.

  mask: bool broadcastable to (B, 1, N, N), True = attend; masked logits are replaced by the
  float32 minimum (Flax's rule). per_head=True runs one (N, N) attention per head, which keeps the
  logits in cache and is ~20% faster on CPU; the result is identical.
  """
  if per_head:
    heads = [
        dot_product_attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1], mask)
        for h in range(q.shape[1])
    ]
    return jnp.concatenate(heads, axis=1)
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v)


class MLP(nn.Module):
  """CLIP MLP: c_fc (W -> 4W), quick_gelu, c_proj (4W -> W)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(4 * width, dtype=self.dtype, name='c_fc')(x)
    x = quick_gelu(x)
    return nn.Dense(width, dtype=self.dtype, name='c_proj')(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_0(x)), then + mlp(ln_1(.))."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    y = nn.LayerNorm(epsilon=CLIP_LN_EPS, name='ln_0')(x)
    x = x + MultiHeadAttention(self.num_heads, self.dtype, name='attn')(y, mask)
    y = nn.LayerNorm(epsilon=CLIP_LN_EPS, name='ln_1')(x)
    return x + MLP(self.dtype, name='mlp')(y)


class Transformer(nn.Module):
  """Stack of `resblocks_{i}`.

  Attributes:
    num_layers: number of blocks.
    num_heads: attention heads per block.
    dtype: compute dtype.
    remat: rematerialise each block (`nn.remat`): its activations are recomputed in the backward
      pass instead of stored, trading ~1/3 more compute for memory when the encoder trains. The
      parameter tree (`resblocks_{i}/...`), outputs and gradients are unchanged.
  """

  num_layers: int
  num_heads: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.num_layers):
      x = block(self.num_heads, self.dtype, name=f'resblocks_{i}')(x, mask)
    return x


def truncate_positional_embedding(posemb: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """Fits a (1 + g², W) position embedding to an input grid (h, w) (Scenic's truncation rule).

  The class position is kept; the patch part is reshaped to (g, g, W) and its top-left h×w part is
  taken. No interpolation. Raises ValueError if the input grid is larger than the native one.
  """
  h, w = grid_hw
  native = int(round(np.sqrt(posemb.shape[0] - 1)))
  if (h, w) == (native, native):
    return posemb
  if h > native or w > native:
    raise ValueError(
        f"Input grid {h}x{w} is larger than the checkpoint's native {native}x{native} grid; "
        "resize the image to the model's image size (see clipcrop_jax.owlvit.preprocessing)."
    )
  patches = posemb[1:].reshape(native, native, -1)[:h, :w].reshape(h * w, -1)
  return jnp.concatenate([posemb[:1], patches], axis=0)


class VisionTransformer(nn.Module):
  """CLIP ViT returning ln_post of *all* tokens (no pooling, no projection), as OWL-ViT uses it.

  Attributes:
    patch_size: patch side p.
    width: W.
    num_layers: number of blocks.
    native_grid: side g of the position-embedding grid stored in the parameters.
    dtype: compute dtype.
    remat: rematerialise the blocks (`Transformer.remat`).
  """

  patch_size: int
  width: int
  num_layers: int
  native_grid: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: (B, H, W, 3), CLIP-normalised. Returns (B, 1 + h·w, W); token 0 is the class token."""
    batch = images.shape[0]
    x = PatchEmbedding(self.patch_size, self.width, self.dtype, name='conv1')(images)
    h, w = x.shape[1:3]
    x = x.reshape(batch, h * w, self.width)

    scale = self.width**-0.5
    cls = self.param('class_embedding', nn.initializers.normal(scale), (self.width,), jnp.float32)
    posemb = self.param(
        'positional_embedding',
        nn.initializers.normal(scale),
        (1 + self.native_grid**2, self.width),
        jnp.float32,
    )
    cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + truncate_positional_embedding(posemb, (h, w)).astype(x.dtype)[None]
    x = nn.LayerNorm(epsilon=CLIP_LN_EPS, name='ln_pre')(x)
    x = Transformer(
        self.num_layers, self.width // HEAD_DIM, self.dtype, self.remat, name='transformer'
    )(x)
    return nn.LayerNorm(epsilon=CLIP_LN_EPS, name='ln_post')(x)


class PatchEmbedding(nn.Module):
  """`conv1`: p×p stride-p conv, no bias, 'SAME' padding (Flax default), kernel HWIO (p, p, 3, W).

  When H and W are multiples of p (all native sizes), SAME equals VALID and the conv is computed as a
  patchify + matmul: the same math, several times faster on CPU.
  """

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images: (B, H, W, C). Returns (B, ceil(H/p), ceil(W/p), width)."""
    p = self.patch_size
    b, height, width, c = images.shape
    kernel = self.param(
        'kernel',
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        (p, p, c, self.width),
        jnp.float32,
    ).astype(self.dtype)
    images = images.astype(self.dtype)
    if height % p or width % p:
      return jax.lax.conv_general_dilated(
          images, kernel, (p, p), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
      )
    h, w = height // p, width // p
    x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, p * p * c)
    return jnp.einsum('bhwk,kd->bhwd', x, kernel.reshape(p * p * c, self.width))


class TextEncoder(nn.Module):
  """CLIP text transformer; pools at argmax(ids) (the EOT position) and projects without bias.

  Attributes:
    vocab_size: 49408.
    width: T.
    num_layers: number of blocks.
    out_features: D (text projection output).
    max_len: text length L (16).
    dtype: compute dtype.
    remat: rematerialise the blocks (`Transformer.remat`).
  """

  vocab_size: int
  width: int
  num_layers: int
  out_features: int
  max_len: int
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    """text: int (N, L), 0 = padding. Returns unnormalised embeddings (N, D)."""
    length = text.shape[-1]
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds the model's {self.max_len} positions.")
    x = nn.Embed(
        self.vocab_size,
        self.width,
        embedding_init=nn.initializers.normal(0.02),
        name='token_embedding',
    )(text)
    posemb = self.param(
        'positional_embedding',
        nn.initializers.normal(0.01),
        (self.max_len, self.width),
        jnp.float32,
    )
    x = (x + posemb[None, :length]).astype(self.dtype)
    # Padding mask (both query and key positions must be real tokens) AND causal mask, as in Scenic.
    pad = text > 0
    mask = pad[:, None, :, None] & pad[:, None, None, :]
    mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = Transformer(
        self.num_layers, self.width // HEAD_DIM, self.dtype, self.remat, name='transformer'
    )(x, mask)
    x = nn.LayerNorm(epsilon=CLIP_LN_EPS, name='ln_final')(x)
    # Pool at the EOT token (the largest id); first occurrence, as jnp.argmax.
    x = jnp.take_along_axis(x, jnp.argmax(text, axis=-1)[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.out_features, use_bias=False, dtype=self.dtype, name='text_projection')(x)


class CLIP(nn.Module):
  """Holds `visual`, `text` and the (unused by the detector) `logit_scale`; `remat`
  rematerialises both towers' blocks (`Transformer.remat`)."""

  config: Any  # OwlViTConfig
  dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.visual = VisionTransformer(
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        num_layers=cfg.vision_layers,
        native_grid=cfg.native_image_grid_size or cfg.grid_size,
        dtype=self.dtype,
        remat=self.remat,
    )
    self.text = TextEncoder(
        vocab_size=cfg.vocab_size,
        width=cfg.text_width,
        num_layers=cfg.text_layers,
        out_features=cfg.embed_dim,
        max_len=cfg.max_query_length,
        dtype=self.dtype,
        remat=self.remat,
    )
    self.logit_scale = self.param(
        'logit_scale', nn.initializers.constant(np.log(1 / 0.07)), (), jnp.float32
    )

  def encode_image(self, images: jax.Array) -> jax.Array:
    return self.visual(images)

  def encode_text(self, text: jax.Array) -> jax.Array:
    return self.text(text)

  def __call__(self, images: jax.Array, text: jax.Array):
    return self.encode_image(images), self.encode_text(text), self.logit_scale
