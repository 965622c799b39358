"""PyTorch-layout state dicts (diffusers / transformers naming) <-> our Flax params.

Our modules are named after the diffusers modules, so each Flax parameter path
maps to one state-dict key by a fixed rule:

* a module name ``<list>_<i>`` where ``<list>`` is a torch ``ModuleList`` /
  ``Sequential`` name (``down_blocks_0``, ``to_out_0``) becomes ``<list>.<i>``;
* ``kernel`` becomes ``weight`` (conv kernels HWIO <-> OIHW, dense kernels
  transposed), ``scale`` and ``embedding`` become ``weight``, ``bias`` stays;
  the torch parameters in ``PLAIN_PARAMETERS`` keep their name.

Conversion is driven by the abstract param tree of the module, so every
missing key, unexpected key and shape mismatch is found and reported at once.
Nothing here imports torch: state dicts are dicts of numpy arrays.
"""

import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

# torch ModuleList / Sequential attribute names whose children are indexed.
INDEXED_MODULES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
    "features", "model", "main",  # torchvision VGG16, lpips linear heads, taming's PatchGAN discriminator
})
_INDEXED = re.compile(r"^(%s)_(\d+)$" % "|".join(sorted(INDEXED_MODULES)))

# Parameters that keep their own name in the state dict (torch ``nn.Parameter`` attributes, not layers).
PLAIN_PARAMETERS = frozenset({"positional_embedding"})

# Buffers that torch modules carry but that are not parameters of ours.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


class WeightsMismatchError(ValueError):
    """A state dict does not fit the module: lists every missing, unexpected and misshapen key."""


def torch_key(path: tuple[str, ...], ndim: int) -> str:
    """The state-dict key of the Flax parameter at ``path`` (with ``ndim`` dims)."""
    *modules, leaf = path
    parts = [_INDEXED.sub(r"\1.\2", m) for m in modules]
    if leaf in PLAIN_PARAMETERS:
        return ".".join([*parts, leaf])
    parts.append("bias" if leaf == "bias" else "weight")
    if leaf not in ("kernel", "bias", "scale", "embedding"):
        raise ValueError(f"no torch name for parameter {'/'.join(path)} (ndim {ndim})")
    return ".".join(parts)


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Rearrange a torch tensor into the layout of the Flax parameter named ``leaf``."""
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_flax_layout`."""
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _flat_shapes(abstract_params: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    unboxed = flax.linen.meta.unbox(abstract_params)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(unboxed))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def state_dict_shapes(abstract_params: Any) -> dict[str, tuple[int, ...]]:
    """The torch-named state-dict keys and torch-layout shapes that ``abstract_params`` expects."""
    return {torch_key(path, len(shape)): _torch_shape(path[-1], shape)
            for path, shape in _flat_shapes(abstract_params).items()}


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(to_torch_layout(leaf, np.empty(shape, np.int8)).shape)


def state_dict_to_params(state: Mapping[str, np.ndarray], abstract_params: Any, *, what: str = "model",
                         dtype: Any = np.float32) -> dict:
    """Build the Flax param tree shaped like ``abstract_params`` from a torch-named ``state``.

    Raises WeightsMismatchError naming every missing key, unexpected key and
    shape mismatch (key, expected shape, found shape).
    """
    missing, mismatched, flat = [], [], {}
    used = set()
    for path, shape in _flat_shapes(abstract_params).items():
        key = torch_key(path, len(shape))
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax_layout(path[-1], np.asarray(state[key]))
        if tuple(value.shape) != shape:
            mismatched.append(f"{key}: expected shape {_torch_shape(path[-1], shape)}, "
                              f"found {tuple(np.shape(state[key]))}")
            continue
        flat[path] = value.astype(dtype)
    unexpected = sorted(k for k in state if k not in used and not IGNORED_KEYS.search(k))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:20]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:20]))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]))
    if problems:
        raise WeightsMismatchError(f"{what} weights do not fit the model: " + " | ".join(problems))
    return flax.traverse_util.unflatten_dict(flat)


def params_to_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Flatten Flax params into a torch-named state dict of float32 numpy arrays."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(flax.linen.meta.unbox(params)))
    state = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        state[torch_key(path, value.ndim)] = np.ascontiguousarray(to_torch_layout(path[-1], value))
    return state

