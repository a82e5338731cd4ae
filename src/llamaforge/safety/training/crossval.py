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



# -- leave-one-source-out: what a new source will see -------------------------------------------
# Per-source targets (issue 18): harmful recall, benign-but-scary over-flagging, plain benign flagging.
TARGET_PLAIN = 0.01
PLAIN_SOURCES = ("arc", "gsm8k", "self-instruct")
# evaluation sets: scored when left out like every source, never trained on when another one is
SCORE_ONLY = ("translated-prompts",)


def loso_splits(source_of: list[str], score_only: tuple[str, ...] = SCORE_ONLY):
    """(left-out source, training rows, scored rows) for every source. Rows whose source is "" (the
    de-obfuscated views and paragraphs of other rows) and rows of a ``score_only`` source (an
    evaluation set) are never trained on."""
    for s in sorted({x for x in source_of if x}):
        yield (s, [i for i, x in enumerate(source_of) if x and x != s and x not in score_only],
               [i for i, x in enumerate(source_of) if x == s])


def leave_one_source_out(recipe, source_of: list[str], parts_of: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every row by the model trained on all the other sources (trained exactly as the
    final guard is); a row scores as the most unsafe of its parts (``parts_of[i]``: row indices,
    itself and its views, as the guard scores a message). View rows' entries are left at -1."""
    n = len(source_of)
    scores, probs = torch.full((n,), -1.0), torch.zeros(n, len(CODES))
    for s, fit, held in loso_splits(source_of):
        log.info("leaving out %s: training on %d rows, scoring %d", s, len(fit), len(held))
        model = recipe.fit(fit)
        recipe.finish(model, fit)
        parts = sorted({j for i in held for j in parts_of[i]})
        sc, pr = recipe.predict(model, parts)
        at = {j: k for k, j in enumerate(parts)}
        for i in held:
            best = max(parts_of[i], key=lambda j: float(sc[at[j]]))
            scores[i], probs[i] = sc[at[best]], pr[at[best]]
    return scores, probs


def _source_margin(source: str, harmful: torch.Tensor, flagged: torch.Tensor) -> float:
    """The worse distance of one source's rates to its targets (positive when met)."""
    out = []
    if harmful.any():
        out.append(float(flagged[harmful].float().mean()) - TARGET_RECALL)
    if (~harmful).any():
        limit = TARGET_PLAIN if source in PLAIN_SOURCES else TARGET_OVERFLAG
        out.append(limit - float(flagged[~harmful].float().mean()))
    return min(out)


def worst_source_threshold(examples: list[Example], scores: torch.Tensor, source_of: list[str]) -> tuple[float, float]:
    """(threshold, worst margin): the threshold whose worst left-out source is best off, not the mean;
    ties go to the middle of the plateau."""
    rows = [i for i, s in enumerate(source_of) if s]
    by = {s: torch.tensor([i for i in rows if source_of[i] == s]) for s in {source_of[i] for i in rows}}
    harm = torch.tensor([e.harmful for e in examples])
    grid = [round(0.05 + 0.01 * k, 2) for k in range(91)]
    worst = [min(_source_margin(s, harm[ix], scores[ix] >= t) for s, ix in by.items()) for t in grid]
    best = max(worst)
    plateau = [t for t, m in zip(grid, worst) if m >= best - 1e-9]
    return plateau[len(plateau) // 2], best


def loso_table(examples: list[Example], scores: torch.Tensor, source_of: list[str], threshold: float) -> dict:
    """Per left-out source: harmful flagged, benign flagged, the margin to its targets, harmful
    flagged per category (O-code), and per kind for sources with kinds (the evasion set's)."""
    out = {}
    flagged = scores >= threshold

    def rate(ix: list[int]) -> dict:
        k = sum(bool(flagged[i]) for i in ix)
        return {"n": len(ix), "flagged": k, "rate": round(k / len(ix), 4) if ix else None}

    for s in sorted({x for x in source_of if x}):
        ix = [i for i, x in enumerate(source_of) if x == s]
        harm = [i for i in ix if examples[i].harmful]
        safe = [i for i in ix if not examples[i].harmful]
        row = {"harmful": rate(harm), "benign": rate(safe),
               "margin": round(_source_margin(s, torch.tensor([examples[i].harmful for i in ix]),
                                              flagged[torch.tensor(ix)]), 4),
               "by_category": {c: rate([i for i in harm if c in examples[i].categories])
                               for c in CODES if any(c in examples[i].categories for i in harm)}}
        # kinds: the evasion set's disguises, the translated set's languages
        kinds = sorted({examples[i].group for i in ix if examples[i].source in ("evasion-prompts", "translated-prompts")})
        if kinds:
            row["by_kind"] = {k: {"harmful": rate([i for i in harm if examples[i].group == k]),
                                  "benign": rate([i for i in safe if examples[i].group == k])} for k in kinds}
        out[s] = row
    return out
