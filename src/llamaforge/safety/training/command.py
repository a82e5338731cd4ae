"""Train (and evaluate) the default guard: a head over the bundled SmolLM2's hidden states and a
fine-tuned all-MiniLM-L6-v2 with its head, their probabilities averaged.

    llamaforge train-guard            # train, write the shipped guard, print held-out figures
    llamaforge train-guard --eval     # evaluate the shipped guard on the held-out split

The ``smollm2`` member reads frozen hidden states of the bundled SmolLM2-135M-Instruct after block
``--layer`` (15; ``lmfeatures.LMFeatures``), computed once and cached; only its head trains. The
``minilm`` member keeps the embeddings (and any bottom layers below the top ``--layers``; default:
all six are tuned) frozen, their outputs computed once and cached; the tuned layers and its head
train together, and the layers ship as fp16 overrides inside ``guard_head.safetensors``.
``--encoder`` trains one member alone. The threshold is chosen on out-of-fold scores of the training
split (grouped k-fold cross-validation, ``cross_validate`` and ``choose_threshold``), never on the
held-out split; the shipped guard is then trained on the whole training split.

Data (see docs/safety.md and safety/data/README.md for provenance):
- harmful prompts: ``safety/`` of the shared data folder (`paths.data_dir`) (AdvBench, StrongREJECT, HarmBench; HarmBench's copyright
  behaviours are left out: reproducing lyrics or book passages is not an O1-O7 harm); AdvBench's
  ``target`` column ("Sure, here is ...") gives harmful *Agent* turns;
- benign prompts: Alpaca's self-instruct seed tasks (instructions and their answers), GSM8K questions
  (and answers), ARC questions, and ``safety/data/hard_prompts.csv``: hand-written safe-but-scary
  prompts in the style of XSTest (homonyms, figurative language, safe targets and contexts, fiction,
  history, definitions, safety questions) plus a few unsafe contrast prompts, and
  ``safety/data/hard_prompts_extra.csv`` (more of both, training only).

The held-out split is by source, never a random shuffle of near-duplicates: the harmful test set is
HarmBench plus the StrongREJECT prompts that StrongREJECT took from other collections (DAN,
HarmfulQ, MaliciousInstruct, ...), training uses AdvBench and StrongREJECT's own "custom" prompts
(StrongREJECT's copies of AdvBench prompts are dropped); benign test prompts come from GSM8K *test*
and ARC-*Challenge*, training from GSM8K *train* and ARC-*Easy*; the hand-written prompts are split by
their focus word (every prompt about "kill" lands on the same side), so no held-out prompt has a
templated sibling in training; extra prompts may not share a held-out focus topic at all.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from json import dumps
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file

from ... import options
from ...fileio import atomic_write
from ..guard import Guard
from ..head import HEAD_FILE, HIDDEN, META_FILE
from ..policy import DEFAULT_CATEGORIES
from .crossval import choose_threshold, cross_validate, evaluate_scores, margin
from .data import SEED, count_by, load_examples, threshold_population
from .recipes import N_LAYERS, Ensemble, LMRecipe, MiniLMRecipe, one_thread

log = logging.getLogger(__name__)


@dataclass
class GuardTrainConfig:
    """How the default guard is trained (the defaults are the shipped guard's settings).

    encoder: smollm2: a head over the bundled chat model's hidden states; minilm: all-MiniLM-L6-v2 fine-tuned with a head; smollm2+minilm (the shipped guard): both, probabilities averaged
    layer: smollm2: the block whose output the head reads
    epochs: minilm: fine-tuning epochs
    layers: minilm: top encoder layers to fine-tune
    hard_weight: loss weight of the hand-written prompts relative to the other rows
    folds: cross-validation folds that choose the threshold
    held_out: train the final guard and score the held-out split; --no-held-out cross-validates only, writes nothing (compare settings without looking at the held-out split)
    data: the shared data folder (default: paths.data_dir())
    out: write guard_head.* to this folder instead of the package
    """
    encoder: Literal["smollm2+minilm", "smollm2", "minilm"] = "smollm2+minilm"
    layer: int = 15       # of SmolLM2's 30 blocks; chosen by cross-validation
    epochs: int = 8       # minilm: epochs and layers chosen by cross-validation (docs/safety.md)
    layers: int = N_LAYERS
    hard_weight: float = 3.0
    folds: int = 5
    held_out: bool = True
    data: str | None = options.path_field()
    out: str | None = options.path_field()

    def validate(self) -> None:
        """One-line errors for settings that cannot train."""
        if self.encoder not in ("smollm2+minilm", "smollm2", "minilm"):
            raise ValueError(f"--encoder must be one of smollm2+minilm, smollm2, minilm, not {self.encoder!r}")
        if self.hard_weight <= 0:
            raise ValueError(f"--hard-weight must be positive, not {self.hard_weight}")
        if self.folds < 2:
            raise ValueError(f"--folds must be at least 2, not {self.folds}")
        if not self.held_out and self.out is not None:
            raise ValueError("--no-held-out only cross-validates: it takes no --out")


def train(config: GuardTrainConfig) -> dict:
    """Choose the threshold by grouped k-fold cross-validation on the training split, then train the
    guard on the whole training split, write it and return the held-out figures.

    ``held_out=False`` stops after the cross-validation and writes nothing (the out-of-fold figures are
    returned under ``"validation"``, with ``margin``: the worse distance to the two targets), for
    comparing training settings without looking at the held-out split."""
    cfg = config
    cfg.validate()
    t0 = time.time()
    examples = load_examples(cfg.data)
    recipe = Ensemble([LMRecipe(examples, cfg.layer, cfg.hard_weight) if m == "smollm2"
                       else MiniLMRecipe(examples, cfg.layers, cfg.epochs, cfg.hard_weight) for m in cfg.encoder.split("+")])
    train_rows = [i for i, e in enumerate(examples) if e.split == "train"]
    test_rows = [i for i, e in enumerate(examples) if e.split == "test"]
    train_ex = [examples[i] for i in train_rows]
    test_ex = [examples[i] for i in test_rows]

    oof, oof_probs = cross_validate(recipe, train_rows, cfg.folds)
    pop = [j for j, e in enumerate(train_ex) if threshold_population(e)]
    val_ex = [train_ex[j] for j in pop]
    threshold = choose_threshold(val_ex, oof[pop])
    val_fig = evaluate_scores(val_ex, oof[pop], oof_probs[pop], threshold)
    hf, hb = val_fig["harmful_flagged"], val_fig["hard_benign_flagged"]
    val_fig["margin"] = round(margin(hf["flagged"] / hf["n"], hb["flagged"] / hb["n"]), 4)
    if not cfg.held_out:
        return {"validation": val_fig}

    model = recipe.fit(train_rows)
    recipe.finish(model, train_rows)
    scores, probs = recipe.predict(model, test_rows)
    figures = evaluate_scores(test_ex, scores, probs, threshold)
    training = {"examples": len(train_ex), "harmful": sum(e.harmful for e in train_ex),
                "by_source": count_by(train_ex), "seed": SEED, "hand_written_weight": cfg.hard_weight, "folds": cfg.folds,
                "threshold_rule": f"on out-of-fold scores ({cfg.folds}-fold cross-validation grouped by topic): the "
                                  "threshold whose worse margin to the targets (recall >= 0.95, hard-benign "
                                  "over-flag <= 0.05) is largest"}
    training.update({r.name: r.training() for r in recipe.recipes})
    command = " ".join(["llamaforge train-guard", options.flags(replace(cfg, data=None, out=None))]).strip()
    meta = {
        "format": "llamaforge-guard-head/3",
        "members": recipe.meta(),
        "combine": "mean of the members' probabilities",
        "categories": [{"code": c.code, "name": c.name} for c in DEFAULT_CATEGORIES],
        "threshold": threshold,
        "hidden": HIDDEN,
        "training": training,
        # "validation" holds the out-of-fold figures the threshold was chosen on
        "validation": {k: v for k, v in val_fig.items() if k not in ("false_positives", "misses")},
        "validation_sources": count_by(val_ex),
        "held_out": {k: v for k, v in figures.items() if k not in ("false_positives", "misses")},
        "held_out_sources": count_by(test_ex),
        "command": command,
        "seconds": round(time.time() - t0, 1),
    }
    state = {k: v.contiguous() for k, v in recipe.tensors(model).items()}
    out = Path(cfg.out) if cfg.out is not None else HEAD_FILE.parent
    # package data files: readable by everyone, like the rest of the package (mkstemp makes them 0600)
    atomic_write(out / HEAD_FILE.name, lambda p: (save_file(state, str(p)), os.chmod(p, 0o644)))
    atomic_write(out / META_FILE.name, lambda p: (p.write_text(dumps(meta, indent=2) + "\n"), os.chmod(p, 0o644)))
    figures["meta"] = meta
    figures["validation"] = val_fig
    return figures


def evaluate_shipped(data: str | Path | None = None) -> dict:
    """Held-out figures of the shipped head (the guard exactly as `Guard.load()` runs it)."""
    guard = Guard.load()
    test_ex = [e for e in load_examples(data) if e.split == "test"]
    with one_thread():
        scores, probs = guard.scores([e.text for e in test_ex])
    return evaluate_scores(test_ex, scores, probs, guard.threshold)


def _print_figures(fig: dict) -> None:
    hf, hb, pb = fig["harmful_flagged"], fig["hard_benign_flagged"], fig["plain_benign_flagged"]
    print(f"threshold {fig['threshold']:.4f}" + (f"  (margin to the targets {fig['margin']:+.4f})" if "margin" in fig else ""))
    print(f"harmful prompts flagged        : {hf['flagged']}/{hf['n']} = {hf['rate']:.1%}")
    for s, r in fig["harmful_by_source"].items():
        print(f"  {s:<28} {r['flagged']}/{r['n']} = {r['rate']:.1%}")
    print(f"hard benign prompts flagged    : {hb['flagged']}/{hb['n']} = {hb['rate']:.1%}")
    for s, r in fig["hard_benign_by_type"].items():
        print(f"  {s:<28} {r['flagged']}/{r['n']}")
    print(f"plain benign prompts flagged   : {pb['flagged']}/{pb['n']} = {pb['rate']:.1%}")
    if "category_top1_accuracy" in fig:
        c = fig["category_top1_accuracy"]
        print(f"category top-1 accuracy        : {c['rate']:.1%} of {c['n']}")
    if fig.get("curve"):
        print("threshold sweep: threshold / harmful flagged / hard benign flagged")
        for c in fig["curve"]:
            print(f"  {c['threshold']:.2f}  {c['harmful_flagged']:.1%}  {c['hard_benign_flagged']:.1%}")
    for t in fig["false_positives"]:
        print(f"  false positive: {t[:100]}")
    for t in fig["misses"]:
        print(f"  missed: {t[:100]}")



def train_guard(config: GuardTrainConfig, *, eval: bool = False, loso: bool = False, json: bool = False) -> int:
    """Train the default guard (cross-validated threshold, then the final fit) and print its figures.

    eval: evaluate the shipped guard on the held-out split instead of training
    loso: leave-one-source-out evaluation of the recipe instead of training (writes nothing)
    json: print the figures as JSON
    """
    logging.getLogger("llamaforge").setLevel(logging.INFO)
    if eval and not config.held_out:
        raise ValueError("--no-held-out only cross-validates: it takes no --eval")
    if loso:
        if eval or config.out is not None:
            raise ValueError("--loso only evaluates: it takes no --eval or --out")
        from .loso import print_loso, run_loso
        fig = run_loso(config)
        print(dumps(fig, indent=2)) if json else print_loso(fig)
        return 0
    fig = evaluate_shipped(config.data) if eval else train(config)
    fig.pop("meta", None)
    if json:
        print(dumps(fig, indent=2))
        return 0
    if "validation" in fig:
        print("out-of-fold scores of the training split (the threshold is chosen here):")
        _print_figures(fig.pop("validation"))
    if fig:
        print("held-out split:")
        _print_figures(fig)
    return 0
