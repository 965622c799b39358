"""The attention implementations agree; the option reaches every attention layer and stays out of configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from configs import tiny
from ldm_jax.models import attention as attention_module
from ldm_jax.models.attention import (attention, einsum_attention, padded_keys_attention, pallas_tpu_attention,
                                      tiled_attention)
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.pipeline import build_modules, init_inputs

CPU_IMPLS = ("auto", "xla", "einsum")  # the implementations a CPU runs
TOLERANCE = 2e-6  # float32 rounding; measured <= 3e-7 on CPU (jax 0.10.2)


def _reference(q, k, v, heads, mask=None, is_causal=False) -> np.ndarray:
    """float64 numpy attention on [B, T, heads * D]."""
    split = lambda x: np.asarray(x, np.float64).reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    keep = np.ones(logits.shape, bool)
    if mask is not None:
        keep &= np.asarray(mask)
    if is_causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(keep, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)


def _qkv(batch, tq, tk, heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda t: (batch, t, heads * head_dim)
    return (rng.standard_normal(shape(tq)).astype(np.float32), rng.standard_normal(shape(tk)).astype(np.float32),
            rng.standard_normal(shape(tk)).astype(np.float32))


# U-Net shapes: self-attention over 8x8 latents and cross-attention to 7 text tokens; CLIP: causal self-attention
# over 6 tokens with padding keys masked out (the last two of the first prompt).
CASES = {
    "unet_self": dict(shapes=(2, 64, 64, 2, 16), mask=None, is_causal=False),
    "unet_cross": dict(shapes=(2, 64, 7, 2, 16), mask=None, is_causal=False),
    "clip_causal_masked": dict(shapes=(2, 6, 6, 4, 8), mask=np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], bool)
                               .reshape(2, 1, 1, 6), is_causal=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_implementations_agree(case):
    spec = CASES[case]
    batch, tq, tk, heads, head_dim = spec["shapes"]
    q, k, v = _qkv(batch, tq, tk, heads, head_dim)
    expected = _reference(q, k, v, heads, spec["mask"], spec["is_causal"])
    for impl in CPU_IMPLS:
        out = jax.jit(lambda q, k, v: attention(q, k, v, heads, spec["mask"], spec["is_causal"], impl=impl))(q, k, v)
        assert out.shape == expected.shape
        np.testing.assert_allclose(np.asarray(out), expected, atol=TOLERANCE, err_msg=impl)


@pytest.mark.parametrize("impl,backend", [("cudnn", "gpu"), ("pallas_tpu", "tpu")])
def test_unavailable_implementation_names_itself_and_the_backend(impl, backend):
    q, k, v = _qkv(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match=rf"attention_impl '{impl}' needs the '{backend}' backend.*backend is 'cpu'"):
        attention(q, k, v, 1, impl=impl)
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        attention(q, k, v, 1, impl="flash")


def test_the_option_reaches_every_attention_layer():
    """With 'cudnn' on a CPU every model fails at its first attention call: the field is passed all the way down."""
    configs = {name: tiny.get_config()[name].to_dict() for name in ("unet", "vae", "text_encoder")}
    modules = build_modules(configs, attention_impl="cudnn")
    for name in ("unet", "vae", "text_encoder"):
        assert modules[name].attention_impl == "cudnn"
        with pytest.raises(ValueError, match="attention_impl 'cudnn' needs the 'gpu' backend"):
            jax.eval_shape(modules[name].init, jax.random.key(0), *init_inputs(name, configs[name]))
    unet = build_modules(configs, attention_impl="xla")["unet"]
    jax.eval_shape(unet.init, jax.random.key(0), *init_inputs("unet", configs["unet"]))  # an available one traces


def test_runtime_fields_stay_out_of_the_diffusers_config():
    config = tiny.get_config().unet.to_dict()
    plain = UNet2DConditionModel.from_diffusers_config(config)
    tuned = UNet2DConditionModel.from_diffusers_config(config, attention_impl="xla", remat_policy="full")
    assert tuned.attention_impl == "xla" and tuned.remat_policy == "full"
    assert tuned.diffusers_config() == plain.diffusers_config()
    assert not {"attention_impl", "remat_policy", "dtype", "param_dtype"} & set(tuned.diffusers_config())
    with pytest.raises(ValueError, match="unknown diffusers UNet option 'attention_impl'"):
        UNet2DConditionModel.from_diffusers_config({**config, "attention_impl": "xla"})
    with pytest.raises(ValueError, match="unknown attention_impl 'fast'"):
        UNet2DConditionModel.from_diffusers_config(config, attention_impl="fast")


def _heads_last(x, heads):
    return jnp.asarray(x).reshape(x.shape[0], x.shape[1], heads, -1)


def test_padded_keys_give_the_unpadded_values_and_gradients():
    """7 keys padded to 8 (and 77 to 80, SD's text length): the padding gets no weight and no gradient."""
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    for tk in (7, 77):
        q, k, v = (_heads_last(x, 2) for x in _qkv(2, 16, tk, 2, 8))
        padded = lambda q, k, v: padded_keys_attention(q, k, v, 8, implementation="xla")
        value, grads = jax.value_and_grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
        plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
        expected_value, expected = jax.value_and_grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
        np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6)
        for got, want in zip(grads, expected):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on NVIDIA GPUs only")
@pytest.mark.parametrize("tk", [4096, 77])
def test_cudnn_matches_xla_on_gpu(tk):
    """SD 1.5's first-level self-attention (4096 keys) and cross-attention (77 text tokens, padded for cuDNN):
    bfloat16 values and gradients of the cuDNN kernel against XLA's, as training runs them."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(2, 4096, tk, 8, 40))
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, 8, impl=impl).astype(jnp.float32)))
    value, grads = jax.jit(jax.value_and_grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    expected_value, expected = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(float(value), float(expected_value), rtol=2e-2)
    for got, want in zip(grads, expected):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max() + 1e-3


# The Pallas TPU kernel, run by its interpreter on the CPU.

def test_pallas_tpu_kernel_matches_einsum_in_interpret_mode():
    """Causal attention with padding keys masked out (CLIP's case)."""
    spec = CASES["clip_causal_masked"]
    batch, tq, tk, heads, head_dim = spec["shapes"]
    q, k, v = (jnp.asarray(x).reshape(batch, x.shape[1], heads, head_dim).transpose(0, 2, 1, 3)
               for x in _qkv(batch, tq, tk, heads, head_dim))
    with pltpu.force_tpu_interpret_mode():
        out = pallas_tpu_attention(q, k, v, spec["mask"], spec["is_causal"])
    expected = einsum_attention(q, k, v, spec["mask"], spec["is_causal"])
    assert out.shape == expected.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=TOLERANCE)


def test_pallas_tpu_kernel_values_and_gradients_match_einsum_in_interpret_mode():
    """Forward and backward kernels (what training runs) with both paddings: 7 keys to 128, a 160-wide head
    (SD 1.5's third level) to 256."""
    q, k, v = (jnp.asarray(x).reshape(1, x.shape[1], 1, 160).transpose(0, 2, 1, 3) for x in _qkv(1, 8, 7, 1, 160))
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    with pltpu.force_tpu_interpret_mode():
        value, grads = jax.value_and_grad(loss(pallas_tpu_attention), argnums=(0, 1, 2))(q, k, v)
    expected_value, expected = jax.value_and_grad(loss(einsum_attention), argnums=(0, 1, 2))(q, k, v)
    # measured: value 2.5e-7 relative, gradients 5.4e-7 absolute
    np.testing.assert_allclose(float(value), float(expected_value), rtol=3e-6)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6)


@pytest.mark.parametrize("logits_per_tile", [2 * 64 * 64, 64 * 16, 64])
def test_tiled_attention_values_and_gradients_match_einsum(logits_per_tile):
    """Tiles of whole sequences for two (batch, head) rows, of 16 queries for one row, and of one query: the
    output and all three gradients equal the untiled einsum's; so do bfloat16 inputs, to bfloat16 rounding."""
    q, k, v = (jnp.asarray(x).reshape(2, x.shape[1], 2, 8).transpose(0, 2, 1, 3) for x in _qkv(2, 64, 64, 2, 8))
    weights = jnp.cos(jnp.arange(8.0))  # a loss whose gradient differs per output element
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    tiled = lambda q, k, v: tiled_attention(q, k, v, logits_per_tile)
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        args = tuple(x.astype(dtype) for x in (q, k, v))
        value, grads = jax.jit(jax.value_and_grad(loss(tiled), argnums=(0, 1, 2)))(*args)
        expected_value, expected = jax.value_and_grad(loss(einsum_attention), argnums=(0, 1, 2))(*args)
        np.testing.assert_allclose(float(value), float(expected_value), rtol=tolerance)
        for got, want in zip(grads, expected):
            assert got.shape == want.shape and got.dtype == dtype
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            assert np.abs(got - want).max() <= tolerance * np.abs(want).max(), dtype


def test_einsum_impl_tiles_only_large_unmasked_attention(monkeypatch):
    """Past LOGITS_PER_TILE logits the einsum implementation runs the tiled kernel (whose output then
    reaches attention()'s caller); masked and causal attention, and smaller calls, do not."""
    calls = []
    real = attention_module.tiled_attention
    monkeypatch.setattr(attention_module, "tiled_attention", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(attention_module, "LOGITS_PER_TILE", 2 * 2 * 64 * 64 - 1)
    q, k, v = _qkv(2, 64, 64, 2, 16)
    out = attention(q, k, v, 2, impl="einsum")
    assert calls == [2 * 2 * 64 * 64 - 1]
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, 2), atol=TOLERANCE)
    attention(q, k, v, 2, is_causal=True, impl="einsum")
    attention(q[:1], k[:1], v[:1], 2, impl="einsum")
    assert len(calls) == 1


@pytest.mark.slow  # about 25 s, a benchmark's smoke run (CI time budget)
def test_vae_attention_bench_compares_tiled_and_whole_attention(tmp_path):
    """bench.vae_attention_bench on configs/base.py's VAE at batch 4 (4 x 1,024 x 1,024 logits: past LOGITS_PER_TILE,
    so tiled): both variants give the same gradients and encodings, and the record holds both timings."""
    from bench import vae_attention_bench

    record = vae_attention_bench.main(["--train-batch", "4", "--encode-batch", "4", "--rounds", "1",
                                       "--out", str(tmp_path / "va.json")])
    assert record["attention_tokens"] == 1024 and 4 * 1024 * 1024 > record["logits_per_tile"]
    assert record["train_max_relative_difference"] < 1e-5 and record["encode_max_relative_difference"] < 1e-5
    for part in ("train", "encode"):
        assert record[f"{part}_tiled_s"] > 0 and record[f"{part}_whole_s"] > 0
