"""Image helpers shared by the sampling CLI, the trainer's sample grids and the evaluator."""

import math

import numpy as np
from PIL import Image


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images in [0, 255] as float32 in the VAE's range [-1, 1] (the inverse of `to_uint8`)."""
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in the VAE's range [-1, 1] (clipped) as uint8 in [0, 255]."""
    return np.round(np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(images: np.ndarray) -> Image.Image:
    """Images [N, H, W, 3] in [0, 1] tiled row by row into one RGB image, ceil(sqrt(N)) columns wide."""
    n, height, width, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = np.zeros((rows * cols, height, width, 3), np.uint8)
    tiles[:n] = np.round(np.clip(images, 0.0, 1.0) * 255.0)
    grid = tiles.reshape(rows, cols, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, cols * width, 3)
    return Image.fromarray(grid)
