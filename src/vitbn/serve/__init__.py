"""Trained models in a user's hands: MNIST-like preprocessing, a predictor, and the browser demo (``vitbn serve``)."""

from vitbn.serve.predictor import Prediction, Predictor, find_study_models
from vitbn.serve.preprocess import BlankImageError, ImageError, decode_image, read_images, to_mnist

__all__ = [
    "BlankImageError",
    "ImageError",
    "Prediction",
    "Predictor",
    "decode_image",
    "find_study_models",
    "read_images",
    "to_mnist",
]
