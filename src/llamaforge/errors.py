"""Errors shared across layers (a leaf module: importing it pulls in nothing else of llamaforge)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem."""
