"""`llamaforge quantize` vs llama.cpp's quantizer on the bundled SmolLM2 (issue 13 item 5).

    python bench/bench_quantize.py --limit 40      # writes section "quantize" of docs/benchmarks.md

The bundled Q4_1 model is dequantized to an F32 GGUF; both quantizers write each file type from it
(llamaforge in this process, llama.cpp's ``llama_model_quantize`` in a child with the same thread
count); the script compares every tensor's type and bytes, the wall time of each quantizer, and the
wikitext-2 perplexity of both files (llamaforge's evaluator, float32 arithmetic on the file's weights,
1024-token windows, stride 512; --limit windows, 0 = the whole test file). When every tensor is
byte-identical the second file's perplexity is the first's and is not computed again.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from _report import machine_line, update_section  # noqa: E402

from llamaforge.eval.harness import run_evaluation  # noqa: E402
from llamaforge.formats import load_checkpoint  # noqa: E402
from llamaforge.formats.gguf import parse, write  # noqa: E402
from llamaforge.paths import default_model_path  # noqa: E402
from llamaforge.quant.command import quantize  # noqa: E402

TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1")
_CHILD = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), ftype, str(threads)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp's quantizer failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def same_tensors(a: Path, b: Path) -> tuple[int, int, dict[str, int]]:
    ta, tb = {t.name: t for t in parse(a)[2]}, {t.name: t for t in parse(b)[2]}
    same = sum(ta[n].qtype == tb[n].qtype and np.array_equal(np.asarray(ta[n].data).view(np.uint8),
                                                             np.asarray(tb[n].data).view(np.uint8)) for n in ta)
    types: dict[str, int] = {}
    for t in ta.values():
        types[t.qtype] = types.get(t.qtype, 0) + 1
    return same, len(ta), types


def ppl(path: Path, limit: int | None) -> dict:
    return run_evaluation(str(path), ["wikitext2"], limit=limit, quantize=None, progress=False)["wikitext2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--limit", type=int, default=40, help="wikitext-2 windows (0 = all 590)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    limit = args.limit or None
    rows = []
    with tempfile.TemporaryDirectory() as d:
        f32 = Path(d) / "smollm2-f32.gguf"
        write(f32, load_checkpoint(default_model_path()), qtype="f32")
        for ft in args.types:
            ours, ref = Path(d) / f"ours-{ft}.gguf", Path(d) / f"ref-{ft}.gguf"
            t = time.perf_counter()
            quantize(str(f32), type=ft, output=str(ours))
            t_ours = time.perf_counter() - t
            t_ref = llama_cpp_quantize(f32, ref, ft, args.threads)
            same, n, types = same_tensors(ours, ref)
            p_ours = ppl(ours, limit)
            # identical tensors give an identical perplexity under the same evaluator: computed once then
            p_ref = dict(p_ours, shared=True) if same == n else ppl(ref, limit)
            rows.append((ft, types, same, n, ours.stat().st_size / 2**20, t_ours, t_ref, p_ours, p_ref))
            print(rows[-1][:7], p_ours["token_ppl"], p_ref["token_ppl"], flush=True)
    cmd = "python bench/bench_quantize.py " + " ".join(sys.argv[1:])
    scored = rows[0][7]
    lines = ["## Quantizer: `llamaforge quantize` vs llama.cpp's `llama_model_quantize`", "",
             f"`{cmd.strip()}` — {machine_line()}", "",
             "Source: the bundled SmolLM2-135M-Instruct Q4_1 dequantized to an F32 GGUF; both quantizers write each "
             "type from that file (llama.cpp in a child process, "
             f"{args.threads} threads; llamaforge's numpy quantizers in one thread). Perplexity: wikitext-2 test, "
             f"llamaforge's evaluator with float32 arithmetic on each file's weights, {scored['window']}-token windows, "
             f"stride {scored['stride']}, {scored['tokens']} tokens scored "
             f"({'the whole file' if limit is None else f'first {limit} windows'}). SmolLM2's 576-wide rows are "
             "not a multiple of 256, so K-quant mixes fall back as llama.cpp's do (Q4_K -> Q5_0, Q5_K -> Q5_1, "
             "Q6_K -> Q8_0); only `ffn_down` (1536-wide rows) is K-quantized.", "",
             "| type | tensor types (ours) | tensors byte-identical to llama.cpp's | MiB | quantize s ours / llama.cpp "
             "| token ppl ours | token ppl llama.cpp | difference |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ft, types, same, n, mib, t_o, t_r, p_o, p_r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(types.items()))
        d = 100 * (p_o["token_ppl"] / p_r["token_ppl"] - 1)
        ref = "same tensors" if p_r.get("shared") else f"{p_r['token_ppl']:.3f}"
        lines.append(f"| {ft} | {kinds} | {same} / {n} | {mib:.1f} | {t_o:.1f} / {t_r:.1f} | {p_o['token_ppl']:.3f} "
                     f"| {ref} | {d:+.2f}% |")
    lines += ["", "Target (issue 13): each type's perplexity within 1% of llama.cpp's file. The quick form is "
              "`tests/test_quant.py::test_bundled_quantized_perplexity_matches_llama_cpp` (512 tokens, marked slow); "
              "`test_quantize_matches_llama_cpp_quantizer` checks byte equality on random tensors of every shape rule."]
    md = "\n".join(lines)
    if args.no_write:
        print(md)
    else:
        print("wrote", update_section("quantize", md))


if __name__ == "__main__":
    main()
