"""clipcrop_jax: ClipCrop (conditioned cropping driven by OWL-ViT) in JAX/Flax."""

__version__ = "0.1.0"
