"""bench/train_bench.py: the step-by-step ratio of the peer comparison."""

import statistics

import pytest

from bench import train_bench


def test_pair_ratios_cancel_a_change_of_speed_that_the_ratio_of_medians_keeps():
    # ldm_jax is 1.25x faster throughout; the machine halves its speed between ldm_jax's third step and the
    # diffusers step after it.
    ours = [0.100, 0.100, 0.100, 0.200, 0.200]
    theirs = [0.125, 0.125, 0.250, 0.250, 0.250]
    assert statistics.median(theirs) / statistics.median(ours) == pytest.approx(2.5)
    assert train_bench.pair_ratios(theirs, ours) == pytest.approx([1.25, 1.25, 1.25])
    assert train_bench.pair_ratios([0.1, 0.3, 0.2, 0.4], [0.2, 0.1, 0.1, 0.2]) == pytest.approx(
        [1.625, 2.0, 2.25])  # ratios 0.5, 3, 2, 2
    with pytest.raises(ValueError):
        train_bench.pair_ratios([0.1, 0.2], [0.1])
