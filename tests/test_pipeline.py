"""Pipeline.from_pretrained / save_pretrained against diffusers' StableDiffusionPipeline (tiny random weights).

The references are diffusers' UNet2DConditionModel and AutoencoderKL and
transformers' CLIPTextModel, saved by diffusers itself; our loader must give
their numbers, and a folder we write must load back into diffusers.
"""

import functools
import importlib
import os
import shutil
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax import Pipeline

from ldm_jax.weights import convert, diffusers_folder, single_file


from ldm_jax.models.clip import normalize_state_dict, tokenize
from ldm_jax.weights.convert import WeightsMismatchError
from ldm_jax.testing import max_rel_error, numpy_state_dict
from ldm_jax.testing import pipeline as pipeline_refs

PROMPTS = ["a red circle", "a photo of a cat on a mat"]
TOL = 2e-5  # max_rel_error of float32 outputs against diffusers; measured at most 1.8e-6 (2-core AMD EPYC)


def reference(style: str, root: str) -> types.SimpleNamespace:
    """The torch models of ``style``, the diffusers folder they were saved to, and inputs for both implementations."""
    pipe, folder = pipeline_refs.build(style, root)
    return types.SimpleNamespace(pipe=pipe, folder=folder,
                                 inputs=make_inputs(pipeline_refs.STYLES[style][0], pipe.tokenizer))


def make_inputs(unet_config: dict, tokenizer) -> dict:
    """Random NHWC inputs for the three models, shared by both implementations."""
    rng = np.random.default_rng(0)
    return {
        "ids": tokenize(tokenizer, PROMPTS),
        "latents": rng.standard_normal((2, 16, 16, 4)).astype(np.float32),
        "timesteps": np.array([3, 981], np.int32),
        "context": rng.standard_normal((2, 7, unet_config["cross_attention_dim"])).astype(np.float32),
        "image": rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32),
    }


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@torch.no_grad()
def torch_outputs(pipe: diffusers.StableDiffusionPipeline, inputs: dict) -> dict[str, np.ndarray]:
    """The reference outputs of every model of a diffusers pipeline."""
    text = pipe.text_encoder(torch.from_numpy(inputs["ids"]).long())
    posterior = pipe.vae.encode(nchw(inputs["image"])).latent_dist
    return {
        "unet": nhwc(pipe.unet(nchw(inputs["latents"]), torch.from_numpy(inputs["timesteps"]).long(),
                               torch.from_numpy(inputs["context"])).sample),
        "vae_mean": nhwc(posterior.mean), "vae_logvar": nhwc(posterior.logvar),
        "vae_decode": nhwc(pipe.vae.decode(nchw(inputs["latents"][..., :4])).sample),
        "clip_hidden": text.last_hidden_state.numpy(), "clip_pooled": text.pooler_output.numpy(),
    }


@functools.partial(jax.jit, static_argnums=(0, 1))
def apply(module, method: str, params, *args):
    """``module.apply`` jitted once per (module, method): equal modules share the compiled code."""
    return module.apply({"params": params}, *args, method=method)


def jax_outputs(pipe: Pipeline, inputs: dict) -> dict[str, np.ndarray]:
    """The same outputs from our Flax modules and params."""
    p = pipe.params
    posterior = apply(pipe.vae, "encode", p["vae"], inputs["image"])
    hidden, pooled = apply(pipe.text_encoder, "__call__", p["text_encoder"], inputs["ids"])
    return {
        "unet": apply(pipe.unet, "__call__", p["unet"], inputs["latents"], inputs["timesteps"], inputs["context"]),
        "vae_mean": posterior.mean, "vae_logvar": posterior.logvar,
        "vae_decode": apply(pipe.vae, "decode", p["vae"], inputs["latents"][..., :4]),
        "clip_hidden": hidden, "clip_pooled": pooled,
    }


def assert_outputs_close(ours: dict, theirs: dict, tol: float = TOL) -> None:
    errors = {name: max_rel_error(ours[name], theirs[name]) for name in theirs}
    assert all(e <= tol for e in errors.values()), errors


@pytest.fixture(scope="module", params=sorted(pipeline_refs.STYLES))
def ref(request, tmp_path_factory):
    return reference(request.param, str(tmp_path_factory.getbasetemp()))


def test_from_pretrained_folder_matches_diffusers(ref):
    pipe = Pipeline.from_pretrained(ref.folder)
    assert_outputs_close(jax_outputs(pipe, ref.inputs), torch_outputs(ref.pipe, ref.inputs))
    assert pipe.scale_factor == pytest.approx(ref.pipe.vae.config.scaling_factor)
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    np.testing.assert_array_equal(
        tokenize(pipe.tokenizer, PROMPTS),
        ref.pipe.tokenizer(PROMPTS, padding="max_length", max_length=ref.pipe.tokenizer.model_max_length,
                           truncation=True, return_tensors="np").input_ids)


def test_from_pretrained_single_file_matches_diffusers(ref, tmp_path):
    torch_pipe = ref.pipe
    states = {"unet": numpy_state_dict(torch_pipe.unet), "vae": numpy_state_dict(torch_pipe.vae),
              "text_encoder": normalize_state_dict(numpy_state_dict(torch_pipe.text_encoder))}
    configs = {"unet": dict(torch_pipe.unet.config), "vae": dict(torch_pipe.vae.config),
               "text_encoder": torch_pipe.text_encoder.config.to_dict()}
    path = str(tmp_path / "model.safetensors")
    single_file.save_single_file(path, states["unet"], states["vae"], states["text_encoder"], configs)
    # Head counts and group counts are not in the tensor shapes of a single file: the tiny models say theirs.
    overrides = {"unet": {"attention_head_dim": configs["unet"]["attention_head_dim"], "norm_num_groups": 8},
                 "vae": {"norm_num_groups": 8},
                 "text_encoder": {"num_attention_heads": configs["text_encoder"]["num_attention_heads"]}}
    pipe = Pipeline.from_pretrained(path, overrides=overrides)
    assert_outputs_close(jax_outputs(pipe, ref.inputs), torch_outputs(torch_pipe, ref.inputs))


def test_save_pretrained_loads_back_into_diffusers(ref, tmp_path):
    ours = Pipeline.from_pretrained(ref.folder)
    ours.save_pretrained(str(tmp_path / "out"))
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), safety_checker=None)
    assert type(reloaded.scheduler).__name__ == "DDIMScheduler"
    assert reloaded.vae.config.scaling_factor == pytest.approx(ours.scale_factor)
    assert_outputs_close(torch_outputs(reloaded, ref.inputs), torch_outputs(ref.pipe, ref.inputs), tol=1e-6)
    assert_outputs_close(jax_outputs(Pipeline.from_pretrained(str(tmp_path / "out")), ref.inputs),
                         torch_outputs(ref.pipe, ref.inputs))


def test_bf16_compute_close_to_float32(ref):
    pipe = Pipeline.from_pretrained(ref.folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pipe.params))
    ours = jax_outputs(pipe, ref.inputs)
    assert ours["unet"].dtype == jnp.bfloat16
    theirs = torch_outputs(ref.pipe, ref.inputs)
    errors = {name: max_rel_error(np.asarray(ours[name], np.float32), theirs[name]) for name in theirs}
    assert all(e <= 5e-2 for e in errors.values()), errors
    assert max(errors.values()) > 1e-4, "bfloat16 compute had no effect"


def test_shape_mismatch_names_component_key_and_shapes(ref, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(ref.folder, bad)
    unet = {**numpy_state_dict(ref.pipe.unet), "conv_in.weight": np.zeros((32, 4, 5, 5), np.float32)}
    diffusers_folder.write_state_dict(os.path.join(bad, "unet", "diffusion_pytorch_model.safetensors"),
                                                  unet)
    with pytest.raises(WeightsMismatchError, match=r"unet.*conv_in\.weight: expected shape \(32, 4, 3, 3\), "
                                                   r"found \(32, 4, 5, 5\)"):
        Pipeline.from_pretrained(bad)


def test_missing_and_unexpected_keys_are_listed(ref, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(ref.folder, bad)
    vae = numpy_state_dict(ref.pipe.vae)
    vae["extra.weight"] = vae.pop("decoder.conv_out.weight")
    diffusers_folder.write_state_dict(os.path.join(bad, "vae", "diffusion_pytorch_model.safetensors"),
                                                  vae)
    with pytest.raises(WeightsMismatchError) as err:
        Pipeline.from_pretrained(bad)
    assert "1 missing key(s): decoder.conv_out.weight" in str(err.value)
    assert "1 unexpected key(s): extra.weight" in str(err.value)


def test_unknown_layouts_are_named(ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained pipeline"):
        Pipeline.from_pretrained(str(tmp_path / "nowhere"))
    partial = str(tmp_path / "partial")
    shutil.copytree(ref.folder, partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ValueError, match=r"not a diffusers pipeline folder: missing \['vae'\]"):
        Pipeline.from_pretrained(partial)
    pickled = str(tmp_path / "pickled")
    shutil.copytree(ref.folder, pickled)
    os.remove(os.path.join(pickled, "unet", "diffusion_pytorch_model.safetensors"))
    torch.save({}, os.path.join(pickled, "unet", "diffusion_pytorch_model.bin"))
    with pytest.raises(ValueError, match="only PyTorch pickle weights"):
        Pipeline.from_pretrained(pickled)


@pytest.mark.parametrize("name,arg", [("tiny", None), ("sd15", None), ("sd21", None), ("sd21", "base")])
def test_configs_describe_the_reference_architectures(name, arg):
    """Our params from a config have exactly the state-dict keys and shapes of the diffusers/transformers models."""
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    abstract = jax.eval_shape(lambda key: Pipeline.from_config(config, key).params, jax.random.key(0))
    with torch.device("meta"):
        references = {
            "unet": diffusers.UNet2DConditionModel(**config.unet), "vae": diffusers.AutoencoderKL(**config.vae),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.text_encoder))}
    for component, model in references.items():
        state = model.state_dict()
        state = normalize_state_dict(state) if component == "text_encoder" else state
        expected = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}
        assert convert.state_dict_shapes(abstract[component]) == expected, component


def test_tokenize_is_exported_at_the_top_level():
    import ldm_jax
    from ldm_jax.models import clip

    assert ldm_jax.tokenize is clip.tokenize and "tokenize" in ldm_jax.__all__


def test_tokenize_without_a_tokenizer_says_where_to_get_one():
    """A single-file pipeline has no tokenizer: tokenize names the problem instead of an AttributeError."""
    from ldm_jax import tokenize

    with pytest.raises(ValueError, match=r"no tokenizer: a single-file checkpoint carries none; .*load_tokenizer"):
        tokenize(None, ["a red circle"], 77)
