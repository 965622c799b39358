"""`gs://` paths against a local GCS emulator: epath, tf.io.gfile, TensorStore, orbax checkpoints, a pretrained
folder and an image folder."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from etils import epath
from PIL import Image

from configs import tiny
from gcs_emulator import emulator_fixture
from ldm_jax import paths
from ldm_jax.data import input_pipeline
from ldm_jax.data.shapes import write_tokenizer
from ldm_jax.models.clip import load_tokenizer
from ldm_jax.pipeline import Pipeline
from ldm_jax.weights import diffusers_folder

gcs = emulator_fixture()


def test_epath_write_read_list_rename(gcs):
    directory = epath.Path(gcs.uri("epath", "run"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.txt").write_text("hello")
    assert (directory / "a.txt").read_text() == "hello"
    assert directory.is_dir() and (directory / "a.txt").exists()
    (directory / "a.txt").rename(directory / "b.txt")
    assert [p.name for p in directory.iterdir()] == ["b.txt"]
    assert [p.name for p in epath.Path(gcs.uri("epath")).glob("*/*.txt")] == ["b.txt"]
    (directory / "b.txt").unlink()
    assert not (directory / "b.txt").exists()


def test_tf_gfile_and_summary(gcs):
    path = gcs.uri("gfile", "a.bin")
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(bytes(range(256)) * 1000)
    with tf.io.gfile.GFile(path, "rb") as f:
        assert f.read() == bytes(range(256)) * 1000
    writer = tf.summary.create_file_writer(gcs.uri("gfile", "logs"))
    with writer.as_default():
        tf.summary.scalar("loss", 0.5, step=1)
    writer.close()
    assert len(tf.io.gfile.glob(gcs.uri("gfile", "logs", "events.out.tfevents.*"))) == 1


def test_orbax_checkpoint_round_trip(gcs):
    tree = {"w": jnp.arange(1000, dtype=jnp.float32).reshape(10, 100) / 7, "b": jnp.ones((7,), jnp.bfloat16),
            "step": jnp.int32(3)}
    directory = epath.Path(gcs.uri("run", "checkpoints"))
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as manager:
        for step in (1, 2, 3):
            manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3]
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(3, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                                 tree)))
    for name, value in tree.items():
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))


def test_missing_bucket_errors(gcs):
    import tensorstore as ts

    missing = "gs://no-such-bucket/x"
    with pytest.raises(FileNotFoundError, match="404"):
        epath.Path(missing).read_text()
    with pytest.raises(tf.errors.NotFoundError, match="(?s)404.*initiating an upload"):
        epath.Path(missing).write_text("x")
    assert not epath.Path(missing).exists()
    with pytest.raises(ValueError, match="NOT_FOUND.*404"):
        ts.KvStore.open("gs://no-such-bucket/").result().write("x", b"1").result()


def test_a_pretrained_folder_and_an_image_folder_on_gcs_read_as_local_ones(gcs, tmp_path):
    pipe = Pipeline.from_config(tiny.get_config(), jax.random.key(0))
    remote = gcs.uri("pretrained")
    pipe.save_pretrained(remote)
    write_tokenizer(f"{remote}/tokenizer")
    loaded = Pipeline.from_pretrained(remote)
    weights = f"{remote}/unet/diffusion_pytorch_model.safetensors"
    assert paths.safetensors_keys(weights) == sorted(diffusers_folder.read_safetensors(weights))  # header only
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(pipe.params), strict=True):
        np.testing.assert_array_equal(a, b)
    write_tokenizer(str(tmp_path / "tokenizer"))
    local = load_tokenizer(str(tmp_path / "tokenizer"))
    assert loaded.tokenizer("a red circle").input_ids == local("a red circle").input_ids

    images = gcs.uri("images")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), np.uint8)
    for i, image in enumerate(pixels):
        with epath.Path(f"{images}/{i}.png").open("wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        epath.Path(f"{images}/{i}.txt").write_text(f"caption {i}")
    assert input_pipeline.folder_entries(images) == [(f"{images}/{i}.png", f"caption {i}") for i in range(3)]
    source = input_pipeline.folder_source(images, 0, 1)
    read = source.read(tf.constant(2, tf.int64))
    np.testing.assert_array_equal(tf.io.decode_png(read["image"]).numpy(), pixels[2])
    assert read["caption"].numpy() == b"caption 2"
