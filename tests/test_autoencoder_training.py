"""Stage 1 and the latent cache end to end on the tiny config: train, checkpoint, resume, encode, refuse to mix."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd15, tiny
from ldm_jax.data import latents, shapes
from ldm_jax.data.input_pipeline import make_iterator
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.train import run
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder.state import stage_dir
from ldm_jax.training.latent_cache import cache_folder, load_frozen_vae
from ldm_jax.training.metrics import read_metrics
from ldm_jax.training.run_config import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the tiny ldm_shapes build."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir, "tiny")
    return data_dir


def _config(data_dir: str, **changes):
    base = tiny.get_config()
    sections = dict(
        unet=base.unet.to_dict(), vae=base.vae.to_dict(), text_encoder=base.text_encoder.to_dict(),
        scheduler=sd15.SD_SCHEDULER, workdir="unused", stages="autoencoder,latents",
        data=dict(source="shapes", name="ldm_shapes/tiny", data_dir=data_dir, batch_size=8, image_size=32,
                  max_length=16),
        autoencoder=dict(steps=3, disc_start=2, log_every=1, eval_every=0, eval_examples=16, checkpoint_every=2,
                         disc_channels=8, disc_layers=2, optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9),
                         disc_optimizer=dict(learning_rate=1e-3, b1=0.5, b2=0.9)),
        latents=dict(batch_size=16, shard_size=200),
    )
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(sections.get(key), dict):
            sections[key] = {**sections[key], **value}
        else:
            sections[key] = value
    return run_config(**sections)


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """A workdir after stages autoencoder + latents on the tiny config (3 steps, checkpoints at 2 and 3)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config(shapes_dir)
    run(config, workdir)
    return config, workdir


def _vae_params(workdir: str, step: int):
    folder = stage_dir(workdir)
    with checkpoints.checkpoint_manager(folder, keep=None, create=False) as manager:
        metadata = checkpoints.params_metadata(manager, step)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), metadata["vae"])
        params = checkpoints.restore_params(manager, step, {"vae": abstract}, metadata)["vae"]
        saved = checkpoints.read_config(manager, step)
    return params, saved


def test_stage1_trains_and_checkpoints(trained):
    config, workdir = trained
    folder = stage_dir(workdir)
    assert checkpoints.available_steps(folder) == [2, 3]
    records = read_metrics(folder)
    train = [r for r in records if "train/total_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["train/total_loss"]) for r in train)
    # The discriminator trains from disc_start = 2 on: zero loss before, a real hinge loss after; the
    # autoencoder's adversarial term is left out before it (g_loss and its weight 0) and joins from it.
    assert train[0]["train/disc_loss"] == 0.0 and train[2]["train/disc_loss"] > 0.0
    assert train[0]["train/g_loss"] == train[0]["train/d_weight"] == 0.0
    assert train[2]["train/g_loss"] != 0.0 and train[2]["train/d_weight"] > 0.0
    assert train[2]["train/disc_factor"] == 1.0
    tests = [r for r in records if "test/eval_psnr" in r]
    assert [r["step"] for r in tests] == [3] and 0.0 < tests[0]["test/eval_psnr"] < 60.0
    first, _ = _vae_params(workdir, 2)
    last, saved = _vae_params(workdir, 3)
    assert saved["eval"]["eval_psnr"] == pytest.approx(tests[0]["test/eval_psnr"])
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last)))


def test_scale_factor_is_inverse_std_of_first_batch_latents(trained):
    config, workdir = trained
    params, saved = _vae_params(workdir, 3)
    assert saved["configs"]["vae"]["scaling_factor"] == saved["scale_factor"]
    images = next(make_iterator(config.data, "train", seed=config.seed))["image"]
    vae = AutoencoderKL.from_diffusers_config(saved["configs"]["vae"])
    posterior = vae.apply({"params": params}, jnp.asarray(images), method="encode")
    # Independent estimate: the std of a posterior sample is sqrt(E[var] + Var[mean]) over all elements.
    mean, var = np.asarray(posterior.mean, np.float64), np.exp(np.asarray(posterior.logvar, np.float64))
    expected = 1.0 / np.sqrt(var.mean() + mean.var())
    assert saved["scale_factor"] == pytest.approx(expected, rel=0.05)


def test_resume_continues_from_latest_checkpoint(trained, shapes_dir, tmp_path):
    config, workdir = trained
    resumed = str(tmp_path / "run")
    shutil.copytree(workdir, resumed)
    run(_config(shapes_dir, stages="autoencoder", autoencoder=dict(steps=5, checkpoint_every=5)), resumed)
    folder = stage_dir(resumed)
    assert checkpoints.available_steps(folder) == [2, 3, 5]
    steps = [r["step"] for r in read_metrics(folder) if "train/total_loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # steps 1-3 from the first run, 4-5 resumed at step 3


def test_latent_cache_holds_the_vae_moments_of_every_example(trained):
    config, workdir = trained
    folder = cache_folder(config, workdir)
    manifest = latents.read_manifest(folder)
    assert manifest["format"] == latents.FORMAT
    assert manifest["splits"]["train"]["count"] == 512
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 200 + 200 + 112 rows
    assert manifest["latent_shape"] == [8, 8, 4]
    params, saved = _vae_params(workdir, 3)
    assert manifest["vae"]["step"] == 3 and manifest["scale_factor"] == saved["scale_factor"]
    reader = latents.LatentIterator(folder, "train", batch_size=8, seed=0)
    rows = reader.gather(np.arange(512))
    np.testing.assert_array_equal(np.sort(rows["index"]), np.arange(512))
    # Recompute some rows with the VAE on the dataset's images (one device, unsharded).
    batch = next(make_iterator(config.data, "train", num_epochs=1, shuffle=False))
    vae = AutoencoderKL.from_diffusers_config(saved["configs"]["vae"])
    posterior = vae.apply({"params": params}, jnp.asarray(batch["image"]), method="encode")
    position = {int(i): k for k, i in enumerate(rows["index"])}
    order = [position[int(i)] for i in batch["index"]]
    np.testing.assert_allclose(rows["mean"][order], posterior.mean, atol=1e-5)
    np.testing.assert_allclose(rows["logvar"][order], posterior.logvar, atol=1e-5)
    np.testing.assert_array_equal(rows["input_ids"][order], batch["input_ids"])
    assert rows["caption"][order].tolist() == batch["caption"].tolist()


def test_latent_iterator_order_is_a_function_of_seed_and_step(trained):
    config, workdir = trained
    folder = cache_folder(config, workdir)
    run_a = latents.LatentIterator(folder, "train", batch_size=8, seed=3)
    batches = [next(run_a)["index"] for _ in range(70)]  # 70 * 8 > 512: crosses an epoch
    epoch = np.concatenate(batches)[:512]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(512))
    resumed = latents.LatentIterator(folder, "train", batch_size=8, seed=3, start_step=65)
    for k in range(65, 70):
        np.testing.assert_array_equal(next(resumed)["index"], batches[k])
    other_seed = latents.LatentIterator(folder, "train", batch_size=8, seed=4)
    assert not np.array_equal(next(other_seed)["index"], batches[0])
    hosts = [latents.LatentIterator(folder, "train", batch_size=8, seed=3, process_index=p, process_count=2)
             for p in range(2)]
    seen = [np.concatenate([next(h)["index"] for _ in range(64)]) for h in hosts]  # 64 * 4 = 256 each
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0]) | set(seen[1])) == 512


def test_cache_refuses_another_vae_and_other_data(trained, shapes_dir, tmp_path):
    config, workdir = trained
    folder = cache_folder(config, workdir)
    before = latents.read_manifest(folder)
    other_vae = str(tmp_path / "other")
    run(_config(shapes_dir, stages="autoencoder", seed=1, autoencoder=dict(steps=1, checkpoint_every=1)),
        other_vae)
    mixed = _config(shapes_dir, vae_from=other_vae, latents=dict(dir=folder))
    with pytest.raises(latents.CacheMismatchError, match="refusing to mix latents of two VAEs"):
        latents.ensure_cache(mixed, load_frozen_vae(mixed, other_vae), folder, ["train"])
    changed = _config(shapes_dir, data=dict(flip=True), latents=dict(dir=folder))
    with pytest.raises(latents.CacheMismatchError, match="flip: cache False vs config True"):
        latents.ensure_cache(changed, load_frozen_vae(changed, workdir), folder, ["train"])
    assert latents.read_manifest(folder) == before  # nothing already saved was touched


def test_interrupted_cache_is_rebuilt_and_new_splits_added(trained, tmp_path):
    config, workdir = trained
    folder = str(tmp_path / "latents")
    shutil.copytree(cache_folder(config, workdir), folder)
    os.remove(os.path.join(folder, latents.MANIFEST))  # as if the build died before its last write
    np.save(os.path.join(folder, "train", "00000-00099.mean.npy"), np.zeros((3, 8, 8, 4), np.float32))
    vae = load_frozen_vae(config, workdir)
    manifest = latents.ensure_cache(config, vae, folder, ["train", "test"])
    assert manifest["splits"]["train"]["count"] == 512 and manifest["splits"]["test"]["count"] == 128
    assert not os.path.exists(os.path.join(folder, "train", "00000-00099.mean.npy"))


def test_train_and_encode_latents_commands(shapes_dir, tmp_path):
    """The two commands as users type them (a relative workdir), on configs/vae.py:quick plus a latents stage."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": ROOT}
    args = ["--config", os.path.join(ROOT, "configs", "vae.py") + ":quick", "--workdir", "run",
            f"--config.data.data_dir={shapes_dir}"]
    subprocess.run([sys.executable, "-m", "ldm_jax.train", *args, "--config.stages=autoencoder,latents"],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    workdir = str(tmp_path / "run")
    assert checkpoints.available_steps(stage_dir(workdir)) == [2, 4]
    manifest = json.load(open(os.path.join(workdir, "latents", latents.MANIFEST)))
    assert manifest["splits"]["train"]["count"] == 512 and manifest["latent_shape"] == [32, 32, 4]
    assert manifest["vae"]["step"] == 4
    result = subprocess.run([sys.executable, "-m", "ldm_jax.encode_latents", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "latent cache ready: {'train': 512}" in result.stderr, result.stderr[-2000:]
    typo = subprocess.run([sys.executable, "-m", "ldm_jax.train", *args, "--config.autoencoder.step=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert typo.returncode != 0 and "autoencoder has no key 'step'; did you mean autoencoder.steps?" in typo.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_stage1_non_finite_steps_follow_the_nan_policy(shapes_dir, tmp_path, policy):
    """A learning rate of 1e30 overflows the VAE after its first update: 'stop' names the step and keeps the
    finite checkpoint; 'skip' finishes with every bad update counted and never applied."""
    from ldm_jax.training.nonfinite import NonFiniteError

    workdir = str(tmp_path / policy)
    config = _config(shapes_dir, stages="autoencoder", autoencoder=dict(
        steps=4, checkpoint_every=1, disc_start=100, nan_policy=policy,
        optimizer=dict(learning_rate=1e30, b1=0.5, b2=0.9)))
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"stage 1: non-finite loss or gradient at step \d+"):
            run(config, workdir)
    else:
        run(config, workdir)
        skips = [row["train/nonfinite_skips"] for row in read_metrics(stage_dir(workdir))
                 if "train/nonfinite_skips" in row]
        assert skips[-1] >= 1
    folder = stage_dir(workdir)
    with checkpoints.checkpoint_manager(folder, keep=None, create=False) as manager:
        latest = manager.latest_step()
    assert latest is not None and (policy == "stop" or latest == 4)
    params, _ = _vae_params(workdir, latest)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
