"""The PatchGAN discriminator against taming's layout, and the stage-1 autoencoder losses.

Loss tests use a tiny AutoencoderKL, discriminator and LPIPS on 32 x 32
images; the expected values are recomputed independently (numpy formulas,
the gradient of each loss piece through the whole autoencoder).
"""

import dataclasses
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax import testing as refs
from ldm_jax.testing import discriminator as disc_ref

from ldm_jax.weights import convert
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.training.autoencoder import losses

START = 100


def patch_shape(size: int, n_layers: int = 3) -> int:
    """Logit-map side for a ``size`` input, from the layout: 4x4 convs, padding 1, strides 2 .. 2, 1, 1."""
    for stride in [2] * n_layers + [1, 1]:
        size = (size + 2 - 4) // stride + 1
    return size


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_shape_and_param_count_match_taming(size, norm):
    ref = disc_ref.build(norm=norm)
    x = np.zeros((1, size, size, 3), np.float32)
    abstract = jax.eval_shape(NLayerDiscriminator(norm=norm).init, jax.random.key(0), x)
    out = jax.eval_shape(NLayerDiscriminator(norm=norm).apply, abstract, x)
    with torch.no_grad():
        ref_shape = tuple(ref(torch.zeros(1, 3, size, size)).permute(0, 2, 3, 1).shape)
    assert out.shape == ref_shape == (1, patch_shape(size), patch_shape(size), 1)
    assert {64: 6, 256: 30}[size] == patch_shape(size)
    ours = sum(leaf.size for leaf in jax.tree_util.tree_leaves(abstract))
    assert ours == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_matches_taming_in_train_mode(norm):
    ref = disc_ref.build(seed=1, norm=norm)
    with torch.no_grad():  # norms start at scale 1 (about), bias 0: randomize them to catch a swap
        for module in ref.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
    model = NLayerDiscriminator(norm=norm)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    state = {k: v for k, v in refs.numpy_state_dict(ref).items() if "running_" not in k and "batches_tracked" not in k}
    params = convert.state_dict_to_params(state, abstract, what="discriminator")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert refs.max_rel_error(jax.jit(model.apply)({"params": params}, x), expected) <= 3e-5  # measured 3.4e-6


def test_discriminator_init_follows_taming():
    params = nn.meta.unbox(jax.jit(NLayerDiscriminator().init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    assert abs(float(jnp.std(params["main_5"]["kernel"])) - 0.02) < 1e-3
    assert abs(float(jnp.mean(params["main_6"]["scale"])) - 1.0) < 1e-2
    assert "bias" not in params["main_5"] and "bias" in params["main_0"]


def test_hinge_and_generator_losses_match_numpy():
    real = np.array([[2.0, 0.5], [-1.0, 0.9]], np.float32)
    fake = np.array([[-2.0, -0.5], [1.5, 0.0]], np.float32)
    expected = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    np.testing.assert_allclose(losses.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake)), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, 0.5 * ((0 + 0.5 + 2 + 0.1) / 4 + (0 + 0.5 + 2.5 + 1) / 4), rtol=1e-6)
    np.testing.assert_allclose(losses.generator_adversarial_loss(jnp.asarray(fake)), -np.mean(fake), rtol=1e-6)


def test_adaptive_weight_formula_and_clip():
    a, b = jnp.full((3, 3), 2.0), jnp.full((3, 3), 0.5)
    np.testing.assert_allclose(losses.adaptive_weight(a, b), 6.0 / (1.5 + 1e-4), rtol=1e-6)
    assert float(losses.adaptive_weight(a, jnp.zeros((3, 3)))) == losses.MAX_ADAPTIVE_WEIGHT
    assert float(jax.grad(lambda s: losses.adaptive_weight(s * a, b))(1.0)) == 0.0


def test_disc_factor_gating():
    config = losses.AutoencoderLossConfig(AutoencoderKL(), disc_start=START, disc_factor=0.7)
    factors = [float(losses.disc_factor(config, s)) for s in (0, START - 1, START, START + 5)]
    assert factors == [0.0, 0.0, pytest.approx(0.7), pytest.approx(0.7)]
    assert float(jax.jit(losses.disc_factor, static_argnums=0)(config, jnp.int32(START))) == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------- full losses

TINY_VAE = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         mid_block_add_attention=False)  # f = 1: the losses do not care, compiles are short


def make_config(**overrides) -> losses.AutoencoderLossConfig:
    """Tiny modules, LDM's weights, ``disc_start=START``."""
    return losses.AutoencoderLossConfig(vae=TINY_VAE, discriminator=NLayerDiscriminator(ndf=8),
                                        lpips=LPIPS((4, 8, 8, 8, 8)), disc_start=START, **overrides)


@functools.cache
def setup():
    """The tiny config, its params, a batch and an rng."""
    config = make_config()
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = {"vae": refs.random_params(config.vae, x, seed=1),
              "discriminator": refs.random_params(config.discriminator, x, seed=2),
              "lpips": refs.random_params(config.lpips, x, x, seed=3, non_negative=True)}  # as LPIPS heads are
    return types.SimpleNamespace(config=config, params=params, batch={"image": x}, rng=jax.random.key(4))


@functools.cache
def value_and_grad(name: str):
    """``jax.value_and_grad(losses.<name>)`` over params, jitted with the config static: one compile per config
    gives the loss, its metrics and the gradients."""
    return jax.jit(jax.value_and_grad(getattr(losses, name), argnums=1, has_aux=True), static_argnums=0)


def generator(config=None, params=None, step=START):
    """((loss, metrics), grads) of the generator loss on the tiny setup."""
    s = setup()
    return value_and_grad("generator_loss")(config or s.config, params or s.params, s.batch, s.rng, step)


@functools.cache
def reference() -> dict:
    """Independent values for the tiny setup, straight from the modules: the loss pieces, their gradients
    with respect to all VAE params (one forward, one pullback per piece: ``<piece>_grad``) and the norms of
    the nll and g gradients at the decoder's ``conv_out`` kernel."""
    s = setup()
    x, (vae, lpips, disc) = s.batch["image"], (s.config.vae, s.config.lpips, s.config.discriminator)
    lpips_params, disc_params = s.params["lpips"], s.params["discriminator"]

    def pieces(vae_params):
        recon, posterior = vae.apply({"params": vae_params}, x, s.rng, sample_posterior=True)
        p = lpips.apply({"params": lpips_params}, x, recon)
        scalars = dict(nll=jnp.mean(jnp.abs(x - recon).sum(axis=(1, 2, 3)) + x[0].size * p),
                       g=-jnp.mean(disc.apply({"params": disc_params}, recon)), kl=jnp.mean(posterior.kl()))
        return scalars, dict(recon=recon, p=p)

    @jax.jit
    def run():
        scalars, pullback, out = jax.vjp(pieces, s.params["vae"], has_aux=True)
        for name in scalars:
            out[f"{name}_grad"] = pullback({k: jnp.float32(k == name) for k in scalars})[0]
            out[f"{name}_grad_norm"] = jnp.linalg.norm(out[f"{name}_grad"]["decoder"]["conv_out"]["kernel"])
        out["logits_real"] = disc.apply({"params": disc_params}, x)
        out["logits_fake"] = disc.apply({"params": disc_params}, out["recon"])
        return {**scalars, **out}

    return jax.device_get(run())


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
    (_, metrics), _ = generator()
    ref = reference()
    expected = 0.5 * ref["nll_grad_norm"] / (ref["g_grad_norm"] + 1e-4)
    assert 0 < expected < 0.5 * losses.MAX_ADAPTIVE_WEIGHT  # not clipped: the ratio itself is tested
    np.testing.assert_allclose(metrics["d_weight"], expected, rtol=5e-6)  # measured 5.0e-7


def test_generator_loss_terms_and_gating():
    (before, m0), _ = generator(step=START - 1)
    (after, m1), _ = generator(step=START)
    ref = reference()
    np.testing.assert_allclose([m1["nll_loss"], m1["kl_loss"], m1["p_loss"], m1["g_loss"]],
                               [ref["nll"], ref["kl"], ref["p"].mean(), ref["g"]], rtol=1e-5)
    assert float(m0["disc_factor"]) == 0.0 and float(m1["disc_factor"]) == 1.0
    np.testing.assert_allclose(before, ref["nll"] + 1e-6 * ref["kl"], rtol=1e-5)
    np.testing.assert_allclose(after, ref["nll"] + 1e-6 * ref["kl"] + m1["d_weight"] * ref["g"], rtol=1e-5)
    assert abs(float(after - before)) > 1e-3 * abs(float(before))


def test_generator_without_the_adversarial_term_is_the_loss_before_disc_start():
    """adversarial=False (the train step's branch before disc_start) gives the same loss and VAE gradients
    as the full loss there, with g_loss and d_weight 0, and never runs the discriminator: it has no params."""
    s = setup()
    no_discriminator = {**s.params, "discriminator": None}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: losses.generator_loss(s.config, p, s.batch, s.rng, START - 1, adversarial=False),
        has_aux=True))(no_discriminator)
    (full_loss, full_metrics), full_grads = generator(step=START - 1)
    np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
    assert float(metrics["g_loss"]) == float(metrics["d_weight"]) == 0.0 != float(full_metrics["g_loss"])
    for ours, theirs in zip(jax.tree_util.tree_leaves(grads["vae"]), jax.tree_util.tree_leaves(full_grads["vae"])):
        assert refs.max_rel_error(ours, theirs) <= 1e-5


def test_generator_gradients_reach_the_vae_only():
    (_, metrics), grads = generator()
    for name in ("discriminator", "lpips"):
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads[name]))
    ref, d_weight = reference(), float(metrics["d_weight"])
    expected = jax.tree_util.tree_map(lambda n, k, g: n + 1e-6 * k + d_weight * g,
                                      ref["nll_grad"], ref["kl_grad"], ref["g_grad"])
    assert jax.tree_util.tree_structure(grads["vae"]) == jax.tree_util.tree_structure(expected)
    for ours, theirs in zip(jax.tree_util.tree_leaves(grads["vae"]), jax.tree_util.tree_leaves(expected)):
        assert refs.max_rel_error(ours, theirs) <= 3e-5  # measured at most 2.5e-6
    assert float(jnp.max(jnp.abs(grads["vae"]["encoder"]["conv_in"]["kernel"]))) > 0


def test_kl_weight_and_lpips_off():
    """LPIPS off (no params) and kl_weight 1: before disc_start the loss is exactly L1 sum + KL."""
    s = setup()
    params = {**s.params, "lpips": None}
    config = dataclasses.replace(s.config, kl_weight=1.0)
    assert losses.perceptual_weight(config, params) == 0.0 and losses.perceptual_weight(config, s.params) == 1.0
    (loss, metrics), _ = generator(config=config, params=params, step=0)
    (_, default), _ = generator(step=0)
    ref = reference()
    l1 = np.abs(np.asarray(s.batch["image"]) - ref["recon"]).sum(axis=(1, 2, 3)).mean()
    assert float(metrics["p_loss"]) == 0.0
    np.testing.assert_allclose([metrics["nll_loss"], metrics["kl_loss"]], [l1, ref["kl"]], rtol=1e-5)
    np.testing.assert_allclose(loss, l1 + ref["kl"], rtol=1e-5)
    assert float(default["nll_loss"]) > l1 * (1 + 1e-3)


def test_discriminator_loss_gating_value_and_gradients():
    s = setup()
    ref = reference()
    (before, _), _ = value_and_grad("discriminator_loss")(s.config, s.params, s.batch, s.rng, START - 1)
    (after, metrics), grads = value_and_grad("discriminator_loss")(s.config, s.params, s.batch, s.rng, START)
    real, fake = ref["logits_real"], ref["logits_fake"]
    expected = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    assert float(before) == 0.0
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    np.testing.assert_allclose([metrics["logits_real"], metrics["logits_fake"]], [real.mean(), fake.mean()],
                               rtol=1e-5, atol=1e-6)
    for name in ("vae", "lpips"):
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(grads[name]))
    assert float(jnp.max(jnp.abs(grads["discriminator"]["main_0"]["kernel"]))) > 0


def test_psnr_matches_the_formula_on_the_image_range():
    """Stage 1's PSNR is ``10 log10(MAX^2 / MSE)`` with MAX the width of the images' range [-1, 1] (2), after
    clipping the reconstruction to that range, per example; a PSNR computed as if images were in [0, 1] would be
    20 log10(2) = 6.02 dB off."""
    from ldm_jax.training.autoencoder.step import psnr

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 16, 12, 3)).astype(np.float32)
    images[0, 0, 0] = -1.0, 1.0, 0.0
    assert images.min() == -1.0 and images.max() == 1.0  # the data range: the input pipeline's [-1, 1]
    noise = np.array([0.01, 0.1, 0.5], np.float32)[:, None, None, None]
    recon = images + noise * rng.standard_normal(images.shape).astype(np.float32)
    assert recon.max() > 1.0 and recon.min() < -1.0  # so that clipping matters
    clipped = np.clip(recon.astype(np.float64), -1.0, 1.0)
    mse = np.mean((images.astype(np.float64) - clipped) ** 2, axis=(1, 2, 3))
    expected = 10 * np.log10(2.0 ** 2 / mse)
    ours = np.asarray(jax.jit(psnr)(images, recon))
    print(f"PSNR {ours} dB, formula {expected} dB")
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)  # dB; float32 measured 2.1e-6
    # A uniform error of 0.02 (1% of the range) is 40 dB.
    np.testing.assert_allclose(psnr(images[:1] * 0.9, images[:1] * 0.9 + 0.02), [40.0], atol=3e-4)
