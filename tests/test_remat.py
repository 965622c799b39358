"""U-Net rematerialization: same parameters, same loss and gradients, and the remat really in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.layers import REMAT_POLICIES
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.testing import random_params

# One level, no resnets on the way down (a small program: fast compiles): the mid block and one up resnet +
# transformer pair.
CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",),
              up_block_types=("CrossAttnUpBlock2D",), block_out_channels=(32,), layers_per_block=0,
              attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
_rng = np.random.default_rng(0)
INPUTS = (_rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([10, 700]),
          _rng.standard_normal((2, 7, 32)).astype(np.float32))
TARGET = _rng.standard_normal((2, 8, 8, 4)).astype(np.float32)


def _unet(policy: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_diffusers_config(CONFIG, remat_policy=policy)


def _loss_fn(unet: UNet2DConditionModel):
    return lambda params: jnp.mean(jnp.square(unet.apply({"params": params}, *INPUTS) - TARGET))


def _paths(tree) -> list[tuple[str, tuple[int, ...]]]:
    return [(jax.tree_util.keystr(path), leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_remat_keeps_the_parameter_tree():
    """Checkpoints and weight conversion see the same names and shapes whatever the policy."""
    plain = jax.eval_shape(_unet("none").init, jax.random.key(0), *INPUTS)["params"]
    for policy in REMAT_POLICIES:
        assert _paths(jax.eval_shape(_unet(policy).init, jax.random.key(0), *INPUTS)["params"]) == _paths(plain)


def test_remat_wraps_every_block_with_its_policy():
    """Every policy but 'none' puts each resnet and each transformer under jax.checkpoint with its policy."""
    params = random_params(_unet("none"), *INPUTS, seed=0)
    for policy, saveable in REMAT_POLICIES.items():
        jaxpr = jax.make_jaxpr(_loss_fn(_unet(policy)))(params)
        remats = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint")]
        # mid: resnet, transformer, resnet; up: resnet + transformer
        assert len(remats) == (0 if policy == "none" else 5)
        assert all(e.params["policy"] is saveable for e in remats)


def test_remat_gives_the_same_loss_and_gradients():
    params = random_params(_unet("none"), *INPUTS, seed=0)
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(_unet("none"))))(params)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(_loss_fn(_unet("dots_saveable"))))(params)
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat_policy 'some'"):
        _unet("some")
