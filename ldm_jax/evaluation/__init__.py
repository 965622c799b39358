"""Evaluation of generated samples: an attribute checker for ldm_shapes images (``shapes_checker``)."""
