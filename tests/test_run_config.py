"""The run config: defaults, locking, and errors that name the values involved, before anything is built;
a property-based test of the validator; init_from / vae_from paths of the wrong kind."""

import json
import os
import re

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings, strategies as st

from configs import base, vae
from ldm_jax import parallel, train
from ldm_jax.pipeline import abstract_params, build_modules
from ldm_jax.training import checkpoints, run_config
from ldm_jax.training import sources as sources_lib


def _sections(**changes):
    config = base.get_config("quick").to_dict()
    sections = {k: config[k] for k in ("unet", "vae", "text_encoder", "scheduler", "data", "workdir",
                                       "autoencoder", "diffusion", "latents", "mesh")}
    sections.update(changes)
    return sections


def test_configs_build_and_lock():
    config = base.get_config()
    assert run_config.stages(config) == ["autoencoder", "latents", "diffusion"]
    assert run_config.stages(vae.get_config()) == ["autoencoder"]
    with pytest.raises(AttributeError, match="steps"):
        config.diffusion.step = 3  # locked: a misspelt key is an error, not a new key


def test_base_variants_build():
    """configs/base.py runs an f=2 VAE, a 32x32 U-Net and a zero-terminal-SNR schedule; its f4 variant swaps in the
    f=4 VAE, a 16x16 U-Net and SD's schedule; unknown variants fail."""
    for arg, factor, side, zero_snr, steps, workdir in ((None, 2, 32, True, 4500, "runs/base"),
                                                        ("f4", 4, 16, False, 2400, "runs/base_f4")):
        config = base.get_config(arg)
        assert 2 ** (len(config.vae.block_out_channels) - 1) == factor and config.image_size // factor == side
        assert config.unet.sample_size == side
        assert bool(config.scheduler.get("rescale_betas_zero_snr")) == zero_snr
        assert (config.diffusion.steps, config.workdir) == (steps, workdir)
    with pytest.raises(ValueError, match="unknown variant 'f2' of configs/base.py; the variants are 'quick' and 'f4'"):
        base.get_config("f2")


@pytest.mark.parametrize("changes,message", [
    (dict(diffusion=dict(stepz=3)), r"unknown diffusion config key\(s\) \['stepz'\]"),
    (dict(autoencoder=dict(optimizer=dict(lr=1.0))), r"unknown autoencoder.optimizer config key\(s\) \['lr'\]"),
    (dict(image_size=65, data=dict(source="shapes", image_size=65)),
     "image_size 65 is not divisible by the VAE's downsampling factor 2"),
    (dict(image_size=32), "image_size 32 differs from data.image_size 64"),
    (dict(unet={**base.UNET, "cross_attention_dim": 64}),
     "unet.cross_attention_dim 64 differs from the text encoder's width text_encoder.hidden_size 128"),
    (dict(unet={**base.UNET, "in_channels": 8}), "unet.in_channels 8 differs from vae.latent_channels 4"),
    (dict(data=dict(source="shapes", max_length=77)),
     "data.max_length 77 exceeds the text encoder's text_encoder.max_position_embeddings 16"),
    (dict(stages="autoencoder,difusion"), r"unknown stage\(s\) \['difusion'\]"),
    (dict(diffusion=dict(dtype="float8")), "diffusion.dtype must be float32, bfloat16 or float16, got 'float8'"),
    (dict(data=dict(source="folder", data_dir="images")),
     "diffusion.sample_prompts must name the sample grid's prompts for data.source 'folder'"),
    (dict(attention_impl="flash"), "unknown attention_impl 'flash'; choose one of"),
    (dict(diffusion=dict(remat_policy="some")), r"diffusion.remat_policy must be one of \['none', 'full'.*got 'some'"),
    (dict(diffusion=dict(timestep_sampling="cosine")),
     r"diffusion.timestep_sampling must be one of \['uniform', 'logit_normal'\], got 'cosine'"),
    (dict(diffusion=dict(timestep_logit_std=0.0)), r"diffusion.timestep_logit_std must be positive, got 0.0"),
    (dict(diffusion=dict(state_layout="tiled")),
     r"diffusion.state_layout must be one of \['auto', 'default'\], got 'tiled'"),
])
def test_bad_configs_fail_with_the_values_named(changes, message):
    with pytest.raises((KeyError, ValueError), match=message):
        run_config.run_config(**_sections(**changes))


@pytest.mark.parametrize("mesh,devices,message", [
    (dict(data=3), 8, r"make 3 devices, but there are 8"),
    (dict(data=-1, fsdp=3), 8, "8 devices are not divisible by the fixed axes' product 3"),
    (dict(data=-1, fsdp=-1), 8, "at most one may be -1"),
    (dict(pipeline=2), 8, r"unknown mesh axes \['pipeline'\]"),
    (dict(dcn_data=3), 8, r"8 devices do not split into dcn_data \* dcn_fsdp = 3 \* 1 = 3 equal slices"),
    (dict(data=-1, fsdp=3, dcn_data=2), 8, "the 4 devices of each of 2 slices are not divisible by the fixed axes' "
     "product 3"),
    (dict(data=2, fsdp=4, dcn_fsdp=2), 8, r"make 8 devices, but there are the 4 devices of each of 2 slices"),
    (dict(dcn_fsdp=0), 8, "across-slice sizes must be positive"),
    (dict(frozen="gather"), 8, r"mesh.frozen must be one of \('shard', 'replicate'\), got 'gather'"),
])
def test_bad_meshes_fail_with_the_sizes_named(mesh, devices, message):
    with pytest.raises(ValueError, match=message):
        parallel.mesh_shape(mesh, devices)


def test_mesh_section_is_validated_with_the_config():
    with pytest.raises(ValueError, match="mesh.frozen must be one of"):
        run_config.run_config(**_sections(mesh=dict(frozen="all")))
    assert run_config.run_config(**_sections(mesh=dict(dcn_data=2, frozen="replicate"))).mesh.dcn_data == 2


@pytest.mark.parametrize("rules,message", [
    ((("embed", "fsdp"), ("mlp", "fdsp")), r"mesh.axis_rules maps to unknown mesh axes 'fdsp'; the mesh axes are "
     r"\['data', 'fsdp', 'tensor'\]"),
    ((("embed", "fsdp"), ("mlp", "tensor"), ("embed", None)),
     r"mesh.axis_rules lists the logical axes \['embed'\] more than once"),
    ((("embed",),), r"mesh.axis_rules entry \('embed',\) is not a \(logical_name, mesh_axis_or_None\) pair"),
])
def test_bad_axis_rules_fail_validation_with_the_problem_named(rules, message):
    with pytest.raises(ValueError, match=message):
        run_config.run_config(**_sections(mesh=dict(axis_rules=rules)))


def test_axis_rules_of_the_config_lay_out_the_parameters():
    """mesh.axis_rules mapping 'embed' to None: no U-Net parameter is split over fsdp along an embed dimension."""
    rules = tuple((name, None if name == "embed" else axes) for name, axes in parallel.LOGICAL_AXIS_RULES)
    config = run_config.run_config(**_sections(mesh=dict(data=1, fsdp=8, axis_rules=rules)))
    abstract = abstract_params(build_modules(config)["unet"], "unet", config.unet)
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
    mesh = parallel.make_mesh(config.mesh)

    def embed_specs(axis_rules):
        shardings = jax.tree.leaves(parallel.logical_shardings(abstract, mesh, axis_rules))
        return [s.spec[box.names.index("embed")] for box, s in zip(boxed, shardings) if "embed" in box.names]
    assert "fsdp" in embed_specs(parallel.LOGICAL_AXIS_RULES)
    assert set(embed_specs(parallel.axis_rules(config.mesh))) == {None}


@pytest.mark.parametrize("slices,devices,error", [
    (3, 1, r"diffusion.batch_slices 3 does not divide diffusion.batch_size 16"),
    (2, 8, r"diffusion.batch_slices 2 runs the slices as concurrent programs on one CPU device; this run has 8 "
           r"devices"),
    (4, 1, None), (1, 8, None), (0, 8, None)])
def test_batch_slices_need_one_device_and_must_divide_the_stage_2_batch(slices, devices, error):
    quick = base.get_config("quick").diffusion.to_dict()
    config = run_config.run_config(**_sections(diffusion={**quick, "batch_size": 16, "batch_slices": slices}))
    if error:
        with pytest.raises(ValueError, match=error):
            run_config.check_devices(config, devices)
    else:
        run_config.check_devices(config, devices)


def test_batch_must_split_over_the_data_parallel_axes():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert parallel.mesh_shape(dict(data=-1, tensor=2), 8) == (4, 1, 2)
    parallel.check_batch(8, mesh)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the data-parallel size 4"):
        parallel.check_batch(6, mesh)


# ----------------------------------------------------------------------------------- property-based: the validator

_SIZES = st.fixed_dictionaries({
    "image_size": st.integers(8, 96), "data_image_size": st.one_of(st.none(), st.integers(8, 96)),
    "vae_levels": st.integers(1, 4), "latent": st.integers(1, 8), "unet_in": st.integers(1, 8),
    "unet_out": st.integers(1, 8), "context": st.sampled_from([16, 32, 64]), "width": st.sampled_from([16, 32, 64]),
    "positions": st.integers(4, 77), "max_length": st.integers(0, 80),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "float8"]),
    "nan_policy": st.sampled_from(["stop", "skip", "ignore"]), "steps": st.integers(0, 3),
    "checkpoint_every": st.integers(0, 3), "unknown_key": st.booleans(),
    "data_batch": st.integers(1, 48), "diffusion_batch": st.integers(0, 48), "latents_batch": st.integers(0, 48),
    "devices": st.sampled_from([1, 2, 4, 8]), "fsdp": st.sampled_from([1, 2]), "batch_slices": st.integers(-1, 4),
})


def _violations(v: dict) -> list[str]:
    """The messages (regexes) a validator must choose from for these values; [] when they are consistent."""
    found = []
    size = v["image_size"]
    data_size = size if v["data_image_size"] is None else v["data_image_size"]
    factor = 2 ** (v["vae_levels"] - 1)
    if v["unknown_key"]:
        found.append(r"unknown diffusion config key\(s\) \['stepz'\]")
    if size != data_size:
        found.append(f"image_size {size} differs from data.image_size {data_size}")
    if size % factor:
        found.append(f"image_size {size} is not divisible by the VAE's downsampling factor {factor}")
    for key in ("in", "out"):
        if v[f"unet_{key}"] != v["latent"]:
            found.append(f"unet.{key}_channels {v[f'unet_{key}']} differs from vae.latent_channels {v['latent']}")
    if v["max_length"] > v["positions"]:
        found.append(f"data.max_length {v['max_length']} exceeds the text encoder's "
                     f"text_encoder.max_position_embeddings {v['positions']}")
    if v["dtype"] == "float8":
        found.append("diffusion.dtype must be float32, bfloat16 or float16, got 'float8'")
    if v["context"] != v["width"]:
        found.append(f"unet.cross_attention_dim {v['context']} differs from the text encoder's width "
                     f"text_encoder.hidden_size {v['width']}")
    for key in ("steps", "checkpoint_every"):
        if v[key] < 1:
            found.append(f"diffusion.{key} must be at least 1, got {v[key]}")
    if v["nan_policy"] == "ignore":
        found.append(r"diffusion.nan_policy must be one of \('stop', 'skip'\), got 'ignore'")
    if v["batch_slices"] < 0:
        found.append(rf"diffusion.batch_slices must be 0 \(auto\) or positive, got {v['batch_slices']}")
    return found


def _device_violations(v: dict) -> list[str]:
    """The batch-vs-mesh messages for a config that passed `validate`."""
    if v["devices"] % v["fsdp"]:
        return [f"{v['devices']} devices are not divisible by the fixed axes' product {v['fsdp']}"]
    parallel_size = v["devices"]  # data = devices / fsdp, times fsdp
    batches = {"data.batch_size": v["data_batch"],
               "latents.batch_size" if v["latents_batch"] else "data.batch_size": v["latents_batch"] or v["data_batch"],
               "diffusion.batch_size" if v["diffusion_batch"] else "data.batch_size":
                   v["diffusion_batch"] or v["data_batch"]}
    found = [f"{key} {size} is not divisible by the data-parallel size {parallel_size}"
             for key, size in batches.items() if size % parallel_size]
    diffusion_key = "diffusion.batch_size" if v["diffusion_batch"] else "data.batch_size"
    if not found and v["batch_slices"] > 1 and v["devices"] > 1:
        found.append(f"diffusion.batch_slices {v['batch_slices']} runs the slices as concurrent programs on one CPU "
                     f"device; this run has {v['devices']} devices")
    elif not found and v["batch_slices"] > 1 and batches[diffusion_key] % v["batch_slices"]:
        found.append(f"diffusion.batch_slices {v['batch_slices']} does not divide {diffusion_key} "
                     f"{batches[diffusion_key]}")
    return found


@settings(max_examples=150, deadline=None)
@given(_SIZES)
def test_validator_accepts_exactly_the_consistent_configs(v):
    """Random model, data, training and mesh values: an error iff a rule is broken, naming the values involved."""
    levels = v["vae_levels"]
    vae = {**base.VAE, "block_out_channels": (16,) * levels, "down_block_types": ("DownEncoderBlock2D",) * levels,
           "up_block_types": ("UpDecoderBlock2D",) * levels, "latent_channels": v["latent"]}
    unet = {**base.UNET, "in_channels": v["unet_in"], "out_channels": v["unet_out"],
            "cross_attention_dim": v["context"]}
    text = {**base.TEXT_ENCODER, "hidden_size": v["width"], "max_position_embeddings": v["positions"]}
    data = dict(source="shapes", max_length=v["max_length"], batch_size=v["data_batch"],
                image_size=v["image_size"] if v["data_image_size"] is None else v["data_image_size"])
    diffusion = dict(dtype=v["dtype"], nan_policy=v["nan_policy"], steps=v["steps"],
                     checkpoint_every=v["checkpoint_every"], batch_size=v["diffusion_batch"],
                     batch_slices=v["batch_slices"], **({"stepz": 1} if v["unknown_key"] else {}))
    sections = _sections(unet=unet, vae=vae, text_encoder=text, data=data, image_size=v["image_size"],
                         diffusion=diffusion, latents=dict(batch_size=v["latents_batch"]),
                         mesh=dict(data=-1, fsdp=v["fsdp"]))
    expected = _violations(v)
    if expected:
        with pytest.raises((KeyError, ValueError)) as error:
            run_config.run_config(**sections)
        assert any(re.search(message, str(error.value)) for message in expected), (str(error.value), expected)
        return
    config = run_config.run_config(**sections)
    expected = _device_violations(v)
    if expected:
        with pytest.raises(ValueError) as error:
            run_config.check_devices(config, v["devices"])
        assert any(re.search(message, str(error.value)) for message in expected), (str(error.value), expected)
    else:
        run_config.check_devices(config, v["devices"])


# ------------------------------------------------------------------------------- init_from / vae_from: their kinds


def _orbax_run(folder: str, models: list[str]) -> str:
    """A real orbax checkpoint (step 1) whose config item names ``models``, as the training loops write it."""
    with checkpoints.checkpoint_manager(folder, keep=None) as manager:
        checkpoints.save_train_step(manager, 1, {m: {"w": np.zeros(2, np.float32)} for m in models},
                                    {"step": np.zeros((), np.int32)}, {"configs": {m: {} for m in models}})
        manager.wait_until_finished()
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """One path of each kind that ``classify`` tells apart."""
    root = tmp_path_factory.mktemp("sources")
    paths = {"stage1-run": str(root / "vae_run"), "stage2-run": str(root / "unet_run"),
             "pipeline": str(root / "sd"), "single-file": str(root / "sd.safetensors"),
             "vae-file": str(root / "vae.safetensors")}
    _orbax_run(os.path.join(paths["stage1-run"], "autoencoder"), ["vae", "discriminator"])
    _orbax_run(paths["stage2-run"], ["unet", "vae", "text_encoder"])
    paths["stage1-folder"] = os.path.join(paths["stage1-run"], "autoencoder")
    for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", None)):
        os.makedirs(os.path.join(paths["pipeline"], name))
        with open(os.path.join(paths["pipeline"], name, "config.json"), "w") as f:
            json.dump({"_class_name": cls} if cls else {"architectures": ["CLIPTextModel"]}, f)
    paths["model-folder"] = os.path.join(paths["pipeline"], "vae")
    tensor = np.zeros((1,), np.float32)
    safetensors.numpy.save_file({"model.diffusion_model.out.0.weight": tensor,
                                 "first_stage_model.encoder.conv_in.weight": tensor}, paths["single-file"])
    safetensors.numpy.save_file({"encoder.conv_in.weight": tensor, "decoder.conv_in.weight": tensor},
                                paths["vae-file"])
    return paths


def test_classify_tells_the_kinds_apart(sources):
    for kind, path in sources.items():
        assert sources_lib.classify(path)[0] == kind, path


@pytest.mark.parametrize("key,kind,message", [
    ("init_from", "stage1-run", "is a training workdir with a stage-1 .autoencoder. checkpoint; init_from takes a "
                                "pretrained pipeline .* to encode with its VAE, set vae_from="),
    ("init_from", "stage1-folder", r"is a stage-1 checkpoint folder \(models \['discriminator', 'vae'\]: a VAE, no "
                                   "U-Net\\); init_from takes"),
    ("init_from", "vae-file", "is a .safetensors with only VAE weights .*; a VAE alone cannot start a U-Net"),
    ("init_from", "model-folder", r"is a single model folder \(AutoencoderKL\), not a whole pipeline; .* pass the "
                                  "pipeline folder above it"),
    ("init_from", "stage2-run", "is a stage-2 training workdir .* to continue that run, pass it as --workdir"),
    ("vae_from", "stage2-run", "is a stage-2 training workdir .*; vae_from takes a stage-1 training workdir"),
    ("vae_from", "stage1-folder", "is a stage-1 checkpoint folder .*; vae_from takes .*; pass its workdir"),
])
def test_a_checkpoint_of_the_wrong_kind_is_refused_by_name(sources, key, kind, message):
    config = base.get_config("quick")
    with config.unlocked():
        config[key] = sources[kind]
    with pytest.raises(ValueError, match=f"{key}='{re.escape(sources[kind])}' {message}"):
        sources_lib.check_sources(config)


def test_right_kinds_pass_and_a_missing_path_is_named(sources, tmp_path):
    config = base.get_config("quick")
    with config.unlocked():
        config.init_from, config.vae_from = sources["pipeline"], sources["stage1-run"]
        sources_lib.check_sources(config)
        config.init_from, config.vae_from = sources["single-file"], sources["pipeline"]
        sources_lib.check_sources(config)
        config.vae_from = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="vae_from='.*nothing': .*nothing does not exist; vae_from takes"):
        sources_lib.check_sources(config)


def test_trainer_refuses_a_wrong_checkpoint_before_building_anything(sources, tmp_path):
    config = base.get_config("quick")
    with config.unlocked():
        config.init_from = sources["stage1-run"]
    with pytest.raises(ValueError, match="init_from=.* is a training workdir with a stage-1"):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # failed before any stage wrote anything


# ----------------------------------------------------------------------------- model configs vs run configs

def _load_config(spec: str):
    """``configs/x.py[:variant]`` as the trainer's --config flag loads it."""
    import importlib

    path, _, variant = spec.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return module.get_config(variant or None)


def test_run_configs_lists_exactly_the_run_configs():
    for spec in run_config.RUN_CONFIGS:
        run_config.validate(_load_config(spec))
    for spec in ("configs/tiny.py", "configs/sd15.py", "configs/sd21.py", "configs/sd21.py:base"):
        with pytest.raises(ValueError, match=re.escape("this is a model config (keys image_size, scheduler, "
                                                       "text_encoder, unet, vae; no 'stages'); training takes a "
                                                       "run config (built by ldm_jax.training.run_config.run_config"
                                                       "): configs/base.py, configs/base.py:quick") + ".*"
                                                       + re.escape("configs/tiny.py:run")):
            run_config.validate(_load_config(spec))
    with pytest.raises(ValueError, match=r"this is not a run config \(no 'workdir', 'seed', 'stages', .*'diffusion'"
                                         r"\); training takes a run config"):
        run_config.validate(_load_config("configs/data_example.py"))


def test_trainer_on_a_model_config_exits_with_one_line_naming_the_run_configs():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "ldm_jax.train", "--config", "configs/tiny.py"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(r"ldm_jax.train: error: --config configs/tiny.py: this is a model config \(.*no 'stages'\); "
                        r"training takes a run config .*configs/tiny.py:run.*", result.stderr.splitlines()[-1])
