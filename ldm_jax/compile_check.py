r"""Will this stage-2 train step fit this mesh? Compile it on fake CPU devices and print its cost, no params made.

  python -m ldm_jax.compile_check --config configs/sd15.py [--mesh data=1,fsdp=8,tensor=1] [--devices 8]
      [--batch 8] [--dtype float32] [--frozen shard]

Builds the full stage-2 train step of the config's models (U-Net trained,
text encoder frozen unless the config's ``diffusion.train_text_encoder``,
AdamW with EMA, cached 1/8-resolution latents, ``max_position_embeddings``
tokens) for ``--devices`` fake CPU devices, with every argument a
``jax.ShapeDtypeStruct`` on its sharding (``jax.eval_shape``: nothing is
allocated), then ``.lower(...).compile()``. Errors of the config (mesh vs
devices, batch vs data-parallel size, parameters that do not fit the mesh)
come before compiling. Prints the step's FLOPs (XLA's cost analysis of the
per-device program, and times the device count) and per-device memory
(arguments, outputs, temporaries, aliased by donation). XLA:CPU's numbers
are a proxy for a TPU / GPU compile of the same program: argument and output
bytes are exact, temporaries depend on the backend's fusion.

A model-only config (configs/sd15.py) uses the trainer's stage-2 defaults; a
run config (configs/base.py) its own ``diffusion`` and ``mesh`` sections.
"""

import os
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from ldm_jax import cli, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model or run config file (configs/*.py[:variant]).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. 'data=1,fsdp=8,tensor=1' (default: the config's "
                            "mesh section, else all data); the config's mesh.axis_rules apply either way.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of fake CPU devices.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (default: the config's diffusion.dtype, else float32); params stay float32.")
_FROZEN = flags.DEFINE_enum("frozen", None, ["shard", "replicate"],
                            "Layout of the frozen text encoder (default: the config's mesh.frozen, else shard).")

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def use_fake_cpu_devices(count: int) -> None:
    """Make JAX's backend ``count`` CPU devices; must run before JAX creates its backends."""
    flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags_ + [f"{DEVICE_COUNT_FLAG}={count}"])
    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != count:
        raise RuntimeError(f"asked for {count} CPU devices but JAX already started with {jax.device_count()}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
        n /= 1024


def main(argv: list[str]) -> None:
    """Entry point of ``python -m ldm_jax.compile_check``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    use_fake_cpu_devices(_DEVICES.value)
    from ldm_jax.training import compile_cost  # after the device count is fixed
    config = _CONFIG.value
    started = time.time()
    try:  # a mesh, batch or config that cannot work is one line on stderr, found before compiling
        mesh_config = dict(config.get("mesh", {}))
        if _MESH.value is not None:  # the flag's sizes replace the config's; its axis rules stay
            mesh_config = {**parallel.parse_mesh(_MESH.value), "axis_rules": parallel.axis_rules(mesh_config)}
        if _FROZEN.value:
            mesh_config["frozen"] = _FROZEN.value
        report = compile_cost.compile_train_step(config, mesh_config, _BATCH.value, _DTYPE.value)
    except (KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"ldm_jax.compile_check: error: {message}")
    mesh = report["mesh"]
    print(f"config {config_flags.get_config_filename(flags.FLAGS['config'])}")
    print(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} devices, batch "
          f"{report['batch']}, compute dtype {report['dtype']}, frozen models: {report['frozen']}")
    for name, count in report["params"].items():
        print(f"params {name}: {count:,}")
    print(f"compile_seconds {report['compile_seconds']:.1f} (lowering included)")
    print(f"flops_per_device {report['flops_per_device']:.4g}")
    print(f"flops_all_devices {report['flops_per_device'] * mesh.devices.size:.4g}")
    for key in ("argument", "output", "temp", "alias"):
        value = report["memory"][key]
        print(f"{key}_bytes_per_device {value} ({_human(value)})")
    peak = report["memory"]["argument"] + report["memory"]["output"] + report["memory"]["temp"] - report["memory"][
        "alias"]
    print(f"total_bytes_per_device {peak} ({_human(peak)}): arguments + outputs + temporaries - aliased")
    print(f"wall_seconds {time.time() - started:.1f}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.flags_parser("ldm_jax.compile_check", config_flag="config"))
