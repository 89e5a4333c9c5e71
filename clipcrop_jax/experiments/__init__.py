"""Experiments: the embedded synthetic pipeline and hyper-parameter sweeps."""
