"""A kernel change measured against an earlier revision's kernels, in one process.

On a shared VM a fresh-process ratio against llama.cpp moves by +-15% between runs, too much to see
a kernel change of 10-20%. This builds the native kernels of an earlier git revision next to the
current ones, loads the model once, and times whole decode steps with every module's kernel module
swapped between the two builds, alternating and rotating the order; it prints the medians.
With --prefill it times the prompt's forward (the first step of a new sequence) instead.

    .venv/bin/python bench/bench_kernel_ab.py --model /work/models/llama2-7b-shaped.Q4_K_M.gguf --baseline e51f816
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from _report import machine_line  # noqa: E402


def build_revision(rev: str, where: Path):
    """The kernels of git revision `rev`, compiled with the current build flags."""
    from torch.utils.cpp_extension import load
    from llamaforge import native
    src = where / "kernels"
    src.mkdir(parents=True)
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:src/llamaforge/kernels"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        data = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/llamaforge/kernels/{name}"],
                              check=True, capture_output=True).stdout
        (src / name).write_bytes(data)
    tag = "".join(c for c in rev if c.isalnum())[:12]
    print(f"building the kernels of {rev} (a minute or two)", flush=True)
    return load(name=f"llamaforge_kernels_ab_{tag}", sources=[str(p) for p in sorted(src.glob("*.cpp"))],
                extra_cflags=native._FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(where), verbose=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", required=True, help="git revision whose kernels to compare against")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (the cache length decode attends over)")
    ap.add_argument("--rows", type=int, default=1, help="sequences decoding together (batched decode)")
    ap.add_argument("--activations", choices=("auto", "int8", "f32"), default="auto")
    ap.add_argument("--prefill", action="store_true", help="time the prompt's forward, not decode steps")
    args = ap.parse_args()
    import torch
    from llamaforge import native
    from llamaforge.benchmark import prompt_ids
    from llamaforge.commands import load_model
    from llamaforge.generate import Batch
    from llamaforge.quant import ggml
    from llamaforge.sampling import SamplingParams
    torch.set_num_threads(args.threads)
    ggml.set_activations(args.activations)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {args.baseline: build_revision(args.baseline, Path(tmp)), "current": native.kernels()}
        llm = load_model(args.model, None, "none")
        mods = [m for m in llm.model.modules() if hasattr(m, "_k")]
        ids = prompt_ids(llm.tokenizer, args.prompt + args.rows)
        rates: dict[str, list[float]] = {name: [] for name in builds}
        order = list(builds)
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                for m in mods:
                    m._k = builds[name]
                batch = Batch(llm.model, llm.tokenizer, max_batch=args.rows, max_seq=args.prompt + args.rows + args.steps + 8,
                              prefill_chunk=512)
                if args.prefill:   # one prompt of args.prompt tokens, prefilled by one step
                    t = time.perf_counter()
                    batch.add(ids[rep % args.rows:rep % args.rows + args.prompt], SamplingParams(max_tokens=2, temperature=0.0))
                    batch.step()
                    rates[name].append(args.prompt / (time.perf_counter() - t))
                    continue
                for r in range(args.rows):   # different prompts, each prefilled by its own step
                    batch.add(ids[r:r + args.prompt], SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True))
                for _ in range(args.rows + 1):
                    batch.step()
                t = time.perf_counter()
                for _ in range(args.steps):
                    batch.step()
                rates[name].append(args.rows * args.steps / (time.perf_counter() - t))
    base, cur = statistics.median(rates[args.baseline]), statistics.median(rates["current"])
    what = "prefill" if args.prefill else "decode"
    print(f"{Path(args.model).name}: {what} {cur:.2f} tok/s with the current kernels, {base:.2f} with {args.baseline}'s:"
          f" {cur / base:.3f}x ({args.threads} threads, {args.rows} sequence(s) of {args.prompt} prompt tokens,"
          f" {args.activations} activations,"
          f" {args.reps} alternating reps" + ("" if args.prefill else f" of {args.steps} steps") + ", medians)")
    print(machine_line())


if __name__ == "__main__":
    main()
