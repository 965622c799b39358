"""Weights files: diffusers-layout folders (``diffusers_folder``), single-file original checkpoints
(``single_file``), and the rule between PyTorch state-dict keys and our Flax params (``convert``)."""
