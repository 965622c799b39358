"""The one path layer of every user file: etils.epath, the layer orbax checkpoints use.

A workdir, latent cache, pretrained folder, image folder or output file may be
local or remote (``gs://bucket/...``); every read and write goes through
``epath.Path``, which keeps local paths on the os functions and sends remote
ones through tf.io.gfile or gcsfs. The helpers here cover what epath alone
does not: memory-mapping ``.npy`` files where the file is local, reading only
the headers of ``.npy`` and ``.safetensors`` files, write-then-rename replaces,
and local copies of folders for libraries that only read local folders
(transformers' ``from_pretrained``).
"""

import contextlib
import io
import json
import math
import os
import sys
import tempfile
from typing import Any, Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """Whether ``path`` is on the local file system (no ``scheme://`` prefix)."""
    return "://" not in os.fspath(path)


def storage_errors() -> tuple[type[Exception], ...]:
    """The exceptions a storage client raises for a path it cannot read or write: OSError, and TensorFlow's
    OpError once epath reaches ``gs://`` through tf.io.gfile (evaluated when an error is caught, so TensorFlow is
    never imported for it)."""
    tf = sys.modules.get("tensorflow")
    return (OSError, tf.errors.OpError) if tf is not None else (OSError,)


def absolute(path: PathLike) -> str:
    """``path`` made absolute and normalized when local (as os.path.abspath), unchanged when remote."""
    return os.path.abspath(path) if is_local(path) else os.fspath(path)


def load_npy(path: PathLike) -> np.ndarray:
    """A ``.npy`` array: memory-mapped read-only when local, read whole when remote (remote files cannot be
    mapped)."""
    path = epath.Path(path)
    if is_local(path):
        return np.load(os.fspath(path), mmap_mode="r")
    with path.open("rb") as f:
        return np.load(io.BytesIO(f.read()))


def npy_shape(path: PathLike) -> tuple[int, ...]:
    """The shape in a ``.npy`` file's header, read without its data (a few hundred bytes, local or remote);
    ValueError when the file is shorter than that shape needs (a truncated copy) or is no ``.npy`` file."""
    path = epath.Path(path)
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        needed = f.tell() + math.prod(shape) * dtype.itemsize
    size = path.stat().length
    if size < needed:
        raise ValueError(f"{path} is {size} bytes, its header needs {needed}")
    return shape


def save_npy(path: PathLike, array: np.ndarray) -> None:
    """Write ``array`` as the ``.npy`` file ``path``."""
    with epath.Path(path).open("wb") as f:
        np.save(f, array)


def replace_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` renamed over it, so readers never see half a file."""
    path = epath.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def safetensors_keys(path: PathLike) -> list[str]:
    """The tensor names of the ``.safetensors`` file ``path``, from its header alone (local or remote)."""
    if is_local(path):
        import safetensors  # imported here: only weight files need it
        with safetensors.safe_open(os.fspath(path), framework="numpy") as f:
            return list(f.keys())
    with epath.Path(path).open("rb") as f:  # the format: an 8-byte little-endian length, then a JSON header
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sorted(name for name in header if name != "__metadata__")


@contextlib.contextmanager
def local_folder(path: PathLike) -> Iterator[str]:
    """``path`` as a local folder for the block: itself when local, else a temporary copy of its files (not of its
    subfolders), for libraries that read only local folders (transformers' ``from_pretrained``)."""
    if is_local(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as folder:
        for child in epath.Path(path).iterdir():
            if child.is_file():
                (epath.Path(folder) / child.name).write_bytes(child.read_bytes())
        yield folder


@contextlib.contextmanager
def writable_folder(path: PathLike) -> Iterator[str]:
    """A local folder to write ``path``'s files into: ``path`` itself when local (created), else a temporary folder
    whose files are copied to ``path`` when the block ends (for ``save_pretrained``)."""
    target = epath.Path(path)
    target.mkdir(parents=True, exist_ok=True)
    if is_local(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as folder:
        yield folder
        for child in epath.Path(folder).iterdir():
            (target / child.name).write_bytes(child.read_bytes())


def save_image(image: Any, path: PathLike, image_format: str = "PNG") -> None:
    """Write the PIL ``image`` to ``path`` in ``image_format`` (the handle carries no suffix to guess from)."""
    with epath.Path(path).open("wb") as f:
        image.save(f, format=image_format)
