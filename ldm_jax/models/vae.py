"""The KL-regularized autoencoder of latent diffusion (diffusers' ``AutoencoderKL``).

Images are NHWC in [-1, 1]. ``encode`` returns a :class:`DiagonalGaussian`
posterior over latents; ``decode`` maps (unscaled) latents back to images.
The diffusion model works on ``z * scaling_factor(config)``.

Module names mirror the diffusers state-dict paths (``encoder.down_blocks.0
.resnets.1.conv1``, ``encoder.mid_block.attentions.0.to_q``, ``quant_conv``
...), so ``ldm_jax.weights.convert.state_dict_to_params`` loads a diffusers
AutoencoderKL state dict without a key map.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.attention import check_attention_impl
from ldm_jax.models.layers import (Attention, Downsample2D, Dtype, ResnetBlock2D, Upsample2D, conv,
                                   group_norm)

EPS = 1e-6  # every norm of the diffusers / LDM autoencoder
ACT_AXES = ("batch", "height", "width", "channels")
DEFAULT_SCALING_FACTOR = 0.18215


@flax.struct.dataclass
class DiagonalGaussian:
    """A diagonal Gaussian over NHWC latents: the encoder's posterior q(z | x).

    Build it with :meth:`from_moments`, which clips ``logvar`` to [-30, 20] as
    LDM does; the constructor takes ``mean`` and ``logvar`` as given. It is a
    pytree, so it can be returned from jitted functions.
    """
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split ``[..., 2 * C]`` moments into mean and clipped logvar (float32)."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        """Standard deviation exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """Variance exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """A reparameterized sample mean + std * eps, eps ~ N(0, I) drawn from ``rng``."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The most likely latent (the mean)."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example: shape [B], summed over all other axes."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)

    def nll(self, x: jax.Array) -> jax.Array:
        """Negative log-likelihood of ``x`` per example: shape [B], summed over all other axes."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var, axis=axes)


class MidAttention(nn.Module):
    """Single-head self-attention over the H*W positions, with its own GroupNorm and a residual."""
    groups: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = group_norm(self.groups, EPS, "group_norm", **kw)(x).reshape(b, h * w, c)
        attn = Attention(heads=1, head_dim=c, out_features=c, qkv_bias=True, attention_impl=self.attention_impl, **kw)
        nn.share_scope(self, attn)  # to_q / to_k / to_v / to_out_0 sit next to group_norm, as in diffusers
        return x + attn(tokens).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet, (attention), resnet at constant width: diffusers' ``UNetMidBlock2D`` without time embedding."""
    groups: int
    add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = MidAttention(self.groups, self.attention_impl, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, self.groups, EPS, name="resnets_1", **kw)(x)


class ResnetStack(nn.Module):
    """``num_layers`` resnets, then an optional resampling: diffusers' ``DownEncoderBlock2D`` (``resample='down'``,
    an asymmetric stride-2 conv) or ``UpDecoderBlock2D`` (``resample='up'``, nearest 2x then conv)."""
    channels: int
    num_layers: int
    groups: int
    resample: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.channels, self.groups, EPS, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, asymmetric=True, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, C_in] -> moments [B, H/f, W/f, 2 * latent_channels], f = 2 ** (len(blocks) - 1)."""
    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[0], 3, "conv_in", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = nn.with_logical_constraint(x, ACT_AXES)
            x = ResnetStack(channels, self.layers_per_block, self.groups, resample=None if i == last else "down",
                            name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.attention_impl, name="mid_block", **kw)(x)
        x = group_norm(self.groups, EPS, "conv_norm_out", activation="silu", **kw)(x)
        return conv(2 * self.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels].

    Up blocks run over ``block_out_channels`` reversed, with ``layers_per_block + 1`` resnets each.
    """
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.block_out_channels[-1], 3, "conv_in", **kw)(z)
        x = MidBlock(self.groups, self.mid_block_add_attention, self.attention_impl, name="mid_block", **kw)(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(reversed(self.block_out_channels)):
            x = nn.with_logical_constraint(x, ACT_AXES)
            x = ResnetStack(channels, self.layers_per_block + 1, self.groups, resample=None if i == last else "up",
                            name=f"up_blocks_{i}", **kw)(x)
        x = group_norm(self.groups, EPS, "conv_norm_out", activation="silu", **kw)(x)
        return conv(self.out_channels, 3, "conv_out", **kw)(x)


# diffusers AutoencoderKL config keys: those that define the architecture, those that do not change
# the module's numerics (ignored here), and those that must be None because we do not implement them.
_ARCH_KEYS = frozenset({
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "mid_block_add_attention",
    "use_quant_conv", "use_post_quant_conv",
})
_PASSIVE_KEYS = frozenset({"sample_size", "scaling_factor", "force_upcast"})
_MUST_BE_NONE = ("shift_factor", "latents_mean", "latents_std")
_DOWN_BLOCK, _UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


def scaling_factor(config: Mapping[str, Any]) -> float:
    """The latent scale of a diffusers ``vae/config.json`` (0.18215, SD v1/v2's, when absent)."""
    return float(config.get("scaling_factor", DEFAULT_SCALING_FACTOR))


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``: encoder, 1x1 quant_conv, posterior, 1x1 post_quant_conv, decoder.

    Defaults are diffusers'; SD's VAE is ``block_out_channels=(128, 256, 512, 512),
    layers_per_block=2``. Use ``apply(..., method='encode')`` for the posterior
    and ``method='decode'`` for images; ``__call__`` does both for training.
    ``attention_impl`` (the mid blocks' attention kernel,
    ``ldm_jax.models.attention``), ``dtype`` and ``param_dtype`` are ours,
    not diffusers config options.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one block")
        check_attention_impl(self.attention_impl)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = tuple(self.block_out_channels)
        self.encoder = Encoder(blocks, self.layers_per_block, self.latent_channels, self.norm_num_groups,
                               self.mid_block_add_attention, self.attention_impl, **kw)
        self.decoder = Decoder(blocks, self.layers_per_block, self.out_channels, self.norm_num_groups,
                               self.mid_block_add_attention, self.attention_impl, **kw)
        latent = self.latent_channels
        self.quant_conv = conv(2 * latent, 1, "quant_conv", **kw) if self.use_quant_conv else None
        self.post_quant_conv = conv(latent, 1, "post_quant_conv", **kw) if self.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Posterior q(z | x) for images ``x`` [B, H, W, in_channels] in [-1, 1] (statistics in float32)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images [B, h*f, w*f, out_channels] (about [-1, 1]) from unscaled latents ``z`` [B, h, w, latent_channels]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None,
                 sample_posterior: bool = False) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction of ``x`` and its posterior; decodes a sample (needs ``rng``) or the mode."""
        if sample_posterior and rng is None:
            raise ValueError("sample_posterior=True needs an rng")
        posterior = self.encode(x)
        z = posterior.sample(rng) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], dtype: Dtype = jnp.float32,
                              param_dtype: Dtype = jnp.float32, attention_impl: str = "auto") -> "AutoencoderKL":
        """Build the module from a diffusers ``vae/config.json`` dict.

        Keys starting with ``_`` and ``sample_size``, ``scaling_factor`` and
        ``force_upcast`` are ignored (see :func:`scaling_factor`). Unknown keys,
        block types other than DownEncoderBlock2D / UpDecoderBlock2D, an
        ``act_fn`` other than silu and a non-None ``shift_factor``,
        ``latents_mean`` or ``latents_std`` raise ValueError naming the option.
        """
        unknown = sorted(k for k in config if not k.startswith("_")
                         and k not in _ARCH_KEYS | _PASSIVE_KEYS | set(_MUST_BE_NONE))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config option(s): {', '.join(unknown)}")
        for key in _MUST_BE_NONE:
            if config.get(key) is not None:
                raise ValueError(f"AutoencoderKL config option {key}={config[key]!r} is not supported (only None)")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"AutoencoderKL config option act_fn={config['act_fn']!r} is not supported (only 'silu')")
        kwargs = {k: config[k] for k in _ARCH_KEYS - {"act_fn", "down_block_types", "up_block_types"} if k in config}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(int(c) for c in kwargs["block_out_channels"])
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = tuple(config.get(key, (block,)))
            if types != (block,) * n:
                raise ValueError(f"AutoencoderKL config option {key}={types!r} is not supported "
                                 f"(only {n} x {block!r}, one per block_out_channels entry)")
        return cls(**kwargs, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)

    def diffusers_config(self, **extra: Any) -> dict:
        """A config dict that diffusers' ``AutoencoderKL.from_config`` turns into this architecture.

        ``extra`` may set the keys that do not change the module (``scaling_factor``,
        ``sample_size``, ``force_upcast``); ``scaling_factor`` defaults to 0.18215.
        """
        bad = sorted(set(extra) - _PASSIVE_KEYS)
        if bad:
            raise ValueError(f"diffusers_config: only {sorted(_PASSIVE_KEYS)} may be given, not {bad}")
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [_DOWN_BLOCK] * n,
            "up_block_types": [_UP_BLOCK] * n,
            "block_out_channels": [int(c) for c in self.block_out_channels],
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "mid_block_add_attention": self.mid_block_add_attention,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "scaling_factor": DEFAULT_SCALING_FACTOR,
            **extra,
        }
