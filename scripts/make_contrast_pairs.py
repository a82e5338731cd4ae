"""Contrast preference pairs: refuse the harmful request, answer its harmless-sounding twin.

A safety tune on harmlessness pairs alone (HH-RLHF harmless-base) learns to refuse, and refuses
safe requests that merely sound dangerous too ("How do I kill a Python process?"); pairs that only
punish refusals teach the opposite, to refuse nothing. Llama 2 kept borderline prompts in its
safety data (paper §4.2); these pairs, for `align --extra-data`, hold both sides of the line. The
prompts are the project's hand-written, training-only `safety/data/hard_prompts_extra.csv` (none of
them is in `hard_prompts.csv`, whose safe rows measure over-refusal, nor in AdvBench or
StrongREJECT): for a `safe` row the starting model's own greedy answer is `chosen` and a refusal
`rejected`; for an `unsafe` row (a request only, no harmful content) the refusal is `chosen` and the
model's answer `rejected`. Rows where the model refused are left out (no answer to contrast).
Refusals are hand-written sentences, taken in turn, the same ones on both sides. `--safe-per-unsafe R`
keeps R safe-prompt pairs per unsafe-prompt pair (evenly spaced rows of a side are kept when it has
more): 1 makes a refusal's wording neither preferred nor punished on its own; the default 2 leans
against refusing, to offset the harmlessness pairs the file is mixed with.

    .venv/bin/python scripts/make_contrast_pairs.py [--model PATH] [--out configs/data/contrast_pairs.jsonl]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "src" / "llamaforge" / "safety" / "data" / "hard_prompts_extra.csv"
REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I cannot help with that. It could be used to cause harm.",
    "I'm sorry, I can't assist with that.",
    "As an AI assistant, I can't provide help with this request.",
    "I can't help with that, as it may be dangerous or illegal.",
    "Sorry, but I cannot provide information on that topic.",
    "I'm not able to help with that request.",
    "I apologize, but I can't provide that information.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="the policy to be tuned (default: the bundled SmolLM2)")
    ap.add_argument("--out", default=str(ROOT / "configs" / "data" / "contrast_pairs.jsonl"))
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--safe-per-unsafe", type=float, default=2.0,
                    help="safe-prompt pairs kept per unsafe-prompt pair (1: as many of each)")
    a = ap.parse_args()
    from llamaforge.api import Llama
    from llamaforge.eval.harness import LM
    from llamaforge.eval.safety_tasks import is_refusal
    from llamaforge.fileio import atomic_write_text
    with open(PROMPTS, newline="", encoding="utf-8") as f:
        rows = [(r["prompt"], r["label"] == "safe") for r in csv.DictReader(f) if r["label"] in ("safe", "unsafe")]
    llm = Llama.load(a.model, weights="float")      # float32 weights, as `align` trains them
    convs = [[{"role": "user", "content": p}] for p, _ in rows]
    answers = LM(llm, batch_size=a.batch, progress=True).generate([llm.encode_chat(c) for c in convs],
                                                                   max_tokens=a.max_new)
    usable = {True: [], False: []}
    for conv, (_, safe), answer in zip(convs, rows, answers):
        if not is_refusal(answer.strip()):
            usable[safe].append((conv, answer.strip()))
    if a.safe_per_unsafe <= 0:
        sys.exit("--safe-per-unsafe must be > 0")
    n_unsafe = min(len(usable[False]), int(len(usable[True]) / a.safe_per_unsafe))
    count = {False: n_unsafe, True: min(len(usable[True]), round(n_unsafe * a.safe_per_unsafe))}
    lines, kinds = [], {True: 0, False: 0}
    for safe, items in usable.items():
        n = count[safe]
        for i in range(n):
            conv, answer = items[i * len(items) // n]
            refusal = REFUSALS[i % len(REFUSALS)]
            chosen, rejected = (answer, refusal) if safe else (refusal, answer)
            lines.append(json.dumps({"messages": conv, "chosen": chosen, "rejected": rejected}, ensure_ascii=False))
            kinds[safe] += 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"{out}: {kinds[True]} safe-prompt pairs (answer preferred), {kinds[False]} unsafe-prompt pairs "
          f"(refusal preferred); of {len(rows)} prompts, {len(rows) - len(usable[True]) - len(usable[False])} refused "
          f"by the model and {len(usable[True]) + len(usable[False]) - len(lines)} beyond --safe-per-unsafe "
          f"{a.safe_per_unsafe:g} left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
