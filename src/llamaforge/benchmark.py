"""`llamaforge bench`: prefill and decode speed, time to first token and peak memory of one model."""
from __future__ import annotations

import json as _json
import resource
import sys
import time
from typing import Any

import torch

from .api import Weights
from .cache import kv_name
from .commands import KVType, Quantize, load_model
from .generate import Batch
from .sampling import SamplingParams

# OpenMP's wait policy decides a lot on a 2-core machine. Spinning (the default) is ~2x faster on an
# idle machine (decode 96 vs 47 tok/s here, and 152 vs 46 for llama.cpp); on a busy one it collapses
# (a 541 ms decode step vs 60 ms passive at load ~10). So nothing sets it: export
# OMP_WAIT_POLICY=PASSIVE yourself when the cores are shared.

# A fixed English text so every run (and every peer in bench/) sees the same prompt tokens.
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Books had "
    "been copied by hand for centuries, slowly and at great cost, and a single scribe might spend a year on "
    "one volume. Within fifty years of Gutenberg's first Bible, presses were working in more than two hundred "
    "cities across Europe, and millions of books had been printed. Prices fell, literacy spread beyond the "
    "clergy and the nobility, and ideas could travel faster than any ruler could suppress them. Scholars "
    "compared editions, corrected errors and built upon each other's work, which some historians see as a "
    "foundation of the scientific revolution. Newspapers, pamphlets and maps followed, changing commerce, "
    "religion and politics alike. "
)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n token ids of PROMPT_TEXT (repeated as needed), starting with BOS when the model uses one."""
    ids = tokenizer.encode(PROMPT_TEXT, bos=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    out = list(bos)
    while len(out) < n:
        out.extend(ids)
    return out[:n]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run(llm, prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
    """Greedy-generate gen_tokens after a prompt_tokens prompt; time the phases."""
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
    batch = Batch(llm.model, llm.tokenizer, max_batch=1, max_seq=prompt_tokens + gen_tokens + 1,
                  prefill_chunk=max(prompt_tokens, 1))
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    seq = batch.add(ids, params)
    t_prefill = time.perf_counter()
    batch.step()                      # samples the first token, runs the first decode forward
    t_first = time.perf_counter()
    while not seq.finish_reason:
        batch.step()
    t_end = time.perf_counter()
    decoded = max(len(seq.out) - 1, 1)
    return {"prefill_tok_s": prompt_tokens / (t_prefill - t0),
            "decode_tok_s": decoded / (t_end - t_first),
            "ttft_s": t_first - t0}


def bench(*, model: str | None = None, prompt_tokens: int = 512, gen_tokens: int = 128, threads: int = 2,
          json: bool = False, weights: Weights | None = None, quantize: Quantize = "none",
          kv_type: KVType | None = None) -> int:
    """Measure prefill and decode speed of a model (greedy, batch 1).

    model: checkpoint path; the bundled SmolLM2 when omitted
    prompt_tokens: prompt length
    gen_tokens: tokens to generate
    threads: CPU threads for torch
    json: print one JSON object (prefill_tok_s, decode_tok_s, ttft_s, peak_rss_mb, ...)
    weights: blocks (default) computes with a GGUF's quantized blocks (native kernels); float dequantizes them to float32
    quantize: int8/int4 repack the weights for PyTorch's weight-only kernels (auto: deprecated, = --weights blocks)
    kv_type: KV cache element type, f32, f16 or q8_0; default: f16 for GGUF models computed from their blocks (as llama.cpp), else the model's dtype
    """
    if prompt_tokens < 1 or gen_tokens < 1 or threads < 1:
        raise ValueError("--prompt-tokens, --gen-tokens and --threads must be at least 1")
    torch.set_num_threads(threads)
    t = time.perf_counter()
    llm = load_model(model, weights, quantize, kv_type=kv_type)
    load_s = time.perf_counter() - t
    if prompt_tokens + gen_tokens >= llm.args.max_seq_len:
        raise ValueError(f"prompt + generated tokens ({prompt_tokens + gen_tokens}) exceed the context window "
                         f"({llm.args.max_seq_len})")
    run(llm, min(prompt_tokens, 16), min(gen_tokens, 4))   # warm-up: first-call allocations and kernel setup
    result: dict[str, Any] = run(llm, prompt_tokens, gen_tokens)
    result.update(peak_rss_mb=peak_rss_mb(), load_s=load_s, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                  threads=threads, weights=weights or "blocks", quantize=quantize, kv_type=kv_name(llm.model), model=str(llm.checkpoint.path if llm.checkpoint else model))
    if json:
        print(_json.dumps(result))
    else:
        print(f"model        {result['model']}  (weights={result['weights']}, quantize={quantize}, {threads} threads)")
        print(f"prefill      {result['prefill_tok_s']:.1f} tok/s  ({prompt_tokens} tokens)")
        print(f"decode       {result['decode_tok_s']:.1f} tok/s  ({gen_tokens} tokens)")
        print(f"first token  {result['ttft_s']:.3f} s")
        print(f"peak RSS     {result['peak_rss_mb']:.0f} MiB   (load {load_s:.1f} s)")
    return 0
