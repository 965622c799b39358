"""taming-transformers' PatchGAN ``NLayerDiscriminator`` in PyTorch, rebuilt layer by layer (taming is not
installable from PyPI in a usable form): ``main`` is the same ``nn.Sequential``, so state-dict keys and
parameter counts are taming's."""

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    """taming's ``NLayerDiscriminator(input_nc, ndf, n_layers)``; ``norm='group'`` swaps BatchNorm2d for
    GroupNorm(groups) and, as taming does for any norm other than BatchNorm, gives the middle convs a bias."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch", groups: int = 32):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.GroupNorm(groups, c))
        use_bias = norm != "batch"
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=use_bias), norm_layer(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits map [B, 1, H', W'] of NCHW images."""
        return self.main(x)


def weights_init(module: nn.Module) -> None:
    """taming's init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0)


def build(seed: int = 0, **config) -> NLayerDiscriminator:
    """A seeded discriminator with taming's init, in train mode (as taming uses it)."""
    torch.manual_seed(seed)
    return NLayerDiscriminator(**config).apply(weights_init).train()
