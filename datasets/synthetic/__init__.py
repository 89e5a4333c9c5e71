"""`synthetic_crops`: the procedurally generated cropping dataset (see README.md).

`tfds build datasets/synthetic` imports `synthetic.synthetic` (the builder module) itself; this file
stays empty so that importing the folder does not register the builder twice.
"""
