"""Errors shared across layers (a leaf module: importing it pulls in nothing else of llamaforge)."""
from __future__ import annotations

MAX_MESSAGE = 600  # a hostile file can put megabytes into a name that ends up in the message


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the problem, on one line."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split())
        if len(text) > MAX_MESSAGE:
            text = text[:MAX_MESSAGE - 3] + "..."
        super().__init__(text)
