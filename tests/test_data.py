"""Data pipelines (ldm_jax.data): the ldm_shapes TFDS builder and its tokenizer, TFDS and image-folder sources,
preprocessing, determinism, resuming, host sharding and config validation.

Everything is real: TFDS builds into temporary folders, tf.data pipelines,
images written with PIL. The tiny shapes build (512 train / 128 test) is
shared by the module.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import data_example
from ldm_jax.data import shapes
from ldm_jax.data.config import DEFAULTS, data_config
from ldm_jax.data.input_pipeline import make_iterator, preprocess
from ldm_jax.models.clip import load_tokenizer, tokenize

ATTRIBUTES = ("shape", "colour", "size", "position")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the tiny ldm_shapes build."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir, "tiny")
    return data_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A folder with the shapes tokenizer (16 tokens per caption, like the tiny text encoder)."""
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    shapes.write_tokenizer(folder, model_max_length=16)
    return folder


def _records(data_dir: str, config: str | shapes.ShapesConfig, split: str) -> list[dict]:
    """Every example of a shapes split, images still PNG bytes, in file order."""
    builder = shapes.LdmShapes(data_dir=data_dir, config=config)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i] for i in range(len(source))]


def _attributes(record: dict) -> dict[str, str]:
    """The class names of a record's attribute labels."""
    names = dict(shape=shapes.SHAPES, colour=shapes.COLOURS, size=shapes.SIZES, position=shapes.POSITIONS)
    return {key: names[key][record[key]] for key in ATTRIBUTES}


def _shapes_data(data_dir: str, **overrides) -> dict:
    """A data section reading the tiny shapes build."""
    return {**dict(source="shapes", name="ldm_shapes/tiny", data_dir=data_dir, batch_size=8), **overrides}


def _take(iterator, n: int) -> list[dict]:
    """The next ``n`` batches."""
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Equal batch lists: same keys, identical arrays."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------------------------ the shapes dataset


def test_shapes_builds_are_identical(tmp_path):
    config = shapes.ShapesConfig(name="mini", num_train=24, num_test=8)
    for folder in ("a", "b"):
        shapes.prepare(str(tmp_path / folder), config)
    for split, size in (("train", 24), ("test", 8)):
        first, second = (_records(str(tmp_path / folder), config, split) for folder in ("a", "b"))
        assert len(first) == size and first == second
    image = shapes.example("train", 3)["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, shapes.example("train", 3)["image"])
    assert not np.array_equal(image, shapes.example("train", 3, seed=1)["image"])


def test_shapes_captions_agree_with_attributes(shapes_dir):
    for split in shapes.SPLITS:
        for record in _records(shapes_dir, "tiny", split):
            attributes = _attributes(record)
            assert record["caption"].decode() == shapes.caption(**attributes)
            assert record["held_out"] == ((attributes["colour"], attributes["shape"]) in shapes.HELD_OUT)
            image = np.asarray(Image.open(io.BytesIO(record["image"])))
            assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("size", shapes.SIZES)
def test_shape_centres_stay_within_max_jitter_of_their_region(size):
    """A red circle's centroid (its fully covered pixels) lies within MAX_JITTER px of its region's centre, per axis,
    for small and large circles, and the jitter uses most of that room."""
    offsets = []
    for seed in range(40):
        attributes = dict(shape="circle", colour="red", size=size, position="top left")
        image = shapes.render(attributes, np.random.default_rng(seed)).astype(int)
        ys, xs = np.nonzero(np.abs(image - (220, 35, 35)).max(-1) <= 1)
        offsets.append((xs.mean() + 0.5 - 16, ys.mean() + 0.5 - 16))  # pixel centres; the region's is (16, 16)
    offsets = np.abs(np.array(offsets))
    assert offsets.max() <= shapes.MAX_JITTER + 0.5
    assert offsets.max() >= 0.6 * shapes.MAX_JITTER if size == "small" else offsets.max() >= 0.5


def test_held_out_pairs_only_in_test(shapes_dir):
    pairs = {split: {(a["colour"], a["shape"]) for a in map(_attributes, _records(shapes_dir, "tiny", split))}
             for split in shapes.SPLITS}
    assert not pairs["train"] & set(shapes.HELD_OUT)
    assert set(shapes.HELD_OUT) <= pairs["test"]
    assert len(pairs["train"]) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(shapes.HELD_OUT)


def test_tokenizer_has_one_token_per_caption_word(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    with open(os.path.join(tokenizer_dir, "vocab.json")) as f:
        vocab = json.load(f)
    assert len(vocab) < 1000 and tokenizer.unk_token == shapes.EOS
    for word in shapes.CAPTION_WORDS:
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [vocab[word + "</w>"]], word
    for index in range(20):
        text = shapes.example("test", index)["caption"]
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text.split()) + 2 and tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer("a zebra!")["input_ids"], skip_special_tokens=True) == "a zebra !"


# ----------------------------------------------------------------------------------------------- the pipeline


def test_shapes_pipeline_batches(shapes_dir):
    iterator = make_iterator(_shapes_data(shapes_dir), "train")
    batch = next(iterator)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
    assert batch["input_ids"].shape == (8, 77) and batch["input_ids"].dtype == np.int32
    assert batch["index"].dtype == np.int64 and ((0 <= batch["index"]) & (batch["index"] < 512)).all()
    decoded = iterator.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == [c.decode() for c in batch["caption"]]
    iterator.close()
    with pytest.raises(StopIteration):
        next(iterator)


def test_same_seed_same_batches_other_seed_other_batches(shapes_dir):
    data = _shapes_data(shapes_dir, random_crop=True, flip=True)
    first = _take(make_iterator(data, "train", seed=3), 3)
    _assert_same_batches(first, _take(make_iterator(data, "train", seed=3), 3))
    other = _take(make_iterator(data, "train", seed=4), 3)
    assert not np.array_equal(first[0]["index"], other[0]["index"])


def test_resume_from_step_k_equals_batch_k(shapes_dir):
    # 128 test examples in batches of 32: batches 3 and 4 straddle the first epoch boundary.
    data = _shapes_data(shapes_dir, batch_size=32, random_crop=True, flip=True)
    from_start = _take(make_iterator(data, "test", seed=7), 5)
    _assert_same_batches(from_start[3:], _take(make_iterator(data, "test", seed=7, start_step=3), 2))
    assert sorted(np.concatenate([b["index"] for b in from_start[:4]])) == list(range(128))
    assert not np.array_equal(from_start[0]["index"], from_start[4]["index"])  # a new order each epoch


def test_hosts_read_disjoint_shares_covering_the_split(shapes_dir):
    data = _shapes_data(shapes_dir, batch_size=16)
    seen = []
    for host in range(2):
        batches = list(make_iterator(data, "test", num_epochs=1, process_index=host, process_count=2))
        assert all(len(b["index"]) <= 8 for b in batches)
        seen.append(np.concatenate([b["index"] for b in batches]))
    assert len(seen[0]) == len(seen[1]) == 64 and not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(128))
    in_order = make_iterator(data, "test", num_epochs=1, shuffle=False, process_index=1, process_count=2)
    assert list(np.concatenate([b["index"] for b in in_order])) == list(range(64, 128))


def test_tfds_by_name_with_class_name_captions(shapes_dir, tokenizer_dir):
    data = dict(source="tfds", name="ldm_shapes/tiny", data_dir=shapes_dir, caption_feature="",
                label_feature="shape", caption_template="a photo of a {}", tokenizer=tokenizer_dir, batch_size=8)
    batch = next(make_iterator(data, "test"))
    records = _records(shapes_dir, "tiny", "test")
    expected = [f"a photo of a {shapes.SHAPES[records[i]['shape']]}" for i in batch["index"]]
    assert [c.decode() for c in batch["caption"]] == expected
    assert batch["input_ids"].shape == (8, 16) and batch["image"].shape == (8, 64, 64, 3)
    with pytest.raises(KeyError, match="'label'"):
        make_iterator({**data, "label_feature": "label"}, "test")


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        make_iterator(dict(source="tfds", name="ldm_shapes/tiny", data_dir=str(tmp_path)), "train")


# ----------------------------------------------------------------------------------------------- image folders


def _write_image(path, size=(40, 24), mode="RGB", fill=0) -> None:
    """A PIL image of ``size`` (w, h) with a horizontal ramp, saved at ``path`` (format from the extension)."""
    ramp = (np.arange(size[0])[None, :, None] * 5 + fill) % 256
    array = np.broadcast_to(ramp, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def _folder_data(folder, **overrides) -> dict:
    """A data section reading ``folder`` itself as the split."""
    return {**dict(source="folder", data_dir=str(folder), split="", image_size=16, batch_size=2), **overrides}


def test_folder_with_captions_jsonl(tmp_path, tokenizer_dir):
    names = ["b.png", "sub/a.jpg", "c.png"]
    os.makedirs(tmp_path / "sub")
    for i, (name, mode) in enumerate(zip(names, ["RGB", "L", "RGBA"])):
        _write_image(tmp_path / name, size=(40 + 8 * i, 24), mode=mode, fill=i)
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.writelines(json.dumps({"file": n, "caption": f"a small red circle {i}"}) + "\n" for i, n in enumerate(names))
    batches = list(make_iterator(_folder_data(tmp_path, tokenizer=tokenizer_dir), num_epochs=1, shuffle=False))
    assert [len(b["index"]) for b in batches] == [2, 1]
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert list(batch["index"]) == [0, 1, 2]
    assert [c.decode() for c in batch["caption"]] == [f"a small red circle {i}" for i in range(3)]
    assert batch["image"].shape == (3, 16, 16, 3) and batch["input_ids"].shape == (3, 16)
    assert np.abs(batch["image"]).max() <= 1.0
    with open(tmp_path / "captions.jsonl", "a") as f:
        f.write('{"file": "d.png"}\n')
    with pytest.raises(ValueError, match="line 4"):
        make_iterator(_folder_data(tmp_path))


def test_folder_with_txt_captions(tmp_path):
    for name in ["x.png", "y.bmp"]:
        _write_image(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    iterator = make_iterator(_folder_data(tmp_path), num_epochs=1, shuffle=False)
    batch = next(iterator)
    assert [c.decode() for c in batch["caption"]] == ["caption of x.png", "caption of y.bmp"]
    assert "input_ids" not in batch and iterator.tokenizer is None
    (tmp_path / "y.txt").unlink()
    with pytest.raises(ValueError, match="y.bmp has no caption"):
        make_iterator(_folder_data(tmp_path))


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        _write_image(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(name)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="b.png"):
        iterator = make_iterator(_folder_data(tmp_path), num_epochs=1)
    assert iterator.skipped == (str(tmp_path / "b.png"),)
    batch = next(iterator)
    assert sorted(batch["index"]) == [0, 2] and sorted(c.decode() for c in batch["caption"]) == ["a.png", "c.png"]


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_every_colour_mode_is_converted_and_broken_files_are_skipped(tmp_path):
    """Grey, grey + alpha, RGBA (over white), palette, 16-bit grey, CMYK JPEG: RGB images; corrupt, truncated and
    zero-byte files: skipped, listed and warned about, the rest of the folder still read."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    over_white = rgb * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    good = {  # file -> (image, the RGB the pipeline must give, tolerance)
        "rgb.png": (Image.fromarray(rgb), rgb, 0),
        "grey.png": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1), 0),
        "grey_alpha.png": (Image.fromarray(np.dstack([grey, alpha]), "LA"),
                           grey[..., None] * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0), 1),
        "rgba.png": (rgba, over_white, 1),
        "palette.png": (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB")),
                        0),
        "grey16.png": (Image.fromarray(grey.astype(np.uint16) * 257), np.repeat(grey[..., None], 3, -1), 0),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), None, 3),  # compared with PIL's decoding below
    }
    for name, (image, _, _) in good.items():
        image.save(tmp_path / name)
    cmyk = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
    png = (tmp_path / "rgb.png").read_bytes()
    broken = {"corrupt.png": b"\x89PNG\r\n\x1a\n not a png", "truncated.png": png[:len(png) // 2],
              "truncated.jpg": _encoded(Image.fromarray(rgb), "JPEG")[:150], "zero.png": b""}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
    names = sorted(good) + sorted(broken)
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.writelines(json.dumps({"file": n, "caption": n}) + "\n" for n in names)
    with pytest.warns(UserWarning) as caught:
        iterator = make_iterator(_folder_data(tmp_path, image_size=16, batch_size=1), num_epochs=1, shuffle=False)
    assert sorted(os.path.basename(p) for p in iterator.skipped) == sorted(broken)
    assert {os.path.basename(str(w.message).split()[-1]) for w in caught} >= set(broken)
    decoded = {b["caption"][0].decode(): np.round((b["image"][0] + 1) * 127.5) for b in iterator}
    assert sorted(decoded) == sorted(good)
    for name, (_, expected, tolerance) in good.items():
        expected = cmyk if expected is None else expected
        assert np.abs(decoded[name] - expected).max() <= tolerance, name


def test_empty_captions_are_allowed(tmp_path, tokenizer_dir):
    for name in ["a.png", "b.png", "c.png"]:
        _write_image(tmp_path / name)
    with open(tmp_path / "captions.jsonl", "w") as f:
        f.writelines(json.dumps({"file": n, "caption": c}) + "\n"
                     for n, c in [("a.png", ""), ("b.png", None), ("c.png", "a red circle")])
    batch = next(make_iterator(_folder_data(tmp_path, batch_size=3, tokenizer=tokenizer_dir), num_epochs=1,
                               shuffle=False))
    assert [c.decode() for c in batch["caption"]] == ["", "", "a red circle"]
    empty = tokenize(load_tokenizer(tokenizer_dir), [""], 16)[0]
    np.testing.assert_array_equal(batch["input_ids"][0], empty)
    np.testing.assert_array_equal(batch["input_ids"][1], empty)


def test_a_folder_without_a_readable_image_is_a_clear_error(tmp_path):
    for name in ["a.png", "b.jpg"]:
        (tmp_path / name).write_bytes(b"")
        (tmp_path / name).with_suffix(".txt").write_text("caption")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no readable image in .*: all 2 listed images "
                                                                    r"of this host's share failed to decode"):
        make_iterator(_folder_data(tmp_path))


# -------------------------------------------------------------------------------------------- preprocessing


def _preprocess(image: np.ndarray, size: int, seed: int = 0, **kwargs) -> np.ndarray:
    """preprocess() on a uint8 numpy image, back to uint8 numpy."""
    out = preprocess(tf.constant(image), size, tf.constant([seed, 0], tf.int64), **kwargs).numpy()
    return np.round((out + 1.0) * 127.5).astype(np.uint8)


def test_center_crop_keeps_the_middle():
    image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_preprocess(image, 32), image[:, 16:48])
    np.testing.assert_array_equal(_preprocess(image.transpose(1, 0, 2), 32), image.transpose(1, 0, 2)[16:48])


def test_resize_to_the_shorter_side_then_crop():
    rng = np.random.default_rng(1)
    for shape in [(100, 50, 3), (50, 100, 3), (7, 9, 3), (64, 64, 3)]:
        out = preprocess(tf.constant(rng.integers(0, 256, shape, dtype=np.uint8)), 20, tf.constant([0, 0]))
        assert out.shape == (20, 20, 3) and out.dtype == tf.float32
        assert -1.0 <= out.numpy().min() and out.numpy().max() <= 1.0


def test_random_crop_and_flip_are_seeded_windows():
    image = np.random.default_rng(2).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    windows = [image[:, o:o + 32] for o in range(33)]
    offsets = set()
    for seed in range(8):
        out = _preprocess(image, 32, seed, random_crop=True, flip=True)
        np.testing.assert_array_equal(out, _preprocess(image, 32, seed, random_crop=True, flip=True))
        matches = [(o, f) for o, w in enumerate(windows) for f in (False, True)
                   if np.array_equal(out, w[:, ::-1] if f else w)]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 2


# --------------------------------------------------------------------------------------------------- configs


# ------------------------------------------------------------------- the layouts of configs/data_example.py, as written

DATA_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "data_example.py")


def _example(variant: str, **paths) -> dict:
    """Variant ``variant`` of configs/data_example.py, loaded from the file as ``--config FILE:variant`` loads it
    (``get_config(variant)`` of the file executed as a module); only the ``paths`` (data_dir, tokenizer, split
    folder) are changed."""
    spec = importlib.util.spec_from_file_location("data_example_file", DATA_EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return data_config(module.get_config(variant).data, **paths)


def _captioned_images(folder, names: list[str], jsonl: bool) -> dict[str, str]:
    """Images ``names`` under ``folder``, captioned by a captions.jsonl or by a .txt beside each; {caption: name}."""
    captions = {f"a small red circle number {i}": name for i, name in enumerate(names)}
    for caption, name in captions.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _write_image(folder / name, size=(48, 36))
        if not jsonl:
            (folder / name).with_suffix(".txt").write_text(caption)
    if jsonl:
        (folder / "captions.jsonl").write_text("".join(json.dumps({"file": name, "caption": caption}) + "\n"
                                                       for caption, name in captions.items()))
    return captions


def _captions_read(data, split: str) -> list[str]:
    """Every caption of one pass over ``split``, in index order, after checking the images' shape."""
    batches = list(make_iterator(data, split, num_epochs=1, shuffle=False))
    for batch in batches:
        assert batch["image"].shape[1:] == (data.image_size, data.image_size, 3)
        assert batch["input_ids"].shape[1] == 16
    return [c.decode() for batch in batches for c in batch["caption"]]


@pytest.mark.parametrize("jsonl", [False, True], ids=["txt captions", "captions.jsonl"])
def test_folder_example_reads_a_flat_folder_for_every_split(tmp_path, tokenizer_dir, jsonl):
    """``:folder`` (split ''): the folder itself, subfolders included, is what the trainer's 'train' (stage 1,
    the latent cache) and 'test' (stage 1's evaluation) read."""
    captions = _captioned_images(tmp_path, ["b.png", "a.jpg", "more/c.png"], jsonl)
    data = _example("folder", data_dir=str(tmp_path), tokenizer=tokenizer_dir)
    assert data.split == ""
    for split in ("train", "test"):
        assert sorted(_captions_read(data, split)) == sorted(captions)


def test_folder_example_with_split_subfolders(tmp_path, tokenizer_dir):
    """``:folder`` with ``split='train'``: each split is the subfolder of its name."""
    train = _captioned_images(tmp_path / "train", ["x.png", "y.png"], jsonl=False)
    test = _captioned_images(tmp_path / "test", ["z.png"], jsonl=True)
    data = _example("folder", data_dir=str(tmp_path), tokenizer=tokenizer_dir, split="train")
    assert sorted(_captions_read(data, "train")) == sorted(train)
    assert _captions_read(data, "test") == list(test)


def test_tiny_shapes_example_reads_both_splits(shapes_dir):
    """``:tiny`` (the 512 / 128 ldm_shapes build), only its TFDS data_dir moved to the module's build.

    ``:shapes`` differs only by the 20k build (30 s to generate) and ``:tfds``
    needs a download, so neither is read here."""
    data = _example("tiny", data_dir=shapes_dir)
    for split, size in (("train", 512), ("test", 128)):
        iterator = make_iterator(data, split)
        batch = next(iterator)
        assert iterator.size == size and batch["image"].shape == (16, 64, 64, 3) and batch["input_ids"].shape[0] == 16


def test_config_validation():
    assert data_config().to_dict() == DEFAULTS
    with pytest.raises(KeyError, match="batchsize"):
        data_config(batchsize=8)
    with pytest.raises(KeyError, match="shuffle_buffer"):
        make_iterator(dict(shuffle_buffer=100))
    with pytest.raises(ValueError, match="data.source"):
        data_config(source="webdataset")
    with pytest.raises(ValueError, match="data.data_dir"):
        data_config(source="folder")
    with pytest.raises(ValueError, match="data.batch_size"):
        data_config(batch_size=0)
    with pytest.raises(TypeError):
        data_config(image_size="64")
    with pytest.raises(AttributeError):
        data_config().batchsize = 8  # locked: a typo is an error, not a new key
    for variant in data_example.VARIANTS:
        data = data_example.get_config(variant).data
        assert data_config(data) == data and set(data) == set(DEFAULTS)


def test_core_modules_do_not_import_tensorflow():
    code = ("import sys, ldm_jax, ldm_jax.sample, ldm_jax.data.config, configs.data_example; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"
