"""Leave-one-source-out evaluation: for every source (each public data set, each hand-written file),
train the guard's recipe on all the other sources and score the one left out, as the guard scores a
message (its paragraphs and de-obfuscated views, the most unsafe part). The threshold is the one
whose worst left-out source is best off.

    llamaforge train-guard --loso --encoder smollm2
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

from ... import options
from ..head import META_FILE
from ..normalise import scored_parts
from .crossval import leave_one_source_out, loso_table, worst_source_threshold
from .data import Example, load_loso_examples, loso_source
from .recipes import Ensemble, LMRecipe, MiniLMRecipe

log = logging.getLogger(__name__)


def with_views(examples: list[Example]) -> tuple[list[Example], list[str], list[list[int]]]:
    """The rows plus one row per extra part the guard scores (paragraphs, de-obfuscated views);
    each row's LOSO source ("" for the parts, never trained on) and the rows its score is the max of."""
    rows, source_of, parts_of = list(examples), [loso_source(e) for e in examples], []
    for i, e in enumerate(examples):
        sp = scored_parts(e.text)
        # the row's own text is one of its parts unless normalisation rewrote it (as the guard does)
        parts = [i] if sp[0] == e.text else []
        for p in sp[1:] if parts else sp:
            parts.append(len(rows))
            rows.append(replace(e, text=p, source="view", split="view"))
            source_of.append("")
        parts_of.append(parts)
    parts_of += [[j] for j in range(len(examples), len(rows))]
    return rows, source_of, parts_of


def run_loso(cfg) -> dict:
    """The leave-one-source-out table of ``cfg``'s recipe (a `GuardTrainConfig`), at the threshold
    the worst-source rule picks and at the shipped guard's threshold."""
    t0 = time.time()
    base = load_loso_examples(cfg.data)
    rows, source_of, parts_of = with_views(base)
    log.info("%d rows from %d sources, %d extra parts", len(base), len({s for s in source_of if s}), len(rows) - len(base))
    recipe = Ensemble([LMRecipe(rows, cfg.layer, cfg.hard_weight) if m == "smollm2"
                       else MiniLMRecipe(rows, cfg.layers, cfg.epochs, cfg.hard_weight) for m in cfg.encoder.split("+")])
    scores, _ = leave_one_source_out(recipe, source_of, parts_of)
    threshold, worst = worst_source_threshold(rows, scores, source_of)
    shipped = float(json.loads(META_FILE.read_text())["threshold"])
    return {"command": " ".join(["llamaforge train-guard --loso", options.flags(replace(cfg, data=None, out=None))]).strip(),
            "threshold": threshold, "worst_margin": round(worst, 4),
            "table": loso_table(rows, scores, source_of, threshold),
            "shipped_threshold": shipped, "table_at_shipped": loso_table(rows, scores, source_of, shipped),
            "seconds": round(time.time() - t0, 1)}


def print_loso(fig: dict) -> None:
    """The table as text: one line per left-out source, then its categories and kinds."""
    for key, t in (("table", fig["threshold"]), ("table_at_shipped", fig["shipped_threshold"])):
        print(f"threshold {t:.2f}" + (f"  (worst-source rule; worst margin {fig['worst_margin']:+.4f})" if key == "table" else "  (the shipped guard's)"))
        print(f"  {'left-out source':<20} {'harmful flagged':>18} {'benign flagged':>16} {'margin':>8}")
        for s, r in fig[key].items():
            h, b = r["harmful"], r["benign"]
            hs = f"{h['flagged']}/{h['n']} = {h['rate']:.1%}" if h["n"] else "-"
            bs = f"{b['flagged']}/{b['n']} = {b['rate']:.1%}" if b["n"] else "-"
            print(f"  {s:<20} {hs:>18} {bs:>16} {r['margin']:+8.3f}")
            cats = ", ".join(f"{c} {v['flagged']}/{v['n']}" for c, v in r["by_category"].items())
            if cats:
                print(f"  {'':<20} harmful by category: {cats}")
            for k, v in r.get("by_kind", {}).items():
                print(f"  {'':<20} {k:<10} harmful {v['harmful']['flagged']}/{v['harmful']['n']}, benign {v['benign']['flagged']}/{v['benign']['n']}")
    print(f"{fig['seconds']:.0f} s  ({fig['command']})")
