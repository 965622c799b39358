"""The ldm_shapes attribute checker (ldm_jax.evaluation.shapes_checker): accuracy on real dataset images, clean
and degraded; valid answers on images with no shape; the accuracy and confusion arithmetic; input dtype and size
invariance.
"""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import shapes
from ldm_jax.evaluation import shapes_checker
from ldm_jax.evaluation.shapes_checker import ATTRIBUTES, accuracy, classify, classify_batch, confusion, validate

VALUES = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "size": shapes.SIZES, "position": shapes.POSITIONS}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """The first 60 images of the test split."""
    return [shapes.example("test", index)["image"] for index in range(60)]


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_accuracy_on_dataset_images(split):
    # Measured on 1,000 images of each split: 100% for each attribute but test positions, 99.9%.
    acc = validate(split, count=300)
    assert acc["colour"] >= 0.99 and acc["position"] >= 0.99, acc
    assert acc["shape"] >= 0.98 and acc["size"] >= 0.98, acc


def test_accuracy_on_blurred_noisy_images():
    # Gaussian blur of 1 px and noise of std 0.05, as in a blurry generated sample: 100% measured, bounds loose.
    acc = validate("test", count=300, blur=1.0, noise=0.05)
    assert acc["colour"] >= 0.95 and acc["position"] >= 0.95, acc
    assert acc["shape"] >= 0.85 and acc["size"] >= 0.9, acc


def test_validate_is_deterministic():
    assert validate("test", count=20, blur=1.0, noise=0.05) == validate("test", count=20, blur=1.0, noise=0.05)


def _odd_images() -> dict[str, np.ndarray]:
    """Images with no shape, or odd sizes and values, that must still get valid attributes."""
    rng = np.random.default_rng(0)
    dot = np.full((64, 64, 3), 0.5)
    dot[40, 20] = (1.0, 0.0, 0.0)
    with_nan = rng.random((64, 64, 3))
    with_nan[10:20, 10:20] = np.nan
    return {"black uint8": np.zeros((64, 64, 3), np.uint8), "white float": np.ones((64, 64, 3)),
            "grey": np.full((64, 64, 3), 0.5), "one red pixel": dot, "nan": with_nan,
            "uniform noise uint8": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "uniform noise float": rng.random((64, 64, 3)), "uniform noise 128": rng.random((128, 128, 3)),
            "5x7 noise": rng.random((5, 7, 3)), "48x80 noise": rng.random((48, 80, 3)),
            "rgba noise": rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)}


@pytest.mark.parametrize("name", _odd_images())
def test_odd_images_get_valid_attributes(name):
    attributes = classify(_odd_images()[name])
    assert set(attributes) == set(ATTRIBUTES)
    for attribute, value in attributes.items():
        assert value in VALUES[attribute], (attribute, value)


def test_blank_image_falls_back():
    attributes = classify(np.full((64, 64, 3), 128, np.uint8))
    assert (attributes["shape"], attributes["size"], attributes["position"]) == ("circle", "small", "center")


def test_accuracy_counts_each_attribute_and_all():
    targets = [dict(colour="red", shape="star", size="small", position="center"),
               dict(colour="blue", shape="cross", size="large", position="top left"),
               dict(colour="green", shape="square", size="small", position="bottom right"),
               dict(colour="purple", shape="circle", size="large", position="top right")]
    predictions = [dict(targets[0]),
                   dict(targets[1], colour="purple"),
                   dict(targets[2], shape="circle", size="large"),
                   dict(targets[3], position="center", colour="red")]
    assert accuracy(predictions, targets) == dict(colour=0.5, shape=0.75, size=0.75, position=0.75, all=0.25)
    with pytest.raises(ValueError):
        accuracy(predictions, targets[:3])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_confusion_counts_what_each_target_value_was_read_as():
    targets = [dict(shape="star"), dict(shape="star"), dict(shape="star"), dict(shape="cross")]
    predictions = [dict(shape="circle"), dict(shape="star"), dict(shape="circle"), dict(shape="cross")]
    table = confusion(predictions, targets, "shape")
    assert list(table) == list(shapes.SHAPES) and all(list(row) == list(shapes.SHAPES) for row in table.values())
    assert table["star"] == dict(circle=2, square=0, triangle=0, star=1, cross=0)
    assert table["cross"]["cross"] == 1 and sum(table["circle"].values()) == 0
    assert sum(sum(row.values()) for row in table.values()) == len(targets)
    with pytest.raises(ValueError, match="hue"):
        confusion(predictions, targets, "hue")
    with pytest.raises(ValueError):
        confusion(predictions, targets[:3], "shape")


def test_dtypes_and_sizes_agree(images):
    expected = classify_batch(images)
    variants = {"float64": lambda im: im / 255.0, "float32": lambda im: im.astype(np.float32) / 255.0,
                "128 nearest": lambda im: im.repeat(2, axis=0).repeat(2, axis=1),
                "128 bilinear": lambda im: np.asarray(Image.fromarray(im).resize((128, 128), Image.BILINEAR)),
                "96 bicubic": lambda im: np.asarray(Image.fromarray(im).resize((96, 96), Image.BICUBIC))}
    for name, variant in variants.items():
        assert classify_batch([variant(im) for im in images]) == expected, name
    assert classify_batch(np.stack(images)) == expected


def test_largest_component():
    mask = np.zeros((64, 64), bool)
    mask[2:5, 2:5] = True  # 9 pixels
    mask[10:20, 30] = True  # 10 pixels in a line
    mask[30:34, 40:42] = True  # 8 pixels
    mask[63, 63] = True
    expected = np.zeros_like(mask)
    expected[10:20, 30] = True
    np.testing.assert_array_equal(shapes_checker._largest_component(mask), expected)
    assert not shapes_checker._largest_component(np.zeros_like(mask)).any()
