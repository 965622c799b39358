"""Stage 1: the AutoencoderKL's losses (``losses``), its pure train step (``step``) and its training loop (``loop``)."""
