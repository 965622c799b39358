"""Sharding over a device mesh on the 8 fake CPU devices of conftest.py: multi-slice mesh shapes, config errors
before compiling, stage-2 steps on several meshes equal to one device, per-device bytes under fsdp, stage 1, the
latent encoder and sample_fn under a mesh, and two real processes training, checkpointing and restoring.

The stage-2 model is tests/multihost_worker.py's (configs/tiny.py cut to one U-Net level). The data=8 mesh, the
stage-1 step and the 2-process run are marked slow (CI time budget): ``pytest -m slow tests/test_parallel.py``.
"""

import os
import socket
import subprocess
import sys
import types

import flax
import jax
import numpy as np
import pytest

from ldm_jax import parallel
from ldm_jax.data import latents
from ldm_jax.diffusion.sample_fn import Models, sample_fn
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.vae import AutoencoderKL
from ldm_jax.pipeline import abstract_params, build_modules
from ldm_jax.training import checkpoints
from ldm_jax.training.autoencoder import state as autoencoder_state
from ldm_jax.training.diffusion import state as diffusion_state
from ldm_jax.training.autoencoder.losses import AutoencoderLossConfig
from ldm_jax.training.train_state import make_optimizer
from gcs_emulator import emulator_fixture
from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"data=8": dict(data=8, frozen="replicate"), "fsdp=8": dict(data=1, fsdp=8),
          "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2)}
# float32; reductions are split differently on each mesh, so results agree to round-off, not bit for bit.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6  # the 3 steps move parameters by up to 3e-3 (learning rate 1e-3)
MULTIHOST_TIMEOUT_S = 300

gcs = emulator_fixture()


def _fake_devices(slices: int, per_slice: int, with_slices: bool = True) -> list:
    """Stand-ins for TPU devices of ``slices`` slices (or processes, without ``slice_index``)."""
    devices = []
    for i in range(slices * per_slice):
        fields = dict(id=i, process_index=i // per_slice, platform="cpu", device_kind="cpu")
        if with_slices:
            fields["slice_index"] = i // per_slice
        devices.append(types.SimpleNamespace(**fields))
    return devices


@pytest.mark.parametrize("mesh,slices,expected", [
    (dict(data=-1, dcn_data=2), 2, (8, 1, 1)),
    (dict(data=1, fsdp=-1, dcn_fsdp=2), 2, (1, 8, 1)),
    (dict(data=1, fsdp=2, tensor=-1, dcn_data=2, dcn_fsdp=2), 4, (2, 4, 1)),
])
def test_multi_slice_mesh_keeps_each_slice_together(mesh, slices, expected):
    """create_hybrid_device_mesh places slices along the across-slice axes; inside, the within-slice shape."""
    devices = _fake_devices(slices, 8 // slices)
    ici, dcn = parallel.slice_shapes(mesh, len(devices))
    assert tuple(i * d for i, d in zip(ici, dcn)) == expected == parallel.mesh_shape(mesh, len(devices))
    grid = parallel.device_grid(mesh, devices)
    assert grid.shape == expected
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    blocks = [slice_of[a * ici[0]:(a + 1) * ici[0], b * ici[1]:(b + 1) * ici[1]]
              for a in range(dcn[0]) for b in range(dcn[1])]
    assert sorted(int(block.flat[0]) for block in blocks) == list(range(slices))
    assert all((block == block.flat[0]).all() for block in blocks)
    # Without slice_index (GPU nodes), the processes are the slices.
    by_process = parallel.device_grid(mesh, _fake_devices(slices, 8 // slices, with_slices=False))
    np.testing.assert_array_equal(np.vectorize(lambda d: d.process_index)(by_process), slice_of)


def test_plain_mesh_when_across_slice_sizes_are_one():
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(mesh.devices), np.arange(8).reshape(2, 2, 2))
    with pytest.raises(ValueError, match="the devices span 2 slices but mesh.dcn_data \\* mesh.dcn_fsdp = 1"):
        parallel.device_grid(dict(data=-1), _fake_devices(2, 4))


def test_parameters_that_do_not_fit_the_mesh_fail_before_compiling():
    """Shapes from eval_shape against the logical shardings: the error names the parameter and the sizes."""
    task, configs, _ = worker.setup()
    abstract = abstract_params(task.unet, "unet", configs["unet"])
    with pytest.raises(ValueError, match=r"24 of the parameters do not fit the mesh \{'data': 2, 'fsdp': 1, "
                       r"'tensor': 3\}: down_blocks_0/resnets_0/time_emb_proj/bias \(32,\): dimension 0 \('mlp' "
                       r"-> mesh tensor=3\) has size 32, not divisible by 3"):
        parallel.logical_shardings(abstract, parallel.make_mesh(dict(data=-1, tensor=3), jax.devices()[:6]))
    # fsdp: a small parameter whose dimension does not divide stays whole (U-Net conv_out: 4 channels, 4.5 KiB;
    # SD's is 45 KiB); a large one is an error.
    fsdp3 = parallel.make_mesh(dict(data=-1, fsdp=3), jax.devices()[:6])
    shardings = parallel.logical_shardings(abstract, fsdp3)
    assert shardings["conv_out"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, None)
    large = {"proj": {"kernel": flax.linen.LogicallyPartitioned(jax.ShapeDtypeStruct((512, 1024), np.float32),
                                                                 ("embed", "mlp"))}}
    with pytest.raises(ValueError, match=r"proj/kernel \(512, 1024\): dimension 0 \('embed' -> mesh fsdp=3\) has "
                       r"size 512, not divisible by 3"):
        parallel.logical_shardings(large, fsdp3)
    fsdp8 = parallel.logical_shardings(abstract, parallel.make_mesh(dict(data=1, fsdp=8)))
    assert fsdp8["conv_in"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def _per_device_bytes(tree) -> dict[int, int]:
    """Bytes each device holds of the arrays of ``tree``, from their addressable shards."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device.id] = totals.get(shard.device.id, 0) + shard.data.nbytes
    return totals


def _start_workers(workdir: str) -> list[subprocess.Popen]:
    """The 2 processes of tests/multihost_worker.py, 4 CPU devices each, on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": ROOT,
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    return [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", workdir], cwd=ROOT,
                             env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _train_on(stage2, mesh_config: dict, devices=None) -> tuple[list[float], dict]:
    """The losses and params after 3 steps of stage2's task from the initial state placed on ``mesh_config``'s
    shardings."""
    task = stage2.task
    mesh = parallel.make_mesh(mesh_config, devices)
    shardings = diffusion_state.state_shardings(task, stage2.configs, stage2.optimizer, mesh,
                                                mesh_config.get("frozen", "shard"))
    state, frozen = jax.device_put(stage2.initial, shardings)
    state, losses = worker.train(task, stage2.optimizer, mesh, state, frozen, shardings)
    return losses, jax.tree.map(np.asarray, state.params)


@pytest.fixture(scope="module")
def stage2():
    """The initial state (created on the fsdp=8 mesh), and the losses and params of 3 steps on one device."""
    task, configs, optimizer = worker.setup()
    fsdp = parallel.make_mesh(MESHES["fsdp=8"])
    state, frozen, _ = diffusion_state.create_state(task, configs, optimizer, fsdp, jax.random.key(0))
    stage2 = types.SimpleNamespace(task=task, configs=configs, optimizer=optimizer, created=(state, frozen),
                                   initial=jax.tree.map(np.asarray, (state, frozen)))
    stage2.reference = _train_on(stage2, {}, jax.devices()[:1])
    return stage2


def _assert_matches_reference(stage2, losses: list[float], params: dict, reference=None) -> None:
    """Losses and params equal to ``reference``'s (losses, params) within the stated tolerances; default: the
    one-device run; and the 3 steps did move the params."""
    ref_losses, ref_params = stage2.reference if reference is None else reference
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_params),
                                                    jax.tree.leaves(stage2.initial[0].params)))
    assert moved > 1e-3  # the steps did change the params
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    for path, a in flax.traverse_util.flatten_dict(ref_params, sep="/").items():
        np.testing.assert_allclose(flat[path], a, atol=PARAM_ATOL, rtol=0, err_msg=path)


# Each mesh costs a compile (about 12 s on 2 cores): data=8 runs by hand with -m slow (CI time budget); fsdp=8
# and data=2,fsdp=2,tensor=2 (all three axes at once) run in CI.
@pytest.mark.parametrize("name", [pytest.param("data=8", marks=pytest.mark.slow), "fsdp=8",
                                  "data=2,fsdp=2,tensor=2"])
def test_stage2_steps_on_a_mesh_match_one_device(stage2, name):
    _assert_matches_reference(stage2, *_train_on(stage2, MESHES[name]))


def test_fsdp_state_is_born_sharded_and_shrinks_per_device_bytes(stage2):
    state, frozen = stage2.created
    total = sum(leaf.nbytes for leaf in jax.tree.leaves((state, frozen)))
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves((state, frozen)) if leaf.sharding.is_fully_replicated)
    per_device = _per_device_bytes((state, frozen))
    assert sorted(per_device) == list(range(8))
    assert set(per_device.values()) == {(total - whole) // 8 + whole}  # every split leaf is split 8 ways
    assert whole < 0.05 * total  # norms, biases and the 4-channel conv_out stay whole
    kernel = state.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (3, 3, 32, 4)  # conv_out split over fsdp
    replicated = jax.device_put(stage2.initial, parallel.replicated(parallel.make_mesh(dict(data=8))))
    assert set(_per_device_bytes(replicated).values()) == {total}


# About 45 s of wall time and 90 s of CPU each (CI time budget): the gs:// run, which does all the local one does
# through a shared bucket, runs in CI; the local one with -m slow.
@pytest.mark.parametrize("storage", [pytest.param("local", marks=pytest.mark.slow), "gs"])
def test_two_processes_train_checkpoint_and_restore_like_one(stage2, tmp_path, request, storage):
    """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1), a hybrid mesh with data across processes:
    restore the initial state, train 3 steps, save, restore; the result matches one process on 8 devices (the
    same mesh shape) and one device. The workdir is local, or shared on gs:// (tests/gcs_emulator.py)."""
    workdir = str(tmp_path / "run") if storage == "local" else request.getfixturevalue("gcs").uri("multihost", "run")
    state, frozen = stage2.created
    with checkpoints.checkpoint_manager(workdir, keep=None) as manager:
        diffusion_state.save_state(manager, 0, stage2.task, state, frozen, {})
        manager.wait_until_finished()
    workers = _start_workers(workdir)
    try:
        outputs = [p.communicate(timeout=MULTIHOST_TIMEOUT_S)[0] for p in workers]
    except subprocess.TimeoutExpired:
        for p in workers:
            p.kill()
        pytest.fail(f"the 2-process run did not finish in {MULTIHOST_TIMEOUT_S} s: "
                    + " | ".join(p.communicate()[0][-2000:] for p in workers))
    for p, out in zip(workers, outputs):
        assert p.returncode == 0, out[-4000:]
    assert "process 1 of 2: mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in outputs[1]

    mesh = parallel.make_mesh(MESHES["fsdp=8"])
    shardings = diffusion_state.state_shardings(stage2.task, stage2.configs, stage2.optimizer, mesh)
    with checkpoints.checkpoint_manager(workdir, keep=None, create=False) as manager:
        losses = checkpoints.read_config(manager, worker.STEPS)["losses"]
        restored, _ = diffusion_state.restore_state(manager, worker.STEPS, stage2.task, state, frozen, shardings)
    assert int(restored.step) == worker.STEPS
    restored_params = jax.tree.map(np.asarray, restored.params)
    one_process = {**worker.MULTIHOST_MESH, "data": worker.MULTIHOST_MESH["data"] * worker.MULTIHOST_MESH["dcn_data"],
                   "dcn_data": 1}
    _assert_matches_reference(stage2, losses, restored_params, _train_on(stage2, one_process))
    _assert_matches_reference(stage2, losses, restored_params)


MICRO_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
                 norm_num_groups=8, act_fn="silu", sample_size=8)
SHARDED = dict(data=2, fsdp=2, tensor=2)


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(3).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.slow  # three compiles (init, sharded step, one-device step) (CI time budget): run with -m slow
def test_stage1_step_runs_sharded_like_one_device():
    """The stage-1 state is born sharded on data=2,fsdp=2,tensor=2; one jitted step (AE + discriminator) gives
    the losses and params of the same step on one device."""
    loss_cfg = AutoencoderLossConfig(vae=AutoencoderKL.from_diffusers_config(MICRO_VAE),
                                     discriminator=NLayerDiscriminator(ndf=8, n_layers=1), disc_start=0)
    optimizers = {name: make_optimizer(dict(learning_rate=1e-3, eps=1e-3), 1) for name in autoencoder_state.MODELS}
    stage = autoencoder_state.Stage1(loss_cfg, optimizers, image_shape=(8, 8, 3))
    mesh = parallel.make_mesh(SHARDED)
    state, shardings = autoencoder_state.create_state(stage, mesh, jax.random.key(0))
    vae = state.params["vae"]
    assert vae["encoder"]["conv_in"]["kernel"].sharding.shard_shape((3, 3, 3, 16)) == (3, 3, 3, 8)
    assert vae["decoder"]["conv_out"]["kernel"].sharding.is_fully_replicated  # 3 channels, 1.7 KiB: kept whole
    single = parallel.make_mesh({}, jax.devices()[:1])
    single_shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(single, s.spec), shardings)
    copy = jax.device_put(jax.tree.map(np.asarray, state), single_shardings)
    batch = {"image": _images(8)}
    results = []
    for m, s, st in ((mesh, shardings, state), (single, single_shardings, copy)):
        step = autoencoder_state.jit_train_step(stage, m, s, adversarial=True)
        new, metrics = step(st, parallel.shard_batch(batch, m), None, jax.random.key(1))
        results.append((jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}))
    (sharded, m1), (ref, m2) = results
    assert m1.keys() == m2.keys() and all(np.isfinite(list(m1.values())))
    np.testing.assert_allclose([m1[k] for k in sorted(m1)], [m2[k] for k in sorted(m2)], rtol=1e-5, atol=1e-6)
    # One stage-1 step (Adam eps 1e-3) moves parameters by up to ~1e-3; a sharded reduction order moved one
    # element of 2,304 by 1.2e-6 in CI, so this step gets 5e-6 (still 200x below the update size).
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=0)


def _vae_params(module: AutoencoderKL) -> dict:
    return flax.linen.meta.unbox(module.init(jax.random.key(5), _images(1))["params"])


def test_latent_encoder_with_a_sharded_vae_matches_one_device():
    module = AutoencoderKL.from_diffusers_config(MICRO_VAE)
    vae = latents.FrozenVAE(module, _vae_params(module), 0.5, {})
    images = _images(8)
    moments = []
    for mesh_config, devices, layout in ((SHARDED, None, "shard"), ({}, jax.devices()[:1], "replicate")):
        mesh = parallel.make_mesh(mesh_config, devices)
        encode, params = latents.encode_fn(vae, mesh, layout)
        if layout == "shard":
            assert not params["encoder"]["conv_in"]["kernel"].sharding.is_fully_replicated
        moments.append([np.asarray(m) for m in encode(params, parallel.shard_batch({"x": images}, mesh)["x"])])
    for a, b in zip(*moments):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sample_fn_on_sharded_params_and_batch_matches_one_device(stage2):
    configs = {**stage2.configs, "vae": MICRO_VAE}
    modules = build_modules(configs)
    models = Models.create(modules["unet"], modules["vae"], modules["text_encoder"], configs["scheduler"], 0.5)
    state, frozen = stage2.initial
    params = {"unet": state.params["unet"], "text_encoder": frozen["text_encoder"],
              "vae": _vae_params(modules["vae"])}
    ids = worker.global_batches()[0]["input_ids"]
    empty = worker.global_batches()[0]["empty_ids"]
    mesh = parallel.make_mesh(SHARDED)
    abstract = {name: abstract_params(modules[name], name, configs[name]) for name in params}
    sharded = jax.device_put(params, parallel.frozen_shardings(abstract, mesh, "shard"))
    assert not sharded["unet"]["conv_in"]["kernel"].sharding.is_fully_replicated
    kw = dict(models=models, steps=2, guidance_scale=3.0, height=8, width=8)
    batch = parallel.shard_batch({"ids": ids, "empty": empty}, mesh)
    images = sample_fn(sharded, batch["ids"], batch["empty"], jax.random.key(2), **kw)
    reference = sample_fn(jax.device_put(params, jax.devices()[0]), ids, empty, jax.random.key(2), **kw)
    assert images.shape == (8, 8, 8, 3)
    np.testing.assert_allclose(np.asarray(images), np.asarray(reference), atol=1e-5)

