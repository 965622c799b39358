"""Reading and writing the files of a diffusers-layout folder, without torch.

A component folder (``unet/``, ``vae/``, ``text_encoder/``) holds a config
JSON and safetensors weights, possibly sharded with an ``.index.json``.
"""

import json
import os
from typing import Any

import numpy as np
import safetensors.numpy

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_json(path: str) -> dict:
    """Read a JSON file, with an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON (tuples become lists)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=list)
        f.write("\n")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file; bfloat16 (which numpy lacks) is read as ml_dtypes.bfloat16.

    A truncated, empty or otherwise unreadable file is a ValueError naming it.
    """
    try:
        return safetensors.numpy.load_file(path)
    except TypeError:  # "data type 'bfloat16' not understood"
        pass
    except safetensors.SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from error
    import ml_dtypes  # installed with jax
    dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path} is truncated: tensor {name} ends at byte {end} of {len(data)} data bytes")
        out[name] = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _weight_files(folder: str, variant: str | None) -> list[str]:
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for name in WEIGHT_NAMES:
        single = os.path.join(folder, name + suffix)
        if os.path.isfile(single):
            return [single]
        index = single + ".index.json"
        if os.path.isfile(index):
            shards = sorted(set(read_json(index)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(f.endswith((".bin", ".ckpt", ".pt", ".pth")) for f in present):
        raise ValueError(f"{folder} has only PyTorch pickle weights ({present}); ldm_jax reads safetensors "
                         "without torch: re-save the model with safe_serialization=True")
    wanted = [n + suffix for n in WEIGHT_NAMES]
    raise FileNotFoundError(f"no weights in {folder}: expected one of {wanted} (or a sharded .index.json); "
                            f"found {present}")


def read_state_dict(folder: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder as float32 numpy arrays."""
    state = {}
    for path in _weight_files(folder, variant):
        state.update(read_safetensors(path))
    return {k: v.astype(np.float32) for k, v in state.items()}


def write_state_dict(path: str, state: dict[str, np.ndarray], metadata: dict[str, Any] | None = None) -> None:
    """Write tensors to one safetensors file (``format: pt`` metadata so PyTorch loaders accept it)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
