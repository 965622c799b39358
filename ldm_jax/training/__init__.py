"""Training code: so far the on-disk checkpoints of a training workdir and the stage-1 losses.

``checkpoints`` defines the workdir's checkpoint format (params, model configs,
tokenizer), which the sampler (``python -m ldm_jax.sample --checkpoint
WORKDIR``) reads on its own and the training loop writes.
``autoencoder_losses`` holds the autoencoder's generator and discriminator
losses as pure functions for a jitted train step.
"""
