"""Reading and writing the files of a diffusers-layout folder, without torch.

A component folder (``unet/``, ``vae/``, ``text_encoder/``) holds a config
JSON and safetensors weights, possibly sharded with an ``.index.json``.
"""

import json
from typing import Any

import numpy as np
import safetensors.numpy
from etils import epath

from ldm_jax import paths

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_json(path: str) -> dict:
    """Read a JSON file, with an error that names the file."""
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON (tuples become lists)."""
    epath.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=list) + "\n")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file; bfloat16 (which numpy lacks) is read as ml_dtypes.bfloat16.

    A truncated, empty or otherwise unreadable file is a ValueError naming it.
    Local files are memory-mapped; remote ones are read whole (they cannot be mapped).
    """
    local = paths.is_local(path)
    raw = None if local else epath.Path(path).read_bytes()
    try:
        return safetensors.numpy.load_file(path) if local else safetensors.numpy.load(raw)
    except TypeError:  # "data type 'bfloat16' not understood"
        pass
    except safetensors.SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from error
    import ml_dtypes  # installed with jax
    dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
    if local:
        with epath.Path(path).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    else:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        data = np.frombuffer(raw, dtype=np.uint8, offset=8 + size)
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
        single = epath.Path(folder) / (name + suffix)
        if single.is_file():
            return [str(single)]
        index = epath.Path(folder) / (name + suffix + ".index.json")
        if index.is_file():
            shards = sorted(set(read_json(str(index))["weight_map"].values()))
            return [str(epath.Path(folder) / shard) for shard in shards]
    present = sorted(p.name for p in epath.Path(folder).iterdir()) if epath.Path(folder).is_dir() else []
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
    metadata = {"format": "pt", **(metadata or {})}
    if paths.is_local(path):
        safetensors.numpy.save_file(tensors, path, metadata=metadata)
    else:  # the library writes only local files: serialize in memory and upload
        epath.Path(path).write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
