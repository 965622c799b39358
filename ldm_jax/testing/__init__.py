"""The PyTorch reference builders used by the tests and the benchmarks.

Independent references (diffusers / transformers / lpips / taming's PatchGAN),
built with seeded random weights: each submodule builds one reference model
(``unet``, ``vae``, ``clip`` with a tokenizer made without a download,
``pipeline``, ``lpips``, ``discriminator``), and this module holds what they
share (``max_rel_error``, ``numpy_state_dict``, ``perturb_norms``,
``random_params``).

It needs torch, diffusers and transformers, the ``test`` extra
(``pip install -e '.[test]'``); nothing else in ``ldm_jax`` imports it, so the
package itself imports without torch.
"""

import flax.linen as nn
import jax
import numpy as np
import torch


def perturb_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Randomize every norm scale and bias, which default init leaves at 1 and 0.

    Without this a swapped or missing norm parameter would go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def max_rel_error(ours, reference) -> float:
    """max |ours - reference| divided by max(1, max |reference|)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(ours - reference)) / max(1.0, float(np.max(np.abs(reference)))))


def random_params(module: nn.Module, *args, seed: int, non_negative: bool = False) -> dict:
    """Seeded random float32 params shaped like ``module.init(key, *args)``, without compiling an init.

    Kernels are N(0, 1 / fan_in), scales 1 + N(0, 0.01), other leaves N(0, 0.01); absolute values with ``non_negative``.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        else:
            value = (name == "scale") + 0.1 * rng.normal(size=leaf.shape)
        return np.asarray(np.abs(value) if non_negative else value, np.float32)

    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    return jax.tree_util.tree_map_with_path(draw, abstract)
