"""The ``lpips`` package's LPIPS-VGG as a reference, with a random VGG16 trunk.

lpips builds its trunk with ``torchvision.models.vgg16(pretrained=...).features``.
PyPI's torchvision wheels are built against PyPI's CUDA torch and do not load
next to the CPU-only torch build used here (``operator torchvision::nms does
not exist``: its ``_C.so`` links ``libtorch_cuda``), and the CPU wheel index
is not reachable. So ``import_lpips`` imports lpips with a minimal
``torchvision.models`` stand-in in ``sys.modules`` whose ``vgg16`` returns
torchvision's exact ``features`` layout (the classifier is never used by
lpips). Everything LPIPS itself computes — scaling layer, tap slicing,
normalization, linear heads, spatial average, layer sum — is the lpips
package's code.
"""

import functools
import sys
import types
from unittest import mock

import pytest
import torch
from torch import nn

# torchvision's cfgs["D"] (VGG16): conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features``: 3x3 convs (padding 1) + ReLU, 2x2 max-pools (indices 0 .. 30).

    Weights are He-normal (fan in) with N(0, 0.1) biases so that activations stay O(1) through all 13 convs.
    """
    layers, channels = [], 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(channels, item, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.normal_(conv.bias, std=0.1)
        layers += [conv, nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(*layers)


def _torchvision_stand_in() -> types.ModuleType:
    models = types.ModuleType("torchvision.models")

    def vgg16(pretrained: bool = False, **_):
        assert not pretrained, "the stand-in has no pretrained weights"
        return types.SimpleNamespace(features=vgg16_features())

    models.vgg16 = vgg16
    package = types.ModuleType("torchvision")
    package.models = models
    return package


@functools.cache
def import_lpips() -> types.ModuleType:
    """The lpips package, imported with the torchvision stand-in (see the module docstring); skips the
    calling test when lpips is not installed."""
    stand_in = _torchvision_stand_in()
    with mock.patch.dict(sys.modules, {"torchvision": stand_in, "torchvision.models": stand_in.models}):
        return pytest.importorskip("lpips", reason="lpips is not installed: pip install --no-deps lpips==0.1.4")


def build(seed: int, random_heads: bool = True) -> nn.Module:
    """lpips' ``LPIPS(net='vgg')`` with a seeded random trunk, in eval mode.

    ``random_heads`` draws the linear heads at random (non-negative, like the
    trained ones); otherwise they are the trained heads shipped inside the lpips package.
    """
    lpips = import_lpips()
    torch.manual_seed(seed)
    model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=not random_heads, verbose=False)
    if random_heads:
        with torch.no_grad():
            for lin in model.lins:
                lin.model[1].weight.uniform_(0.0, 1.0)
    return model.eval()
