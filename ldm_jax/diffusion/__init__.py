"""The diffusion process: noise schedules (``schedule``) and samplers as pure step functions (``samplers``)."""
