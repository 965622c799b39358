"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk: the perceptual term of LDM's autoencoder loss.

The computation is the ``lpips`` package's ``LPIPS(net='vgg', version='0.1')``
(which taming-transformers and LDM copy): scale the [-1, 1] input per channel,
run torchvision's VGG16 ``features`` and tap relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, unit-normalize each tap over channels, square the
difference of the two images' taps, weight channels with a 1x1 conv without
bias (``lin0`` .. ``lin4``), average over space and sum over taps.

Parameter names mirror the torch state dicts (VGG conv ``features.N`` is our
module ``features_N``, the head ``lin0.model.1`` is ``lin0/model_1``), so
:func:`params_from_torch` is a mechanical rename through ``ldm_jax.weights.convert``.
The network is a frozen metric: the loss stops gradients into its params.
"""

import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.weights import convert, diffusers_folder
from ldm_jax.models.layers import Dtype, conv

# The lpips package's ScalingLayer: ImageNet mean and std expressed on [-1, 1] inputs.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)
NORM_EPS = 1e-10  # lpips.normalize_tensor


def vgg16_conv_indices() -> tuple[tuple[int, ...], ...]:
    """torchvision ``vgg16().features`` indices of the convs of each stage (0, 2 | 5, 7 | 10, 12, 14 | ...).

    Each conv is followed by a ReLU, and each stage after the first starts with a max-pool.
    """
    stages, index = [], 0
    for stage, n in enumerate(CONVS_PER_STAGE):
        index += 1 if stage else 0
        stages.append(tuple(range(index, index + 2 * n, 2)))
        index += 2 * n
    return tuple(stages)


def normalize_channels(x: jax.Array) -> jax.Array:
    """``x / (||x||_channels + 1e-10)`` as lpips computes it, with a finite gradient where ``x`` is all zero."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / (jnp.sqrt(jnp.maximum(sq, NORM_EPS ** 2)) + NORM_EPS)


class LinearHead(nn.Module):
    """The lpips ``NetLinLayer``: a bias-free 1x1 conv to one channel, kept as ``model_1`` (torch ``model.1``,
    after a dropout that is ``model.0``). Computed in float32."""
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(1, 1, "model_1", use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype)(x)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two NHWC image batches in [-1, 1]: ``apply(params, x0, x1)`` -> [B].

    ``channels`` are the VGG16 stage widths; keep the default to load real
    weights (smaller widths give tiny test models). The trunk runs in
    ``dtype``; normalization, heads and averages run in float32.
    """
    channels: Sequence[int] = VGG16_CHANNELS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        batch = x0.shape[0]
        x = jnp.concatenate([x0, x1]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        total = jnp.zeros((batch,), jnp.float32)
        for k, feature in enumerate(self.taps(x.astype(self.dtype))):
            feature = normalize_channels(feature.astype(jnp.float32))
            diff = jnp.square(feature[:batch] - feature[batch:])
            total += jnp.mean(LinearHead(self.param_dtype, name=f"lin{k}")(diff), axis=(1, 2, 3))
        return total

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """VGG16 features of scaled images ``x``: the last ReLU output of each stage."""
        if len(self.channels) != len(CONVS_PER_STAGE):
            raise ValueError(f"LPIPS needs {len(CONVS_PER_STAGE)} stage widths, got {tuple(self.channels)}")
        taps = []
        for stage, (width, indices) in enumerate(zip(self.channels, vgg16_conv_indices())):
            if stage:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for index in indices:
                x = conv(width, 3, f"features_{index}", dtype=self.dtype, param_dtype=self.param_dtype)(x)
                x = nn.relu(x)
            taps.append(x)
        return taps


StateDict = Mapping[str, np.ndarray]


def _as_state_dict(source: StateDict | str | os.PathLike) -> dict[str, np.ndarray]:
    if isinstance(source, (str, os.PathLike)):
        return diffusers_folder.read_safetensors(os.fspath(source))
    return dict(source)


def params_from_torch(vgg: StateDict | str | os.PathLike, heads: StateDict | str | os.PathLike,
                      channels: Sequence[int] = VGG16_CHANNELS) -> dict:
    """LPIPS params from a torchvision VGG16 state dict and the lpips package's linear-head state dict.

    ``vgg`` holds ``features.N.weight`` / ``features.N.bias`` (a full
    ``vgg16().state_dict()`` is fine: its ``classifier.*`` keys are dropped);
    ``heads`` holds ``lin0.model.1.weight`` .. ``lin4.model.1.weight`` (the
    lpips ``weights/v0.1/vgg.pth`` content). Each is a dict of numpy arrays or
    a ``.safetensors`` path. Raises ``convert.WeightsMismatchError`` naming
    every missing, unexpected and misshapen key.
    """
    state = {k: v for k, v in _as_state_dict(vgg).items() if not k.startswith("classifier.")}
    state.update(_as_state_dict(heads))
    dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
    abstract = jax.eval_shape(LPIPS(tuple(channels)).init, jax.random.key(0), dummy, dummy)["params"]
    return convert.state_dict_to_params(state, abstract, what="lpips")
