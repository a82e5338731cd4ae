"""Mixed-adapter batches: 8 sequences over 4 LoRA adapters (2 rows each) vs the same 8 on the base alone.

Both runs decode greedily on the bundled SmolLM2-135M in one `Batch` of 8 (continuous batching, as
the server does); the mixed run's model carries the 4 adapters (never merged: each row adds its own
adapter's update). Adapters are random PEFT folders of rank --rank on --targets. The two runs
alternate repetitions in one process; the table reports medians. Target (issue 17): mixed >= 0.8x base.

    .venv/bin/python bench/bench_multilora.py [--reps 5 --gen 64 --rank 16 --targets q,v --threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, median, update_section  # noqa: E402

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Three facts about owls:", "Once upon a time", "The best way to learn Python is",
           "List the planets of the solar system.", "A good breakfast has"]


def make_adapters(base, root: Path, n: int, rank: int, targets: tuple[str, ...]) -> dict[str, Path]:
    from llamaforge.api import Llama
    from llamaforge.lora import LoraConfig, apply_lora, lora_modules, save_adapter
    out = {}
    for i in range(n):
        model = Llama.load(base).model
        apply_lora(model, LoraConfig(r=rank, alpha=2 * rank, targets=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.05)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
        out[f"a{i}"] = save_adapter(model, root / f"a{i}")
    return out


def run(llm, bank, names, gen: int) -> tuple[float, float]:
    """(decode tokens/s over all rows, end-to-end tokens/s including the prefills) for one batch of 8."""
    from llamaforge.generate import Batch
    from llamaforge.sampling import SamplingParams
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    batch = Batch(llm.model, llm.tokenizer, max_batch=len(PROMPTS), adapters=bank)
    t0 = time.perf_counter()
    seqs = [batch.add(llm.tokenizer.encode(p), params, adapter=n) for p, n in zip(PROMPTS, names)]
    batch.step()
    t1 = time.perf_counter()
    while any(not s.finish_reason for s in seqs):
        batch.step()
    t2 = time.perf_counter()
    total = sum(len(s.out) for s in seqs)
    return (total - len(seqs)) / (t2 - t1), total / (t2 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llamaforge.api import Llama
    from llamaforge.multilora import AdapterBank
    from llamaforge.paths import default_model_path
    base = default_model_path()
    targets = tuple(args.targets.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(base, Path(tmp), 4, args.rank, targets)
        plain, multi = Llama.load(base), Llama.load(base)
        bank = AdapterBank(multi.model)
        for name, d in dirs.items():
            bank.load(name, d)
        names = [f"a{i % 4}" for i in range(len(PROMPTS))]
        run(plain, None, [None] * len(PROMPTS), 8)          # warm-up both
        run(multi, bank, names, 8)
        res: dict[str, list[tuple[float, float]]] = {"base": [], "mixed": []}
        for _ in range(args.reps):
            res["base"].append(run(plain, None, [None] * len(PROMPTS), args.gen))
            res["mixed"].append(run(multi, bank, names, args.gen))
    dec = {k: median([d for d, _ in v]) for k, v in res.items()}
    e2e = {k: median([e for _, e in v]) for k, v in res.items()}
    body = "\n".join([
        "## Mixed-adapter batches (multi-LoRA)", "",
        f"`bench/bench_multilora.py --reps {args.reps} --gen {args.gen} --rank {args.rank} --targets {args.targets} "
        f"--threads {args.threads}`: 8 sequences, greedy, {args.gen} tokens each, on the bundled SmolLM2-135M; "
        "mixed = 4 random LoRA adapters (2 rows each, unmerged, per-row updates) vs the same batch on the base. "
        f"Medians of {args.reps} alternating repetitions.", "",
        f"{machine_line()}", "",
        "| batch | decode tok/s (all rows) | end-to-end tok/s (with prefills) |", "|---|---|---|",
        f"| base alone | {dec['base']:.1f} | {e2e['base']:.1f} |",
        f"| 4 adapters mixed | {dec['mixed']:.1f} | {e2e['mixed']:.1f} |", "",
        f"Mixed / base: decode **{dec['mixed'] / dec['base']:.2f}x**, end-to-end **{e2e['mixed'] / e2e['base']:.2f}x** "
        "(target >= 0.8x).",
    ])
    print(body)
    if not args.no_write:
        update_section("multilora", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
