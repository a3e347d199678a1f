"""recog: distributed training of image recognition and retrieval models."""

__version__ = "0.1.0"
