"""Data: feature names, dataset formats, the input pipeline and the synthetic scenes."""
