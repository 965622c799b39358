"""Every user file goes through one path layer (etils.epath, ldm_jax.paths), and local paths behave as before."""

import json
import os
import pathlib
import re
import tokenize

import numpy as np
import pytest
from etils import epath
from PIL import Image

from ldm_jax import paths
from ldm_jax.data import latents
from ldm_jax.images import make_grid
from ldm_jax.training import metrics

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ldm_jax"

# Calls that work on local files only (or bypass epath), so that a gs:// path breaks or lands in a local folder.
LOCAL_ONLY = re.compile(
    r"(?<![\w.])open\(|\bos\.(?:path|makedirs|mkdir|listdir|scandir|walk|remove|unlink|rmdir|replace|rename|stat)\b"
    r"|\bshutil\.|\bglob\.|\bnp\.(?:load|save|savez|savez_compressed|memmap)\b|\bsafe_open\(|\bload_file\("
    r"|\bsave_file\(|\btempfile\.|\btokenizer\.save_pretrained\(|\bCLIPTokenizer\.from_pretrained\(")

# (file, call) -> why it may stay. Each entry must still be in use: a stale one fails too.
ALLOWED = {
    ("paths.py", "os.path"): "absolute(): os.path.abspath of a path already known to be local",
    ("paths.py", "np.load"): "load_npy(): the memory-mapped branch for local files, and the read of a remote one",
    ("paths.py", "np.save"): "save_npy(): writes to an epath handle",
    ("paths.py", "safe_open("): "safetensors_keys(): header-only read of a local file",
    ("paths.py", "tempfile."): "local_folder() / writable_folder(): local copies for local-only libraries",
    ("weights/diffusers_folder.py", "load_file("): "read_safetensors(): the memory-mapped branch for local files",
    ("weights/diffusers_folder.py", "np.memmap"): "read_safetensors(): bfloat16 files, local branch",
    ("weights/diffusers_folder.py", "save_file("): "write_state_dict(): the local branch (no copy in memory)",
    ("models/clip.py", "CLIPTokenizer.from_pretrained("): "load_tokenizer(): inside paths.local_folder",
    ("models/clip.py", "tokenizer.save_pretrained("): "write_tokenizer(): inside paths.writable_folder",
    ("data/input_pipeline.py", "tempfile."): "scratch folder for the built-in shapes tokenizer",
    ("data/shapes.py", "open("): "write_tokenizer(): inside paths.writable_folder, which transformers reads back",
    ("data/shapes.py", "os.path"): "write_tokenizer(): as above",
    ("data/shapes.py", "CLIPTokenizer.from_pretrained("): "write_tokenizer(): as above",
    ("data/shapes.py", "tokenizer.save_pretrained("): "write_tokenizer(): as above",
    ("testing/clip.py", "os.makedirs"): "test fixture: writes into a pytest tmp folder",
    ("testing/clip.py", "open("): "test fixture: as above",
    ("testing/clip.py", "os.path"): "test fixture: as above",
    ("testing/clip.py", "tokenizer.save_pretrained("): "test fixture: as above",
    ("testing/clip.py", "CLIPTokenizer.from_pretrained("): "test fixture: as above",
    ("testing/pipeline.py", "os.path"): "test fixture: as above",
}


def _code_without_strings(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, code) of ``path`` with strings and comments blanked (so messages and docs never match)."""
    lines = path.read_text().splitlines()
    blank = {}
    with path.open("rb") as f:
        for token in tokenize.tokenize(f.readline):
            if token.type in (tokenize.STRING, tokenize.COMMENT) and token.start[0] == token.end[0]:
                blank.setdefault(token.start[0], []).append((token.start[1], token.end[1]))
            elif token.type == tokenize.STRING:  # a multi-line string: blank its lines whole
                for number in range(token.start[0], token.end[0] + 1):
                    blank.setdefault(number, []).append((0, 10 ** 6))
    code = []
    for number, line in enumerate(lines, 1):
        for start, end in blank.get(number, []):
            line = line[:start] + " " * (min(end, len(line)) - start) + line[end:]
        code.append((number, line))
    return code


def _uses() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        for number, line in _code_without_strings(path):
            for match in LOCAL_ONLY.finditer(line):
                call = match.group(0)
                call = "os.path" if call.startswith("os.path") else call
                found.setdefault((name, call), []).append(number)
    return found


def test_user_files_go_through_epath_except_the_allow_list():
    found = _uses()
    unexpected = {f"{name}:{lines} {call}" for (name, call), lines in found.items() if (name, call) not in ALLOWED}
    assert not unexpected, (f"local-only file calls outside the allow-list (use etils.epath / ldm_jax.paths, or add "
                            f"an entry to ALLOWED with the reason): {sorted(unexpected)}")
    stale = set(ALLOWED) - set(found)
    assert not stale, f"allow-list entries no longer in use (remove them): {sorted(stale)}"


def test_the_check_sees_local_only_calls_and_not_epath_ones():
    for call in ("os.makedirs(folder)", "with open(path) as f:", "np.load(path, mmap_mode='r')", "shutil.rmtree(x)",
                 "glob.glob(pattern)", "os.path.join(a, b)"):
        assert LOCAL_ONLY.search(call), call
    for call in ("epath.Path(path).open('rb')", "os.environ['XLA_FLAGS']", "Image.open(handle)", "path.mkdir()"):
        assert not LOCAL_ONLY.search(call), call


def test_remote_paths_are_kept_as_they_are():
    assert paths.is_local("rel/dir") and paths.is_local("/abs/dir") and not paths.is_local("gs://bucket/run")
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
    assert paths.absolute("rel/dir") == os.path.abspath("rel/dir")


def test_a_local_cache_shard_round_trips_memory_mapped(tmp_path):
    writer = latents._ShardWriter(str(tmp_path / "train"), process=0, shard_size=3)
    (tmp_path / "train").mkdir()
    mean = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    writer.add({"mean": mean, "caption": np.array([b"a", b"b", b"c", b"d"])})
    writer.close()
    shards = latents._list_shards(str(tmp_path), "train")
    assert shards == [["train/00000-00000", 3], ["train/00000-00001", 1]]
    first = latents._open_shard_file(epath.Path(tmp_path) / "train/00000-00000.mean.npy", 3)
    assert isinstance(first, np.memmap)  # local shards stay memory-mapped
    np.testing.assert_array_equal(first, mean[:3])
    np.testing.assert_array_equal(np.load(tmp_path / "train/00000-00001.caption.npy"), [b"d"])
    with pytest.raises(latents.CacheDamagedError, match="holds 3 rows, its manifest lists 2"):
        latents._open_shard_file(epath.Path(tmp_path) / "train/00000-00000.mean.npy", 2)


def test_a_host_opens_only_the_cache_shards_of_its_share(tmp_path):
    writer = latents._ShardWriter(str(tmp_path / "train"), process=0, shard_size=3)
    (tmp_path / "train").mkdir()
    writer.add({"mean": np.zeros((8, 2), np.float32), "logvar": np.zeros((8, 2), np.float32),
                "caption": np.array([b"x"] * 8), "index": np.arange(8)})
    writer.close()
    manifest = {"splits": {"train": {"count": 8, "shards": latents._list_shards(str(tmp_path), "train")}}}
    paths.replace_text(tmp_path / latents.MANIFEST, json.dumps(manifest))
    opened = latents.open_split(str(tmp_path), manifest, "train", (3, 6))  # rows of shard 1 only
    assert [a is not None for a in opened["mean"]] == [False, True, False]
    iterator = latents.LatentIterator(str(tmp_path), "train", 8, seed=0, process_index=1, process_count=2)
    assert [a is not None for a in iterator.arrays["index"]] == [False, True, True]  # rows 4..7
    assert sorted(next(iterator)["index"]) == [4, 5, 6, 7]


def test_local_metrics_and_manifest_round_trip(tmp_path):
    path = epath.Path(tmp_path) / "metrics.jsonl"
    for step in (1, 2, 3):
        metrics._append_line(path, json.dumps({"step": step, "loss": step / 10}))
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a line cut short by a kill
    assert metrics.MetricWriter(str(tmp_path)).restart_at(2) == 2  # drops step 3 and the cut line, as before
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}]
    paths.replace_text(tmp_path / latents.MANIFEST, json.dumps({"format": latents.FORMAT}))
    assert latents.read_manifest(str(tmp_path)) == {"format": latents.FORMAT}
    assert sorted(p.name for p in tmp_path.iterdir()) == [latents.MANIFEST, "metrics.jsonl"]


def test_a_local_grid_and_tokenizer_folder_round_trip(tmp_path):
    images = np.random.default_rng(0).uniform(size=(3, 4, 4, 3))
    grid = make_grid(images)
    paths.save_image(grid, tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(grid))
    with paths.writable_folder(tmp_path / "tokenizer") as folder:
        assert folder == str(tmp_path / "tokenizer")  # local folders are used in place, no copy
        (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with paths.local_folder(tmp_path / "tokenizer") as folder:
        assert folder == str(tmp_path / "tokenizer")
