"""The latent cache: every example encoded once by the frozen VAE, on disk, for stage 2.

What is stored: the posterior's **moments** (``mean`` and ``logvar``,
float32, unscaled), not one sampled ``z * scale``. Stage 2 draws
``z = (mean + exp(logvar / 2) * eps) * scale`` with a fresh ``eps`` every time an
example is seen, exactly what encoding on the fly would give (LDM samples the
posterior per step), while a single cached sample would freeze one draw of
the noise for the whole run. It costs twice the disk of one sample (32 KB an
example at 32x32x4), and the scale factor stays a recorded number, not baked in.

Layout::

    DIR/manifest.json              written last: format, the VAE's reference and fingerprint, scale factor,
                                   the data settings that shape the examples, latent shape, shards per split,
                                   unreadable images skipped per split
    DIR/<split>/<process>-<shard>.<field>.npy     fields: mean, logvar [n, h, w, c] float32,
                                   input_ids [n, L] int32 (when the data has a tokenizer), caption [n] bytes,
                                   index [n] int64 (the example's index in the split)

Every process encodes its own share of a split (the data pipeline's host
shard) and writes its own shards to the shared folder; process 0 writes the
manifest after all are done. A folder without a manifest is an interrupted
build and is rebuilt; one whose manifest names a different VAE or different
data settings is refused (`CacheMismatchError`), never mixed. A complete
cache whose shard files were damaged later (missing, truncated, empty, or
another row count than the manifest's) is refused naming the file
(`CacheDamagedError`) and never rebuilt in place: moving the folder aside (or
its manifest) rebuilds it.

Reading (`LatentIterator`) follows the data pipeline's order rule: host ``p``
reads its contiguous share, position ``i`` is example ``perm_e(i mod size)``
of epoch ``e``, ``perm_e`` seeded by (seed, host, e), so batch ``k`` depends
only on (seed, host, k) and a resumed run continues the same order. Each
host opens only the shards of its share: memory-mapped on a local disk; on
object storage (``gs://``) read whole into host memory once, since shuffled
rows need random access. That is the cache's size over the host count: 655
MB for the base run (20k examples of 32 KB), 128 GB over the hosts for 1M
SD examples at 64x64x4 (8 GB a host on a 16-host v5e-64). The checks before
training (`check_split`) read only the files' headers.
"""

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, Callable, Mapping

import flax
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ldm_jax import parallel, paths
from ldm_jax.parallel import host_range
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.pipeline import abstract_params

FORMAT = "ldm_jax latent moments v1"
MANIFEST = "manifest.json"
MOMENTS = ("mean", "logvar")
FIELDS = (*MOMENTS, "caption", "index")  # every shard has these; input_ids when the data has a tokenizer
# Data settings that change what the cached examples are (batch size and download do not).
DATA_IDENTITY = ("source", "name", "data_dir", "image_feature", "caption_feature", "label_feature",
                 "caption_template", "tokenizer", "max_length", "image_size", "random_crop", "flip", "seed")


class CacheMismatchError(ValueError):
    """The cache on disk was made by another VAE or from other data settings."""


class CacheDamagedError(ValueError):
    """A file of a complete cache is missing, truncated, empty or holds another number of rows than listed."""


@dataclasses.dataclass(frozen=True)
class FrozenVAE:
    """A VAE to encode with: module, params, latent scale factor and a reference to where it came from.

    ``reference`` is JSON: {'source': path, 'step': int or None, 'fingerprint': sha256 of the params}.
    """
    module: AutoencoderKL
    params: Any
    scale_factor: float
    reference: dict[str, Any]


def fingerprint(params: Any) -> str:
    """sha256 over the parameter names, shapes, dtypes and bytes (gathered to host)."""
    digest = hashlib.sha256()
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(flax.linen.meta.unbox(params)))
    for path in sorted(flat):
        value = np.asarray(multihost_utils.process_allgather(flat[path], tiled=True))
        digest.update(f"{'/'.join(path)}:{value.shape}:{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def frozen_vae(module: AutoencoderKL, params: Any, scale_factor: float, source: str,
               step: int | None = None) -> FrozenVAE:
    """A `FrozenVAE` whose reference names ``source`` (absolute path) and ``step``, with the params' fingerprint."""
    reference = {"source": paths.absolute(source), "step": step, "fingerprint": fingerprint(params)}
    return FrozenVAE(module, params, float(scale_factor), reference)


def data_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data settings recorded in (and checked against) a manifest."""
    return {key: data[key] for key in DATA_IDENTITY}


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The cache's manifest, or None when ``folder`` has none (absent or interrupted build)."""
    path = epath.Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_manifest(manifest: Mapping[str, Any], vae: FrozenVAE, data: Mapping[str, Any], folder: str) -> None:
    """CacheMismatchError naming both sides when the cache was not made by ``vae`` from ``data``."""
    if manifest.get("format") != FORMAT:
        raise CacheMismatchError(f"latent cache {folder} has format {manifest.get('format')!r}, not {FORMAT!r}; "
                                 "delete it or choose another latents.dir")
    made_by = manifest["vae"]
    if made_by["fingerprint"] != vae.reference["fingerprint"]:
        raise CacheMismatchError(
            f"latent cache {folder} was made by the VAE {made_by['source']} (step {made_by['step']}, fingerprint "
            f"{made_by['fingerprint'][:12]}), not by {vae.reference['source']} (step {vae.reference['step']}, "
            f"fingerprint {vae.reference['fingerprint'][:12]}); refusing to mix latents of two VAEs: delete the "
            "cache or set latents.dir to a new folder")
    wanted = data_identity(data)
    changed = {k: (manifest["data"].get(k), v) for k, v in wanted.items() if manifest["data"].get(k) != v}
    if changed:
        details = ", ".join(f"{k}: cache {old!r} vs config {new!r}" for k, (old, new) in sorted(changed.items()))
        raise CacheMismatchError(f"latent cache {folder} was made from other data settings ({details}); delete it "
                                 "or set latents.dir to a new folder")


def _encode_moments(vae: AutoencoderKL, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    posterior = vae.apply({"params": params}, images, method="encode")
    return posterior.mean, posterior.logvar


def vae_shardings(module: AutoencoderKL, mesh: jax.sharding.Mesh, layout: str,
                  rules: Any = parallel.LOGICAL_AXIS_RULES) -> Any:
    """Shardings of a frozen VAE's params for ``mesh.frozen`` = ``layout`` ('shard' or 'replicate') and the
    logical axis ``rules`` (``mesh.axis_rules``)."""
    config = {"block_out_channels": module.block_out_channels, "in_channels": module.in_channels}
    return parallel.frozen_shardings(abstract_params(module, "vae", config), mesh, layout, rules)


def encode_fn(vae: FrozenVAE, mesh: jax.sharding.Mesh, layout: str,
              rules: Any = parallel.LOGICAL_AXIS_RULES) -> tuple[Callable, Any]:
    """The jitted encoder ``fn(params, images) -> (mean, logvar)``, batch-sharded, and the VAE's params placed
    for it per ``layout`` and ``rules`` (`vae_shardings`)."""
    shardings = vae_shardings(vae.module, mesh, layout, rules)
    batch = parallel.batch_sharding(mesh)
    fn = jax.jit(functools.partial(_encode_moments, vae.module), in_shardings=(shardings, batch),
                 out_shardings=batch)
    return fn, jax.device_put(vae.params, shardings)


class _ShardWriter:
    """Collects rows and writes them as ``<process>-<shard>.<field>.npy`` files of ``shard_size`` rows."""

    def __init__(self, folder: str, process: int, shard_size: int):
        self.folder, self.process, self.shard_size = folder, process, shard_size
        self.rows: dict[str, list[np.ndarray]] = {}
        self.pending = self.shards = 0

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        for name, value in rows.items():
            self.rows.setdefault(name, []).append(value)
        self.pending += len(next(iter(rows.values())))
        while self.pending >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)

    def _write(self, count: int) -> None:
        stem = f"{self.process:05d}-{self.shards:05d}"
        for name, parts in self.rows.items():
            merged = np.concatenate(parts)
            paths.save_npy(epath.Path(self.folder) / f"{stem}.{name}.npy", merged[:count])
            self.rows[name] = [merged[count:]]
        self.pending -= count
        self.shards += 1


def encode_split(config: Mapping[str, Any], vae: FrozenVAE, folder: str, split: str,
                 mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """Encode this process's share of ``split`` into ``folder/split`` (jitted, batch sharded).

    Returns the rows written and the number of unreadable images skipped.
    """
    # TensorFlow: loaded only to encode (the train step needs none)
    from ldm_jax.data.input_pipeline import make_iterator, report_skipped
    data = dict(config["data"])
    data["batch_size"] = config["latents"]["batch_size"] or data["batch_size"]
    parallel.check_batch(data["batch_size"], mesh)
    iterator = make_iterator(data, split, seed=config["seed"], num_epochs=1, shuffle=False)
    report_skipped(iterator, f"latent cache ({split})")
    per_host = data["batch_size"] // jax.process_count()
    batches = int(np.max(multihost_utils.process_allgather(np.asarray(math.ceil(iterator.size / per_host)))))
    batch_sharding = parallel.batch_sharding(mesh)
    encode, params = encode_fn(vae, mesh, config["mesh"]["frozen"], parallel.axis_rules(config["mesh"]))
    out = epath.Path(folder) / split
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, jax.process_index(), config["latents"]["shard_size"])
    image_shape = (data["image_size"], data["image_size"], vae.module.in_channels)
    written = 0
    for _ in range(batches):  # every process runs the same number of steps; spent ones feed padding
        batch = next(iterator, None)
        rows = 0 if batch is None else len(batch["image"])
        images = np.zeros((per_host, *image_shape), np.float32)
        if rows:
            images[:rows] = batch["image"]
        moments = encode(params, jax.make_array_from_process_local_data(batch_sharding, images))
        if rows:
            local = [np.asarray(multihost_utils.global_array_to_host_local_array(
                m, mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES)))[:rows] for m in moments]
            fields = dict(zip(MOMENTS, local), caption=batch["caption"].astype(bytes), index=batch["index"])
            if "input_ids" in batch:
                fields["input_ids"] = batch["input_ids"].astype(np.int32)
            writer.add(fields)
            written += rows
    writer.close()
    iterator.close()
    return written, len(iterator.skipped)


def _list_shards(folder: str, split: str) -> list[list]:
    """[[stem, rows], ...] of a split's shards in (process, shard) order (reading only the files' headers)."""
    stems = sorted(p.name[: -len(".mean.npy")] for p in (epath.Path(folder) / split).glob("*.mean.npy"))
    return [[f"{split}/{stem}", int(paths.npy_shape(epath.Path(folder) / split / f"{stem}.mean.npy")[0])]
            for stem in stems]


def _check_shard_file(path: epath.Path, rows: int) -> None:
    """CacheDamagedError naming ``path`` when it is missing, shorter than its header says, or does not hold
    ``rows`` rows; reads only the header."""
    fix = f"move {path.parent.parent} aside (or delete it) to rebuild the cache"
    try:
        shape = paths.npy_shape(path)
    except (*paths.storage_errors(), ValueError, EOFError) as error:
        raise CacheDamagedError(f"latent cache file {path} is damaged ({type(error).__name__}: {error}); "
                                f"{fix}") from error
    if shape[0] != rows:
        raise CacheDamagedError(f"latent cache file {path} holds {shape[0]} rows, its manifest lists {rows}; {fix}")


def _open_shard_file(path: epath.Path, rows: int) -> np.ndarray:
    """``path`` checked (`_check_shard_file`), then memory-mapped when local, read whole when remote."""
    _check_shard_file(path, rows)
    return paths.load_npy(path)


def _fields(folder: str, split: str) -> tuple[str, ...]:
    tokenized = any((epath.Path(folder) / split).glob("*.input_ids.npy"))
    return (*FIELDS, "input_ids") if tokenized else FIELDS


def check_split(folder: str, manifest: Mapping[str, Any], split: str) -> None:
    """CacheDamagedError naming the first file of ``split`` that is missing, truncated or holds another row count
    than the manifest lists; reads only the files' headers."""
    for field in _fields(folder, split):
        for stem, rows in manifest["splits"][split]["shards"]:
            _check_shard_file(epath.Path(folder) / f"{stem}.{field}.npy", rows)


def open_split(folder: str, manifest: Mapping[str, Any], split: str,
               rows: tuple[int, int] | None = None) -> dict[str, list[np.ndarray | None]]:
    """Every cached field of ``split``: per shard of the manifest, the array (checked as in `check_split`) when
    the shard holds any of the split's rows ``[start, stop)`` (default: all), else None. Local shards are
    memory-mapped; remote ones are read into host memory, so a host reads only the shards of its share."""
    shards = manifest["splits"][split]["shards"]
    offsets = np.cumsum([0] + [n for _, n in shards])
    start, stop = rows if rows is not None else (0, int(offsets[-1]))
    wanted = [offsets[i] < stop and offsets[i + 1] > start for i in range(len(shards))]
    return {field: [_open_shard_file(epath.Path(folder) / f"{stem}.{field}.npy", n) if want else None
                    for (stem, n), want in zip(shards, wanted)]
            for field in _fields(folder, split)}


def _remove_tree(folder: epath.Path) -> None:
    """Delete ``folder`` and everything in it, if it exists."""
    if folder.exists():
        folder.rmtree()


def build_cache(config: Mapping[str, Any], vae: FrozenVAE, folder: str, splits: list[str],
                manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode ``splits`` into ``folder`` (adding them to ``manifest`` if given) and write the manifest last."""
    mesh = parallel.make_mesh(config["mesh"])
    manifest = manifest or {"format": FORMAT, "vae": vae.reference, "scale_factor": vae.scale_factor,
                            "data": data_identity(config["data"]), "splits": {}}
    for split in splits:
        if jax.process_index() == 0:
            _remove_tree(epath.Path(folder) / split)  # leftovers of an interrupted build
        multihost_utils.sync_global_devices(f"latent cache: clear {split}")
        rows, skipped = encode_split(config, vae, folder, split, mesh)
        logging.info("latent cache: process %d wrote %d %s examples to %s", jax.process_index(), rows, split, folder)
        multihost_utils.sync_global_devices(f"latent cache: encoded {split}")
        skipped = int(np.sum(multihost_utils.process_allgather(np.asarray(skipped))))
        shards = _list_shards(folder, split)
        manifest["latent_shape"] = list(paths.npy_shape(epath.Path(folder) / f"{shards[0][0]}.mean.npy")[1:])
        manifest["splits"][split] = {"count": sum(n for _, n in shards), "shards": shards}
        manifest.setdefault("skipped", {})[split] = skipped
    if jax.process_index() == 0:
        paths.replace_text(epath.Path(folder) / MANIFEST, json.dumps(manifest, indent=1))
    multihost_utils.sync_global_devices("latent cache: manifest")
    return manifest


def ensure_cache(config: Mapping[str, Any], vae: FrozenVAE, folder: str, splits: list[str]) -> dict[str, Any]:
    """The manifest of ``folder`` after encoding whichever of ``splits`` it lacks.

    Raises CacheMismatchError when the folder holds a cache of another VAE or of
    other data settings, CacheDamagedError when a file of a cached split is damaged.
    """
    manifest = read_manifest(folder)
    if manifest is not None:
        check_manifest(manifest, vae, config["data"], folder)
        missing = [s for s in splits if s not in manifest["splits"]]
        for split in set(splits) - set(missing):
            check_split(folder, manifest, split)
        if not missing:
            logging.info("latent cache: using %s (%s)", folder, ", ".join(
                f"{s}: {manifest['splits'][s]['count']} examples" for s in splits))
            return manifest
        return build_cache(config, vae, folder, missing, manifest)
    epath.Path(folder).mkdir(parents=True, exist_ok=True)
    logging.info("latent cache: encoding %s into %s with the VAE %s", ", ".join(splits), folder,
                 vae.reference["source"])
    return build_cache(config, vae, folder, splits)


class LatentIterator:
    """Batches of this host's share of a cached split, in the (seed, host, step) order of the module docstring.

    Each batch is {'mean', 'logvar': float32 [b, h, w, c], 'input_ids': int32 [b, L] (if cached),
    'caption': bytes [b], 'index': int64 [b]} with ``b = batch_size // process_count``.
    """

    def __init__(self, folder: str, split: str, batch_size: int, seed: int, start_step: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None):
        """Open the shards of ``folder``'s ``split`` that hold this host's share (memory-mapped when local, read
        into host memory when remote) and start at batch ``start_step``."""
        manifest = read_manifest(folder)
        if manifest is None or split not in manifest["splits"]:
            raise FileNotFoundError(f"no latent cache of split {split!r} in {folder} (no {MANIFEST} listing it)")
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        shards = manifest["splits"][split]["shards"]
        self.offsets = np.cumsum([0] + [n for _, n in shards])
        self.start, stop = host_range(int(self.offsets[-1]), process_index, process_count)
        self.size = stop - self.start
        if self.size == 0:
            raise ValueError(f"this host's share of the cached split {split!r} in {folder} is empty")
        self.arrays = open_split(folder, manifest, split, (self.start, stop))
        self.per_host, self.seed, self.process_index = batch_size // process_count, seed, process_index
        self.position = start_step * self.per_host
        self.manifest = manifest
        self._epoch, self._perm = -1, None

    def __iter__(self) -> "LatentIterator":
        """The iterator itself (endless)."""
        return self

    def _example(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.process_index, epoch]).permutation(self.size)
            self._epoch = epoch
        return self.start + int(self._perm[position % self.size])

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch."""
        indices = np.asarray([self._example(p) for p in range(self.position, self.position + self.per_host)])
        self.position += self.per_host
        return self.gather(indices)

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` (global, in manifest order) of every cached field."""
        shard = np.searchsorted(self.offsets, indices, side="right") - 1
        offset = indices - self.offsets[shard]
        return {name: np.stack([parts[s][o] for s, o in zip(shard, offset)]) for name, parts in self.arrays.items()}

