"""Independent PyTorch references (diffusers / transformers) built with random weights.

Each submodule builds one reference model at a tiny config; this package holds
what they share.
"""

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
