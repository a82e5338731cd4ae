"""Perplexity and memory per token of each KV cache type (docs/inference.md).

WikiText-2 test text, windows of --window tokens scored in chunks of --chunk: every chunk after the
first attends to the earlier chunks' keys and values from the KV cache, so their storage type is
what differs between the rows. Usage: python bench/kv_types.py [--model FILE] [--windows N] [--types q8_0 ...]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from llamaforge.api import Llama
from llamaforge.cache import KV_TYPES

DATA = Path("/work/shared/data/eval/wikitext2_test.raw")


def perplexity(llm: Llama, ids: list[int], window: int, chunk: int, windows: int) -> tuple[float, int]:
    nll, n = 0.0, 0
    m = llm.model
    for w in range(windows):
        seq = torch.tensor([ids[w * window:(w + 1) * window]])
        cache = m.new_cache(1, window)
        with torch.inference_mode():
            for s in range(0, window, chunk):
                pos = torch.arange(s, s + chunk).view(1, -1)
                logits = m(seq[:, s:s + chunk], pos=pos, cache=cache)[0]
                if s == 0:
                    continue       # the first chunk sees no cached keys
                tgt = seq[0, s + 1:s + chunk + 1]
                lp = torch.log_softmax(logits[:len(tgt)].float(), -1)
                nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
                n += len(tgt)
    return math.exp(nll / n), n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", choices=list(KV_TYPES), default=list(KV_TYPES))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for kv in a.types:
        llm = Llama.load(a.model, kv_type=kv)
        ids = llm.tokenizer.encode(DATA.read_text(encoding="utf-8"), bos=False)
        t = time.perf_counter()
        ppl, n = perplexity(llm, ids, a.window, a.chunk, a.windows)
        cache, args = llm.model.new_cache(1, 1), llm.args
        per_token = (cache.k.numel() + cache.v.numel()) * cache.k.element_size()   # q8_0: the blocks' bytes
        per_value = per_token / (2 * args.n_layers * args.kv_heads * args.head_dim)
        print(f"| {kv} | {ppl:.4f} | {n} | {per_token / 1024:.2f} KiB | {per_value:g} | {time.perf_counter() - t:.0f} s |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
