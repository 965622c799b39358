"""What a path given as ``init_from`` or ``vae_from`` holds, checked before anything is built or compiled.

`classify` looks only at folder layouts, JSON configs, safetensors headers and
the JSON item of orbax checkpoints (no weights are read). The kinds:

    pipeline       a diffusers pipeline folder (model_index.json, or unet/ vae/ text_encoder/)
    single-file    an original Stable Diffusion .safetensors (U-Net, VAE and text encoder)
    vae-file       a .safetensors holding only VAE weights (e.g. SD's vae-ft-mse-840000)
    model-folder   one diffusers / transformers model folder (config.json), e.g. a pipeline's vae/ or unet/
    stage1-run     a training workdir with a stage-1 (autoencoder) checkpoint in autoencoder/
    stage1-folder  that autoencoder/ folder itself
    stage2-run     a training workdir with stage-2 (U-Net) checkpoints and no stage-1 one
    unknown        anything else; missing paths are a FileNotFoundError
"""

import json
from typing import Any, Mapping

from etils import epath

from ldm_jax import paths
from ldm_jax.weights.single_file import UNET_PREFIX, VAE_PREFIX
from ldm_jax.training import checkpoints

ACCEPTED = {"init_from": ("pipeline", "single-file"), "vae_from": ("pipeline", "single-file", "stage1-run")}
TAKES = {"init_from": "a pretrained pipeline (a diffusers folder or a single-file SD .safetensors)",
         "vae_from": "a stage-1 training workdir, a diffusers pipeline folder or a single-file SD .safetensors"}


def _json(path: str) -> dict[str, Any]:
    try:
        return json.loads(epath.Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _checkpoint_models(folder: str) -> list[str] | None:
    """The model names in the config item of the latest checkpoint under ``folder/checkpoints`` (None: none)."""
    if not epath.Path(checkpoints.checkpoint_dir(folder)).is_dir():
        return None
    with checkpoints.checkpoint_manager(folder, keep=None, create=False) as manager:
        step = manager.latest_step()
        return None if step is None else sorted(checkpoints.read_config(manager, step)["configs"])


def classify(path: str) -> tuple[str, str]:
    """(kind, what was found) for ``path``; FileNotFoundError when it does not exist."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist")
    if epath.Path(path).is_file():
        if not path.endswith(".safetensors"):
            return "unknown", "a file that is not a .safetensors"
        keys = paths.safetensors_keys(path)
        if any(k.startswith(UNET_PREFIX) for k in keys):
            return "single-file", "a single-file SD checkpoint"
        if keys and all(k.startswith((VAE_PREFIX, "encoder.", "decoder.", "quant_conv.", "post_quant_conv."))
                        for k in keys):
            return "vae-file", "a .safetensors with only VAE weights (no model.diffusion_model.* U-Net keys)"
        return "unknown", f"a .safetensors without U-Net weights (first keys: {keys[:3]})"
    names = {p.name for p in epath.Path(path).iterdir()}
    if "model_index.json" in names or {"unet", "vae", "text_encoder"} <= names:
        return "pipeline", "a diffusers pipeline folder"
    if "config.json" in names:
        config = _json(str(epath.Path(path) / "config.json"))
        model = config.get("_class_name") or ",".join(config.get("architectures", [])) or "an unnamed model"
        return "model-folder", f"a single model folder ({model}), not a whole pipeline"
    stage1 = _checkpoint_models(str(epath.Path(path) / "autoencoder")) if "autoencoder" in names else None
    if stage1 is not None:
        return "stage1-run", "a training workdir with a stage-1 (autoencoder) checkpoint"
    models = _checkpoint_models(path)
    if models is not None and "unet" in models:
        return "stage2-run", "a stage-2 training workdir (U-Net checkpoints, no stage-1 checkpoint)"
    if models is not None:
        return "stage1-folder", f"a stage-1 checkpoint folder (models {models}: a VAE, no U-Net)"
    return "unknown", f"a folder with neither a pipeline nor a checkpoint (it holds {sorted(names)[:8]})"


def _hint(key: str, kind: str, path: str) -> str:
    """What the user probably meant, for the common mix-ups."""
    parent = str(epath.Path(paths.absolute(path)).parent)
    hints = {
        ("init_from", "stage1-run"): f"; to encode with its VAE, set vae_from={path!r} instead",
        ("init_from", "stage1-folder"): f"; to encode with its VAE, set vae_from={parent!r} instead",
        ("init_from", "vae-file"): "; a VAE alone cannot start a U-Net",
        ("init_from", "stage2-run"): "; to continue that run, pass it as --workdir",
        ("init_from", "model-folder"): f"; pass the pipeline folder above it ({parent!r})",
        ("vae_from", "stage1-folder"): f"; pass its workdir ({parent!r})",
        ("vae_from", "model-folder"): f"; pass the pipeline folder above it ({parent!r})",
        ("vae_from", "stage2-run"): "; its VAE came from vae_from or init_from of that run: pass that instead",
    }
    return hints.get((key, kind), "")


def check_sources(config: Mapping[str, Any]) -> None:
    """Raise ValueError (FileNotFoundError if missing) when ``init_from`` or ``vae_from`` names the wrong kind."""
    for key, accepted in ACCEPTED.items():
        path = config[key]
        if not path:
            continue
        try:
            kind, found = classify(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{key}={path!r}: {error}; {key} takes {TAKES[key]}") from None
        if kind not in accepted:
            raise ValueError(f"{key}={path!r} is {found}; {key} takes {TAKES[key]}{_hint(key, kind, path)}")
