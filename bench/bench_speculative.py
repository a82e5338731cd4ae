"""Speculative decoding by prompt lookup vs plain decoding: tokens/s, same model, same run.

Input-grounded tasks (summarise, edit, quote from a given text: real paragraphs of wikitext-2 and
Shakespeare from ../shared/data) and free generation, greedy, on the bundled SmolLM2-135M-Instruct
chat model. For each task the plain and the lookup runs alternate, `--reps` times each; a rep's
tokens/s is completion tokens over wall time (prefill included, the same for both); the table
reports medians and their ratio, and checks that both produced the same tokens.

    nice .venv/bin/python bench/bench_speculative.py [--reps 5 --max-tokens 160 --k 8 --threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, median, update_section  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def paragraphs(min_len: int, max_len: int) -> list[str]:
    lines = (DATA / "eval" / "wikitext2_test.raw").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if min_len < len(line) < max_len and not line.startswith(" =")]


def shakespeare(lines: int, start: int) -> str:
    text = (DATA / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    return "\n".join(text[start:start + lines])


def typos(text: str, every: int = 9) -> str:
    """text with the inner letters of every `every`-th longer word swapped (a deterministic typo)."""
    words = text.split(" ")
    for i in range(0, len(words), every):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def tasks() -> list[tuple[str, str, str]]:
    """(kind, name, user message)."""
    p = paragraphs(500, 900)
    name = next(w for w in p[2].split()[8:] if w[:1].isupper() and w.isalpha())
    return [
        ("grounded", "summarise", f"Summarise the following text in a few sentences.\n\n{p[0]}"),
        ("grounded", "fix typos", f"Correct the spelling mistakes in this text and return the whole corrected "
                                  f"text.\n\n{typos(p[1])}"),
        ("grounded", "edit verse", f"Copy this passage, replacing every name with \"Sir\":\n\n{shakespeare(14, 200)}"),
        ("grounded", "quote", f"Context:\n{p[2]}\n\nQuestion: Which sentences of the context mention {name}? "
                              f"Quote them exactly."),
        ("free", "story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("free", "explain", "Explain how a refrigerator works, step by step, for a ten-year-old."),
        ("free", "list", "Give me ten ideas for a weekend trip with friends, with one sentence on each."),
    ]


def run(llm, messages, max_tokens: int, lookup):
    """(tokens, tokens per wall second, tokens per CPU second of the process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    c = llm.chat(messages, max_tokens=max_tokens, lookup=lookup)
    return c.tokens, len(c.tokens) / (time.perf_counter() - t0), len(c.tokens) / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--k", type=int, default=8, help="most draft tokens per verify forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="GGUF/HF/Meta checkpoint (default: the bundled SmolLM2)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from llamaforge.api import Llama
    from llamaforge.speculative import PromptLookup
    llm = Llama.load(a.model)
    rows = []
    for kind, name, text in tasks():
        messages = [{"role": "user", "content": text}]
        run(llm, messages, 16, None)                          # warm-up (page cache, kernels)
        plain, spec, plain_cpu, spec_cpu, stats = [], [], [], [], []
        ref = None
        for _ in range(a.reps):
            tokens, tps, cps = run(llm, messages, a.max_tokens, None)
            plain.append(tps)
            plain_cpu.append(cps)
            ref = tokens
            look = PromptLookup(k=a.k)
            tokens, tps, cps = run(llm, messages, a.max_tokens, look)
            spec.append(tps)
            spec_cpu.append(cps)
            stats.append(look.stats)
            if tokens != ref:
                raise SystemExit(f"{name}: lookup decoding produced different tokens than plain decoding")
        s = stats[-1]
        per_verify = (s.accepted + s.verifies) / s.verifies if s.verifies else 0.0
        row = (kind, name, len(ref), median(plain), median(spec), median(spec) / median(plain), median(plain_cpu),
               median(spec_cpu), median(spec_cpu) / median(plain_cpu), s.acceptance, per_verify, s.verifies,
               s.plain_steps)
        rows.append(row)
        print(f"{kind:9s} {name:12s} {len(ref):4d} tok  wall: plain {row[3]:6.1f} lookup {row[4]:6.1f} tok/s x{row[5]:.2f}"
              f"  CPU: plain {row[6]:6.1f} lookup {row[7]:6.1f} x{row[8]:.2f}  accepted {row[9]:.0%} of drafts, "
              f"{per_verify:.1f} tok/verify, {s.verifies} verifies + {s.plain_steps} plain steps", flush=True)
    table = ["| task | kind | tokens | plain tok/s | lookup tok/s | ratio (wall) | plain tok/CPU-s | lookup tok/CPU-s "
             "| ratio (CPU) | drafts accepted | tokens per verify | verifies + plain steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, name, n, p, s_, r, pc, sc, rc, acc, pv, nv, ps in rows:
        table.append(f"| {name} | {kind} | {n} | {p:.1f} | {s_:.1f} | {r:.2f}x | {pc:.1f} | {sc:.1f} | **{rc:.2f}x** "
                     f"| {acc:.0%} | {pv:.1f} | {nv} + {ps} |")
    for kind in ("grounded", "free"):
        rw = [r[5] for r in rows if r[0] == kind]
        rc = [r[8] for r in rows if r[0] == kind]
        table.append(f"| median, {kind} | | | | | {median(rw):.2f}x | | | **{median(rc):.2f}x** | | | |")
    body = "\n".join([
        "## Speculative decoding: prompt lookup vs plain decoding (`bench/bench_speculative.py`)",
        "",
        machine_line() + f"; {a.threads} threads.",
        "",
        f"Bundled SmolLM2-135M-Instruct Q4_1, chat template, greedy, up to {a.max_tokens} tokens, "
        f"`lookup=PromptLookup(k={a.k})` (adaptive draft length); medians of {a.reps} alternating reps; "
        "tokens/s over the whole call (prefill included), per wall second and per CPU second of the process "
        "(the CPU figure is the one to read on a shared machine: other processes inflate wall time). Both produced the same tokens in every rep. "
        "Grounded tasks use real text from `../shared/data` (wikitext-2, tinyshakespeare). "
        "Counters are from the last rep.",
        "",
        *table,
    ])
    print(body)
    if not a.no_write:
        print(update_section("speculative", body))


if __name__ == "__main__":
    main()
