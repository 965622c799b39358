r"""Where the stage-2 train step's time goes: its device kernels, summed by kind and traced back to the model code.

    python -m bench.step_profile --out profile.json                     # SD 1.5, batch 16, on the GPU
    python -m bench.step_profile --config base --out /tmp/base.json     # configs/base.py, batch 16, on a CPU
    python -m bench.step_profile --config tiny --out /tmp/tiny.json     # tiny models on any machine

Compiles the trainer's own train step as ``bench/gpu_bench.py`` builds it
(``ldm_jax.training.diffusion.state.build``; same models, attention kernel,
remat policy and state layout; ``--config base`` is configs/base.py's models
at its stage-2 batch of 16) on ``--batch-slices`` slices of the batch (default
0: the trainer's choice, 2 on a single CPU device, else 1; ``k`` > 1 runs the
step as ``ldm_jax.training.cpu_step``'s concurrent programs, whose kernels are
profiled together, each read against its own program's HLO), in ``--dtype``
(default bfloat16 on an accelerator, float32 on a CPU) with float32 params,
runs two warm-up steps and three unprofiled rounds of ``--steps`` steps
(their median step time, with the model FLOPs and MFU as ``gpu_bench``
counts them), then ``--steps`` steps under ``jax.profiler``, and reports per
step:

* the time of every device kernel (GPU streams; on a CPU, XLA's op events),
  their sum (over all streams or threads, so on a CPU it can exceed the step)
  and the *idle* time: the step's wall time with no kernel running anywhere
  (on a GPU the device idling; on a CPU, the gaps between XLA's thunks);
* that time by kind (:data:`KINDS`): matmuls, convolutions and attention,
  which do the model's FLOPs, and the memory-bound rest;
* the ``--top`` costliest kernels, each with its HLO instruction's shape
  and the JAX operation it came from (the HLO metadata's ``op_name``,
  whose path names the Flax module).

``--hlo-out FILE.gz`` also writes the optimized HLO of every program. Writes
the JSON record to ``--out`` and prints a summary. On a CPU, profile as the
trainer runs best, with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the
environment: the kernels that first touch a step's temporary buffers pay for
its page faults, far fewer in huge pages.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

# Kinds of kernels, in the order a kernel is tested against them: a kernel's name (or, for XLA's own fusions, the
# operations of its HLO computation) decides its kind.
KINDS = ("attention", "convolution", "matmul", "transpose", "reduction", "concatenate", "copy", "elementwise")
_NAME_KINDS = (  # (kind, pattern of library kernel names and of XLA fusion names)
    ("attention", r"sdpa|fmha|flash|cudnn::fusion"),
    ("convolution", r"fprop|dgrad|wgrad|convolution|implicit_gemm|Conv"),
    ("matmul", r"gemm|nvjet|cublas|matmul|^dot|_dot"),
    ("transpose", r"transpose"),
    ("reduction", r"reduce"),
    ("concatenate", r"concatenate"),
    ("copy", r"memcpy|memset|^copy"),
)
_BODY_KINDS = (("attention", "custom-call"), ("convolution", "convolution"), ("matmul", "dot"),
               ("reduction", "reduce"), ("transpose", "transpose"), ("concatenate", "concatenate"))
# Configs profiled besides gpu_bench's (``gpu_bench.SPECS``): configs/base.py's models at its stage-2 batch, for CPUs.
EXTRA_CONFIGS = {"base": dict(module="configs.base", train_batch=16)}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def kernel_name(hlo_name: str) -> str:
    """The name XLA:GPU gives the kernel of HLO instruction ``hlo_name`` ('.' and '-' become '_')."""
    return re.sub(r"[.\-]", "_", hlo_name)


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """HLO instructions by kernel name: ``shape``, ``opcode``, ``op_name`` (metadata, '' when absent) and
    ``body``: the opcodes of the computation a fusion calls (empty for other instructions)."""
    bodies: dict[str, set[str]] = collections.defaultdict(set)
    instructions, computation = {}, None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header and " = " not in line:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        bodies[computation].add(opcode)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        instructions[kernel_name(name)] = dict(shape=shape, opcode=opcode, op_name=op_name.group(1) if op_name else "",
                                               calls=called.group(1) if called else None)
    for info in instructions.values():
        info["body"] = sorted(bodies.get(info.pop("calls"), ())) if info["opcode"] == "fusion" else []
    return instructions


def kernel_kind(name: str, instruction: dict | None) -> str:
    """The kind (one of :data:`KINDS`) of kernel ``name``, whose HLO instruction (if known) is ``instruction``."""
    if instruction is not None and instruction["opcode"] != "fusion":
        body = {instruction["opcode"]}
    else:
        body = set(instruction["body"]) if instruction else set()
    for kind, opcode in _BODY_KINDS:
        if opcode in body and (kind != "attention" or re.search(_NAME_KINDS[0][1], name)):
            return kind
    for kind, pattern in _NAME_KINDS:
        if re.search(pattern, name):
            return kind
    return "elementwise"


def program_texts(compiled) -> list[str]:
    """The optimized HLO of each program of a compiled step (``step.programs``: a ``JittedStep``'s one, a
    ``ConcurrentSliceStep``'s three), or of one compiled program."""
    programs = getattr(compiled, "programs", None)
    return [program.as_text() for program in programs.values()] if programs else [compiled.as_text()]


def program_instructions(texts: list[str]) -> dict[str, dict[str, dict]]:
    """`parse_hlo` of each program's HLO text, by the name of its HLO module (which the profiler's events name)."""
    return {re.match(r"HloModule ([\w.\-]+)", text).group(1): parse_hlo(text) for text in texts}


def instruction_of(programs: dict[str, dict[str, dict]], module: str, kernel: str) -> dict | None:
    """The HLO instruction (`parse_hlo`) of ``kernel`` in the program whose module is ``module``; an event that
    names no module ('') is read as the only program's."""
    if module not in programs and len(programs) == 1:
        module = next(iter(programs))
    return programs.get(module, {}).get(kernel_name(kernel))


def device_kernel_events(trace_dir: str,
                         programs: dict[str, dict[str, dict]]) -> list[tuple[str, str, float, float]]:
    """``(module, kernel, start µs, duration µs)`` of every kernel in the profile under ``trace_dir``: every
    event of the GPU streams or, on a CPU, the events of XLA's threads that name an instruction of one of the
    ``programs`` (`program_instructions`). ``module`` is the HLO module the event names, else ''."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = any(name.startswith("Stream") for name in threads.values())
    wanted = {key for key, name in threads.items() if (name.startswith("Stream") if gpu else "XLA" in name)}
    kernels = [(event.get("args", {}).get("hlo_module", ""), event["name"], event["ts"], event["dur"])
               for event in events if event.get("ph") == "X" and (event["pid"], event["tid"]) in wanted]
    return [k for k in kernels if gpu or instruction_of(programs, k[0], k[1]) is not None]


def kernel_times(events: list[tuple[str, str, float, float]]) -> dict[tuple[str, str], list[float]]:
    """``{(module, kernel): [total seconds, launches]}`` of :func:`device_kernel_events`' events."""
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for module, name, _, duration in events:
        times[module, name][0] += duration * 1e-6
        times[module, name][1] += 1
    return dict(times)


def busy_seconds(events: list[tuple[str, str, float, float]]) -> float:
    """The time during which at least one of the events runs (the union of their intervals), in seconds."""
    busy, end = 0.0, float("-inf")
    for _, _, start, duration in sorted(events, key=lambda event: event[2]):
        busy += max(0.0, start + duration - max(start, end))
        end = max(end, start + duration)
    return busy * 1e-6


def summarize(times: dict[tuple[str, str], list[float]], programs: dict[str, dict[str, dict]], steps: int,
              wall_s: float, top: int, busy_s: float) -> dict:
    """Per-step kernel time in total, by kind and for the ``top`` costliest kernels (with their program and
    HLO), and the idle time: ``wall_s`` less ``busy_s``, the time any kernel ran."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    kernels = []
    for (module, name), (seconds, launches) in times.items():
        instruction = instruction_of(programs, module, name)
        kind = kernel_kind(name, instruction)
        by_kind[kind] += seconds / steps
        kernels.append(dict(name=name, program=module, kind=kind, ms=1e3 * seconds / steps,
                            launches=launches / steps,
                            shape=instruction["shape"] if instruction else "",
                            op_name=instruction["op_name"] if instruction else ""))
    kernels.sort(key=lambda k: -k["ms"])
    total = sum(by_kind.values())
    return dict(steps=steps, step_ms=1e3 * wall_s / steps, kernel_ms=1e3 * total,
                idle_ms=1e3 * max(0.0, wall_s - busy_s) / steps,
                kind_ms={k: 1e3 * v for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
                top_kernels=kernels[:top])


def profile_step(compiled, args: tuple, steps: int, top: int, timed_rounds: int = 3) -> dict:
    """Profile ``steps`` calls of the compiled train step (state donated and threaded through) after two
    warm-up calls and ``timed_rounds`` unprofiled rounds of ``steps`` calls; :func:`summarize` of its kernels,
    with ``timed_step_ms``, the median step time of those rounds."""
    import statistics

    import jax

    state, *rest = args

    def run(n: int) -> float:
        nonlocal state
        start = time.perf_counter()
        for _ in range(n):
            state, metrics = compiled(state, *rest)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run(2)
    timed_step_ms = statistics.median(1e3 * run(steps) / steps for _ in range(timed_rounds))
    programs = program_instructions(program_texts(compiled))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            wall_s = run(steps)
        events = device_kernel_events(trace_dir, programs)
    return dict(summarize(kernel_times(events), programs, steps, wall_s, top, busy_seconds(events)),
                timed_step_ms=timed_step_ms)


def print_summary(record: dict) -> None:
    """The per-step totals, the time by kind and the top kernels, as text."""
    mfu = f", MFU {100 * record['mfu']:.1f}%" if record.get("mfu") else ""
    print(f"{record['device_kind']}: step {record['timed_step_ms']:.1f} ms{mfu}; under the profiler "
          f"{record['step_ms']:.1f} ms, kernels {record['kernel_ms']:.1f} ms, no kernel running "
          f"{record['idle_ms']:.1f} ms")
    for kind, ms in record["kind_ms"].items():
        print(f"  {kind:12s} {ms:8.2f} ms  {100 * ms / record['kernel_ms']:5.1f}%")
    several = len({k["program"] for k in record["top_kernels"]}) > 1  # then each kernel's program is named
    for k in record["top_kernels"]:
        name = f"{k['program']}:{k['name']}" if several else k["name"]
        print(f"  {k['ms']:7.3f} ms x{k['launches']:<4g} {k['kind']:11s} {name[:48]:48s} {k['shape'][:40]:40s} "
              f"{k['op_name'][-90:]}")


def main(argv=None) -> dict:
    """Entry point of ``python -m bench.step_profile``."""
    from bench import gpu_bench
    from bench.common import timed
    from bench.hardware import peak_flops, utilization

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    specs = {**gpu_bench.SPECS, **EXTRA_CONFIGS}
    parser.add_argument("--config", choices=sorted(specs), default="sd15")
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--attention-impl", default=None, help="default: cudnn on a GPU, auto elsewhere")
    parser.add_argument("--remat-policy", default="none")
    parser.add_argument("--state-layout", choices=("auto", "default"), default="auto")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="compute dtype (default: bfloat16 on an accelerator, float32 on a CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=60, help="kernels listed")
    parser.add_argument("--hlo-out", help="also write the optimized HLO here (gzipped)")
    parser.add_argument("--batch-slices", type=int, default=0,
                        help="slices of the batch, k > 1 as concurrent programs on one CPU device (default 0: the "
                             "trainer's choice, diffusion.batch_slices)")
    args = parser.parse_args(argv)

    import jax

    impl = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else "auto")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    spec = specs[args.config]
    prepared = gpu_bench.prepare_train(gpu_bench.model_configs(spec["module"]), spec, impl, args.remat_policy,
                                       args.state_layout, dtype, args.batch_slices)
    stage = prepared["stage"]
    compile_s, (compiled, state) = timed(lambda: stage.step.compile(*prepared["args"]))
    record = dict(config=args.config, device_kind=jax.devices()[0].device_kind, jax_version=jax.__version__,
                  attention_impl=impl, remat_policy=args.remat_policy, state_layout=args.state_layout,
                  compute_dtype=dtype, batch=spec["train_batch"], batch_slices=stage.batch_slices,
                  programs=list(compiled.programs), compile_s=compile_s,
                  **profile_step(compiled, (state, *prepared["args"][1:]), args.steps, args.top))
    record.update(model_flops_per_step=prepared["flops"],
                  **utilization(prepared["flops"], record["timed_step_ms"] / 1e3, peak_flops(record["device_kind"])))
    if args.hlo_out:
        with gzip.open(args.hlo_out, "wt") as f:
            f.write("\n".join(program_texts(compiled)))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print_summary(record)
    return record


if __name__ == "__main__":
    main()
