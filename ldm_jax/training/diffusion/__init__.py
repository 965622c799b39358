"""Stage 2: the latent diffusion loss and update (``step``), its state on a mesh (``state``) and its training loop
(``loop``)."""
