"""Embeddings benchmark: llamaforge (`Llama.embed` and `POST /v1/embeddings`) vs llama-cpp-python's
`Llama(model, embedding=True).create_embedding`, on the same GGUF, with the same thread count.

One batch = `--batch` texts of exactly `--tokens` tokens each (the same ids for both tokenizers,
checked; no BOS, as neither adds one for the bundled model). Both pool the same way: mean over the
input's tokens of the final normed hidden states (llama.cpp with `pooling_type=LLAMA_POOLING_TYPE_MEAN`:
its default for a causal LM is no pooling); llamaforge also L2-normalises, llama.cpp's
`create_embedding` does not (a 32 x 576 normalisation costs microseconds). Each engine runs in its own
process (the server too), warmed up; `--rounds` rounds alternate the order of the three, each
timing `--reps` batches; figures are medians of all timed batches, in inputs/s.

    .venv/bin/python bench/bench_embeddings.py          # writes section "embeddings" of docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, machine_line, median, update_section  # noqa: E402
from bench_server import free_port, start  # noqa: E402

WORDS = ("the river carried old leaves past the mill while children counted boats and a baker sang about bread "
         "mountains weather letters gardens trains music silver clocks lanterns harbours").split()


def make_texts(tok, n: int, tokens: int) -> list[str]:
    """n different texts of exactly `tokens` tokens (cut in tokens, decoded, re-checked)."""
    out = []
    i = 0
    while len(out) < n:
        words = [WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(tokens * 2)]
        ids = tok.encode(f"Note {i}: " + " ".join(words), bos=False)[:tokens]
        text = tok.decode(ids)
        if tok.encode(text, bos=False) == ids:
            out.append(text)
        i += 1
    return out


# ------------------------------------------------------------------ children: one engine each
def child_llamaforge(model: str, texts: list[str], reps: int, threads: int, tokens: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from llamaforge import Llama
    llm = Llama.load(model)
    ids = llm.embedding_ids(texts)
    llm.embed(texts[:4])
    vecs = llm.embed(texts)                  # warm-up at the measured shape
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        llm.embed(texts)
        times.append(time.perf_counter() - t)
    return {"times": times, "lengths": [len(s) for s in ids], "first": vecs[0].tolist()}


def child_llama_cpp(model: str, texts: list[str], reps: int, threads: int, tokens: int) -> dict:
    import numpy as np
    import llama_cpp
    from llamaforge.llama_cpp_peer import amx_off, disable_extra_bufts
    if amx_off():
        disable_extra_bufts()
    n = 1 << max(len(texts) * tokens - 1, 2047).bit_length()   # the batch's tokens, a power of two >= 2048
    llm = llama_cpp.Llama(model, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=n,
                          n_batch=n, n_ubatch=n, n_threads=threads, n_threads_batch=threads, verbose=False)
    lengths = [len(llm.tokenize(t.encode(), add_bos=True)) for t in texts]   # as create_embedding tokenizes
    llm.create_embedding(texts[:4])
    first = llm.create_embedding(texts)["data"][0]["embedding"]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        llm.create_embedding(texts)
        times.append(time.perf_counter() - t)
    v = np.asarray(first)
    return {"times": times, "lengths": lengths, "first": (v / np.linalg.norm(v)).tolist(), "amx_off": amx_off()}


def run_child(engine: str, args, texts_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", args.model, "--texts-file", str(texts_file),
           "--reps", str(args.reps), "--threads", str(args.threads), "--tokens", str(args.tokens)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http_reps(url: str, texts: list[str], reps: int) -> dict:
    body = {"input": texts, "encoding_format": "base64"}    # what the openai client asks for by default

    def once() -> list:
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["data"]
    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        data = once()
        times.append(time.perf_counter() - t)
    import numpy as np
    return {"times": times, "first": np.frombuffer(base64.b64decode(data[0]["embedding"]), "<f4").tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the bundled SmolLM2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed batches per engine per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", choices=("llamaforge", "llama.cpp"))
    ap.add_argument("--texts-file")
    a = ap.parse_args()
    if a.model is None:
        from llamaforge.paths import default_model_path
        a.model = str(default_model_path())
    if a.child:
        texts = json.loads(Path(a.texts_file).read_text())
        fn = child_llamaforge if a.child == "llamaforge" else child_llama_cpp
        print(json.dumps(fn(a.model, texts, a.reps, a.threads, a.tokens)))
        return 0

    from llamaforge.tokenizer import Tokenizer
    texts = make_texts(Tokenizer.load(a.model), a.batch, a.tokens)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    texts_file = logs / "embedding_texts.json"
    texts_file.write_text(json.dumps(texts))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(a.threads))
    server = start([sys.executable, "-m", "llamaforge.cli", "serve", "--model", a.model, "--port", str(port),
                    "--threads", str(a.threads)], url, env, logs / "bench_embeddings_server.log")
    load = os.getloadavg()[0]
    results: dict[str, dict] = {}
    try:
        engines = ["llamaforge", "llamaforge HTTP", "llama.cpp"]
        for rnd in range(a.rounds):
            for name in (engines if rnd % 2 == 0 else engines[::-1]):
                r = http_reps(url, texts, a.reps) if name == "llamaforge HTTP" else run_child(name, a, texts_file)
                agg = results.setdefault(name, {"times": []})
                agg["times"] += r["times"]
                agg.update({k: v for k, v in r.items() if k != "times"})
                print(f"round {rnd}  {name:<16} {a.batch / median(r['times']):6.1f} inputs/s", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    for name in ("llamaforge", "llama.cpp"):
        bad = [n for n in results[name]["lengths"] if n != a.tokens]
        if bad:
            raise SystemExit(f"{name} tokenized some texts to {bad} tokens, not {a.tokens}")
    import numpy as np
    ref = np.asarray(results["llamaforge"]["first"])
    agree = {name: float(np.dot(ref, np.asarray(r["first"]))) for name, r in results.items()}
    rate = {name: a.batch / median(r["times"]) for name, r in results.items()}
    ratio = rate["llamaforge"] / rate["llama.cpp"]
    cmd = (f".venv/bin/python bench/bench_embeddings.py --batch {a.batch} --tokens {a.tokens} --threads {a.threads} "
           f"--reps {a.reps} --rounds {a.rounds}")
    lines = [
        "## Embeddings: `Llama.embed` and `POST /v1/embeddings` vs llama-cpp-python's `create_embedding`", "",
        machine_line(), f"Load average at the start: {load:.1f} (other work shares this machine).", "",
        f"Command: `{cmd}`", "",
        f"Model: `{Path(a.model).name}` (its own quantized blocks in both), {a.threads} threads for each "
        f"(`torch.set_num_threads`, `serve --threads`, llama.cpp's `n_threads`/`n_threads_batch`). A batch is "
        f"{a.batch} different texts of exactly {a.tokens} tokens (in both tokenizers, checked), embedded in one "
        "call (llama.cpp: one `create_embedding` with `n_batch` = `n_ubatch` above the batch's tokens, so one decode); "
        "both mean-pool the final normed hidden states (llama.cpp with `pooling_type` MEAN, as its default for "
        "this model is none). The HTTP figure includes the request, base64 answer (the `openai` client's default) "
        f"and JSON. Medians over {a.rounds} rounds x {a.reps} batches, the engines' order alternating by round.", "",
        "| engine | inputs/s | tokens/s | s per batch | cosine of input 0 with llamaforge's |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {rate[name]:.1f} | {rate[name] * a.tokens:.0f} | {median(r['times']):.3f} | "
                     f"{agree[name]:.5f} |")
    lines += ["", f"Ratio llamaforge / llama-cpp-python: {ratio:.2f}x (Python API), "
                  f"{rate['llamaforge HTTP'] / rate['llama.cpp']:.2f}x (HTTP). Target >= 1.0x: "
                  f"{'met' if ratio >= 1.0 else 'not met'}. Spread of llamaforge's batches: "
                  f"{statistics.pstdev(results['llamaforge']['times']) / median(results['llamaforge']['times']):.0%} "
                  "of the median."]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        print(f"wrote {update_section('embeddings', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
