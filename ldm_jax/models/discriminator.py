"""The PatchGAN discriminator of pix2pix, as taming-transformers' ``NLayerDiscriminator`` (used by LDM).

Layout (``n_layers=3``, ``ndf=64``): 4x4 convs with padding 1 —
``ndf`` stride 2, LeakyReLU(0.2); then ``ndf * min(2**n, 8)`` for n = 1 ..
n_layers (stride 2, the last stride 1), each followed by a norm and
LeakyReLU(0.2); then a 1-channel conv, stride 1. An H x W image gives an
(H/8 - 2) x (W/8 - 2) map of logits (30 x 30 for 256 x 256). Module names are
the torch ``nn.Sequential`` indices (``main_0``, ``main_2``, ``main_3`` ...),
so torch state dicts load through ``ldm_jax.weights.convert``.

Norms (``norm``):

* ``"batch"`` (default): batch-statistics normalization with a learned scale
  and bias and **no running averages**. It is what taming's ``BatchNorm2d``
  computes during training (the discriminator is always in train mode
  there), but stateless: no ``batch_stats`` collection to thread through the
  jitted step, no train/eval switch. Under a sharded ``jit`` the statistics
  are over the global batch. Statistics are per call, so, as in taming, the
  real and the fake batch are normalized separately.
* ``"group"``: GroupNorm (``groups`` groups), per example: no coupling
  between examples or devices.

Without a BatchNorm the middle convs get a bias, as in taming. Conv kernels
start N(0, 0.02) and BatchNorm scales N(1, 0.02) (taming's ``weights_init``);
GroupNorm scales start at 1 and all biases at 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import Dtype, conv, group_norm

NORMS = ("batch", "group")
BN_EPS = 1e-5  # torch BatchNorm2d
GN_EPS = 1e-5  # torch GroupNorm
LEAK = 0.2


def _scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchStatNorm(nn.Module):
    """BatchNorm with the current batch's statistics over (N, H, W) and no running averages (stateless).

    Statistics are computed in float32; the output is cast to ``dtype``.
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],)
        scale = self.param("scale", nn.with_logical_partitioning(_scale_init, ("norm",)), shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), shape,
                          self.param_dtype)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
        return ((h - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: NHWC images [B, H, W, C] -> logits [B, H/8 - 2, W/8 - 2, 1] (``n_layers=3``)."""
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        x = nn.leaky_relu(self._conv(self.ndf, 2, "main_0", True)(x), LEAK)
        index = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            x = self._conv(self.ndf * min(2 ** n, 8), stride, f"main_{index}", self.norm != "batch")(x)
            x = nn.leaky_relu(self._norm(f"main_{index + 1}")(x), LEAK)
            index += 3
        return self._conv(1, 1, f"main_{index}", True)(x)

    def _conv(self, features: int, stride: int, name: str, use_bias: bool) -> nn.Conv:
        return conv(features, 4, name, stride=stride, padding=((1, 1), (1, 1)), use_bias=use_bias,
                    kernel_init=nn.initializers.normal(0.02), dtype=self.dtype, param_dtype=self.param_dtype)

    def _norm(self, name: str) -> nn.Module:
        if self.norm == "batch":
            return BatchStatNorm(self.dtype, self.param_dtype, name=name)
        return group_norm(self.groups, GN_EPS, name, dtype=self.dtype, param_dtype=self.param_dtype)
