"""Share of held-out GSM8K test answers that end in the `#### N` format, with and without a LoRA adapter.

Greedy decoding of the first N questions of ../shared/data/eval/gsm8k_test.jsonl (never seen in
training) through the model's chat template, batched.

    .venv/bin/python bench/gsm8k_format.py --adapter runs/gsm8k_lora --n 200
    .venv/bin/python bench/gsm8k_format.py --n 200            # the base model
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=None, help="a PEFT-format LoRA folder; omitted: the base model")
    ap.add_argument("--model", default=None, help="base checkpoint (the bundled SmolLM2 when omitted)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--show", type=int, default=0, help="print this many answers that miss the format")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "eval" / "gsm8k_test.jsonl"))
    a = ap.parse_args()
    from llamaforge.api import Llama
    llm = Llama.load(a.model, adapter=a.adapter)
    recs = [json.loads(line) for line in open(a.data, encoding="utf-8")][: a.n]
    t = time.perf_counter()
    done = []
    for i in range(0, len(recs), a.batch):
        prompts = [llm.encode_chat([{"role": "user", "content": r["question"]}]) for r in recs[i:i + a.batch]]
        done += llm.complete_batch(prompts, max_tokens=a.max_tokens, temperature=0.0,
                                   repetition_penalty=a.repetition_penalty)
    hits = [FINAL.search(c.text.strip()) for c in done]
    gold = [r["answer"].split("####")[-1].strip().replace(",", "") for r in recs]
    right = [m is not None and m.group(1).replace(",", "").rstrip(".") == g for m, g in zip(hits, gold)]
    misses = [(c.finish_reason, c.text) for c, m in zip(done, hits) if m is None]
    for reason, text in misses[: a.show]:
        print(f"--- miss ({reason}, {len(text)} chars): ...{text[-300:]!r}")
    print(json.dumps({"adapter": a.adapter, "repetition_penalty": a.repetition_penalty, "n": len(recs), "ends_in_####_N": sum(m is not None for m in hits),
                      "share": round(sum(m is not None for m in hits) / len(recs), 4), "correct": sum(right),
                      "misses_by_finish_reason": {r: sum(1 for x, _ in misses if x == r) for r in {x for x, _ in misses}},
                      "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
