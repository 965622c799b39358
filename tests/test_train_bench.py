"""bench/train_bench.py and bench/stage2.py: the step-by-step ratio of the peer comparison; the diffusers peer does
the trainer's work (the same losses from the same weights and random draws); the bench's ldm_jax runner is the
trainer's step, on latents or on pixels; XLA's costs of a step of several programs."""

import itertools
import statistics

import jax
import numpy as np
import pytest
import torch

from bench import stage2, train_bench
from configs import base, tiny
from ldm_jax.models import clip
from ldm_jax.pipeline import abstract_params, model_configs
from ldm_jax.testing import numpy_state_dict
from ldm_jax.training.compile_cost import program_cost
from ldm_jax.training.cpu_step import ConcurrentSliceStep
from ldm_jax.training.diffusion.step import sample_latents, sample_timesteps
from ldm_jax.weights import convert

# Caption dropout, v-prediction on a zero-terminal-SNR schedule, logit-normal timesteps, AdamW with weight decay and
# a clipping threshold every step reaches, EMA: every part of the step the diffusers peer mirrors.
SETTINGS = dict(caption_dropout=0.5, ema_decay=0.99, timestep_sampling="logit_normal", timestep_logit_mean=0.5,
                optimizer=dict(learning_rate=1e-3, weight_decay=0.01, grad_clip=0.05))


def _tiny_configs() -> dict:
    return dict(model_configs(tiny.get_config()), scheduler=dict(base.SCHEDULER))


def test_pair_ratios_cancel_a_change_of_speed_that_the_ratio_of_medians_keeps():
    # ldm_jax is 1.25x faster throughout; the machine halves its speed between ldm_jax's third step and the
    # diffusers step after it.
    ours = [0.100, 0.100, 0.100, 0.200, 0.200]
    theirs = [0.125, 0.125, 0.250, 0.250, 0.250]
    assert statistics.median(theirs) / statistics.median(ours) == pytest.approx(2.5)
    assert train_bench.pair_ratios(theirs, ours) == pytest.approx([1.25, 1.25, 1.25])
    assert train_bench.pair_ratios([0.1, 0.3, 0.2, 0.4], [0.2, 0.1, 0.1, 0.2]) == pytest.approx(
        [1.625, 2.0, 2.25])  # ratios 0.5, 3, 2, 2
    with pytest.raises(ValueError):
        train_bench.pair_ratios([0.1, 0.2], [0.1])


def test_the_diffusers_peer_trains_as_the_trainers_step():
    """From the same weights and the trainer's random draws, three steps of diffusers' step give the trainer's
    losses: the same latent sample, dropout, text context, noised input, v target, U-Net, MSE, clipping and
    AdamW (a difference in an update shows in the next step's loss)."""
    configs, settings = _tiny_configs(), stage2.settings(**SETTINGS)
    batch = stage2.moments_batch(4, (8, 8, 4), configs["text_encoder"])
    torch_models = stage2.diffusers_models(configs, "cpu", ("unet", "text_encoder"))
    prepared = stage2.prepare(configs, settings, batch, 0.5)  # the models, to convert the torch weights for
    modules = {"unet": prepared["stage"].task.unet, "text_encoder": prepared["stage"].task.text_encoder}
    states = {"unet": numpy_state_dict(torch_models["unet"]),
              "text_encoder": clip.normalize_state_dict(numpy_state_dict(torch_models["text_encoder"]))}
    pretrained = {name: convert.state_dict_to_params(states[name], abstract_params(module, name, configs[name]),
                                                     what=name)
                  for name, module in modules.items()}
    prepared = stage2.prepare(configs, settings, batch, 0.5, pretrained=pretrained)
    stage, (_, device_batch, frozen, rng) = prepared["stage"], prepared["args"]
    assert stage.batch_slices == 1  # the 8 fake CPU devices that conftest.py sets
    step, state = stage.step.compile(*prepared["args"])
    ours = []
    for _ in range(3):
        state, metrics = step(state, device_batch, frozen, rng)
        ours.append(float(metrics["loss"]))

    count, size, nchw = itertools.count(), len(batch["mean"]), lambda x: torch.from_numpy(
        np.array(x).transpose(0, 3, 1, 2).copy())

    def trainers_draws():  # as step.noised_batch splits the step's key
        latent_rng, drop_rng, t_rng, noise_rng = jax.random.split(jax.random.fold_in(rng, next(count)), 4)
        t = sample_timesteps(t_rng, size, 1000, "logit_normal", 0.5, 1.0)
        return dict(eps=nchw(jax.random.normal(latent_rng, batch["mean"].shape)), noise=nchw(
            jax.random.normal(noise_rng, batch["mean"].shape)), t=torch.from_numpy(np.array(t)).long(),
            drop=torch.from_numpy(np.array(jax.random.bernoulli(drop_rng, 0.5, (size,)))))

    theirs_step = stage2.diffusers_step(configs, settings, batch, 0.5, models=torch_models, draws=trainers_draws)
    theirs = [train_bench.checked(theirs_step().item()) for _ in range(3)]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4)
    assert len(set(np.round(ours, 4))) == 3  # the weights changed between steps
    with pytest.raises(ValueError, match="min_snr_gamma"):
        stage2.diffusers_step(configs, {**settings, "min_snr_gamma": 5.0}, batch, 0.5, models=torch_models)


def test_the_bench_runs_the_trainers_step_on_latents_and_on_pixels():
    """The pixel variant feeds the step the pixels themselves (z0 = the images at scale 1) to a U-Net of 3
    channels; its runner is the trainer's one-program step (as the latent one, whose losses
    `test_the_diffusers_peer_trains_as_the_trainers_step` checks), with finite losses and XLA's costs; the memory
    of the step as concurrent slice programs counts its two slice programs side by side."""
    spec = dict(configs=_tiny_configs(), image_size=16)
    variants = train_bench.pixel_variants(spec, 2)
    pixel = variants["pixel"]
    assert pixel["scale"] == 1.0 and pixel["batch"]["mean"].shape == (2, 16, 16, 3)
    assert {pixel["configs"]["unet"][key] for key in ("in_channels", "out_channels", "sample_size")} == {3, 16}
    assert variants["latent"]["batch"]["mean"].shape == (2, 4, 4, 4)
    z0 = sample_latents(pixel["batch"], jax.random.key(0), pixel["scale"])
    np.testing.assert_allclose(z0, pixel["batch"]["mean"], atol=1e-5)

    settings = stage2.settings(**SETTINGS)
    costs, call = train_bench.jax_runner(pixel["configs"], settings, pixel["batch"], pixel["scale"])
    assert costs["batch_slices"] == 1 and costs["programs"] == ["train_step"]
    assert costs["model_flops"] > 1e6 and costs["flops"] > 0 and costs["compile_s"] > 0
    assert costs["memory_bytes"] >= costs["argument"] > 0
    losses = [call(), call()]
    assert all(np.isfinite(losses)) and losses[0] != losses[1]

    latent = variants["latent"]
    prepared = stage2.prepare(latent["configs"], settings, latent["batch"], latent["scale"])
    stage = prepared["stage"]
    sliced, _ = ConcurrentSliceStep(stage.task, stage.optimizer, 2).compile(*prepared["args"])
    costs = {name: program_cost(program) for name, program in sliced.programs.items()}
    together = costs["slice_gradients"]
    assert stage2.step_costs(sliced)["memory_bytes"] == max(
        costs["prepare"]["memory_bytes"], costs["update"]["memory_bytes"],
        2 * together["memory_bytes"] - together["argument_bytes"])
    assert stage2.step_costs(sliced)["memory_bytes"] < sum(program["memory_bytes"] for program in costs.values())
