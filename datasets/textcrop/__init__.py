"""TextCrop text-guided cropping test set (TFDS builder in `textcrop.py`)."""
