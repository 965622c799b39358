"""Training code; for now the on-disk checkpoints of a training workdir.

``checkpoints`` defines the workdir's checkpoint format (params, model configs,
tokenizer), which the sampler (``python -m ldm_jax.sample --checkpoint
WORKDIR``) reads on its own and the training loop writes.
"""
