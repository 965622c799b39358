"""UNet2DConditionModel against diffusers' PyTorch model with the same random convert."""

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding

from ldm_jax.weights import convert
from ldm_jax.models.unet import GEGLU, UNet2DConditionModel, timestep_embedding
from ldm_jax.testing import max_rel_error, numpy_state_dict
from ldm_jax.testing import unet as refs

CONFIGS = {"sd1": refs.SD1_TINY, "sd2": refs.SD2_TINY, "text_time": refs.TEXT_TIME_TINY,
           "scale_shift": dict(refs.SD1_TINY, resnet_time_scale_shift="scale_shift"),
           "only_cross": refs.ONLY_CROSS_TINY}
TIMESTEPS = np.array([1, 999])
# float32 max_rel_error measured on CPU: sd1 1.7e-6, sd2 1.3e-6, text_time 1.4e-6. The bound is tighter than the
# 1e-4 used at full size so that near-misses fail too: tanh-approximated GELU gives 5e-5.
F32_TOLERANCE = 1e-5

# bfloat16 compute (float32 params) vs the float32 reference. Measured max_rel_error on CPU
# (jax 0.10.2): sd1 1.8e-2, sd2 1.2e-2 (bfloat16 keeps 8 significant bits, ~4e-3 per rounding,
# accumulated over ~30 layers); the bound leaves ~2.5x margin for other backends.
BF16_TOLERANCE = 5e-2


def _inputs(config: dict, batch: int = 2, tokens: int = 7, seed: int = 0):
    """Random NHWC latents, int timesteps and a context for ``config``."""
    rng = np.random.RandomState(seed)
    size = config["sample_size"]
    sample = rng.randn(batch, size, size, config["in_channels"]).astype(np.float32)
    context = rng.randn(batch, tokens, config["cross_attention_dim"]).astype(np.float32)
    return sample, TIMESTEPS[:batch], context


def _torch_forward(model: TorchUNet, sample, timesteps, context) -> np.ndarray:
    """The diffusers model's NHWC output on NHWC inputs."""
    with torch.no_grad():
        out = model(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                    torch.from_numpy(context)).sample
    return out.permute(0, 2, 3, 1).numpy()


def _abstract_params(model: UNet2DConditionModel, sample, timesteps, context):
    """Shapes (boxed with logical names) of the params of ``model``, without computing them."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), sample, timesteps, context))["params"]


class Case:
    """One tiny config: the diffusers reference, our module with its weights, inputs and reference output."""

    def __init__(self, config: dict):
        self.config = config
        self.torch_model = refs.build(config, seed=0)
        self.state = numpy_state_dict(self.torch_model)
        self.model = UNet2DConditionModel.from_diffusers_config(dict(self.torch_model.config))
        self.inputs = _inputs(config)
        self.abstract = _abstract_params(self.model, *self.inputs)
        self.params = convert.state_dict_to_params(self.state, self.abstract, what="unet")
        self.expected = _torch_forward(self.torch_model, *self.inputs)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request) -> Case:
    """Each tiny config, built once per module."""
    return Case(CONFIGS[request.param])


def test_float32_parity(case):
    out = jax.jit(case.model.apply)({"params": case.params}, *case.inputs)
    assert out.shape == case.expected.shape and out.dtype == jnp.float32
    assert max_rel_error(out, case.expected) <= F32_TOLERANCE


def test_params_to_state_dict_loads_strictly_into_diffusers(case):
    state = convert.params_to_state_dict(case.params)
    fresh = refs.build(case.config, seed=1)
    assert max_rel_error(_torch_forward(fresh, *case.inputs), case.expected) > 1e-2  # different weights
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    np.testing.assert_array_equal(_torch_forward(fresh, *case.inputs), case.expected)


def test_config_round_trip(case):
    config = case.model.diffusers_config()
    rebuilt = TorchUNet.from_config(config)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in case.state.items()}
    assert UNet2DConditionModel.from_diffusers_config(config) == case.model


def test_params_carry_logical_axis_names(case):
    leaves = jax.tree_util.tree_leaves(case.abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(p, nn.Partitioned) and len(p.names) == p.value.ndim for p in leaves)


def test_bfloat16_compute(case):
    model = UNet2DConditionModel.from_diffusers_config(dict(case.torch_model.config), dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": case.params}, *case.inputs)
    assert out.dtype == jnp.bfloat16
    err = max_rel_error(np.asarray(out, np.float32), case.expected)
    assert 1e-5 < err <= BF16_TOLERANCE  # the lower bound shows the compute really ran in bfloat16


def test_weights_mismatch_names_key_and_shapes(case):
    state = dict(case.state)
    del state["conv_out.bias"]
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    good = state[key].shape
    state[key] = np.zeros((good[0], good[1] + 1), np.float32)
    with pytest.raises(convert.WeightsMismatchError) as info:
        convert.state_dict_to_params(state, case.abstract)
    message = str(info.value)
    assert "conv_out.bias" in message
    assert f"{key}: expected shape {good}, found {(good[0], good[1] + 1)}" in message


def test_timestep_embedding_matches_diffusers():
    t = np.array([0, 1, 17, 500, 999])
    for dim, flip, shift in [(32, True, 0), (32, False, 1), (33, True, 1)]:
        expected = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim, flip, shift), expected, atol=2e-4)


def test_geglu_matches_diffusers_and_its_backward_concatenates_no_activations():
    """GEGLU's kernel is applied in halves: same values and gradients as diffusers' chunked projection, and the
    compiled gradient holds no concatenate of activation size (what the halves avoid)."""
    from diffusers.models.activations import GEGLU as TorchGEGLU

    torch.manual_seed(0)
    reference = TorchGEGLU(32, 48)
    x = np.random.default_rng(0).standard_normal((2, 10, 32)).astype(np.float32)
    x_t = torch.tensor(x, requires_grad=True)
    torch.sin(reference(x_t)).sum().backward()
    module = GEGLU(48)
    params = {"params": {"proj": {"kernel": jnp.asarray(reference.proj.weight.detach().numpy().T),
                                  "bias": jnp.asarray(reference.proj.bias.detach().numpy())}}}
    grad_fn = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))), argnums=(0, 1)))
    grads, grad_x = grad_fn(params, jnp.asarray(x))
    # atol: measured 2.4e-7 (values), 3.0e-7 (input gradient), 1.4e-6 (kernel gradient, |values| up to ~10)
    np.testing.assert_allclose(module.apply(params, x), reference(torch.tensor(x)).detach().numpy(), atol=3e-6)
    np.testing.assert_allclose(grad_x, x_t.grad.numpy(), atol=3e-6)
    np.testing.assert_allclose(grads["params"]["proj"]["kernel"], reference.proj.weight.grad.numpy().T, atol=1.5e-5)
    hlo = grad_fn.lower(params, jnp.asarray(x)).compile().as_text()
    concatenated = re.findall(r"= f32\[([\d,]+)\]\S* concatenate\(", hlo)
    assert not [shape for shape in concatenated if shape.startswith("2,10,")], concatenated


@pytest.mark.parametrize("option, value", [
    ("resnet_time_scale_shift", "scale_and_shift"), ("class_embed_type", "timestep"), ("mid_block_scale_factor", 2.0),
    ("dual_cross_attention", True), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text_time"), ("some_new_option", 1),
])
def test_unsupported_options_raise(option, value):
    config = dict(refs.SD1_TINY, **{option: value})
    with pytest.raises(ValueError, match=re.escape(option)):
        UNet2DConditionModel.from_diffusers_config(config)


def test_unsupported_block_type_raises():
    config = dict(refs.SD1_TINY, down_block_types=("CrossAttnDownBlock2D", "AttnDownBlock2D"))
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNet2DConditionModel.from_diffusers_config(config)


@pytest.mark.slow
def test_sd15_full_size_parity():
    """SD 1.5's architecture with random weights, 64x64 latents, 77 tokens, batch 1, float32 (~11 GB RAM)."""
    start = time.time()
    torch_model = refs.build(refs.SD15, seed=0)
    model = UNet2DConditionModel.from_diffusers_config(dict(torch_model.config))
    inputs = _inputs(refs.SD15, batch=1, tokens=77)
    expected = _torch_forward(torch_model, *inputs)
    params = convert.state_dict_to_params(numpy_state_dict(torch_model), _abstract_params(model, *inputs))
    del torch_model  # the numpy state dict shares its memory
    params = jax.device_put(params)
    out = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))
    abs_err, rel_err = float(np.max(np.abs(out - expected))), max_rel_error(out, expected)
    print(f"SD1.5 UNet parity: max abs {abs_err:.3g}, rel {rel_err:.3g}, |ref| max {np.abs(expected).max():.3g}, "
          f"{time.time() - start:.0f}s")
    assert rel_err <= 1e-4
