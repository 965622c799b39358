"""The CLIP text encoder (transformers' ``CLIPTextModel``) and its tokenizer.

Module names mirror the state-dict paths of transformers' checkpoint files
(``text_model.encoder.layers.0.self_attn.q_proj`` ...), so
``ldm_jax.weights.convert.state_dict_to_params`` loads such a checkpoint as is, and a
live transformers >= 5 model's state dict after :func:`normalize_state_dict`.
The model is a causal pre-LayerNorm transformer; it returns the final hidden
states (the U-Net's cross-attention context) and the hidden state at the EOS
token (the pooled output). Dropout is left out: the encoder is frozen here.

Importing this module imports neither torch nor tensorflow; transformers is
imported only by :func:`load_tokenizer`.
"""

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import paths
from ldm_jax.models.attention import attention, check_attention_impl
from ldm_jax.models.layers import Dtype, dense, gelu, layer_norm

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# CLIPTextConfig fields that define the architecture (and the pooling rule).
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                 "pad_token_id")

# Before transformers PR #24773 CLIP configs said eos_token_id=2; such models pool at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2

ACTIVATION_AXES = ("batch", "length", "embed")

_TOP_LEVEL_MODULES = ("embeddings", "encoder", "final_layer_norm")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The function for a transformers ``hidden_act`` name; ValueError if we do not support it."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with q_proj/k_proj/v_proj/out_proj (all with bias)."""
    heads: int
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (dense(width, name, ("embed", "heads"), **kw)(x) for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, self.heads, mask=mask, is_causal=True, impl=self.attention_impl)
        return dense(width, "out_proj", ("heads", "embed"), **kw)(out)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(self.hidden_act)(dense(self.intermediate_size, "fc1", ("embed", "mlp"), **kw)(x))
        return dense(x.shape[-1], "fc2", ("mlp", "embed"), **kw)(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(self.layer_norm_eps, "layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.heads, self.attention_impl, name="self_attn", **kw)(h, mask)
        h = layer_norm(self.layer_norm_eps, "layer_norm2", **kw)(x)
        x = x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        init = nn.initializers.normal(0.02)
        embed = lambda n, axes, name: nn.Embed(
            n, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            embedding_init=nn.with_logical_partitioning(init, axes))
        tokens = embed(self.vocab_size, ("vocab", "embed"), "token_embedding")(input_ids)
        positions = embed(self.max_position_embeddings, (None, "embed"), "position_embedding")(jnp.arange(length))
        return nn.with_logical_constraint(tokens + positions[None], ACTIVATION_AXES)


class CLIPEncoder(nn.Module):
    """The stack of encoder layers; returns the output of every layer."""
    num_hidden_layers: int
    heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> list[jax.Array]:
        outputs = []
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                                 self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(x, mask)
            outputs.append(x)
        return outputs


class CLIPTextTransformer(nn.Module):
    """embeddings -> encoder -> final_layer_norm: transformers' ``text_model``; see CLIPTextModel.

    Fields are the CLIPTextConfig fields of the same names (defaults as there).
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    skip_last_layers: int = 0
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        activation(self.hidden_act)
        check_attention_impl(self.attention_impl)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if not 0 <= self.skip_last_layers < self.num_hidden_layers:
            raise ValueError(f"skip_last_layers must be in [0, {self.num_hidden_layers}), "
                             f"got {self.skip_last_layers}")
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, name="embeddings",
                               **kw)(input_ids)
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        hidden = CLIPEncoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                             self.hidden_act, self.layer_norm_eps, self.attention_impl, name="encoder", **kw)(x, mask)
        final_norm = layer_norm(self.layer_norm_eps, "final_layer_norm", **kw)
        last = final_norm(hidden[-1])
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        if self.skip_last_layers:
            last = final_norm(hidden[-1 - self.skip_last_layers])
        return last, pooled


class CLIPTextModel(CLIPTextTransformer):
    """transformers' ``CLIPTextModel`` in Flax: ``apply(params, input_ids) -> (last_hidden_state, pooled)``.

    The fields (those of CLIPTextTransformer) are the CLIPTextConfig fields of
    the same names, plus ``skip_last_layers``, ``attention_impl`` (the
    attention kernel, ``ldm_jax.models.attention``), ``dtype`` (compute) and
    ``param_dtype`` (storage). ``input_ids`` is an int array [B, L] with
    L <= max_position_embeddings; the optional ``attention_mask`` [B, L]
    (1 = real token) hides padding keys on top of the causal mask.
    ``last_hidden_state`` is [B, L, hidden_size]; ``pooled`` [B, hidden_size]
    is the final state at the EOS token: at argmax(input_ids) when
    ``eos_token_id == 2`` (the legacy configs of SD 1.x / 2.x), else at the
    first position holding ``eos_token_id``.

    ``skip_last_layers = k > 0`` ("clip skip") makes ``last_hidden_state`` the
    output of layer ``num_hidden_layers - k`` passed through the final
    LayerNorm, as diffusers' ``clip_skip`` does; ``pooled`` is unchanged. All
    layers still run (and own parameters), so any k loads the same weights.
    """

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(CLIPTextTransformer)
                  if f.name not in ("parent", "name")}
        return CLIPTextTransformer(**fields, name="text_model")(input_ids, attention_mask)

    @classmethod
    def from_transformers_config(cls, config: dict[str, Any], *, dtype: Dtype = jnp.float32,
                                 param_dtype: Dtype = jnp.float32, skip_last_layers: int = 0,
                                 attention_impl: str = "auto") -> "CLIPTextModel":
        """Build from a transformers text-encoder ``config.json`` dict; missing fields take CLIPTextConfig defaults."""
        fields = {k: config[k] for k in CONFIG_FIELDS if config.get(k) is not None}
        return cls(**fields, skip_last_layers=skip_last_layers, attention_impl=attention_impl, dtype=dtype,
                   param_dtype=param_dtype)

    def transformers_config(self) -> dict[str, Any]:
        """A dict that ``transformers.CLIPTextConfig(**d)`` accepts, describing this architecture."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **{k: getattr(self, k) for k in CONFIG_FIELDS}}


def normalize_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Put a CLIPTextModel state dict in the checkpoint-file layout that our module names mirror.

    transformers >= 5 keeps the modules at the top level (``embeddings.*``,
    ``encoder.*``, ``final_layer_norm.*``); checkpoint files and transformers 4
    nest them under ``text_model.``, which both versions load. Other keys are
    left alone, so foreign ones are still reported by the weight loader.
    """
    return {f"text_model.{k}" if k.split(".")[0] in _TOP_LEVEL_MODULES else k: v for k, v in state.items()}


def load_tokenizer(folder: str) -> Any:
    """transformers' ``CLIPTokenizer`` from a folder holding vocab.json and merges.txt (a ``tokenizer/`` dir),
    local or remote (copied to a temporary folder first: transformers reads only local ones)."""
    from transformers import CLIPTokenizer  # imported here: only tokenization needs transformers
    with paths.local_folder(folder) as local:
        return CLIPTokenizer.from_pretrained(local)


def write_tokenizer(tokenizer: Any, folder: str) -> None:
    """Write ``tokenizer``'s files (``save_pretrained``) to ``folder``, local or remote."""
    with paths.writable_folder(folder) as local:
        tokenizer.save_pretrained(local)


def tokenize(tokenizer: Any, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids [B, max_length] int32: BOS, prompt, EOS, then padding with the tokenizer's pad token.

    ``max_length`` defaults to the tokenizer's ``model_max_length`` (pass the
    encoder's ``max_position_embeddings`` when they differ). A longer prompt
    is truncated (keeping its EOS) with a warning naming the prompt, the limit
    and the dropped text. A missing tokenizer (a single-file checkpoint has
    none) is a ValueError saying where to get one.
    """
    if tokenizer is None:
        raise ValueError("no tokenizer: a single-file checkpoint carries none; load a CLIP tokenizer folder with "
                         "ldm_jax.models.clip.load_tokenizer(DIR) (the sample command: --tokenizer DIR)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    max_length = tokenizer.model_max_length if max_length is None else max_length
    for prompt, ids in zip(prompts, tokenizer(prompts)["input_ids"]):
        if len(ids) > max_length:
            dropped = tokenizer.decode(ids[max_length - 1:-1])
            warnings.warn(f"prompt {prompt!r} is {len(ids)} tokens long; truncated to the limit of {max_length} "
                          f"tokens, dropping {dropped!r}", stacklevel=2)
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return np.asarray(ids, dtype=np.int32).reshape(len(prompts), max_length)
