"""clipcrop_jax: ClipCrop (conditioned cropping driven by OWL-ViT) in JAX/Flax.

`clipcrop_jax.ClipCropper` is the inference API (see `clipcrop_jax.cropper`); OWL-ViT lives in
`clipcrop_jax.owlvit`. Both are imported on first use, so `import clipcrop_jax` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["ClipCropper", "Crop", "ClipCropConfig"]


def __getattr__(name):
  if name in ("ClipCropper", "Crop"):
    from clipcrop_jax import cropper  # pylint: disable=g-import-not-at-top

    return getattr(cropper, name)
  if name == "ClipCropConfig":
    from clipcrop_jax import model  # pylint: disable=g-import-not-at-top

    return model.ClipCropConfig
  raise AttributeError(f"module 'clipcrop_jax' has no attribute {name!r}")
