"""Gradients of the U-Net, the VAE and CLIP against torch autograd on the reference models, same random weights.

Each case differentiates a scalar loss (random fixed weights times every output) with respect to every
parameter and every float input, in float32, and compares each gradient tensor with the torch gradient
converted to our layout (``ldm_jax.weights.convert``): ``max |ours - torch| / max |torch|`` per tensor. The
backward pass runs our hand-written VJPs: GroupNorm's (``models/group_norm.py``), the per-tap kernel gradient
of 3x3 convolutions with at least 32 channels (``models/convolution.py``) and, in the ``tiled`` cases, the
tiled attention's (``models/attention.py``, its tile shrunk so that the tiny models use several tiles). One
case per model also compiles under XLA's default optimisation level instead of the suite's
``jax_disable_most_optimizations``, since optimisation passes can change a backward program.
"""

import collections
import functools
import re
import types

import flax
import jax
import jax.extend.core
import numpy as np
import pytest
import torch

from ldm_jax import testing as refs
from ldm_jax.models import attention as attention_module
from ldm_jax.models import clip
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.testing import clip as clip_refs
from ldm_jax.testing import unet as unet_refs
from ldm_jax.testing import vae as vae_refs
from ldm_jax.weights import convert

# Per-tensor max |ours - torch| / max |torch| of float32 gradients. Measured on a 2-core AMD EPYC (worst tensor over
# the cases of a model): U-Net 5.9e-6, VAE 1.1e-5 (tiled attention), CLIP 3.0e-6. A backward pass off by 1e-3 in one
# of the hand-written VJPs shows as 1e-3.
TOLERANCE = 1e-4
# Small enough that the tiny models' attention runs in several tiles: the VAE's mid-block attention over
# 16 x 12 tokens in 12 query blocks, the U-Net's 16 x 16 self-attention in 16.
SMALL_TILE = 4096


# Key biases add the same q . b_k to every logit of a query, which the softmax ignores: their exact gradient is
# zero, and both frameworks return rounding noise (~1e-8) that has no relative error to speak of.
ZERO_GRADIENT = re.compile(r"/(to_k|k_proj)/bias$")


def relative_errors(ours, theirs) -> dict[str, float]:
    """``max |a - b| / max |b|`` for each leaf of two trees with the same structure (flattened, '/'-joined).

    A leaf whose exact gradient is zero (:data:`ZERO_GRADIENT`) is measured against the largest gradient of the
    whole tree instead, after checking that the reference is that small.
    """
    flat_ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(ours), sep="/")
    flat_theirs = flax.traverse_util.flatten_dict(flax.core.unfreeze(theirs), sep="/")
    assert flat_ours.keys() == flat_theirs.keys()
    largest = max(float(np.max(np.abs(b))) for b in flat_theirs.values())
    errors = {}
    for key, reference in flat_theirs.items():
        a, b = np.asarray(flat_ours[key], np.float64), np.asarray(reference, np.float64)
        assert a.shape == b.shape, (key, a.shape, b.shape)
        scale = np.max(np.abs(b))
        if ZERO_GRADIENT.search(key):
            assert scale <= 1e-5 * largest, (key, scale, largest)
            scale = largest
        assert scale > 0, f"{key}: the torch gradient is zero, so the case does not test it"
        errors[key] = float(np.max(np.abs(a - b)) / scale)
    return errors


def check(errors: dict[str, float], what: str) -> None:
    """Print the worst tensor and assert every error is within :data:`TOLERANCE`."""
    worst = max(errors, key=errors.get)
    print(f"{what}: {len(errors)} gradient tensors, worst {worst} {errors[worst]:.2e}")
    bad = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not bad, bad


def torch_param_grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Each parameter's gradient, named by its state-dict key (zeros for a parameter the loss does not reach)."""
    return {name: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy())
            for name, p in model.named_parameters()}


def nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC array -> NCHW leaf tensor that records its gradient."""
    return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture
def optimisation(request):
    """Compile under XLA's default optimisation level when the parameter is 'opt_default' (restored afterwards)."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", request.param != "opt_default")
    try:
        yield request.param
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def attention_impl(impl: str, monkeypatch) -> str:
    """The ``attention_impl`` for ``impl``; 'tiled' is the einsum implementation with a tile of :data:`SMALL_TILE`."""
    if impl == "tiled":
        monkeypatch.setattr(attention_module, "LOGITS_PER_TILE", SMALL_TILE)
        return "einsum"
    return impl


def custom_backwards(fn, *args) -> collections.Counter:
    """How many times each hand-written backward function (by name) appears in the program of ``fn(*args)``.

    The names are read from JAX's description of each ``custom_vjp_call``; should that format change, the counts
    come out empty and :func:`check_paths` fails rather than passing unchecked.
    """
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "custom_vjp_call":
                counts.update(re.findall(r"Core: (\w+)", str(eqn.params["bwd"])))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def check_paths(counts: collections.Counter, tiled: bool) -> None:
    """The backward functions the loss runs: GroupNorm's, the per-tap convolution's, and the tiled attention's
    exactly when ``tiled``."""
    assert counts["_backward"] > 0, counts  # GroupNorm
    assert counts["_same_conv_bwd"] > 0, counts
    assert (counts["_tiled_backward"] > 0) == tiled, counts


# --------------------------------------------------------------------------------------------------------- U-Net

UNET_CONFIGS = {"sd1": unet_refs.SD1_TINY, "sd2": unet_refs.SD2_TINY}


@functools.cache
def unet_reference(name: str):
    """The diffusers U-Net at ``UNET_CONFIGS[name]``, inputs, loss weights and torch's gradients."""
    config = UNET_CONFIGS[name]
    model = unet_refs.build(config, seed=0)
    rng = np.random.default_rng(1)
    size = config["sample_size"]
    sample = rng.standard_normal((2, size, size, config["in_channels"])).astype(np.float32)
    context = rng.standard_normal((2, 7, config["cross_attention_dim"])).astype(np.float32)
    timesteps = np.array([3, 911])
    weights = rng.standard_normal((2, size, size, config["out_channels"])).astype(np.float32)
    sample_t, context_t = nchw(sample), torch.tensor(context, requires_grad=True)
    out = model(sample_t, torch.from_numpy(timesteps), context_t).sample
    (out * nchw(weights).detach()).sum().backward()
    return types.SimpleNamespace(
        model=model, state=refs.numpy_state_dict(model), inputs=(sample, timesteps, context), weights=weights,
        param_grads=torch_param_grads(model), input_grads={"sample": nhwc(sample_t.grad),
                                                           "context": context_t.grad.numpy()})


@pytest.mark.parametrize("name, impl, optimisation", [
    ("sd1", "einsum", "opt_disabled"), ("sd2", "tiled", "opt_disabled"), ("sd1", "tiled", "opt_default"),
], indirect=["optimisation"])
def test_unet_gradients_match_torch(name, impl, optimisation, monkeypatch):
    ref = unet_reference(name)
    model = UNet2DConditionModel.from_diffusers_config(dict(ref.model.config),
                                                       attention_impl=attention_impl(impl, monkeypatch))
    sample, timesteps, context = ref.inputs
    abstract = jax.eval_shape(model.init, jax.random.key(0), *ref.inputs)["params"]
    params = convert.state_dict_to_params(ref.state, abstract, what="unet")

    def loss(params, sample, context):
        return (model.apply({"params": params}, sample, timesteps, context) * ref.weights).sum()

    check_paths(custom_backwards(loss, params, sample, context), tiled=impl == "tiled")
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, sample, context)
    expected = convert.state_dict_to_params(ref.param_grads, abstract, what="unet gradients")
    errors = relative_errors({"params": grads[0], "sample": grads[1], "context": grads[2]},
                             {"params": expected, **ref.input_grads})
    check(errors, f"U-Net {name} {impl} {optimisation}")


# ----------------------------------------------------------------------------------------------------------- VAE

VAE_CONFIGS = {"f2": vae_refs.VAE_TINY}


@functools.cache
def vae_reference(name: str):
    """The diffusers VAE at ``VAE_CONFIGS[name]``, an image, loss weights and torch's gradients.

    The loss covers the reconstruction through the posterior's mode, the posterior's mean and log-variance,
    and its KL divergence (stage 1's terms).
    """
    model = vae_refs.build(VAE_CONFIGS[name], seed=0)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)  # non-square, to catch H/W mix-ups
    w_recon = rng.standard_normal(x.shape).astype(np.float32)
    w_mean, w_logvar = rng.standard_normal((2, 2, 16, 12, 4)).astype(np.float32)
    x_t = nchw(x)
    dist = model.encode(x_t).latent_dist
    recon = model.decode(dist.mode()).sample
    loss = ((recon * nchw(w_recon).detach()).sum() + (dist.mean * nchw(w_mean).detach()).sum()
            + (dist.logvar * nchw(w_logvar).detach()).sum() + dist.kl().sum() / 100)
    loss.backward()
    return types.SimpleNamespace(model=model, state=refs.numpy_state_dict(model), x=x,
                                 weights=(w_recon, w_mean, w_logvar), param_grads=torch_param_grads(model),
                                 input_grad=nhwc(x_t.grad))


@pytest.mark.parametrize("name, impl, optimisation", [
    ("f2", "einsum", "opt_disabled"), ("f2", "tiled", "opt_disabled"), ("f2", "tiled", "opt_default"),
], indirect=["optimisation"])
def test_vae_gradients_match_torch(name, impl, optimisation, monkeypatch):
    ref = vae_reference(name)
    model = AutoencoderKL.from_diffusers_config(ref.model.config, attention_impl=attention_impl(impl, monkeypatch))
    abstract = jax.eval_shape(model.init, jax.random.key(0), ref.x)["params"]
    params = convert.state_dict_to_params(ref.state, abstract, what="vae")
    w_recon, w_mean, w_logvar = ref.weights

    def loss(params, x):
        recon, posterior = model.apply({"params": params}, x)
        return ((recon * w_recon).sum() + (posterior.mean * w_mean).sum() + (posterior.logvar * w_logvar).sum()
                + posterior.kl().sum() / 100)

    check_paths(custom_backwards(loss, params, ref.x), tiled=impl == "tiled")
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, ref.x)
    expected = convert.state_dict_to_params(ref.param_grads, abstract, what="vae gradients")
    check(relative_errors({"params": grads[0], "x": grads[1]}, {"params": expected, "x": ref.input_grad}),
          f"VAE {name} {impl} {optimisation}")


# ---------------------------------------------------------------------------------------------------------- CLIP

CLIP_CONFIGS = {"sd1": clip_refs.CLIP_SD1_TINY, "sd2": clip_refs.CLIP_SD2_TINY}
LENGTH = 16


def clip_ids(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [3, LENGTH] (BOS, words, EOS, EOS padding) and the padding mask; one row fills the length."""
    ids = np.full((3, LENGTH), clip_refs.EOS_ID, np.int32)
    mask = np.zeros((3, LENGTH), np.int32)
    for row, words in enumerate((5, 11, LENGTH - 2)):
        ids[row, 0] = clip_refs.BOS_ID
        ids[row, 1:1 + words] = rng.integers(0, clip_refs.EOS_ID - 1, words)
        mask[row, :words + 2] = 1
    return ids, mask


@functools.cache
def clip_reference(name: str):
    """The transformers CLIP text model at ``CLIP_CONFIGS[name]``, ids, loss weights and torch's gradients.

    The loss covers the last hidden states and the pooled output, under a padding mask; the token ids are
    integers, so their gradient is the token embedding's.
    """
    config = CLIP_CONFIGS[name]
    model = clip_refs.build(config, seed=3)
    rng = np.random.default_rng(3)
    ids, mask = clip_ids(rng)
    w_last = rng.standard_normal((3, LENGTH, config["hidden_size"])).astype(np.float32)
    w_pooled = rng.standard_normal((3, config["hidden_size"])).astype(np.float32)
    out = model(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask))
    ((out.last_hidden_state * torch.from_numpy(w_last)).sum()
     + (out.pooler_output * torch.from_numpy(w_pooled)).sum()).backward()
    return types.SimpleNamespace(config=config, state=clip.normalize_state_dict(refs.numpy_state_dict(model)),
                                 ids=ids, mask=mask, weights=(w_last, w_pooled),
                                 param_grads=clip.normalize_state_dict(torch_param_grads(model)))


@pytest.mark.parametrize("name, impl, optimisation", [
    ("sd1", "einsum", "opt_disabled"), ("sd2", "xla", "opt_disabled"), ("sd2", "einsum", "opt_default"),
], indirect=["optimisation"])
def test_clip_gradients_match_torch(name, impl, optimisation):
    ref = clip_reference(name)
    model = clip.CLIPTextModel.from_transformers_config(ref.config, attention_impl=impl)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ref.ids)["params"]
    params = convert.state_dict_to_params(ref.state, abstract, what="text_encoder")
    w_last, w_pooled = ref.weights

    def loss(params):
        last, pooled = model.apply({"params": params}, ref.ids, ref.mask)
        return (last * w_last).sum() + (pooled * w_pooled).sum()

    grads = jax.jit(jax.grad(loss))(params)
    expected = convert.state_dict_to_params(ref.param_grads, abstract, what="text_encoder gradients")
    check(relative_errors(grads, expected), f"CLIP {name} {impl} {optimisation}")

