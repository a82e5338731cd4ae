"""Preference objectives for the one trainer: the reward model's pairwise loss and DPO.

Both read ``PairSource`` batches (chosen rows first, then rejected) and return a loss summed over
pairs with metric sums (the trainer turns them into global means per pair):

- reward model (Llama 2 paper, eq. 2 with its margin): -log σ(r(x, y_c) - r(x, y_r) - m), where r is
  a scalar head on the last token's final hidden state (``RewardModel``; transformers'
  ``LlamaForSequenceClassification`` computes the same);
- DPO (Rafailov et al. 2023): -log σ(β[(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]),
  optionally label-smoothed (cDPO, ε) or IPO's squared loss on per-token log-ratios (TRL's form).
  The reference is the model with its LoRA adapters off, a frozen copy, or log-probs computed once.
"""
from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..lora import adapters_disabled, lora_modules

log = logging.getLogger(__name__)

DPO_LOSSES = ("sigmoid", "ipo")


# ---------------------------------------------------------------- losses (pure functions)

def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log σ(r_c - r_r - m)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None):
    """Per-pair DPO loss and the implicit rewards β·(log π - log π_ref) of each side.

    sigmoid: -(1-ε)·log σ(βd) - ε·log σ(-βd) with d the difference of log-ratios (ε = 0: plain DPO);
    ipo: (d' - 1/(2β))² with d' from log-ratios divided by each reply's token count (as TRL does).
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        d = beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs each reply's token count")
        d = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(token) at its masked target positions; [rows] float32.

    Only target positions go through the vocabulary projection (replies are a fraction of a pair).
    """
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].bool()
    h = model.hidden(inputs)
    logits = model.output(h[tmask]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[tmask].unsqueeze(1)).squeeze(1)
    rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(tmask)[tmask]
    return torch.zeros(tokens.shape[0], device=tokens.device, dtype=torch.float32).index_add(0, rows, logp)


# ---------------------------------------------------------------- reward model

class RewardModel(nn.Module):
    """A Transformer with a scalar head (``score``, no bias) on the last token's final hidden state."""

    def __init__(self, model: nn.Module, seed: int = 0):
        super().__init__()
        self.model = model
        self.args = model.args
        self.score = nn.Linear(model.args.dim, 1, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # transformers' init of a fresh classification head: N(0, 0.02)
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=g) * 0.02)

    @property
    def layers(self):
        return self.model.layers

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = value

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [rows] float32 of right-padded rows (lengths: each row's token count; default: all)."""
        h = self.model.hidden(tokens)
        if lengths is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()


class _PairObjective(nn.Module):
    loss_label = "loss (per pair)"

    def units(self, batch) -> float:
        return float(batch[4].sum())

    def n_tokens(self, batch) -> int:
        return int(batch[2].sum())

    def blank(self, batch):
        return (*batch[:4], torch.zeros_like(batch[4]), batch[5])


class RewardObjective(_PairObjective):
    """The reward model's pairwise loss with its margin; metrics: accuracy, rewards of each side."""

    curves = {"reward": ["reward_chosen", "reward_rejected"], "accuracy": ["accuracy"]}

    def __init__(self, model: RewardModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask, lengths, margin, weight, index):
        scores = self.model(tokens, lengths)
        chosen, rejected = scores.chunk(2)
        loss = reward_loss(chosen, rejected, margin)
        with torch.no_grad():
            metrics = {"accuracy": ((chosen > rejected).float() * weight).sum(),
                       "reward_chosen": (chosen * weight).sum(), "reward_rejected": (rejected * weight).sum()}
        return (loss * weight).sum(), metrics


class DPOObjective(_PairObjective):
    """DPO on a policy Transformer. reference: "adapters" (LoRA off), "copy" (a frozen copy of the
    starting model) or "table" (log-probs computed once: ``set_reference_table``)."""

    curves = {"reward": ["reward_chosen", "reward_rejected", "reward_margin"], "KL proxy": ["logratio"]}

    def __init__(self, model: nn.Module, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, reference: str = "adapters"):
        super().__init__()
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"DPO loss {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if reference == "adapters" and not lora_modules(model):
            raise ValueError("reference 'adapters' needs a LoRA model; use 'copy' or 'table' for full training")
        self.model = model
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference
        # kept outside the module tree: neither trained, checkpointed nor wrapped by DDP
        self._ref: list[nn.Module] = []
        if reference == "copy":
            ref = copy.deepcopy(model).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._ref.append(ref)
        self._table: torch.Tensor | None = None

    def set_reference_table(self, table: torch.Tensor) -> None:
        """Reference log-probs [pairs, 2] (chosen, rejected) by pair index."""
        self._table = table.float()

    def reference_logps(self, tokens, mask, index) -> torch.Tensor:
        """log π_ref of every row of a batch (chosen rows, then rejected), without gradients."""
        with torch.no_grad():
            if self.reference == "table":
                if self._table is None:
                    raise RuntimeError("reference 'table' but no table was set")
                t = self._table.to(tokens.device)[index]
                return torch.cat([t[:, 0], t[:, 1]])
            if self.reference == "copy":
                return sequence_logps(self._ref[0], tokens, mask)
            was = self.model.training
            self.model.eval()  # no LoRA dropout in the reference
            with adapters_disabled(self.model):
                out = sequence_logps(self.model, tokens, mask)
            self.model.train(was)
            return out

    def forward(self, tokens, mask, lengths, margin, weight, index):
        ref = self.reference_logps(tokens, mask, index)
        logps = sequence_logps(self.model, tokens, mask)
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        n_c, n_r = mask[:, 1:].sum(1).float().chunk(2)
        loss, reward_c, reward_r = dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type,
                                            label_smoothing=self.label_smoothing, chosen_tokens=n_c, rejected_tokens=n_r)
        with torch.no_grad():
            logratio = ((pc - rc) + (pr - rr)).detach() / 2
            metrics = {"reward_chosen": (reward_c * weight).sum(), "reward_rejected": (reward_r * weight).sum(),
                       "reward_margin": ((reward_c - reward_r) * weight).sum(),
                       "accuracy": ((reward_c > reward_r).float() * weight).sum(), "logratio": (logratio * weight).sum()}
        return (loss * weight).sum(), metrics


@torch.no_grad()
def reference_table(objective: DPOObjective, source, *, batch_size: int = 8, progress: bool = False,
                    autocast=None) -> torch.Tensor:
    """log π_ref of both sides of every pair of ``source`` (unshuffled order = pair index): [pairs, 2].

    Computed with the reference the objective would use per step (adapters off, or the model as it is
    before training when there is no LoRA).
    """
    n = len(source.rows)
    out = torch.zeros(n, 2)
    mode = objective.reference if objective.reference != "table" else ("adapters" if lora_modules(objective.model) else "self")
    model = objective.model
    was = model.training
    model.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc="reference log-probs", unit="batch", disable=not progress):
            idx = list(range(start, min(n, start + batch_size)))
            tokens, mask = _plain_batch(source, idx)
            dev = next(model.parameters()).device
            with (autocast() if autocast else torch.autocast("cpu", enabled=False)):
                if mode == "adapters":
                    with adapters_disabled(model):
                        logps = sequence_logps(model, tokens.to(dev), mask.to(dev))
                elif mode == "copy":
                    logps = sequence_logps(objective._ref[0], tokens.to(dev), mask.to(dev))
                else:
                    logps = sequence_logps(model, tokens.to(dev), mask.to(dev))
            c, r = logps.float().cpu().chunk(2)
            out[idx, 0], out[idx, 1] = c, r
    finally:
        model.train(was)
    return out


def _plain_batch(source, rows: Sequence[int]):
    """Tokens and masks of pair rows by row number (no shuffling), chosen then rejected."""
    shuffle = source.shuffle
    source.shuffle = False
    try:
        tokens, mask, *_ = source.batch(rows)
    finally:
        source.shuffle = shuffle
    return tokens, mask
