"""Training: the two trained stages and what they share.

``autoencoder/`` is stage 1 (the AutoencoderKL with its losses) and
``diffusion/`` stage 2 (the text-conditioned U-Net), each as ``step`` (pure
functions), ``state`` (the one builder of its state and step on a device
mesh) and ``loop`` (the training loop). ``latent_cache`` builds the cache
between them; ``cpu_step`` runs stage 2's step as concurrent programs on one
CPU device. Shared: ``run_config`` (the config schema and its checks),
``train_state`` (state, optimizers, EMA), ``checkpoints`` (the workdir's
orbax checkpoints, which ``python -m ldm_jax.sample --checkpoint`` reads),
``metrics``, ``nonfinite``, ``preemption``, ``sources`` and ``compile_cost``.
"""
