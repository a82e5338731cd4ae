"""Many LoRA adapters on one base model at once: every batch row picks its own (multi-LoRA serving).

The weights are never merged. Each targeted projection becomes a ``MultiLoraLinear``: the base
module plus, per loaded adapter, its factors A [r, in] and B [out, r]; a forward adds each row's own
update (``lora.add_lora_rows``, computed row by row), so rows of different adapters share one batch and
each row computes what ``Llama.load(base, adapter=DIR)`` computes for it alone.

    bank = AdapterBank(model)
    bank.load("sql", "adapters/sql")          # PEFT folders, checked against the model's shapes
    with bank.rows(["sql", None, "chat"]):    # batch row 0: sql, row 1: the base model, row 2: chat
        logits = model(tokens, pos, cache, slots)
"""
from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .lora import LoraLinear, adapter_factors, add_lora_rows, rowwise_ok

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")


class MultiLoraLinear(nn.Module):
    """A frozen base projection plus the updates of any number of named adapters, chosen per row."""

    def __init__(self, base: nn.Module, bank: "AdapterBank"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._bank = [bank]       # in a list: not a submodule (the bank holds the model)
        self._plan: tuple = ()    # factors in the bank's adapter order (AdapterBank._refresh)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self._bank[0].rows_for(x)
        if rows is None or not self.factors:
            return y
        if not rowwise_ok(x, self.training):
            raise RuntimeError("multi-adapter rows run at inference only (float32 CPU rows, no gradients)")
        a, bt, scaling = self._plan
        return add_lora_rows(y, x, a, bt, rows, scaling)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.factors)}"


class AdapterBank:
    """The named adapters loaded onto one model, and which adapter each batch row of a forward uses."""

    def __init__(self, model: nn.Module):
        if any(isinstance(m, LoraLinear) for m in model.modules()):
            raise ValueError("the model already has a LoRA adapter applied; serve adapters over the plain base")
        self.model = model
        self.configs: dict[str, dict] = {}
        self._local = threading.local()

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def load(self, name: str, directory: str | Path) -> None:
        """Add the PEFT adapter in directory under name (raises ValueError/FileNotFoundError if unusable)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits and . _ : / -")
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        config, factors = adapter_factors(self.model, directory)   # everything checked before any change
        for (layer, path), (a, b) in factors.items():
            self._module(f"layers.{layer}.{path}").factors[name] = (a, b, config.scaling)
        self.configs[name] = {"path": str(directory), "r": config.r, "alpha": config.alpha,
                              "targets": list(config.targets)}
        self._refresh()

    def unload(self, name: str) -> None:
        """Drop an adapter; projections no adapter uses any more get their plain base module back."""
        if name not in self.configs:
            raise KeyError(name)
        del self.configs[name]
        for path, m in list(self.model.named_modules()):
            if isinstance(m, MultiLoraLinear):
                m.factors.pop(name, None)
                if not m.factors:
                    parent, attr = path.rsplit(".", 1)
                    setattr(self.model.get_submodule(parent), attr, m.base)
        self._refresh()

    def _refresh(self) -> None:
        """Each module's factors as lists in the bank's order, so one row index serves every module;
        a module an adapter does not target gets a rank-0 pair there (an update of exactly zero)."""
        order = self.names
        for m in self.model.modules():
            if isinstance(m, MultiLoraLinear):
                none = (torch.zeros(0, m.in_features), torch.zeros(m.out_features, 0), 0.0)
                f = [m.factors.get(n, none) for n in order]
                m._plan = ([a for a, _, _ in f], [b.t().contiguous() for _, b, _ in f],
                           torch.tensor([s for _, _, s in f], dtype=torch.float32))

    def rows_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row of x's adapter index in the bank's order (-1: none), one per token; None when no
        row of the current forward uses an adapter."""
        plan = getattr(self._local, "rows", None)
        if plan is None:
            return None
        idx, by_tokens = plan
        if len(idx) != x.shape[0]:
            raise ValueError(f"adapter rows name {len(idx)} rows but the batch has {x.shape[0]}")
        per_row = x.numel() // (x.shape[0] * x.shape[-1])
        rows = by_tokens.get(per_row)
        if rows is None:
            rows = by_tokens[per_row] = idx.repeat_interleave(per_row)
        return rows

    @contextlib.contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Forwards inside the block give batch row i the adapter names[i] (None: the base model)."""
        unknown = sorted({n for n in names if n is not None and n not in self.configs})
        if unknown:
            raise KeyError(f"no adapter loaded as {', '.join(unknown)}")
        before = getattr(self._local, "rows", None)
        order = self.names
        idx = [-1 if n is None else order.index(n) for n in names]
        self._local.rows = (torch.tensor(idx, dtype=torch.long), {}) if max(idx, default=-1) >= 0 else None
        try:
            yield
        finally:
            self._local.rows = before

    def _module(self, path: str) -> MultiLoraLinear:
        parent_path, attr = path.rsplit(".", 1)
        parent = self.model.get_submodule(parent_path)
        m = getattr(parent, attr)
        if not isinstance(m, MultiLoraLinear):
            m = MultiLoraLinear(m, self)
            setattr(parent, attr, m)
        return m
