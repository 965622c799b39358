"""bench/step_profile.py: kernels read from a real profile, named after their HLO, sorted into kinds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import step_profile


def _step(state):
    """A train-step-shaped function: (state) -> (state, metrics)."""
    x, w, k = state
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(y.reshape(-1, y.shape[-1]) @ w)
    return (x, w - 1e-3 * jnp.sum(h), k), jnp.sum(h.T, axis=1)


def test_profile_of_a_compiled_step_names_and_sorts_its_kernels():
    x, w, k = jnp.ones((4, 16, 16, 8)), jnp.ones((8, 64)) / 8, jnp.ones((3, 3, 8, 8)) / 72
    compiled = jax.jit(_step).lower((x, w, k)).compile()
    record = step_profile.profile_step(compiled, ((x, w, k),), steps=3, top=50)
    assert record["steps"] == 3 and record["kernel_ms"] > 0 and record["timed_step_ms"] > 0
    assert set(record["kind_ms"]) == set(step_profile.KINDS)
    np.testing.assert_allclose(sum(record["kind_ms"].values()), record["kernel_ms"], rtol=1e-9)
    kinds = {kernel["kind"] for kernel in record["top_kernels"]}
    assert {"convolution", "matmul"} <= kinds, record["top_kernels"]
    named = [kernel for kernel in record["top_kernels"] if kernel["op_name"]]
    assert any("conv_general_dilated" in kernel["op_name"] for kernel in named)
    assert all(kernel["launches"] == 1 for kernel in record["top_kernels"])
    assert 0 <= record["idle_ms"] < record["step_ms"]


def _conv_part(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _dot_part(y, w):
    return jnp.tanh(y.reshape(-1, y.shape[-1]) @ w)


class _TwoProgramStep:
    """A step of two compiled programs, as a compiled ``ConcurrentSliceStep`` is: ``programs`` and a call."""

    def __init__(self, x, w, k):
        self.programs = {"conv": jax.jit(_conv_part).lower(x, k).compile(),
                         "dot": jax.jit(_dot_part).lower(_conv_part(x, k), w).compile()}

    def __call__(self, state):
        x, w, k = state
        h = self.programs["dot"](self.programs["conv"](x, k), w)
        return (x, w - 1e-3 * jnp.sum(h), k), jnp.sum(h)


def test_the_kernels_of_a_step_of_several_programs_are_read_from_their_own_program():
    x, w, k = jnp.ones((4, 16, 16, 8)), jnp.ones((8, 64)) / 8, jnp.ones((3, 3, 8, 8)) / 72
    record = step_profile.profile_step(_TwoProgramStep(x, w, k), ((x, w, k),), steps=3, top=50)
    kinds = {(kernel["program"], kernel["kind"]) for kernel in record["top_kernels"]}
    assert ("jit__conv_part", "convolution") in kinds and ("jit__dot_part", "matmul") in kinds, kinds
    assert {program for program, _ in kinds} == {"jit__conv_part", "jit__dot_part"}
    # One kernel name in two programs: each event is read as its own program's instruction.
    programs = {"jit_a": {"fusion_1": {"opcode": "convolution"}}, "jit_b": {"fusion_1": {"opcode": "dot"}}}
    assert step_profile.instruction_of(programs, "jit_b", "fusion.1") == {"opcode": "dot"}
    assert step_profile.instruction_of(programs, "", "fusion.1") is None  # ambiguous: no program named
    assert step_profile.instruction_of({"jit_a": programs["jit_a"]}, "", "fusion.1") == {"opcode": "convolution"}


def test_busy_time_is_the_union_of_kernel_intervals():
    events = [("m", "conv", 100.0, 50.0), ("m", "dot", 120.0, 10.0), ("m", "add", 140.0, 30.0),
              ("m", "copy", 400.0, 20.0)]
    assert step_profile.busy_seconds(events) == pytest.approx(90e-6)  # [100, 170] and [400, 420] µs
    assert step_profile.busy_seconds(list(reversed(events))) == pytest.approx(90e-6)
    assert step_profile.busy_seconds([]) == 0.0
    times = step_profile.kernel_times(events + [("m", "dot", 500.0, 5.0), ("n", "dot", 600.0, 7.0)])
    assert times["m", "dot"] == pytest.approx([15e-6, 2]) and times["n", "dot"] == pytest.approx([7e-6, 1])


def test_hlo_instructions_and_kinds():
    text = """HloModule m

fused_t {
  p.1 = f32[8,4]{1,0} parameter(0)
  ROOT transpose.2 = f32[4,8]{1,0} transpose(p.1), dimensions={1,0}
}

ENTRY main {
  p.0 = f32[8,4]{1,0} parameter(0)
  input_transpose_fusion.3 = f32[4,8]{1,0} fusion(p.0), kind=kInput, calls=fused_t, metadata={op_name="jit(f)/transpose"}
  ROOT dot.4 = f32[4,4]{1,0} dot(input_transpose_fusion.3, p.0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    instructions = step_profile.parse_hlo(text)
    fusion = instructions["input_transpose_fusion_3"]
    assert fusion == dict(shape="f32[4,8]{1,0}", opcode="fusion", op_name="jit(f)/transpose",
                          body=["parameter", "transpose"])
    assert step_profile.kernel_kind("input_transpose_fusion_3", fusion) == "transpose"
    assert step_profile.kernel_kind("dot_4", instructions["dot_4"]) == "matmul"
    # Library kernels, known by name only.
    assert step_profile.kernel_kind("sm90_xmma_wgrad_implicit_gemm_bf16_nhwc", None) == "convolution"
    assert step_profile.kernel_kind("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", None) == "matmul"
    assert step_profile.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", None) == "attention"
    assert step_profile.kernel_kind("loop_convert_add_fusion", None) == "elementwise"
    assert step_profile.kernel_kind("memcpy128", None) == "copy"
