"""Runnable examples of deferq; run them from the repository root, e.g. `python -m
examples.magic_link`."""
