r"""Example data sections (``config.data``) for the three sources; every key is described in ldm_jax/data/config.py.

Variants: ``configs/data_example.py:shapes`` (default: the built-in ldm_shapes
dataset, 20k/1k examples generated into ~/tensorflow_datasets on first use in
about 30 s on 2 CPU cores, with its own 589-token CLIP vocabulary), ``:tiny``
(its 512/128 build, about 1 s), ``:tfds`` (a TFDS dataset captioned by class
name) and ``:folder`` (a flat image folder: its images, in subfolders too,
captioned by a ``captions.jsonl`` or a ``.txt`` beside each image; stage 1
evaluates on the same images; with ``--config.data.split=train`` the
subfolders ``train/`` and ``test/`` are the splits instead). Read one batch:

  python -c "from configs import data_example; from ldm_jax.data.input_pipeline import make_iterator; \
b = next(make_iterator(data_example.get_config('tiny').data)); print(b['image'].shape, b['caption'][0])"

Overrides on a command line that uses this config: ``--config.data.batch_size=32``.
"""

import ml_collections

from ldm_jax.data.config import data_config

VARIANTS = {
    "shapes": dict(source="shapes"),
    "tiny": dict(source="shapes", name="ldm_shapes/tiny", batch_size=16),
    "tfds": dict(source="tfds", name="oxford_flowers102", download=True, caption_feature="",
                 caption_template="a photo of a {}, a type of flower",
                 tokenizer="path/to/stable-diffusion-v1-5/tokenizer", image_size=256, random_crop=True, flip=True),
    "folder": dict(source="folder", data_dir="path/to/images", split="", tokenizer="path/to/tokenizer",
                   image_size=256, flip=True),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A config whose ``data`` section is variant ``arg`` (default 'shapes') of VARIANTS."""
    arg = arg or "shapes"
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.data = data_config(VARIANTS[arg])
    return config
