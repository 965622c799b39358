"""What the commands share before their work starts: flag parsing that ends in one line, and output path checks.

``app.run(main, flags_parser=cli.flags_parser("ldm_jax.train", config_flag="config"))`` makes ``--help`` exit 0
and turns every flag problem into one line on stderr: a bad flag value, a missing or failing config file (named,
with the nearest file name and the run configs), and a misspelt ``--config.KEY`` override (the key, and the
nearest valid name). `check_run_config`, `check_writable_folder`, `check_output_file` and `image_format` check
the config and the output paths in the first seconds of a command instead of after its work. Paths may be local
or remote (``gs://``): they go through etils' epath.
"""

import difflib
import importlib.util
import sys
import uuid
from typing import Any, Callable, NoReturn

from absl import flags
from etils import epath
from ml_collections import config_flags
from PIL import Image

from ldm_jax import paths
from ldm_jax.training import run_config


def fail(program: str, message: Any) -> NoReturn:
    """Exit with status 1 and the one line ``PROGRAM: error: MESSAGE`` on stderr (a storage client's multi-line
    error joined into one)."""
    sys.exit(f"{program}: error: {' '.join(str(message).split())}")


def _argument(argv: list[str], name: str) -> str | None:
    """The value given to ``--name`` in ``argv`` (``--name=V`` or ``--name V``), None if absent."""
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
    return None


def _overrides(argv: list[str], name: str) -> list[str]:
    """The key paths of the ``--name.KEY=VALUE`` (and ``--noname.KEY``) overrides in ``argv``."""
    paths = []
    for arg in argv:
        flag = arg.lstrip("-").split("=", 1)[0]
        for prefix in (f"{name}.", f"no{name}."):
            if arg.startswith("-") and flag.startswith(prefix):
                paths.append(flag[len(prefix):])
    return paths


def unknown_key(config: Any, path: str) -> str | None:
    """What is wrong with override key ``path`` (``'a.b.c'``) of ``config``: the first part that is not a key,
    with the nearest valid name (difflib) or the valid ones; None when every part exists."""
    node, seen = config, []
    for part in path.split("."):
        if not hasattr(node, "keys"):
            return None  # past a leaf: the flags library's own message names the value's type
        keys = sorted(node.keys())
        if part not in keys:
            where = ".".join(seen) or "the config"
            near = difflib.get_close_matches(part, keys, n=1)
            hint = f"did you mean {'.'.join([*seen, near[0]])}?" if near else f"its keys: {', '.join(keys)}"
            return f"{where} has no key {part!r}; {hint}"
        node, seen = node[part], [*seen, part]
    return None


def missing_config(spec: str) -> str | None:
    """The problem with config file spec ``FILE[:variant]`` when the file does not exist (None when it does):
    the nearest file name of its folder, and the run configs."""
    path = epath.Path(spec.partition(":")[0])
    if path.is_file():
        return None
    folder = path.parent
    names = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    near = difflib.get_close_matches(path.name, names, n=1)
    hint = f"did you mean {folder / near[0]}? " if near else ""
    return f"no config file {path}; {hint}the run configs are {', '.join(run_config.RUN_CONFIGS)}"


def load_config_file(spec: str) -> Any:
    """``get_config([variant])`` of config file spec ``FILE[:variant]``, loaded as the config flag loads it."""
    path, colon, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if colon else module.get_config()


def _config_error(argv: list[str], name: str, error: Exception) -> str:
    """One line for an error raised while the config flag ``name`` loaded its file or applied an override."""
    spec = _argument(argv, name) or ""
    try:  # load the file again, without overrides, to find the override that does not name a key
        config = load_config_file(spec)
        problems = [(path, unknown_key(config, path)) for path in _overrides(argv, name)]
    except Exception:  # the file itself fails: report the original error below
        problems = []
    for path, problem in problems:
        if problem:
            return f"--{name}.{path}: {problem}"
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    return f"--{name} {spec}: {message.strip().splitlines()[-1]}"


def _flag_error(argv: list[str], config_flag: str | None, error: flags.Error) -> str:
    """One line for a flags error; a config file whose ``get_config`` raised gives its last traceback line."""
    message = str(error)
    if config_flag and "Error whilst parsing config file" in message:
        spec = _argument(argv, config_flag) or ""
        return f"--{config_flag} {spec}: {message.strip().splitlines()[-1]}"
    return message.splitlines()[0] if message else type(error).__name__


def flags_parser(program: str, config_flag: str | None = None) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: ``--help`` exits 0, and bad flags exit 1 with one line naming them.

    With ``config_flag`` (the name of an ``ml_collections`` config file flag),
    a config file that does not exist or raises, and an override whose key is
    not in the config, are that one line too (`missing_config`, `unknown_key`).
    """
    def parse(argv: list[str]) -> list[str]:
        try:
            remaining = flags.FLAGS(argv)
        except SystemExit as stop:  # absl's help flags print the usage and exit 1; asking for help is no error
            sys.exit(0 if stop.code == 1 else stop.code)
        except flags.Error as error:
            fail(program, _flag_error(argv, config_flag, error))
        except (AttributeError, KeyError) as error:  # ml_collections' errors for an override or the config's keys
            if not config_flag:
                raise
            fail(program, _config_error(argv, config_flag, error))
        if config_flag:
            spec = _argument(argv, config_flag) or ""
            try:
                getattr(flags.FLAGS[config_flag].value, "keys")  # a config that failed to load raises here
            except OSError as error:
                fail(program, f"--{config_flag} {spec}: " + (missing_config(spec) or str(error).splitlines()[-1]))
        return remaining

    return parse


def check_run_config(program: str, config: Any, config_flag: str = "config") -> None:
    """Exit with one line naming the config file unless ``config`` passes `run_config.validate` (a model config,
    say, gets the list of run configs)."""
    try:
        run_config.validate(config)
    except (KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        fail(program, f"--{config_flag} {config_flags.get_config_filename(flags.FLAGS[config_flag])}: {message}")


def check_writable_folder(path: str, what: str) -> None:
    """ValueError naming ``what``, ``path`` and the storage client's error unless ``path`` is a folder this process
    can write to.

    A missing folder is created (with its parents); a probe file with a unique
    name is written and removed, so concurrent processes do not collide. On
    object storage the probe goes first: it needs no folder, and its error
    comes at once, where creating folders in a missing bucket is retried for
    minutes.
    """
    folder = epath.Path(path)
    probe = folder / f".write_check_{uuid.uuid4().hex}"
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{what} {path} is a file, not a folder")
        if paths.is_local(folder):
            folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    except paths.storage_errors() as error:
        raise ValueError(f"{what} {path} is not a folder this process can write to "
                         f"({getattr(error, 'strerror', None) or error})") from None


# The formats an image grid is usually written in: the ones the error message suggests (PIL accepts more).
COMMON_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def image_format(path: str, flag: str) -> str:
    """PIL's format name for ``path``'s suffix (``.png``: 'PNG', ``.jpg``: 'JPEG', ...); ValueError naming
    ``flag`` and the supported suffixes for any other suffix."""
    Image.init()
    suffix = epath.Path(path).suffix.lower()
    formats = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix not in formats:
        raise ValueError(f"{flag} {path}: cannot tell the image format from the suffix {suffix or '(none)'!r}; "
                         f"use one of {', '.join(sorted(e for e in formats if formats[e] in COMMON_FORMATS))}")
    return formats[suffix]


def check_output_file(path: str, flag: str) -> None:
    """ValueError naming ``flag`` unless ``path`` can be written: not a folder, and in a folder this process can
    write to (created if missing)."""
    target = epath.Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the file to write")
    check_writable_folder(str(target.parent), f"{flag} {path}: its folder")
