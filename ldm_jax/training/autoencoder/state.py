"""Stage 1's train state on a device mesh: the modules and optimizers of a run config, the state born sharded,
the jitted train, eval and latent-std functions, checkpoint save and restore.

The stage-1 loop builds everything it runs here; the sharded-step test
builds the same pieces from a hand-made `Stage1`. The state's shardings
come from ``jax.eval_shape`` of `init_state` and the logical axis rules (the
config's ``mesh.axis_rules``, see ``ldm_jax.parallel``), checked against the
parameters' shapes before anything is compiled.

Checkpoints live in ``WORKDIR/autoencoder/checkpoints/<step>/`` (`stage_dir`)
with the items ``params`` ({'vae', 'discriminator'}), ``state`` (step and
optimizer states) and ``config`` (the JSON the loop gives `save_state`).
"""

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from ldm_jax import parallel
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS, params_from_torch
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder import step as ae_step
from ldm_jax.training.autoencoder.losses import AutoencoderLossConfig
from ldm_jax.training.train_state import TrainState, make_optimizer

MODELS = ("vae", "discriminator")  # the trained models, each with its optimizer
LPIPS_FILES = ("vgg16.safetensors", "lpips_vgg_heads.safetensors")


def stage_dir(workdir: str) -> str:
    """The folder of stage 1's checkpoints and metrics inside a run's workdir."""
    return str(epath.Path(workdir) / "autoencoder")


def loss_config(config: Mapping[str, Any]) -> AutoencoderLossConfig:
    """The static loss config (modules and weights) of a run config."""
    ae = config["autoencoder"]
    vae = AutoencoderKL.from_diffusers_config(dict(config["vae"]), attention_impl=config["attention_impl"])
    discriminator = NLayerDiscriminator(ndf=ae["disc_channels"], n_layers=ae["disc_layers"], norm=ae["disc_norm"])
    return AutoencoderLossConfig(vae=vae, discriminator=discriminator, lpips=LPIPS(), kl_weight=ae["kl_weight"],
                                 perceptual_weight=ae["perceptual_weight"], disc_weight=ae["disc_weight"],
                                 disc_factor=ae["disc_factor"], disc_start=ae["disc_start"],
                                 sample_posterior=ae["sample_posterior"])


def load_lpips(folder: str) -> Any:
    """LPIPS params from ``folder`` (LPIPS_FILES), or None for ''. FileNotFoundError naming a missing file."""
    if not folder:
        return None
    files = [str(epath.Path(folder) / name) for name in LPIPS_FILES]
    missing = [p for p in files if not epath.Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"autoencoder.lpips={folder!r} lacks {missing}: it needs torchvision's VGG16 state "
                                f"dict and the lpips package's v0.1 vgg heads, as {LPIPS_FILES}")
    return params_from_torch(*files)


@dataclasses.dataclass(frozen=True)
class Stage1:
    """What stage 1's state and steps are built from: the loss config (modules and weights), one optimizer per
    model in `MODELS`, and the (H, W, C) shape of the training images."""
    loss: AutoencoderLossConfig
    optimizers: Mapping[str, optax.GradientTransformation]
    image_shape: tuple[int, int, int]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Stage1":
        """Stage 1 of a run config: `loss_config`, the ``autoencoder.optimizer`` and ``disc_optimizer``
        sections over ``autoencoder.steps``, and square images of ``image_size``."""
        ae, loss = config["autoencoder"], loss_config(config)
        optimizers = {"vae": make_optimizer(ae["optimizer"], ae["steps"]),
                      "discriminator": make_optimizer(ae["disc_optimizer"], ae["steps"])}
        return cls(loss, optimizers, (config["image_size"], config["image_size"], loss.vae.in_channels))


def init_state(stage: Stage1, rng: jax.Array) -> TrainState:
    """A fresh state (boxed, logically partitioned params and their optimizer states)."""
    images = jnp.zeros((1, *stage.image_shape), jnp.float32)
    vae_rng, disc_rng = jax.random.split(rng)
    params = {"vae": stage.loss.vae.init(vae_rng, images)["params"],
              "discriminator": stage.loss.discriminator.init(disc_rng, images)["params"]}
    opt_state = {name: stage.optimizers[name].init(params[name]) for name in MODELS}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def state_shardings(stage: Stage1, mesh: jax.sharding.Mesh, rules: Any = parallel.LOGICAL_AXIS_RULES) -> TrainState:
    """The state's shardings, from its abstract shapes and the logical axis ``rules``; ValueError naming
    parameters that do not fit the mesh (before anything is compiled)."""
    return parallel.logical_shardings(jax.eval_shape(functools.partial(init_state, stage), jax.random.key(0)),
                                      mesh, rules)


def create_state(stage: Stage1, mesh: jax.sharding.Mesh, rng: jax.Array,
                 rules: Any = parallel.LOGICAL_AXIS_RULES) -> tuple[TrainState, TrainState]:
    """A fresh state born sharded on ``mesh`` (`state_shardings`), and its shardings."""
    return parallel.sharded_init(functools.partial(init_state, stage), mesh, rng,
                                 shardings=state_shardings(stage, mesh, rules))


def abstract_state(stage: Stage1, mesh: jax.sharding.Mesh, rules: Any = parallel.LOGICAL_AXIS_RULES) -> TrainState:
    """The state as ``ShapeDtypeStruct``s placed on their shardings (`state_shardings`): nothing is allocated."""
    shapes = nn.meta.unbox(jax.eval_shape(functools.partial(init_state, stage), jax.random.key(0)))
    return checkpoints.abstract_like(shapes, state_shardings(stage, mesh, rules))


def jit_train_step(stage: Stage1, mesh: jax.sharding.Mesh, shardings: TrainState, adversarial: bool) -> Any:
    """``step(state, batch, lpips_params, rng) -> (state, metrics)``: the stage-1 step (before ``disc_start``
    or from it on, per ``adversarial``) jitted with the state's shardings, the batch split over the batch axes,
    LPIPS params and metrics replicated, the state donated. Compiled when first called."""
    replicated = parallel.replicated(mesh)
    return jax.jit(functools.partial(ae_step.train_step, stage.loss, stage.optimizers, adversarial=adversarial),
                   in_shardings=(shardings, parallel.batch_sharding(mesh), replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def jit_train_steps(stage: Stage1, mesh: jax.sharding.Mesh, shardings: TrainState) -> dict[bool, Any]:
    """`jit_train_step` for both sides of ``disc_start``, keyed by ``adversarial`` (``step >= disc_start``)."""
    return {adversarial: jit_train_step(stage, mesh, shardings, adversarial) for adversarial in (False, True)}


def jit_eval_step(stage: Stage1, mesh: jax.sharding.Mesh, shardings: TrainState) -> Any:
    """``eval(vae_params, batch) -> {'psnr', 'l1'}`` per example (``step.eval_step``), jitted with the VAE
    params on their ``shardings`` and the batch and results split over the batch axes."""
    batch = parallel.batch_sharding(mesh)
    return jax.jit(functools.partial(ae_step.eval_step, stage.loss), in_shardings=(shardings.params["vae"], batch),
                   out_shardings=batch)


def jit_latent_std(stage: Stage1, mesh: jax.sharding.Mesh) -> Any:
    """``std(vae_params, images, rng) -> scalar``: the std of posterior samples (``step.latent_std``, whose
    inverse is the latent scale factor), jitted with a replicated result."""
    return jax.jit(functools.partial(ae_step.latent_std, stage.loss.vae), out_shardings=parallel.replicated(mesh))


def _rest(state: Any) -> dict[str, Any]:
    """The parts of a state besides its params (saved as the ``state`` item)."""
    return {"step": state.step, "opt_state": state.opt_state}


def save_state(manager: Any, step: int, state: TrainState, config: dict[str, Any]) -> None:
    """Save the state as checkpoint ``step``: the params ({'vae', 'discriminator'}), the step and optimizer
    states, and the JSON ``config`` item (asynchronous)."""
    checkpoints.save_train_step(manager, step, state.params, _rest(state), config)


def restore_state(manager: Any, step: int, state: TrainState, shardings: TrainState) -> TrainState:
    """The state saved at ``step``, restored onto ``shardings`` (``state`` gives the shapes; any mesh works,
    whatever mesh saved it)."""
    params = checkpoints.abstract_like(state.params, shardings.params)
    rest = checkpoints.abstract_like(_rest(state), _rest(shardings))
    params, rest = checkpoints.restore_train_step(manager, step, params, rest)
    return state.replace(params=params, **rest)
