"""Bridges to tools of the field that sit on top of a trained model (lm-evaluation-harness).

Each bridge is an optional extra: its module imports the third-party package at the top, and
nothing in this package's ``__init__`` imports a bridge, so ``import multipromot`` never needs
them. Trackers for training metrics live with the loops (:mod:`multipromot.train.common`).
"""
