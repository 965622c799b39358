"""LPIPS-VGG vs the lpips package's ``LPIPS(net='vgg')`` with the same random trunk, and the weight converter."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from ldm_jax import testing as refs
from ldm_jax.testing import lpips as lpips_ref

from ldm_jax.weights import convert
from ldm_jax.models.lpips import LPIPS, params_from_torch

# max_rel_error measured on a 2-core AMD EPYC: distances 1.2e-7, gradients (per image, max |a - b| / max |b|) 3.6e-6.
TOL = 1e-6
GRAD_TOL = 5e-5
TINY = (4, 8, 8, 8, 8)


def nchw(x) -> torch.Tensor:
    """NHWC numpy array -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def images(shape, seed: int) -> np.ndarray:
    """Random images spanning [-1, 1], the range both LPIPS implementations take (lpips' ``normalize=False``)."""
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    x.reshape(-1)[:2] = -1.0, 1.0
    assert x.min() == -1.0 and x.max() == 1.0
    return x


def torch_state_dicts(model: torch.nn.Module) -> tuple[dict, dict]:
    """(torchvision-named VGG16 ``features.N.*`` state, lpips head state) of an lpips model.

    lpips keeps torchvision's ``features`` indices inside its slices (``net.slice2.5.weight`` is ``features.5``).
    """
    state = refs.numpy_state_dict(model)
    vgg = {re.sub(r"^net\.slice\d\.", "features.", k): v for k, v in state.items() if k.startswith("net.")}
    heads = {k: v for k, v in state.items() if re.match(r"lin\d\.", k)}  # not the duplicate lins.N.*
    return vgg, heads


@functools.cache
def apply_fn(channels=LPIPS.channels):
    """Jitted ``LPIPS(channels).apply`` (one compile per shape per test process)."""
    return jax.jit(LPIPS(channels).apply)


@pytest.mark.parametrize("random_heads", [True, False], ids=["random_heads", "packaged_heads"])
def test_matches_lpips_package(random_heads):
    ref = lpips_ref.build(seed=0, random_heads=random_heads)
    x0, x1 = images((2, 48, 40, 3), 1), images((2, 48, 40, 3), 2)  # non-square; odd sizes after pooling
    with torch.no_grad():
        expected = ref(nchw(x0), nchw(x1)).numpy().reshape(-1)
    params = params_from_torch(*torch_state_dicts(ref))
    ours = apply_fn()({"params": params}, x0, x1)
    err = refs.max_rel_error(ours, expected)
    print(f"LPIPS parity ({'random' if random_heads else 'packaged'} heads): {expected} max rel err {err:.2e}")
    assert err <= TOL
    assert np.all(expected > 0)


def test_input_gradient_matches_lpips_package():
    """The gradient of the distance with respect to both images (what the autoencoder's loss backpropagates)
    against torch autograd through the lpips package's network with the same weights."""
    ref = lpips_ref.build(seed=0, random_heads=True)
    x0, x1 = images((2, 16, 16, 3), 3), images((2, 16, 16, 3), 4)
    weights = np.array([1.0, -0.5], np.float32)
    t0, t1 = nchw(x0).requires_grad_(), nchw(x1).requires_grad_()
    (ref(t0, t1, normalize=False).reshape(-1) * torch.from_numpy(weights)).sum().backward()
    params = params_from_torch(*torch_state_dicts(ref))
    model = LPIPS(LPIPS.channels)
    loss = lambda params, a, b: (model.apply({"params": params}, a, b) * weights).sum()
    grads = jax.jit(jax.grad(loss, argnums=(1, 2)))(params, x0, x1)
    errors = [float(np.max(np.abs(ours - t.grad.numpy().transpose(0, 2, 3, 1))) / np.max(np.abs(t.grad.numpy())))
              for ours, t in zip(grads, (t0, t1))]
    print(f"LPIPS input gradients: max rel err {errors}")
    assert max(errors) <= GRAD_TOL


def test_identical_images_zero_distance_finite_gradient():
    model = LPIPS(TINY)
    x = jnp.asarray(images((1, 32, 32, 3), 3))
    params = refs.random_params(model, x, x, seed=0, non_negative=True)
    distance, grad = jax.jit(jax.value_and_grad(lambda y: model.apply({"params": params}, x, y)[0]))(x)
    assert abs(float(distance)) < 1e-12
    assert np.all(np.isfinite(np.asarray(grad)))


def test_converter_accepts_full_vgg16_and_safetensors_files(tmp_path):
    vgg, heads = torch_state_dicts(lpips_ref.build(seed=1))
    vgg["classifier.0.weight"] = np.zeros((4096, 25088), np.float32)[:2, :2]  # a full vgg16() state dict
    for name, state in (("vgg", vgg), ("heads", heads)):
        safetensors.numpy.save_file(state, str(tmp_path / f"{name}.safetensors"))
    from_files = params_from_torch(tmp_path / "vgg.safetensors", str(tmp_path / "heads.safetensors"))
    from_dicts = params_from_torch(vgg, heads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_files, from_dicts)
    np.testing.assert_array_equal(from_dicts["lin2"]["model_1"]["kernel"][0, 0, :, 0],
                                  heads["lin2.model.1.weight"][0, :, 0, 0])


def test_converter_names_bad_keys():
    vgg, heads = torch_state_dicts(lpips_ref.build(seed=1))
    del vgg["features.28.bias"]
    vgg["features.29.weight"] = vgg["features.28.weight"]
    heads["lin1.model.1.weight"] = heads["lin1.model.1.weight"][:, :64]
    with pytest.raises(convert.WeightsMismatchError) as info:
        params_from_torch(vgg, heads)
    message = str(info.value)
    for needle in ("missing key(s): features.28.bias", "unexpected key(s): features.29.weight",
                   "lin1.model.1.weight: expected shape (1, 128, 1, 1), found (1, 64, 1, 1)"):
        assert needle in message
