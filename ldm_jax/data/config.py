"""The data section of a config (``config.data``): its keys, their defaults and validation.

Importing this module imports neither TensorFlow nor TFDS, so configs can use it.

    source            'shapes' (the built-in ldm_shapes TFDS dataset, generated on first use),
                      'tfds' (any TFDS image dataset) or 'folder' (images with captions)
    name              TFDS name[/config][:version]; '' with 'shapes' means 'ldm_shapes' (its 20k/1k default)
    data_dir          TFDS data_dir ('' = TFDS' default), or for 'folder' the image folder
    split             split read when make_iterator is given none; for 'folder', '' = data_dir itself holds
                      the images and every split reads it (the trainer's 'train', and 'test' for stage 1's
                      evaluation), else each split is a subfolder (data_dir/train, data_dir/test)
    download          'tfds': download and prepare (as array_record) if not prepared yet ('shapes' always is)
    image_feature     TFDS feature holding the image
    caption_feature   TFDS text feature holding the caption; '' = caption from label_feature
    label_feature     TFDS ClassLabel feature whose class names fill caption_template
    caption_template  e.g. 'a photo of a {}' ('_' in class names become spaces)
    tokenizer         folder of a CLIP tokenizer; '' = the shapes vocabulary for 'shapes', no token ids otherwise
    max_length        token ids per caption; 0 = the tokenizer's model_max_length
    image_size        side of the square images
    batch_size        global batch size: each of P hosts yields batch_size // P examples per batch
    random_crop       random crop instead of center crop, after resizing the shorter side to image_size
    flip              random horizontal flips
    seed              default seed of the example order and the augmentations
"""

from typing import Any, Mapping

import ml_collections

SOURCES = ("shapes", "tfds", "folder")

DEFAULTS = dict(
    source="shapes", name="", data_dir="", split="train", download=False,
    image_feature="image", caption_feature="caption", label_feature="label", caption_template="a photo of a {}",
    tokenizer="", max_length=0,
    image_size=64, batch_size=64, random_crop=False, flip=False, seed=0,
)


def data_config(config: Mapping[str, Any] | None = None, **overrides: Any) -> ml_collections.ConfigDict:
    """DEFAULTS updated with ``config`` and then ``overrides``, validated, as a locked ConfigDict.

    Raises KeyError naming any unknown key, TypeError for a value of the wrong
    type, ValueError for a bad value.
    """
    values = {**(dict(config) if config is not None else {}), **overrides}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise KeyError(f"unknown data config key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    data = ml_collections.ConfigDict(DEFAULTS)
    data.update(values)  # ConfigDict refuses a value whose type differs from the default's
    _check(data)
    data.lock()
    return data


def _check(data: ml_collections.ConfigDict) -> None:
    """ValueError naming the first key of ``data`` whose value is not allowed."""
    if data.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {data.source!r}")
    if data.source == "folder" and not data.data_dir:
        raise ValueError("data.data_dir must name the image folder when data.source is 'folder'")
    if data.source == "tfds" and not data.name:
        raise ValueError("data.name must name a TFDS dataset when data.source is 'tfds'")
    for key in ("image_size", "batch_size"):
        if data[key] <= 0:
            raise ValueError(f"data.{key} must be positive, got {data[key]}")
    if data.max_length < 0:
        raise ValueError(f"data.max_length must be >= 0, got {data.max_length}")
    if not data.caption_feature and "{}" not in data.caption_template:
        raise ValueError(f"data.caption_template needs a '{{}}' for the class name, got {data.caption_template!r}")
