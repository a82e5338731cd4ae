"""`make bench`: every benchmark that compares llamaforge with its peer on the bundled model, one after
another, each in its own process (so one's memory and threads never touch the next's timings).

Each script writes its own section of docs/benchmarks.md with the machine line. A failure is
reported and the rest still run; the exit status says whether all passed. Slow ones (alignment,
LoRA training, the quality half of the inference benchmark) are in --all only. The Llama-shaped
7B/1.1B scale rows need files made by bench/make_llama_shaped.py: run
`bench/bench_inference.py --model FILE` for each (see docs/benchmarks.md).

    .venv/bin/python bench/run_all.py [--all] [--only inference,server]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, arguments): quick enough for one sitting on 2 cores (minutes each)
QUICK = [
    ("inference", ["bench_inference.py", "--reps", "5", "--skip-quality"]),
    ("server", ["bench_server.py"]),
    ("server-tools", ["bench_server.py", "--mix", "tools"]),
    ("embeddings", ["bench_embeddings.py"]),
    ("multilora", ["bench_multilora.py"]),
    ("speculative", ["bench_speculative.py"]),
    ("guard", ["bench_guard.py"]),
]
SLOW = [
    ("inference-quality", ["bench_inference.py"]),
    ("quantize", ["bench_quantize.py", "--limit", "40"]),
    ("lora", ["bench_lora.py"]),
    ("align", ["bench_align.py"]),
    ("align-targets", ["bench_align_targets.py"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="also the slow benchmarks")
    ap.add_argument("--only", help="comma-separated names: " + ", ".join(n for n, _ in QUICK + SLOW))
    args = ap.parse_args()
    todo = QUICK + (SLOW if args.all else [])
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {n for n, _ in QUICK + SLOW}
        if unknown:
            print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        todo = [(n, a) for n, a in QUICK + SLOW if n in wanted]
    failed = []
    for name, argv in todo:
        print(f"== {name}: {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent).returncode
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
