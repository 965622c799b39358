"""`Pipeline`: the three models of latent diffusion with their params, tokenizer and schedule.

Loads a diffusers-layout folder or a single-file original Stable Diffusion
checkpoint (``.safetensors``) without torch, builds randomly initialised
models from a config, and writes the diffusers layout back.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from transformers import CLIPTokenizer

from ldm_jax.weights import convert, diffusers_folder, single_file


from ldm_jax.diffusion.sample_fn import Models
from ldm_jax.models.clip import CLIPTextModel, load_tokenizer, normalize_state_dict, write_tokenizer
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL, scaling_factor

COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def model_configs(config: Any) -> dict[str, dict]:
    """The config dicts of a ``configs/*.py`` config's models: 'unet', 'vae', 'text_encoder' and 'scheduler'."""
    return {name: config[name].to_dict() if hasattr(config[name], "to_dict") else dict(config[name])
            for name in COMPONENTS + ("scheduler",)}


def build_modules(configs: dict[str, dict], dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
                  attention_impl: str = "auto", remat_policy: str = "none") -> dict:
    """The Flax modules described by diffusers/transformers config dicts, keyed by component.

    ``attention_impl`` (``ldm_jax.models.attention``) applies to all three
    models, ``remat_policy`` to the U-Net; neither is part of the configs.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    return {
        "unet": UNet2DConditionModel.from_diffusers_config(configs["unet"], remat_policy=remat_policy, **kw),
        "vae": AutoencoderKL.from_diffusers_config(configs["vae"], **kw),
        "text_encoder": CLIPTextModel.from_transformers_config(configs["text_encoder"], **kw),
    }


def init_inputs(name: str, config: dict) -> tuple:
    """Small dummy inputs that create every parameter of component ``name``."""
    if name == "unet":
        size = 2 ** len(config["block_out_channels"])
        return (jnp.zeros((1, size, size, config.get("in_channels", 4))), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, config["cross_attention_dim"])))
    if name == "vae":
        size = 2 ** len(config["block_out_channels"])
        return (jnp.zeros((1, size, size, config.get("in_channels", 3))),)
    return (jnp.zeros((1, config.get("max_position_embeddings", 77)), jnp.int32),)


def abstract_params(module, name: str, config: dict) -> Any:
    """Shapes and dtypes (with logical partitioning metadata) of the module's params, computed without FLOPs."""
    return jax.eval_shape(module.init, jax.random.key(0), *init_inputs(name, config))["params"]


@dataclasses.dataclass
class Pipeline:
    """The models of a latent diffusion pipeline and everything needed to run them.

    ``params`` is ``{'unet': ..., 'vae': ..., 'text_encoder': ...}``;
    ``configs`` holds the diffusers/transformers config dicts of the three
    models and of the scheduler; ``scale_factor`` multiplies VAE latents
    before the U-Net sees them.
    """
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    params: dict
    configs: dict[str, dict]
    tokenizer: CLIPTokenizer | None = None

    @property
    def scale_factor(self) -> float:
        """The latent scale factor (0.18215 for Stable Diffusion's VAE)."""
        return scaling_factor(self.configs["vae"])

    @property
    def scheduler_config(self) -> dict:
        """The diffusers scheduler config: betas, prediction type, timestep spacing."""
        return self.configs["scheduler"]

    @property
    def models(self) -> Models:
        """The static (hashable) bundle that ``sample_fn`` takes as ``models=``."""
        return Models.create(self.unet, self.vae, self.text_encoder, self.scheduler_config, self.scale_factor)

    @classmethod
    def from_config(cls, config, rng: jax.Array, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    tokenizer: CLIPTokenizer | None = None, attention_impl: str = "auto") -> "Pipeline":
        """Randomly initialised models from an ml_collections config (``configs/*.py``).

        ``attention_impl`` picks the attention kernel of all three models (``ldm_jax.models.attention``).
        """
        configs = model_configs(config)
        modules = build_modules(configs, dtype, param_dtype, attention_impl=attention_impl)
        params = {}
        for name, key in zip(COMPONENTS, jax.random.split(rng, len(COMPONENTS))):
            params[name] = jax.jit(modules[name].init)(key, *init_inputs(name, configs[name]))["params"]
        return cls(**modules, params=params, configs=configs, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                        variant: str | None = None, overrides: dict[str, dict] | None = None,
                        attention_impl: str = "auto") -> "Pipeline":
        """Load a diffusers-layout folder or a single-file original SD ``.safetensors``.

        ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the
        params; ``variant`` picks ``*.{variant}.safetensors`` files (e.g.
        'fp16'); ``overrides`` updates the config of a component (for single
        files, where e.g. head counts cannot be read from tensor shapes);
        ``attention_impl`` picks the attention kernel of all three models
        (``ldm_jax.models.attention``).
        """
        if epath.Path(path).is_file():
            configs, states = single_file.load_single_file(path, overrides=overrides)
            tokenizer = None
        elif epath.Path(path).is_dir():
            configs, states = _read_folder(path, variant, overrides or {})
            tokenizer_dir = epath.Path(path) / "tokenizer"
            tokenizer = load_tokenizer(str(tokenizer_dir)) if tokenizer_dir.is_dir() else None
        else:
            raise FileNotFoundError(f"no pretrained pipeline at {path}: expected a diffusers folder "
                                    "(unet/, vae/, text_encoder/, scheduler/) or a single-file .safetensors")
        modules = build_modules(configs, dtype, param_dtype, attention_impl=attention_impl)
        params = {name: _params_from_state(modules[name], name, configs[name], states[name], f"{path}: {name}",
                                           param_dtype) for name in COMPONENTS}
        return cls(**modules, params=params, configs=configs, tokenizer=tokenizer)

    def save_pretrained(self, path: str) -> None:
        """Write the diffusers layout (loadable by diffusers' StableDiffusionPipeline.from_pretrained)."""
        configs = {"unet": self.unet.diffusers_config(),
                   "vae": self.vae.diffusers_config(scaling_factor=self.scale_factor),
                   "text_encoder": self.text_encoder.transformers_config()}
        for name in COMPONENTS:
            folder = epath.Path(path) / name
            folder.mkdir(parents=True, exist_ok=True)
            diffusers_folder.write_json(str(folder / "config.json"), configs[name])
            diffusers_folder.write_state_dict(str(folder / WEIGHT_FILES[name]),
                                              convert.params_to_state_dict(self.params[name]))
        (epath.Path(path) / "scheduler").mkdir(parents=True, exist_ok=True)
        diffusers_folder.write_json(str(epath.Path(path) / "scheduler" / "scheduler_config.json"),
                                    {"_class_name": "DDIMScheduler", **self.scheduler_config})
        if self.tokenizer is not None:
            write_tokenizer(self.tokenizer, str(epath.Path(path) / "tokenizer"))
        diffusers_folder.write_json(str(epath.Path(path) / "model_index.json"), MODEL_INDEX)

    def save_single_file(self, path: str) -> None:
        """Write one original-layout SD ``.safetensors`` (as released by CompVis / Stability)."""
        configs = {**self.configs, "vae": {**self.configs["vae"], "scaling_factor": self.scale_factor}}
        states = {name: convert.params_to_state_dict(self.params[name]) for name in COMPONENTS}
        single_file.save_single_file(path, states["unet"], states["vae"], states["text_encoder"], configs)


def load_vae(path: str, *, attention_impl: str = "auto") -> tuple[AutoencoderKL, Any, float]:
    """The VAE of a pretrained pipeline: module, params and latent scale factor.

    A diffusers folder has only its ``vae/`` read; a single-file checkpoint is
    loaded whole (the VAE is one part of the file). ``attention_impl`` picks
    the attention kernel (``ldm_jax.models.attention``).
    """
    if epath.Path(path).is_file():
        pipe = Pipeline.from_pretrained(path, attention_impl=attention_impl)
        return pipe.vae, pipe.params["vae"], pipe.scale_factor
    folder = epath.Path(path) / "vae"
    if not folder.is_dir():
        raise ValueError(f"{path} is not a diffusers pipeline folder: it has no vae/ (found "
                         f"{_listing(path) if epath.Path(path).is_dir() else 'nothing'})")
    config = diffusers_folder.read_json(str(folder / "config.json"))
    module = AutoencoderKL.from_diffusers_config(config, attention_impl=attention_impl)
    params = _params_from_state(module, "vae", config, diffusers_folder.read_state_dict(str(folder)),
                                f"{path}: vae")
    return module, params, scaling_factor(config)


def _params_from_state(module, name: str, config: dict, state: dict, what: str, dtype: Any = jnp.float32) -> Any:
    """Flax params of component ``name`` from its PyTorch-named state dict (``what`` names it in errors)."""
    return jax.tree.map(jnp.asarray, convert.state_dict_to_params(
        state, abstract_params(module, name, config), what=what, dtype=dtype))


def _listing(folder: str) -> list[str]:
    """The names in ``folder``, sorted (for error messages)."""
    return sorted(p.name for p in epath.Path(folder).iterdir())


def _read_folder(path: str, variant: str | None, overrides: dict[str, dict]) -> tuple[dict, dict]:
    folder = epath.Path(path)
    missing = [name for name in COMPONENTS + ("scheduler",) if not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"{path} is not a diffusers pipeline folder: missing {missing} (found {_listing(path)})")
    configs = {name: diffusers_folder.read_json(str(folder / name / "config.json")) for name in COMPONENTS}
    configs["scheduler"] = diffusers_folder.read_json(str(folder / "scheduler" / "scheduler_config.json"))
    for name, update in overrides.items():
        configs[name] = {**configs[name], **update}
    states = {name: diffusers_folder.read_state_dict(str(folder / name), variant) for name in COMPONENTS}
    states["text_encoder"] = normalize_state_dict(states["text_encoder"])
    return configs, states
