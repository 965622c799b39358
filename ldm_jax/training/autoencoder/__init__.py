"""Stage 1: the AutoencoderKL's losses (``losses``), its pure train step (``step``), its state on a mesh (``state``)
and its training loop (``loop``)."""
