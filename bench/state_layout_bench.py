r"""The stage-2 train step with its state in XLA-chosen layouts against row-major ones, side by side.

    python -m bench.state_layout_bench --out layouts.json                   # SD 1.5, batch 16, on the GPU
    python -m bench.state_layout_bench --config tiny --out /tmp/tiny.json   # tiny models on any machine

Builds the trainer's train step as ``bench/gpu_bench.py`` does
(``ldm_jax.training.diffusion.state.build``) twice from the same random
weights, once per ``diffusion.state_layout`` ('default', 'auto'), each as
one program (batch slices 1: a CPU's concurrent slice programs take the
default layouts whatever the setting), compiles both in this process,
checks that their first steps give the same loss and parameters, then times
them in alternating rounds and reports the median
step times, their ratio and the MFU of each. It also records how many state
arrays 'auto' gave a non-row-major layout (and the layout of the largest
convolution kernel), and that an orbax checkpoint of such a state reads back
equal.
"""

import argparse
import json
import statistics
import tempfile
import time

from bench import gpu_bench
from bench.common import timed
from bench.hardware import peak_flops, utilization

LAYOUTS = ("default", "auto")


def _largest_kernel(params):
    """The U-Net array with the most elements among the 4-d ones (a 3x3 convolution kernel)."""
    import jax

    return max(jax.tree.leaves(params["unet"]), key=lambda x: (x.ndim == 4, x.size))


def _checkpoint_reads_back(state) -> bool:
    """Whether the U-Net params of ``state``, saved by orbax and restored, equal their host copy."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    tree = {"unet": state.params["unet"]}
    with tempfile.TemporaryDirectory() as folder:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(f"{folder}/params", tree)
        checkpointer.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        restored = checkpointer.restore(f"{folder}/params", target)
    return all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(tree))))


def main(argv=None) -> dict:
    """Entry point of ``python -m bench.state_layout_bench``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(gpu_bench.SPECS), default="sd15")
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--attention-impl", default=None, help="default: cudnn on a GPU, auto elsewhere")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timing rounds")
    parser.add_argument("--steps-per-round", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    impl = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else "auto")
    spec = gpu_bench.SPECS[args.config]
    configs = gpu_bench.model_configs(spec["module"])
    device_kind = jax.devices()[0].device_kind
    record = dict(config=args.config, device_kind=device_kind, jax_version=jax.__version__, attention_impl=impl,
                  batch=spec["train_batch"])
    runs = {}
    for layout in LAYOUTS:
        prepared = gpu_bench.prepare_train(configs, spec, impl, "none", layout, batch_slices=1)
        compile_s, (compiled, state) = timed(lambda: prepared["stage"].step.compile(*prepared["args"]))
        runs[layout] = dict(compiled=compiled, state=state, rest=prepared["args"][1:])
        record[layout] = dict(compile_s=compile_s)
    flops = prepared["flops"]
    formats = jax.tree.leaves(runs["auto"]["compiled"].programs["train_step"].input_formats[0][0])
    record["auto_non_row_major_arrays"] = sum(
        f.layout.major_to_minor != tuple(range(len(f.layout.major_to_minor))) for f in formats)
    record["auto_largest_kernel_layout"] = str(_largest_kernel(runs["auto"]["state"].params).format.layout)

    def steps(layout: str, n: int) -> tuple[float, float]:
        run = runs[layout]
        start = time.perf_counter()
        for _ in range(n):
            run["state"], metrics = run["compiled"](run["state"], *run["rest"])
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"{layout}: train loss {loss}")
        return (time.perf_counter() - start) / n, loss

    for layout in LAYOUTS:
        record[layout]["first_loss"] = steps(layout, 1)[1]
    kernels = [np.asarray(jax.device_get(_largest_kernel(runs[layout]["state"].params))) for layout in LAYOUTS]
    record["first_step_params_max_abs_diff"] = float(np.abs(kernels[0] - kernels[1]).max())
    rounds = {layout: [] for layout in LAYOUTS}
    for _ in range(args.rounds):
        for layout in LAYOUTS:
            rounds[layout].append(steps(layout, args.steps_per_round)[0])
    peak = peak_flops(device_kind)
    for layout in LAYOUTS:
        step_s = statistics.median(rounds[layout])
        record[layout].update(step_s=step_s, round_step_s=rounds[layout], images_per_s=spec["train_batch"] / step_s,
                              **utilization(flops, step_s, peak))
    record["model_flops_per_step"] = flops
    record["speedup_auto_over_default"] = record["default"]["step_s"] / record["auto"]["step_s"]
    record["auto_checkpoint_reads_back"] = _checkpoint_reads_back(runs["auto"]["state"])
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    mfu = lambda layout: f", MFU {100 * record[layout]['mfu']:.1f}%" if record[layout]["mfu"] else ""
    print(f"{device_kind}, {args.config}, batch {spec['train_batch']}: state layout default "
          f"{record['default']['step_s'] * 1e3:.1f} ms{mfu('default')}, auto {record['auto']['step_s'] * 1e3:.1f} ms"
          f"{mfu('auto')}: {record['speedup_auto_over_default']:.3f}x; {record['auto_non_row_major_arrays']} arrays "
          f"re-laid out; first-step losses {record['default']['first_loss']:.6f} / {record['auto']['first_loss']:.6f}")
    return record


if __name__ == "__main__":
    main()
