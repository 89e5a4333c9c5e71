"""Horanyi-PR caption-guided cropping test set (TFDS builder in `horanyi_pr.py`)."""
