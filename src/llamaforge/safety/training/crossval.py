"""Scoring the guard: held-out figures, the threshold rule on out-of-fold scores, grouped k-fold
cross-validation of a recipe."""
from __future__ import annotations

import logging

import torch

from ..head import CODES
from .data import HAND_WRITTEN, Example, assign_folds

log = logging.getLogger(__name__)

TARGET_RECALL, TARGET_OVERFLAG = 0.95, 0.05  # issue 7's targets, used to pick the threshold on out-of-fold scores


def evaluate_scores(examples: list[Example], scores: torch.Tensor, cat_probs: torch.Tensor,
                    threshold: float) -> dict:
    """Held-out figures: harmful recall per source, false-positive rate on benign and hard benign prompts."""
    flagged = (scores >= threshold).tolist()
    out: dict = {"threshold": threshold, "n": len(examples)}

    def rate(idx: list[int]) -> dict:
        n = len(idx)
        k = sum(flagged[i] for i in idx)
        return {"n": n, "flagged": k, "rate": round(k / n, 4) if n else None}

    harm = [i for i, e in enumerate(examples) if e.harmful]
    out["harmful_flagged"] = rate(harm)
    out["harmful_by_source"] = {s: rate([i for i in harm if examples[i].source.startswith(s)])
                                for s in sorted({examples[i].source.split(":")[0] for i in harm})}
    hard = [i for i, e in enumerate(examples) if not e.harmful and e.source in HAND_WRITTEN]
    out["hard_benign_flagged"] = rate(hard)
    out["hard_benign_by_type"] = {g: rate([i for i in hard if examples[i].group == g])
                                  for g in sorted({examples[i].group for i in hard})}
    plain = [i for i, e in enumerate(examples) if not e.harmful and e.source not in HAND_WRITTEN]
    out["plain_benign_flagged"] = rate(plain)
    with_cat = [i for i in harm if examples[i].categories]
    if with_cat:
        top = cat_probs[with_cat].argmax(1).tolist()
        hits = sum(CODES[t] in examples[i].categories for t, i in zip(top, with_cat))
        out["category_top1_accuracy"] = {"n": len(with_cat), "rate": round(hits / len(with_cat), 4)}
    out["curve"] = [{"threshold": t, "harmful_flagged": round(float((scores[harm] >= t).float().mean()), 4),
                     "hard_benign_flagged": round(float((scores[hard] >= t).float().mean()), 4) if hard else None}
                    for t in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)] if harm else []
    out["false_positives"] = [examples[i].text for i in hard + plain if flagged[i]]
    out["misses"] = [examples[i].text for i in harm if not flagged[i]]
    return out


def margin(recall: float, over_flag: float) -> float:
    """The worse distance to the two targets (positive when both are met)."""
    return min(recall - TARGET_RECALL, TARGET_OVERFLAG - over_flag)


def choose_threshold(examples: list[Example], scores: torch.Tensor) -> float:
    """The threshold, chosen on out-of-fold scores: the one whose worse margin to the two targets
    (harmful recall >= 95%, hard-benign over-flagging <= 5%) is largest; ties go to the middle of
    the best plateau."""
    harm = torch.tensor([e.harmful for e in examples])
    hard = torch.tensor([not e.harmful and e.source in HAND_WRITTEN for e in examples])
    grid = [round(0.05 + 0.01 * k, 2) for k in range(91)]
    margins = []
    for t in grid:
        flagged = scores >= t
        recall = float(flagged[harm].float().mean())
        over = float(flagged[hard].float().mean())
        margins.append(margin(recall, over))
    best = max(margins)
    plateau = [t for t, m in zip(grid, margins) if m >= best - 1e-9]
    return plateau[len(plateau) // 2]


def cross_validate(recipe, rows: list[int], folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold harm scores and category probabilities of ``rows`` (grouped k-fold: `assign_folds`);
    each fold's model is trained exactly as the final guard is."""
    fold = assign_folds([recipe.examples[i] for i in rows], folds)
    scores = torch.empty(len(rows))
    probs = torch.empty(len(rows), len(CODES))
    for f in range(folds):
        fit = [r for r, k in zip(rows, fold) if k != f]
        held = [j for j, k in enumerate(fold) if k == f]
        log.info("fold %d/%d: training on %d rows, scoring %d", f + 1, folds, len(fit), len(held))
        scores[held], probs[held] = recipe.predict(recipe.fit(fit), [rows[j] for j in held])
    return scores, probs

