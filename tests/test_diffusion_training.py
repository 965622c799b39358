"""Stage 2: the loss against diffusers' training recipe, and the whole chain (stage 1 -> cache -> stage 2) on tiny."""

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs import sd15
from ldm_jax.data import latents, shapes
from ldm_jax.diffusion import schedule as sched
from ldm_jax.diffusion.sample_fn import sample_fn
from ldm_jax.evaluation import word_steering
from ldm_jax.models.clip import CLIPTextModel
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.pipeline import init_inputs
from ldm_jax.train import run
from ldm_jax import parallel
from ldm_jax.training import checkpoints
from ldm_jax.training.diffusion import loop as diffusion_loop
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.diffusion.step import (DiffusionTask, diffusion_loss, drop_captions, loss_weights,
                                             sample_timesteps)
from ldm_jax.training.metrics import DeferredWriter, MetricWriter, read_metrics
from tests.test_autoencoder_training import _config
from tests.test_fault_tolerance import _saved

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                 layers_per_block=1, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _tiny_models_and_batch() -> tuple:
    """The tiny U-Net and text encoder, their random params ({'unet'} trained, {'text_encoder'} frozen) and a
    seeded batch of 4 cached latent moments with token ids."""
    unet, text = UNet2DConditionModel.from_diffusers_config(TINY_UNET), CLIPTextModel.from_transformers_config(TINY_TEXT)
    params = {"unet": unet.init(jax.random.key(0), *init_inputs("unet", TINY_UNET))["params"]}
    frozen = {"text_encoder": text.init(jax.random.key(1), *init_inputs("text_encoder", TINY_TEXT))["params"]}
    rng = np.random.default_rng(0)
    batch = {"mean": rng.normal(size=(4, 8, 8, 4)).astype(np.float32),
             "logvar": rng.normal(-3, 1, size=(4, 8, 8, 4)).astype(np.float32),
             "input_ids": rng.integers(3, 1000, (4, 16)).astype(np.int32), "empty_ids": np.zeros((16,), np.int32)}
    return unet, text, params, frozen, batch


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", 0.0), ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_loss_matches_the_diffusers_training_recipe(prediction_type, gamma):
    """Noised latents, targets and min-SNR weights from diffusers' DDPMScheduler (train_text_to_image.py's recipe)."""
    scheduler_config = {**sd15.SD_SCHEDULER, "prediction_type": prediction_type}
    unet, text, params, frozen, batch = _tiny_models_and_batch()
    task = DiffusionTask(unet=unet, text_encoder=text, vae=None, scheduler=tuple(sorted(scheduler_config.items())),
                         scale_factor=0.5, caption_dropout=0.0, min_snr_gamma=gamma)
    key = jax.random.key(7)
    loss, _ = diffusion_loss(task, params, frozen, batch, key)

    # The same draws, then everything else from diffusers / torch.
    latent_rng, _, t_rng, noise_rng = jax.random.split(key, 4)
    eps_z = np.asarray(jax.random.normal(latent_rng, batch["mean"].shape))
    z0 = (batch["mean"] + np.exp(0.5 * batch["logvar"]) * eps_z) * 0.5
    t = np.asarray(jax.random.randint(t_rng, (4,), 0, 1000))
    noise = np.asarray(jax.random.normal(noise_rng, z0.shape))
    ddpm = diffusers.DDPMScheduler.from_config(scheduler_config)
    z0_t, noise_t, t_t = (torch.from_numpy(np.array(a)) for a in (z0, noise, t))
    t_t = t_t.long()
    noisy = ddpm.add_noise(z0_t, noise_t, t_t).numpy()
    target = (noise_t if prediction_type == "epsilon" else ddpm.get_velocity(z0_t, noise_t, t_t)).numpy()
    context = text.apply({"params": frozen["text_encoder"]}, batch["input_ids"])[0]
    prediction = np.asarray(unet.apply({"params": params["unet"]}, jnp.asarray(noisy), jnp.asarray(t), context))
    mse = ((prediction - target) ** 2).mean(axis=(1, 2, 3))
    alphas = ddpm.alphas_cumprod.numpy()[t].astype(np.float64)
    snr = alphas / (1 - alphas)
    if gamma:  # diffusers' train_text_to_image.py: min(snr, gamma) / snr, or / (snr + 1) for v-prediction
        weights = np.minimum(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    else:
        weights = np.ones(4)
    np.testing.assert_allclose(float(loss), (weights * mse).mean(), rtol=2e-5)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_timesteps_follow_their_density(mean, std):
    """The empirical CDF of 200k draws against P(t < k) = P(sigmoid(mean + std * n) < k / T), from math.erf."""
    t = np.asarray(sample_timesteps(jax.random.key(0), 200_000, 1000, "logit_normal", mean, std))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    for k in (50, 200, 500, 800, 950):
        expected = 0.5 * (1 + math.erf((math.log(k / (1000 - k)) - mean) / (std * math.sqrt(2))))
        assert abs((t < k).mean() - expected) < 0.005, (k, (t < k).mean(), expected)
    with pytest.raises(ValueError, match=r"unknown timestep sampling 'cosine'; known: \['uniform', 'logit_normal'\]"):
        sample_timesteps(jax.random.key(0), 4, 1000, "cosine")


def test_caption_dropout_replaces_that_fraction_with_the_empty_prompt():
    ids = np.arange(20000 * 4, dtype=np.int32).reshape(20000, 4) + 10
    empty = np.asarray([0, 1, 1, 1], np.int32)
    out = np.asarray(drop_captions(ids, empty, 0.1, jax.random.key(0)))
    dropped = (out == empty).all(axis=1)
    np.testing.assert_array_equal(out[~dropped], ids[~dropped])
    assert abs(dropped.mean() - 0.1) < 0.006  # 20000 draws: std 0.002
    assert not np.asarray(drop_captions(ids, empty, 0.0, jax.random.key(0)) == empty).all(axis=1).any()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The whole chain on tiny models: stage 1 (2 steps), the cache, stage 2 (4 steps, checkpoints at 2 and 4)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.prepare(data_dir, "tiny")
    config = _config(data_dir, stages="autoencoder,latents,diffusion", autoencoder=dict(steps=2),
                     diffusion=_DIFFUSION)
    workdir = str(tmp_path_factory.mktemp("run"))
    run(config, workdir)
    return config, workdir, data_dir


_DIFFUSION = dict(steps=4, log_every=1, checkpoint_every=2, sample_every=0, sample_steps=2, train_text_encoder=True,
                  ema_decay=0.99, optimizer=dict(learning_rate=1e-3, warmup_steps=1))


def test_chain_trains_checkpoints_and_samples(chain):
    config, workdir, _ = chain
    assert checkpoints.available_steps(workdir) == [2, 4]
    losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    grid = Image.open(os.path.join(workdir, "samples", "step_000004.png"))
    assert grid.size == (3 * 32, 3 * 32)  # 8 prompts: a 3 x 3 grid of 32 px images
    pipe = checkpoints.load_pipeline(workdir)
    raw = checkpoints.load_pipeline(workdir, use_ema=False)
    assert pipe.scale_factor == raw.scale_factor != 1.0  # the stage-1 estimate, not the config's 1.0
    differs = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(pipe.params["unet"]),
                                                     jax.tree.leaves(raw.params["unet"]))]
    assert any(differs)  # EMA params are saved beside the raw ones and preferred
    ids = np.asarray(pipe.tokenizer(["a small red circle at the top left"], padding="max_length",
                                    max_length=16)["input_ids"], np.int32)
    images = sample_fn(pipe.params, ids, ids, jax.random.key(0), models=pipe.models, steps=2, height=32, width=32)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(images)).all()


def test_evaluate_scores_samples_floor_and_ceilings(chain):
    _, workdir, _ = chain
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    done = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate", "--checkpoint", workdir, "--count", "4",
                           "--batch", "4", "--steps", "2", "--out", os.path.join(workdir, "eval_step_4.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "eval_step_4.json")) as f:
        report = json.load(f)
    assert report["count"] == 4 and report["step"] == 4
    sizes = {shapes.example("test", i)["size"] for i in range(4)}  # the subsets: sizes that occur, held-out pairs
    for name in ("conditional", "unconditional", "real_images", "vae_reconstructions"):
        assert name in done.stdout
        assert set(report[name]) == {"all", "held_out", *sizes}
        for subset in report[name]:
            assert all(0.0 <= v <= 1.0 for v in report[name][subset].values())
    assert report["real_images"]["all"]["all"] == 1.0  # the checker reads these four test images right
    for name in ("conditional", "vae_reconstructions"):  # every prompt counted once, under its size and shape
        counts = {size: sum(n for row in table.values() for n in row.values())
                  for size, table in report["shape_confusion"][name].items()}
        assert counts == dict(Counter(shapes.example("test", i)["size"] for i in range(4)))
        for size, table in report["shape_confusion"][name].items():
            read_right = sum(table[shape][shape] for shape in table) / counts[size]
            assert read_right == pytest.approx(report[name][size]["shape"])
    assert "shapes read (columns)" in done.stdout
    # A 2-step VAE reconstructs nothing recognisable: far below the real images.
    assert report["vae_reconstructions"]["all"]["all"] < 1.0


def test_evaluate_img2img_from_the_test_images_and_a_bad_strength(chain):
    _, workdir, _ = chain
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    command = [sys.executable, "-m", "ldm_jax.evaluate", "--checkpoint", workdir, "--count", "3", "--batch", "2",
               "--steps", "2"]
    out = os.path.join(workdir, "eval_step_4_strength_0.5.json")
    done = subprocess.run([*command, "--strength", "0.5", "--out", out], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    assert report["strength"] == 0.5 and report["count"] == 3  # 3 prompts in batches of 2: the last one padded
    assert all(0.0 <= v <= 1.0 for v in report["conditional"]["all"].values())
    for strength in ("0", "1.5"):
        bad = subprocess.run([*command, "--strength", strength], capture_output=True, text=True, env=env, timeout=600)
        assert bad.returncode != 0 and "strength" in bad.stderr, bad.stderr[-2000:]


def test_stopped_and_resumed_run_matches_uninterrupted(chain, tmp_path):
    config, workdir, data_dir = chain
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))  # as if stopped right after step 2
    run(_config(data_dir, stages="diffusion", diffusion=_DIFFUSION), resumed)
    a = checkpoints.load_pipeline(workdir, 4, use_ema=False).params
    b = checkpoints.load_pipeline(resumed, 4, use_ema=False).params
    for name in ("unet", "text_encoder"):
        for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
            np.testing.assert_array_equal(x, y)


def assert_trained_alike(got, expected) -> None:
    """The trees of two short runs of one training, their gradients summed in another order, are alike.

    Adam divides by the gradient's root mean square, so near-zero gradient entries summed in another order move
    by up to ~1e-5 after a few steps of 1e-3 (the whole update): each leaf within 1e-3 of its largest entry. A
    text encoder's key biases have a zero gradient (softmax ignores a score added to every key), so Adam turns
    their rounding noise into steps: in both runs they must stay below 2e-4, far from the 1e-3 a step of a real
    gradient moves a parameter.
    """
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected), strict=True):
        if "k_proj" in jax.tree_util.keystr(path) and np.ndim(x) == 1:
            assert max(np.abs(x).max(), np.abs(y).max()) < 2e-4, jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3 * float(np.abs(y).max()),
                                       err_msg=jax.tree_util.keystr(path))


def _start_stage2_on_one_device(chain, workdir: str, batch_slices: int) -> subprocess.Popen:
    """Start stage 2 of the chain (2 steps, the text encoder trained) in a new process on one CPU device, from a
    copy of the chain's workdir without its stage-2 checkpoints (its stderr piped)."""
    _, source, data_dir = chain
    shutil.copytree(source, workdir)
    shutil.rmtree(checkpoints.checkpoint_dir(workdir))
    diffusion = {**_DIFFUSION, "steps": 2, "sample_every": -1, "batch_slices": batch_slices}
    code = ("from absl import logging; from ldm_jax.train import run; "
            "from tests.test_autoencoder_training import _config; logging.set_verbosity('info'); "
            f"run(_config({data_dir!r}, stages='diffusion', diffusion={diffusion!r}), {workdir!r})")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "PYTHONPATH": root}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=root)


# About 75 s (two trainer runs): -m slow (CI time budget); tests/test_cpu_step.py checks the same equality at the step.
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU device takes 2 batch slices with 2 cores")
def test_the_trainer_runs_concurrent_slices_on_one_cpu_device_as_it_runs_one_program(chain, tmp_path):
    """The stage-2 loop on one CPU device with 2 cores, the text encoder trained: auto batch slices (0) run 2
    slices as concurrent programs, and its checkpoint (params, EMA, optimizer moments) and logged losses match
    one program's (1)."""
    processes = {slices: _start_stage2_on_one_device(chain, str(tmp_path / str(slices)), slices)
                 for slices in (0, 1)}  # side by side: most of each is a single-threaded compile
    logs = {slices: process.communicate(timeout=600)[1] for slices, process in processes.items()}
    for slices, process in processes.items():
        assert process.returncode == 0, logs[slices][-3000:]
    assert "runs on 2 slice(s) of each device's batch, as concurrent programs" in logs[0]
    assert "runs on 1 slice(s) of each device's batch\n" in logs[1]
    losses = {slices: [r["train/loss"] for r in read_metrics(str(tmp_path / str(slices))) if "train/loss" in r]
              for slices in logs}
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)
    assert_trained_alike(*(_saved(str(tmp_path / str(slices)), 2) for slices in logs))


@pytest.mark.parametrize("state_layout", ["auto", "default"])
def test_compiled_step_takes_its_state_in_the_layouts_it_chose(state_layout):
    """`compile_with_state` lowers the state abstractly and moves it into the compiled step's input formats;
    stepping through it gives what the plain jitted step gives (the GPU case, where 'auto' picks cuDNN's
    kernel layouts, is checked on an H200: docs/experiments.md)."""
    mesh = parallel.make_mesh({})
    sharding = parallel.replicated(mesh)
    state = {"kernel": jnp.arange(3 * 3 * 4 * 8, dtype=jnp.float32).reshape(3, 3, 4, 8) / 100, "step": jnp.int32(0)}
    images = jnp.ones((2, 6, 6, 4))

    def step(state, images):
        loss = lambda k: jnp.mean(jax.lax.conv_general_dilated(images, k, (1, 1), "SAME",
                                                               dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
        value, grad = jax.value_and_grad(loss)(state["kernel"])
        return {"kernel": state["kernel"] - 0.1 * grad, "step": state["step"] + 1}, value

    formats = diffusion_state.state_formats(jax.tree.map(lambda _: sharding, state), state_layout)
    jitted = jax.jit(step, in_shardings=(formats, sharding), out_shardings=(formats, sharding), donate_argnums=0)
    expected, expected_loss = jax.jit(step)(jax.tree.map(jnp.copy, state), images)
    compiled, placed = diffusion_state.compile_with_state(jitted, state, images)
    assert jax.tree.map(lambda x: x.format, placed) == compiled.input_formats[0][0]
    placed, loss = compiled(placed, images)
    assert float(loss) == float(expected_loss) and int(placed["step"]) == 1
    np.testing.assert_array_equal(np.asarray(placed["kernel"]), np.asarray(expected["kernel"]))


def test_init_from_fine_tunes_a_pretrained_pipeline(chain, tmp_path):
    """init_from=a diffusers folder: its VAE (and scale factor) makes the cache, its U-Net and text encoder start
    stage 2, its tokenizer is kept. With a zero learning rate the trained params stay the pretrained ones."""
    _, workdir, data_dir = chain
    source = checkpoints.load_pipeline(workdir, 4, use_ema=False)
    folder = str(tmp_path / "pretrained")
    source.save_pretrained(folder)
    run_dir = str(tmp_path / "finetune")
    config = _config(data_dir, stages="latents,diffusion", init_from=folder,
                     diffusion={**_DIFFUSION, "steps": 1, "ema_decay": 0.0,
                                "optimizer": dict(learning_rate=0.0, weight_decay=0.0)})
    run(config, run_dir)
    tuned = checkpoints.load_pipeline(run_dir, 1)
    assert tuned.scale_factor == pytest.approx(source.scale_factor)
    assert os.path.isdir(os.path.join(run_dir, "tokenizer"))
    for name in ("unet", "text_encoder", "vae"):
        for x, y in zip(jax.tree.leaves(source.params[name]), jax.tree.leaves(tuned.params[name])):
            np.testing.assert_array_equal(x, y)
    manifest = latents.read_manifest(os.path.join(run_dir, "latents"))
    assert manifest["vae"]["source"] == os.path.abspath(folder)


def test_deferred_writer_writes_each_record_one_push_late(tmp_path):
    writer = DeferredWriter(MetricWriter(str(tmp_path)), prefix="train/")
    assert writer.push(1, {"loss": jnp.float32(0.5)}) is None
    assert read_metrics(str(tmp_path)) == []  # nothing fetched yet
    assert writer.push(2, {"loss": jnp.float32(0.25), "lr": 1e-3}) == {"train/loss": 0.5}
    assert writer.flush() == {"train/loss": 0.25, "train/lr": 1e-3}
    assert writer.flush() is None
    assert read_metrics(str(tmp_path)) == [{"step": 1, "train/loss": 0.5},
                                           {"step": 2, "train/loss": 0.25, "train/lr": 1e-3}]


def test_restart_drops_records_past_the_resumed_step_and_a_line_cut_by_a_kill(tmp_path):
    """metrics.jsonl as a run killed while writing step 5 leaves it; resuming from the checkpoint of step 2."""
    lines = [json.dumps({"step": step, "train/loss": 1.0 / (step + 1)}) + "\n" for step in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "train/lo')
    assert MetricWriter(str(tmp_path)).restart_at(2) == 3  # steps 3 and 4, and the cut line
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2]
    assert MetricWriter(str(tmp_path)).restart_at(0) == 3  # a fresh start keeps nothing
    assert read_metrics(str(tmp_path)) == []


def test_logged_metrics_are_the_values_of_their_steps(chain, tmp_path):
    """The loop fetches metrics one log interval late: a rerun logging every 3 steps writes at steps 3 and 4
    exactly the values the chain (logging every step) wrote there."""
    _, workdir, data_dir = chain
    rerun = str(tmp_path / "rerun")
    shutil.copytree(workdir, rerun)
    for name in ("checkpoints", "metrics.jsonl", "tensorboard", "samples"):
        path = os.path.join(rerun, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run(_config(data_dir, stages="diffusion", diffusion={**_DIFFUSION, "log_every": 3}), rerun)
    every_step = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    logged = [r for r in read_metrics(rerun) if "train/loss" in r]
    assert [r["step"] for r in logged] == [3, 4]
    for record in logged:
        for key in ("train/loss", "train/mse", "train/weight", "train/grad_norm", "train/lr"):
            assert record[key] == every_step[record["step"]][key], (record["step"], key)


def test_run_config_speed_settings_reach_the_stage_2_modules(chain):
    """attention_impl reaches the U-Net, the text encoder and the sampling VAE; remat_policy the U-Net; bfloat16
    the compute dtype; the EMA warmup and timestep sampling the step. No params change: stage 2 builds its
    modules from the same configs."""
    _, workdir, data_dir = chain
    config = _config(data_dir, stages="diffusion", attention_impl="xla",
                     diffusion={**_DIFFUSION, "remat_policy": "full", "dtype": "bfloat16", "ema_warmup": False,
                                "timestep_sampling": "logit_normal", "timestep_logit_mean": 0.3,
                                "timestep_logit_std": 0.8})
    _, stage = diffusion_loop.setup(config, workdir)
    for module in (stage.task.unet, stage.task.text_encoder, stage.models.unet, stage.models.vae):
        assert module.attention_impl == "xla" and module.dtype == jnp.bfloat16
    assert stage.task.unet.remat_policy == "full"
    task = stage.task
    assert (task.ema_warmup, task.timestep_sampling, task.logit_mean, task.logit_std) == (
        False, "logit_normal", 0.3, 0.8)
    assert stage.configs["unet"] == config.unet.to_dict()  # the saved diffusers config holds neither setting


@pytest.mark.parametrize("prediction_type,limit", [("epsilon", 1.0), ("v_prediction", 0.0)])
def test_min_snr_weights_at_a_zero_terminal_snr_are_their_limits(prediction_type, limit):
    """min(snr, 5) / snr -> 1 and min(snr, 5) / (snr + 1) -> 0 as snr -> 0: finite at t = T, not 0 / 0."""
    config = {**sd15.SD_SCHEDULER, "prediction_type": prediction_type, "rescale_betas_zero_snr": True}
    schedule = sched.NoiseSchedule.from_config(config)
    weights = np.asarray(loss_weights(schedule, jnp.asarray([0, 500, 999]), 5.0))
    assert np.isfinite(weights).all()
    assert weights[2] == limit
    assert 0.0 < weights[1] <= 1.0


def test_swap_word_changes_only_that_attribute():
    rng = np.random.default_rng(0)
    for i in range(20):
        example = shapes.example("test", i)
        for attribute in ("shape", "colour", "position"):
            caption, value = word_steering.swap_word(example, attribute, rng)
            assert value != example[attribute]
            assert caption == shapes.caption(**{**{a: example[a] for a in ("shape", "colour", "size", "position")},
                                                attribute: value})
    with pytest.raises(ValueError, match="unknown attribute 'texture'"):
        word_steering.swap_word(shapes.example("test", 0), "texture", rng)


def test_evaluate_steering_reports_each_noise_level_and_size(chain):
    _, workdir, _ = chain
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    command = [sys.executable, "-m", "ldm_jax.evaluate", "--checkpoint", workdir, "--count", "3", "--batch", "2",
               "--steering"]
    out = os.path.join(workdir, "eval_step_4_steering.json")
    done = subprocess.run([*command, "--steering_timesteps", "0,500", "--out", out], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        report = json.load(f)
    sizes = [shapes.example("test", i)["size"] for i in range(3)]
    assert set(report["steering"]) == {"all", *sizes} and report["count"] == 3
    for subset, rows in report["steering"].items():
        assert set(rows) == {"0", "500"}
        count = 3 if subset == "all" else sizes.count(subset)
        for row in rows.values():  # fractions of `count` images (3 images in batches of 2: counts weighted)
            assert set(row) == set(word_steering.PROMPTS)
            assert all(round(v * count, 6) == round(v * count) for v in row.values())
    assert "all / t = 500" in done.stdout
    bad = subprocess.run([*command, "--steering_timesteps", "1000"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert bad.returncode != 0 and "steering_timesteps must lie in [0, 1000)" in bad.stderr, bad.stderr[-2000:]
