"""Inference benchmark: llamaforge vs llama.cpp (llama-cpp-python) vs transformers, same run.

Same GGUF, same prompt token ids, same thread count and token counts. Every engine runs in a fresh
process per measurement (so peak RSS is that engine's own), engines alternate within each
repetition and the order rotates between repetitions; the table reports medians (min-max).
Greedy decoding, batch 1. Then the quality of llamaforge's fast path (native kernels computing from
the GGUF's own blocks) against its float32 dequantized path: wikitext-2 perplexity and greedy
agreement on chat prompts, the repacking error of the fallback path (no native kernels: PyTorch's
int4/int8 kernels), and a profile of decode steps.

    .venv/bin/python bench/bench_inference.py            # writes section "inference" of docs/benchmarks.md
    .venv/bin/python bench/bench_inference.py --reps 5 --skip-quality

llama-cpp-python is installed on first use (it compiles llama.cpp from source, ~11 minutes here;
pip caches the wheel, so later installs take seconds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from _report import machine_line, median, update_section  # noqa: E402

ENGINES = ("llamaforge", "llama.cpp", "transformers")
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a prime number is to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "How do I make a cup of green tea?",
]


def ensure_peers() -> None:
    """Install the peers with pip when missing (llama-cpp-python builds once, then comes from pip's cache)."""
    for module, package in (("llama_cpp", "llama-cpp-python"), ("transformers", "transformers")):
        try:
            __import__(module)
        except ImportError:
            print(f"installing {package} (first time: llama-cpp-python compiles for ~11 minutes)", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", package], check=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ children: one engine, one measurement

def child_llama_cpp(model: str, ids: list[int], gen: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama
    t = time.perf_counter()
    llm = Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + gen + 16,
                n_batch=max(len(ids), 1), n_ubatch=max(len(ids), 1), verbose=False)
    load_s = time.perf_counter() - t
    nv = llm.n_vocab()

    def greedy(prompt: list[int], n: int) -> dict:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t_prefill = time.perf_counter()
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))))
        llm.eval([tok])
        t_first = time.perf_counter()
        for _ in range(n - 2):
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))))
            llm.eval([tok])
        t_end = time.perf_counter()
        return {"prefill_tok_s": len(prompt) / (t_prefill - t0), "decode_tok_s": max(n - 2, 1) / (t_end - t_first),
                "ttft_s": t_first - t0}

    greedy(ids[:16], 4)   # warm-up, as llamaforge bench does
    out = greedy(ids, gen)
    out.update(load_s=load_s)
    return out


def child_transformers(model: str, ids: list[int], gen: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    p = Path(model)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t

    @torch.inference_mode()
    def greedy(prompt: list[int], n: int) -> dict:
        t0 = time.perf_counter()
        out = hf(torch.tensor([prompt]), use_cache=True)
        t_prefill = time.perf_counter()
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        out = hf(tok.view(1, 1), past_key_values=past, use_cache=True)
        t_first = time.perf_counter()
        for _ in range(n - 2):
            tok = out.logits[0, -1].argmax()
            out = hf(tok.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
        t_end = time.perf_counter()
        return {"prefill_tok_s": len(prompt) / (t_prefill - t0), "decode_tok_s": max(n - 2, 1) / (t_end - t_first),
                "ttft_s": t_first - t0}

    greedy(ids[:16], 4)
    out = greedy(ids, gen)
    out.update(load_s=load_s)
    return out


def run_child(engine: str, args, ids_file: Path) -> dict:
    if engine == "llamaforge":
        cmd = [sys.executable, "-m", "llamaforge.cli", "bench", "--model", args.model, "--prompt-tokens",
               str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads), "--json"]
    else:
        cmd = [sys.executable, __file__, "--child", engine, "--model", args.model, "--ids-file", str(ids_file),
               "--gen-tokens", str(args.gen_tokens), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ quality of the fast path

def quality(model: str, threads: int, ppl_tokens: int, window: int) -> dict:
    import torch
    import torch.nn.functional as F
    from llamaforge.api import Llama
    torch.set_num_threads(threads)
    res: dict = {}
    fast = Llama.load(model, quantize="auto", max_seq_len=2048)
    flt = Llama.load(model, max_seq_len=2048)
    raw = ROOT.parent / "shared" / "data" / "eval" / "wikitext2_test.raw"
    if raw.exists():
        ids = fast.tokenizer.encode(raw.read_text(encoding="utf-8")[: ppl_tokens * 8])[:ppl_tokens]
        for name, llm in (("float32", flt), ("fast", fast)):
            nll, n = 0.0, 0
            t = time.perf_counter()
            for s in range(0, len(ids) - 1, window):
                w = ids[s:s + window]
                if len(w) < 2:
                    break
                logits = llm.logits(w)
                nll += float(F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
                n += len(w) - 1
            res[f"ppl_{name}"] = math.exp(nll / n)
            res[f"ppl_{name}_s"] = time.perf_counter() - t
        res["ppl_tokens"] = len(ids)
    agree = []
    for p in CHAT_PROMPTS:
        chat_ids = fast.encode_chat([{"role": "user", "content": p}])
        a = fast.complete(chat_ids, max_tokens=32).tokens
        b = flt.complete(chat_ids, max_tokens=32).tokens
        agree.append({"prompt": p, "same": a == b, "fast": fast.tokenizer.decode(a), "float32": flt.tokenizer.decode(b)})
    res["greedy"] = agree
    res["kinds"] = sorted({f"{type(m).__name__} ({getattr(m, 'qtype', '')})".replace(" ()", "")
                           for m in fast.model.modules() if type(m).__name__.startswith(("Int", "GGML"))})
    return res


def repack_errors(model: str) -> dict:
    from llamaforge.formats import load_checkpoint
    from llamaforge.quant.gguf_blocks import QTensor
    from llamaforge.quant.repack import _int8_rows, repack_error
    ck = load_checkpoint(model, dequantize=False)
    n = ck.args.n_layers
    pick = {f"layers.{i}." for i in (0, n // 2, n - 1)}
    by_type: dict[str, list[float]] = {}
    for name, t in ck.tensors.items():
        if not isinstance(t, QTensor) or not (name.startswith(tuple(pick)) or "embeddings" in name or name == "output.weight"):
            continue
        mod = _int8_rows(t, "cpu") if name in ("tok_embeddings.weight", "output.weight") else None
        key = f"{t.qtype} -> {'int8 per-row' if mod is not None or t.qtype not in ('Q4_0', 'Q4_1') else 'int4 g32'}"
        by_type.setdefault(key, []).append(repack_error(t, mod))
    return {k: (len(v), sum(v) / len(v), max(v)) for k, v in by_type.items()}


def profile_decode(model: str, threads: int, steps: int = 50) -> str:
    """Where a decode step's time goes, by Python-visible call (cProfile sees the native kernels by name,
    torch.profiler only sees aten ops)."""
    import cProfile
    import pstats
    import torch
    from llamaforge.api import Llama
    torch.set_num_threads(threads)
    llm = Llama.load(model, quantize="auto", max_seq_len=1024)
    m = llm.model
    cache = m.new_cache(1, 700)
    with torch.inference_mode():
        m(torch.arange(100, 612)[None], torch.arange(512)[None], cache, None, last_only=True)
        tok = torch.tensor([[5]])
        for i in range(3):
            m(tok, torch.tensor([[512 + i]]), cache, None, last_only=True)
        t = time.perf_counter()
        for i in range(steps):
            m(tok, torch.tensor([[515 + i]]), cache, None, last_only=True)
        step_ms = (time.perf_counter() - t) / steps * 1e3
        pr = cProfile.Profile()
        pr.enable()
        for i in range(steps):
            m(tok, torch.tensor([[515 + steps + i]]), cache, None, last_only=True)
        pr.disable()
    st = pstats.Stats(pr).stats
    rows = sorted(st.items(), key=lambda kv: kv[1][2], reverse=True)[:10]   # by own time
    total = sum(v[2] for v in st.values())
    lines = ["| call | calls / step | own ms / step (under cProfile) | share |", "| --- | ---: | ---: | ---: |"]
    for (file, line, func), (cc, nc, tt, ct, _) in rows:
        where = func if file == "~" else f"{Path(file).name}:{line} {func}"
        lines.append(f"| `{where}` | {nc / steps:.0f} | {tt / steps * 1e3:.2f} | {100 * tt / total:.0f}% |")
    lines.append(f"\nDecode step {step_ms:.2f} ms without the profiler ({threads} threads, 512 cached tokens); "
                 "`matmul` and `decode_attention` are llamaforge's native kernels, the rest is Python and small "
                 "torch ops.")
    return "\n".join(lines)


# ------------------------------------------------------------------ report

def fmt(xs: list[float], digits: int = 1) -> str:
    return f"{median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def chart(results: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    engines = [e for e in ENGINES if results.get(e)]
    metrics = [("decode_tok_s", "decode tokens/s"), ("prefill_tok_s", "prefill tokens/s"), ("peak_rss_mb", "peak RSS MiB")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = {"llamaforge": "#2b7bba", "llama.cpp": "#e07b39", "transformers": "#7f7f7f"}
    for ax, (key, label) in zip(axes, metrics):
        vals = [[r[key] for r in results[e]] for e in engines]
        meds = [median(v) for v in vals]
        err = [[m - min(v) for m, v in zip(meds, vals)], [max(v) - m for m, v in zip(meds, vals)]]
        ax.bar(engines, meds, yerr=err, capsize=4, color=[colors[e] for e in engines])
        ax.set_title(label)
        for i, m in enumerate(meds):
            ax.text(i, m, f"{m:.0f}", ha="center", va="bottom", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def report(args, results: dict, qual: dict | None, errors: dict | None, prof: str | None, wall: float) -> str:
    cmd = "python bench/bench_inference.py " + " ".join(sys.argv[1:])
    lines = ["## Inference: llamaforge vs llama.cpp vs transformers", "",
             f"`{cmd.strip()}` — {machine_line()}", "",
             f"Model `{Path(args.model).name}`; prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated "
             f"(greedy, batch 1), {args.threads} threads; {args.reps} alternating repetitions, each engine in a fresh "
             f"process per repetition; medians (min-max). llamaforge: `llamaforge bench --json` (quantize=auto: "
             f"llamaforge's native kernels compute in float32 straight from the GGUF's Q4_1/Q8_0 blocks); llama.cpp: llama-cpp-python "
             f"`Llama.eval` with argmax over the logits; transformers: `from_pretrained(gguf_file=...)` (dequantized "
             f"to float32), `DynamicCache`, argmax. Wall time of the whole run {wall / 60:.1f} min.", "",
             "| engine | decode tok/s | prefill tok/s | time to first token s | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for e in ENGINES:
        rs = results.get(e)
        if rs:
            lines.append(f"| {e} | {fmt([r['decode_tok_s'] for r in rs])} | {fmt([r['prefill_tok_s'] for r in rs])} | "
                         f"{fmt([r['ttft_s'] for r in rs], 3)} | {fmt([r['peak_rss_mb'] for r in rs], 0)} |")
    lf, lc = results.get("llamaforge"), results.get("llama.cpp")
    if lf and lc:
        ratio = lambda k: median([r[k] for r in lf]) / median([r[k] for r in lc])  # noqa: E731
        lines += ["", "Ratios llamaforge / llama.cpp (targets: decode >= 1.0, prefill >= 1.0, peak RSS <= 1.5): "
                  f"decode **{ratio('decode_tok_s'):.2f}x**, prefill **{ratio('prefill_tok_s'):.2f}x**, "
                  f"peak RSS **{ratio('peak_rss_mb'):.2f}x**."]
        tr = results.get("transformers")
        if tr:
            lines.append(f"llamaforge / transformers: decode {median([r['decode_tok_s'] for r in lf]) / median([r['decode_tok_s'] for r in tr]):.1f}x, "
                         f"prefill {median([r['prefill_tok_s'] for r in lf]) / median([r['prefill_tok_s'] for r in tr]):.1f}x.")
    lines += ["", "Per-repetition figures (decode / prefill tok/s):", ""]
    for e in ENGINES:
        if results.get(e):
            lines.append(f"- {e}: " + ", ".join(f"{r['decode_tok_s']:.1f} / {r['prefill_tok_s']:.0f}" for r in results[e]))
    lines += ["", f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset (OpenMP default: spinning)'} for "
              "every engine. Spinning is ~2-3x faster on an idle machine for both llamaforge and llama.cpp, and "
              "collapses on a busy one; compare only runs with the same policy and load.",
              "", f"Load average during the run (1 min, sampled before each measurement): {args.loads}. "
              "The machine is shared with other jobs, so absolute figures move by a large factor between runs; "
              "compare engines within a repetition.", "", "![inference chart](bench_inference.png)"]
    if qual:
        lines += ["", "### Quality of the fast path (native kernels) vs the float32 dequantized path", ""]
        if "ppl_fast" in qual:
            d = 100 * (qual["ppl_fast"] / qual["ppl_float32"] - 1)
            lines.append(f"wikitext-2 test perplexity, first {qual['ppl_tokens']} tokens, {args.window}-token windows: "
                         f"float32 {qual['ppl_float32']:.3f}, fast {qual['ppl_fast']:.3f} (**{d:+.2f}%**; target within 1%).")
        same = sum(g["same"] for g in qual["greedy"])
        lines += ["", f"Greedy output, first 32 tokens, identical on **{same} of {len(qual['greedy'])}** chat prompts "
                  "(target >= 4 of 5):", ""]
        for g in qual["greedy"]:
            lines.append(f"- {'same' if g['same'] else 'DIFFERENT'}: {g['prompt']!r} -> {g['fast'][:90]!r}"
                         + ("" if g["same"] else f" vs float32 {g['float32'][:90]!r}"))
        lines.append(f"\nFast-path modules: {', '.join(qual['kinds'])}.")
    if errors:
        lines += ["", "The native kernels compute with the file's own blocks: their dequantization is bit-identical to "
                  "gguf-py's (`tests/test_native.py`), so the fast path has no repacking error. Without them "
                  "(`LLAMAFORGE_NATIVE=0`, no compiler, or a GPU) tensors are repacked for PyTorch's int4/int8 kernels, "
                  "at this relative RMS error ||W_packed - W_gguf|| / ||W_gguf|| (layers 0, middle, last and the embedding):", "", "| GGUF type -> kernel | tensors | mean | max |",
                  "| --- | ---: | ---: | ---: |"]
        for k, (n, mean, mx) in errors.items():
            lines.append(f"| {k} | {n} | {mean:.4f} | {mx:.4f} |")
    if prof:
        lines += ["", "### Profile of a llamaforge decode step (cProfile, fast path)", "", prof]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing docs")
    ap.add_argument("--child", choices=("llama.cpp", "transformers"))
    ap.add_argument("--ids-file")
    args = ap.parse_args()
    if args.model is None:
        from llamaforge.paths import default_model_path
        args.model = str(default_model_path())

    if args.child:
        ids = json.loads(Path(args.ids_file).read_text())
        fn = child_llama_cpp if args.child == "llama.cpp" else child_transformers
        out = fn(args.model, ids, args.gen_tokens, args.threads)
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
        return

    ensure_peers()
    # every engine runs with the OpenMP wait policy of the environment (default: spinning); see benchmark.py
    from llamaforge.benchmark import prompt_ids
    from llamaforge.tokenizer import Tokenizer
    tok = Tokenizer.load(args.model)
    ids = prompt_ids(tok, args.prompt_tokens)
    engines = [e for e in args.engines.split(",") if e]
    results: dict[str, list[dict]] = {e: [] for e in engines}
    loads = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        ids_file = Path(d) / "ids.json"
        ids_file.write_text(json.dumps(ids))
        for rep in range(args.reps):
            order = engines[rep % len(engines):] + engines[:rep % len(engines)]
            for e in order:
                loads.append(os.getloadavg()[0])
                r = run_child(e, args, ids_file)
                results[e].append(r)
                print(f"rep {rep + 1}/{args.reps} {e:13s} decode {r['decode_tok_s']:7.1f} tok/s  prefill "
                      f"{r['prefill_tok_s']:7.1f} tok/s  ttft {r['ttft_s']:.3f} s  peak RSS {r['peak_rss_mb']:.0f} MiB",
                      flush=True)
    args.loads = f"median {median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
    qual = errors = prof = None
    if not args.skip_quality:
        qual = quality(args.model, args.threads, args.ppl_tokens, args.window)
        print({k: v for k, v in qual.items() if k != "greedy"}, [g["same"] for g in qual["greedy"]], flush=True)
        errors = repack_errors(args.model)
        prof = profile_decode(args.model, args.threads)
    md = report(args, results, qual, errors, prof, time.time() - t0)
    if args.no_write:
        print(md)
        return
    png = ROOT / "docs" / "bench_inference.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    chart(results, png, f"{Path(args.model).name}, {args.threads} threads, prompt {args.prompt_tokens}, "
                        f"gen {args.gen_tokens}; medians of {args.reps}")
    print("wrote", update_section("inference", md))


if __name__ == "__main__":
    main()
