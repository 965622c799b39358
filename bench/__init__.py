"""Benchmarks of ldm_jax against its peers (run from the repository root, e.g. ``python -m bench.sample_bench``)."""
