"""AutoencoderKL vs diffusers' PyTorch AutoencoderKL with the same random convert.

Fast tests use tiny configs (f = 2 and f = 4 with mid-block attention, f = 1
without attention and quant convs) on non-square images; the slow test
(``pytest -m slow``) uses SD's full VAE.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_jax import testing as refs
from ldm_jax.testing.vae import VAE_SD, VAE_TINY, build

from ldm_jax.weights import convert
from ldm_jax.models.vae import AutoencoderKL, DiagonalGaussian, scaling_factor

# float32 max_rel_error on the tiny configs, measured on a 2-core AMD EPYC: posterior 1.1e-6, decode 2.0e-6,
# reconstruction 3.7e-6. The full-size VAE (slow test) accumulates more and keeps 1e-4.
TOL = 3e-5
FULL_SIZE_TOL = 1e-4
# bfloat16 compute with float32 params vs the float32 reference, max_rel_error measured on VAE_TINY
# with seeds 0-5: posterior mean 1.0e-2 .. 1.3e-2, decoded image 1.3e-2 .. 2.1e-2 (bfloat16 keeps
# 8 significant bits, 2**-8 = 3.9e-3, and errors add up over ~20 layers). 2.5x margin.
BF16_TOL = 5e-2

CONFIGS = {
    "f2": VAE_TINY,
    "f4": {**VAE_TINY, "block_out_channels": [16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 3,
           "up_block_types": ["UpDecoderBlock2D"] * 3},
    "f1_no_attn_no_quant": {**VAE_TINY, "block_out_channels": [32], "down_block_types": ["DownEncoderBlock2D"],
                            "up_block_types": ["UpDecoderBlock2D"], "mid_block_add_attention": False,
                            "use_quant_conv": False, "use_post_quant_conv": False},
}


def nchw(x) -> torch.Tensor:
    """NHWC numpy/jax array -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW torch tensor -> NHWC numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def image(shape, seed: int) -> np.ndarray:
    """A random image in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@functools.cache
def setup_pair(name: str, dtype=jnp.float32):
    """For ``CONFIGS[name]``: the diffusers reference and its outputs, our module with params loaded
    from its state dict, and ``run(params, x, z)``, one jitted function giving ``__call__(x)`` and
    ``decode(z)`` (cached, so each config and dtype compiles once per test process)."""
    seed = sorted(CONFIGS).index(name)
    ref = build(CONFIGS[name], seed)
    model = AutoencoderKL.from_diffusers_config(ref.config, dtype=dtype)
    x = image((2, 32, 24, 3), seed)  # non-square, to catch H/W mix-ups
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = convert.state_dict_to_params(refs.numpy_state_dict(ref), abstract, what="vae")
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        z = np.random.default_rng(seed + 100).standard_normal(nhwc(dist.mean).shape).astype(np.float32)
        expected = dict(mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), decoded=nhwc(ref.decode(nchw(z)).sample),
                        recon=nhwc(ref(nchw(x)).sample))

    @jax.jit
    def run(params, x, z):
        recon, posterior = model.apply({"params": params}, x)
        return dict(recon=recon, posterior=posterior, decoded=model.apply({"params": params}, z, method="decode"))

    return types.SimpleNamespace(ref=ref, model=model, abstract=abstract, params=params, x=x, z=z,
                                 expected=expected, run=run)


@pytest.fixture(params=sorted(CONFIGS))
def pair(request):
    return setup_pair(request.param)


def test_encode_decode_parity(pair):
    out, expected = pair.run(pair.params, pair.x, pair.z), pair.expected
    f = 2 ** (len(pair.model.block_out_channels) - 1)
    assert out["posterior"].mean.shape == (2, 32 // f, 24 // f, 4)
    assert np.std(expected["logvar"]) > 0.05 and np.std(expected["decoded"]) > 0.05  # non-trivial references
    assert refs.max_rel_error(out["posterior"].mean, expected["mean"]) <= TOL
    assert refs.max_rel_error(out["posterior"].logvar, expected["logvar"]) <= TOL
    assert refs.max_rel_error(out["decoded"], expected["decoded"]) <= TOL
    assert refs.max_rel_error(out["recon"], expected["recon"]) <= TOL


def test_encode_method_and_posterior_sampling():
    """``method='encode'`` gives the posterior; ``__call__(sample_posterior=True)`` decodes posterior.sample(rng)."""
    pair = setup_pair("f1_no_attn_no_quant")
    key = jax.random.key(1)

    @jax.jit
    def sample(params, x, key):
        recon, _ = pair.model.apply({"params": params}, x, key, sample_posterior=True)
        return recon, pair.model.apply({"params": params}, x, method="encode")

    recon, posterior = sample(pair.params, pair.x, key)
    assert refs.max_rel_error(posterior.mean, pair.expected["mean"]) <= TOL
    out = pair.run(pair.params, pair.x, posterior.sample(key))
    assert refs.max_rel_error(recon, out["decoded"]) <= 1e-5
    assert refs.max_rel_error(recon, out["recon"]) > 10 * TOL
    with pytest.raises(ValueError, match="rng"):
        pair.model.apply({"params": pair.params}, pair.x, sample_posterior=True)


def test_parity_detects_a_wrong_norm():
    """Negative control: undoing one perturbed norm (encoder attention group_norm) breaks parity."""
    pair = setup_pair("f2")
    params = jax.tree.map(lambda a: a, pair.params)
    norm = params["encoder"]["mid_block"]["attentions_0"]["group_norm"]
    norm["scale"] = np.ones_like(norm["scale"])
    mean = pair.run(params, pair.x, pair.z)["posterior"].mean
    assert refs.max_rel_error(mean, pair.expected["mean"]) > 10 * TOL


def test_params_load_into_diffusers_strict():
    pair = setup_pair("f2")
    rng = np.random.default_rng(4)
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape, np.float32), pair.params)
    torch_model = build(VAE_TINY, seed=11)
    state = {k: torch.from_numpy(v) for k, v in convert.params_to_state_dict(params).items()}
    torch_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        recon_ref = nhwc(torch_model(nchw(pair.x)).sample)
    recon = pair.run(params, pair.x, pair.z)["recon"]
    assert refs.max_rel_error(recon_ref, pair.expected["recon"]) > 10 * TOL  # the weights did change
    assert refs.max_rel_error(recon, recon_ref) <= TOL


def test_posterior_matches_diffusers_distribution():
    rng = np.random.default_rng(3)
    moments = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    moments[..., 4:] *= 20  # logvar beyond [-30, 20] gets clipped
    ours = DiagonalGaussian.from_moments(jnp.asarray(moments))
    theirs = DiagonalGaussianDistribution(nchw(moments))
    assert float(jnp.max(ours.logvar)) == 20.0 and float(jnp.min(ours.logvar)) == -30.0
    np.testing.assert_allclose(ours.mean, nhwc(theirs.mean), rtol=0, atol=0)
    np.testing.assert_allclose(ours.mode(), nhwc(theirs.mode()), rtol=0, atol=0)
    np.testing.assert_allclose(ours.logvar, nhwc(theirs.logvar), rtol=0, atol=0)
    np.testing.assert_allclose(ours.std, nhwc(theirs.std), rtol=1e-6)
    assert ours.kl().shape == (2,)
    np.testing.assert_allclose(ours.kl(), theirs.kl().numpy(), rtol=1e-5)
    x = rng.standard_normal(moments[..., :4].shape).astype(np.float32)
    np.testing.assert_allclose(ours.nll(x), theirs.nll(nchw(x)).numpy(), rtol=1e-5)
    key = jax.random.key(5)
    eps = jax.random.normal(key, ours.mean.shape, jnp.float32)
    expected = nhwc(theirs.mean + theirs.std * nchw(eps))
    np.testing.assert_allclose(ours.sample(key), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours.sample(key), ours.sample(jax.random.key(6)))
    leaves = jax.tree.leaves(jax.jit(lambda d: d)(ours))  # a pytree through jit
    assert len(leaves) == 2


@pytest.mark.parametrize("name", sorted(CONFIGS) + ["diffusers_default"])
def test_config_roundtrip_rebuilds_same_shapes(name):
    ref = TorchAutoencoderKL.from_config({}) if name == "diffusers_default" else setup_pair(name).ref
    model = AutoencoderKL.from_diffusers_config(ref.config)
    rebuilt = TorchAutoencoderKL.from_config(model.diffusers_config(scaling_factor=0.13025))
    assert rebuilt.config.scaling_factor == scaling_factor(rebuilt.config) == 0.13025
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == expected
    size = 2 ** len(model.block_out_channels)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)))
    flat = convert.state_dict_to_params(refs.numpy_state_dict(rebuilt), abstract["params"])
    assert len(jax.tree.leaves(flat)) == len(expected)
    assert AutoencoderKL.from_diffusers_config(rebuilt.config) == model


def test_scaling_factor_default():
    assert scaling_factor({}) == 0.18215
    assert scaling_factor({"scaling_factor": 0.13025}) == 0.13025


@pytest.mark.parametrize("option, value", [
    ("shift_factor", 0.0609),
    ("latents_mean", [0.0] * 4),
    ("latents_std", [1.0] * 4),
    ("act_fn", "gelu"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("not_an_option", 1),
])
def test_unsupported_config_raises(option, value):
    with pytest.raises(ValueError, match=option):
        AutoencoderKL.from_diffusers_config({**VAE_TINY, option: value})


def test_diffusers_config_rejects_architecture_overrides():
    with pytest.raises(ValueError, match="latent_channels"):
        AutoencoderKL().diffusers_config(latent_channels=8)


def test_wrong_shape_key_is_reported():
    pair = setup_pair("f2")
    state = refs.numpy_state_dict(pair.ref)
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    assert state[key].shape == (32, 64, 3, 3)
    state[key] = np.zeros((32, 64, 1, 3), np.float32)
    with pytest.raises(convert.WeightsMismatchError, match=key.replace(".", r"\.")) as err:
        convert.state_dict_to_params(state, pair.abstract)
    assert "(32, 64, 3, 3)" in str(err.value) and "(32, 64, 1, 3)" in str(err.value)


def test_bfloat16_compute_stays_close():
    pair = setup_pair("f2", jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(pair.params)} == {np.dtype(np.float32)}
    out = pair.run(pair.params, pair.x, pair.z)
    assert out["posterior"].mean.dtype == jnp.float32 and out["decoded"].dtype == jnp.bfloat16
    mean_err = refs.max_rel_error(out["posterior"].mean, pair.expected["mean"])
    image_err = refs.max_rel_error(out["decoded"].astype(jnp.float32), pair.expected["decoded"])
    print(f"bfloat16 compute: max_rel_error mean {mean_err:.2e}, decode {image_err:.2e}")
    assert TOL < mean_err <= BF16_TOL, mean_err
    assert TOL < image_err <= BF16_TOL, image_err


@pytest.mark.slow
def test_sd_vae_parity_full_size():
    """SD v1/v2's VAE (f = 8) with random weights on one 256x256 image, float32."""
    ref = build(VAE_SD, seed=0)
    model = AutoencoderKL.from_diffusers_config(ref.config)
    x = image((1, 256, 256, 3), seed=0)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = convert.state_dict_to_params(refs.numpy_state_dict(ref), abstract, what="vae")
    with torch.no_grad():
        mean_ref = nhwc(ref.encode(nchw(x)).latent_dist.mean)
        z = np.random.default_rng(1).standard_normal(mean_ref.shape).astype(np.float32)
        image_ref = nhwc(ref.decode(nchw(z)).sample)
    mean = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode").mean)(params, x)
    decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z)
    errors = {name: (float(np.max(np.abs(np.asarray(ours) - theirs))), refs.max_rel_error(ours, theirs))
              for name, ours, theirs in (("mean", mean, mean_ref), ("decode", decoded, image_ref))}
    print("SD VAE 256x256 (max abs, max rel):", errors)
    assert all(rel <= FULL_SIZE_TOL for _, rel in errors.values()), errors
