"""``ldm_shapes``: a TFDS dataset of captioned coloured shapes, generated locally (no download).

Every example is a 64×64 RGB image of one shape on a muted background, with a
caption that names it, e.g. "a small red circle at the top left", and the
attributes as class labels so an evaluator can score prompt following:

    image     uint8 [64, 64, 3] (PNG)
    caption   text: "a {size} {colour} {shape} at the {position}"
    shape     ClassLabel(SHAPES)      colour  ClassLabel(COLOURS)
    size      ClassLabel(SIZES)       position  ClassLabel(POSITIONS)
    held_out  bool: (colour, shape) is one of HELD_OUT

The (colour, shape) pairs in HELD_OUT never appear in ``train``; every even
example of ``test`` has one, so prompt following can be measured on unseen
combinations. Example ``i`` of a split is a pure function of (config seed,
split, i): two builds are identical. Sizes come from the builder config:
``default`` (20,000 train / 1,000 test), ``tiny`` (512 / 128), or any
``ShapesConfig``. `write_tokenizer` writes a CLIP BPE vocabulary in which every
caption word is one token (589 tokens instead of CLIP's 49,408).

    builder = prepare(data_dir, "tiny")          # or tfds.builder("ldm_shapes/tiny", data_dir=data_dir)
    source = builder.as_data_source("train")     # array_record: random access
"""

import colorsys
import dataclasses
import io
import json
import os
from collections import Counter

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from ldm_jax import paths

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
# (colour, shape) pairs absent from train: each colour but orange and each shape once.
HELD_OUT = (("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "cross"), ("purple", "square"))
IMAGE_SIZE = 64
SPLITS = ("train", "test")

_RGB = {"red": (220, 35, 35), "green": (35, 175, 50), "blue": (35, 75, 225), "yellow": (240, 210, 25),
        "purple": (150, 45, 205), "orange": (250, 135, 15)}
_CENTRES = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
            "center": (32, 32)}
_RADII = {"small": (6.0, 9.0), "large": (12.0, 15.0)}
# The most a shape's centre moves from its region's centre, per axis. Version 1 let small shapes move up to 9 px (the
# room left in their 16-px quarter); a 32x32-latent model trained for 30 CPU minutes then drew them as blobs (shape
# read right 22%), against 45% with every shape within 3 px, as large shapes always were (docs/experiments.md).
MAX_JITTER = 3.0
_SUPERSAMPLE = 4  # sub-pixels per side for anti-aliased edges

# Words of the captions, and of class-name captions such as "a photo of a circle".
CAPTION_WORDS = ("a", "an", "the", "at", "of", "photo", *SIZES, *COLOURS, *SHAPES,
                 *dict.fromkeys(w for p in POSITIONS for w in p.split()))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def caption(shape: str, colour: str, size: str, position: str) -> str:
    """The caption of an example with these attributes: "a small red circle at the top left"."""
    return f"a {size} {colour} {shape} at the {position}"


def _pairs(held_out: bool) -> list[tuple[str, str]]:
    """The (colour, shape) pairs in HELD_OUT (``held_out``) or not in it, in a fixed order."""
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def _attributes(split: str, index: int, rng: np.random.Generator) -> dict[str, str]:
    """Draw shape, colour, size, position: train never, and even test examples always, use a HELD_OUT pair."""
    pairs = _pairs(held_out=split == "test" and index % 2 == 0)
    colour, shape = pairs[rng.integers(len(pairs))]
    return dict(shape=shape, colour=colour, size=SIZES[rng.integers(len(SIZES))],
                position=POSITIONS[rng.integers(len(POSITIONS))])


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random low-saturation colour (RGB floats in [0, 255]), far from the saturated shape colours."""
    return 255.0 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.3, 0.8)))


def _background(rng: np.random.Generator) -> np.ndarray:
    """A float [64, 64, 3] background: solid, linear gradient, or blotchy noise, in muted colours."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(_muted(rng), (IMAGE_SIZE, IMAGE_SIZE, 3))
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] / (IMAGE_SIZE - 1)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = ((t - t.min()) / (t.max() - t.min()))[..., None]
        return (1 - t) * _muted(rng) + t * _muted(rng)
    blotches = np.kron(rng.normal(0.0, 12.0, (8, 8, 1)), np.ones((8, 8, 1)))
    return _muted(rng) + blotches + rng.normal(0.0, 5.0, (IMAGE_SIZE, IMAGE_SIZE, 3))


def _sides_within(u: np.ndarray, v: np.ndarray, sides: int, step: int, radius: float) -> np.ndarray:
    """How many edge lines of a regular polygon (``step`` 1) or star polygon (``step`` 2) each point is inside.

    The polygon's ``sides`` vertices lie on a circle of ``radius``, one
    straight up (``-v``); the edges join every ``step``-th vertex.
    """
    normals = -np.pi / 2 + step * np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    distance = radius * np.cos(step * np.pi / sides)
    return sum((u * np.cos(a) + v * np.sin(a) <= distance).astype(np.int8) for a in normals)


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside ``shape`` at coordinates in units of its radius, centred on 0 (``v`` points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return _sides_within(u, v - 0.25, 3, 1, 1.1) == 3  # shifted down to centre it vertically
    if shape == "star":
        return _sides_within(u, v, 5, 2, 1.05) >= 4  # the pentagram: inside at least 4 of its 5 lines
    bar = lambda a, b: (np.abs(a) <= 0.3) & (np.abs(b) <= 0.9)
    return bar(u, v) | bar(v, u)


def _coverage(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Fraction [64, 64, 1] of each pixel inside the shape, from a mask supersampled over its bounding box."""
    s, reach = _SUPERSAMPLE, 1.1 * radius + 1.0  # every shape lies within 1.1 radii of its centre
    x0, y0 = max(int(cx - reach), 0), max(int(cy - reach), 0)
    x1, y1 = min(int(cx + reach) + 1, IMAGE_SIZE), min(int(cy + reach) + 1, IMAGE_SIZE)
    xs = ((np.arange(x0 * s, x1 * s, dtype=np.float32) + 0.5) / s - cx) / radius
    ys = ((np.arange(y0 * s, y1 * s, dtype=np.float32) + 0.5) / s - cy) / radius
    mask = _mask(shape, xs[None, :], ys[:, None])
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    alpha[y0:y1, x0:x1, 0] = mask.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return alpha


def render(attributes: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """uint8 [64, 64, 3]: the shape of ``attributes`` over a random background, its centre jittered by up to
    MAX_JITTER px (less where its region leaves less room)."""
    background = _background(rng)
    radius = rng.uniform(*_RADII[attributes["size"]])
    slack = min(max(IMAGE_SIZE / 4 - radius - 1.0, 0.0), MAX_JITTER)
    cx, cy = np.array(_CENTRES[attributes["position"]]) + rng.uniform(-slack, slack, 2)
    alpha = _coverage(attributes["shape"], cx, cy, radius)
    image = (1 - alpha) * background + alpha * np.array(_RGB[attributes["colour"]])
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def example(split: str, index: int, seed: int = 0) -> dict:
    """Example ``index`` of ``split``, a pure function of (seed, split, index): the dict that TFDS encodes."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    attributes = _attributes(split, index, rng)
    return dict(image=render(attributes, rng), caption=caption(**attributes),
                held_out=(attributes["colour"], attributes["shape"]) in HELD_OUT, **attributes)


def _png(image: np.ndarray) -> bytes:
    """``image`` as PNG bytes, encoded by PIL at its fastest level (TFDS' own encoder runs a TF op per image)."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Split sizes and the generation seed of an ``ldm_shapes`` build."""
    num_train: int = 20_000
    num_test: int = 1_000
    seed: int = 0


class LdmShapes(tfds.core.GeneratorBasedBuilder):
    """Captioned 64×64 images of coloured shapes, with held-out (colour, shape) pairs in ``test``."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "2.0.0": "Small shapes' centres jittered by at most MAX_JITTER = 3 px, as large shapes' are "
                              "(up to 9 px in 1.0.0); every other draw unchanged."}
    BUILDER_CONFIGS = [ShapesConfig(name="default", description="20,000 train / 1,000 test examples."),
                       ShapesConfig(name="tiny", num_train=512, num_test=128, description="512 train / 128 test.")]

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: image, caption, the four attributes as class labels, and the held-out flag."""
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "shape": tfds.features.ClassLabel(names=SHAPES),
            "colour": tfds.features.ClassLabel(names=COLOURS),
            "size": tfds.features.ClassLabel(names=SIZES),
            "position": tfds.features.ClassLabel(names=POSITIONS),
            "held_out": tfds.features.Scalar(dtype=np.bool_),
        })
        return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n")[0], features=features)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        """The train and test splits; nothing is downloaded."""
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        """Yield (index, example) for every example of ``split``."""
        config = self.builder_config
        for index in range(config.num_train if split == "train" else config.num_test):
            ex = example(split, index, config.seed)
            yield index, {**ex, "image": _png(ex["image"])}


def prepare(data_dir: str | None = None, config: str | ShapesConfig = "default") -> LdmShapes:
    """The ``ldm_shapes`` builder for ``config`` under ``data_dir``, generated (as array_record) if not there yet."""
    builder = LdmShapes(data_dir=data_dir, config=config)
    builder.download_and_prepare(file_format="array_record")
    return builder


def _byte_symbols() -> list[str]:
    """The byte-level alphabet of GPT-2 / CLIP BPE: one printable character per byte, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE training to completion on ``words``: the merges, in rank order, that make each word one token.

    Each step merges the most frequent adjacent pair (ties: the smallest
    pair), so encoding a training word replays its merges to a single symbol.
    """
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges = []
    while any(len(p) > 1 for p in pieces):
        counts = Counter(pair for p in pieces for pair in zip(p, p[1:]))
        pair = min(counts, key=lambda q: (-counts[q], q))
        merges.append(pair)
        pieces = [_merge(p, pair) for p in pieces]
    return merges


def _merge(pieces: list[str], pair: tuple[str, str]) -> list[str]:
    """``pieces`` with every non-overlapping occurrence of ``pair``, left to right, joined."""
    out, i = [], 0
    while i < len(pieces):
        if tuple(pieces[i:i + 2]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def write_tokenizer(folder: str, model_max_length: int = 77) -> None:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) covering CAPTION_WORDS into ``folder``.

    The layout is CLIP's: the 256 byte symbols, the same with ``</w>``, the
    merged tokens in merge order, then BOS and EOS (the highest ids; EOS also
    pads, as in SD 1.x). Every caption word is a single token; any other text
    still encodes, byte by byte. Load it with
    ``ldm_jax.models.clip.load_tokenizer(folder)``. ``folder`` may be local or remote.
    """
    from transformers import CLIPTokenizer  # imported here: only writing the tokenizer needs transformers
    symbols = _byte_symbols()
    merges = _bpe_merges(CAPTION_WORDS)
    tokens = [*symbols, *(s + "</w>" for s in symbols), *dict.fromkeys(a + b for a, b in merges), BOS, EOS]
    with paths.writable_folder(folder) as local:
        with open(os.path.join(local, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f)
        with open(os.path.join(local, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(local, pad_token=EOS, model_max_length=model_max_length)
        tokenizer.save_pretrained(local)
