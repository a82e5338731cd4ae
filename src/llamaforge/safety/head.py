"""The default guard's files and its head: what `guard.ClassifierGuard` runs and
`safety.training` writes."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .policy import DEFAULT_CATEGORIES

HERE = Path(__file__).resolve().parent
HEAD_FILE = HERE / "guard_head.safetensors"
META_FILE = HERE / "guard_head.json"
CODES = [c.code for c in DEFAULT_CATEGORIES]
HIDDEN = 128          # the head's hidden width


class Head(torch.nn.Module):
    """One hidden layer over the sentence features; output 0 is 'harmful', outputs 1.. the categories.

    ``shift`` and ``scale`` standardise the features first (identity for the unit-length MiniLM
    embeddings; per-dimension statistics of the training rows for a language model's hidden states,
    whose dimensions differ in scale by orders of magnitude)."""

    def __init__(self, dim: int = 384, hidden: int = HIDDEN, n_categories: int = len(CODES)):
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, 1 + n_categories)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1((x - self.shift) / self.scale)))

