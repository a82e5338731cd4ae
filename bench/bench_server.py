"""Serving benchmark: `llamaforge serve` vs `python -m llama_cpp.server` (llama-cpp-python).

Same GGUF, same thread count, same run: both servers start once, then for each number of
concurrent streaming clients (1, 4, 8, 16) the two are measured alternately, `--reps` times.
Each client sends `--requests` chat requests one after another (greedy, `--max-tokens` each).
Reported: aggregate generated tokens/s (all tokens / wall time; medians over repetitions), p50/p95
request latency (start to last token) and time to first token (pooled over repetitions), failed requests.
Tokens are counted by re-tokenizing each answer with the model's tokenizer, the same way for both.

    .venv/bin/python bench/bench_server.py            # writes section "server" of docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_line, median, update_section  # noqa: E402

TOPICS = ["a dragon", "the sea", "a robot", "a lost key", "the moon", "a small town", "a clockmaker", "winter",
          "a library", "a river", "an old map", "a lighthouse", "a garden", "a train", "a violin", "a storm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start in 300 s; see {log}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, topic: str, max_tokens: int) -> dict:
    return await stream_chat(client, url, {"model": model, "messages": [{"role": "user", "content":
                                                                         f"Write a story about {topic}"}],
                                           "max_tokens": max_tokens, "temperature": 0, "stream": True})


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat request: its text, its tool calls (deltas merged by index), latency, TTFT."""
    t0 = time.perf_counter()
    ttft, last, pieces, calls = None, None, [], {}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]}
                for c in chunk.get("choices") or []:
                    delta = c.get("delta") or {}
                    for d in delta.get("tool_calls") or ():
                        call = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
                        fn = d.get("function") or {}
                        call["id"] = d.get("id") or call["id"]
                        # the name once: llama-cpp-python repeats it in every delta of the call
                        call["name"] = call["name"] or fn.get("name") or ""
                        call["arguments"] += fn.get("arguments") or ""
                    text = (delta.get("content") or "") + "".join((d.get("function") or {}).get("arguments") or ""
                                                                  for d in delta.get("tool_calls") or ())
                    if text:
                        last = time.perf_counter() - t0
                        ttft = ttft or last
                        pieces.append(text)
    except httpx.HTTPError as e:
        return {"ok": False, "error": repr(e)}
    # latency: request start to the last token's text (the same chunks for both servers); the text
    # counted is what a client sees, content and arguments (not a server's own tool-call markup)
    return {"ok": bool(pieces), "text": "".join(pieces), "latency": last or 0.0, "ttft": ttft or 0.0,
            "calls": [calls[i] for i in sorted(calls)], "error": None if pieces else "empty answer"}


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}}]
CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Quito", "Perth", "Dakar"]


async def tool_round_trip(client: httpx.AsyncClient, url: str, model: str, city: str, tag: str,
                          max_tokens: int) -> list[dict]:
    """A tool client's exchange: a call to get_weather (named in tool_choice, the form both servers
    constrain), then its result sent back for an answer. A call whose arguments do not parse or
    validate against the schema is a failure."""
    import jsonschema
    messages = [{"role": "user", "content": f"What is the weather in {city}? (request {tag})"}]
    first = await stream_chat(client, url, {"model": model, "messages": messages, "tools": TOOLS, "temperature": 0,
                                            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                                            "max_tokens": max_tokens, "stream": True})
    if not first["ok"]:
        return [first]
    try:
        (call,) = first["calls"]
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    except (ValueError, AssertionError, jsonschema.ValidationError) as e:
        return [{**first, "ok": False, "error": f"malformed tool call {first['calls']}: {e}"}]
    messages += [{"role": "assistant", "content": "", "tool_calls": [
                     {"id": call["id"], "type": "function", "function": {"name": "get_weather",
                                                                         "arguments": call["arguments"]}}]},
                 {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    second = await stream_chat(client, url, {"model": model, "messages": messages, "tools": TOOLS, "temperature": 0,
                                             "max_tokens": max_tokens, "stream": True})
    return [first, second]


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int,
                    run: str = "", tools: bool = False) -> tuple[float, list[dict]]:
    """clients concurrent streams of requests each; run tags the prompts so that no two requests
    of a benchmark are the same (both servers can reuse a cached prompt prefix, so repeating a
    whole prompt would flatter them); the two servers get the same prompts. With tools, the even
    clients make tool round trips (two requests each) instead of stories."""
    async def client_loop(i: int, c: httpx.AsyncClient) -> list[dict]:
        out = []
        for k in range(requests):
            if tools and i % 2 == 0:
                out += await tool_round_trip(c, url, model, CITIES[(i + k) % len(CITIES)], f"{run}{i}.{k}", max_tokens)
            else:
                out.append(await one_request(c, url, model, f"{TOPICS[(i + k * clients) % len(TOPICS)]} "
                                                            f"(story {run}{i}.{k}).", max_tokens))
        return out
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client_loop(i, c) for i in range(clients)))
        wall = time.perf_counter() - t0
    return wall, [r for rs in results for r in rs]


def scheduler_counters(url: str) -> dict[str, float]:
    """llamaforge's own /metrics counters (decode steps, rows, seconds)."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("llamaforge_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User+system CPU seconds of each thread of a process (Linux /proc)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / hz
    return out


def cpu_profile(a, gguf: Path, env: dict[str, str], logs: Path) -> int:
    """--cpu: llamaforge alone; CPU time per generated token of the server process, by thread.

    CPU time, unlike wall time, hardly moves when other jobs share the cores, so it tells whether
    a change to the serving loop helped on a busy machine.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llamaforge.cli", "serve", "--model", str(gguf), "--port", str(port),
           "--max-batch", str(max(a.clients)), "--ctx", "1024", "--max-queue", "64"] + \
        ["--weights", a.weights]
    proc = start(cmd, url, env, logs / "bench_server_cpu.log")
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        for clients in [1] + a.clients:
            asyncio.run(run_level(url, model, clients, 1, 8, f"w{clients}."))
        print(f"llamaforge serve, {a.threads} thread(s), {a.requests} requests per client, max_tokens {a.max_tokens}")
        for clients in a.clients:
            m0, c0 = scheduler_counters(url), thread_cpu_seconds(proc.pid)
            wall, res = asyncio.run(run_level(url, model, clients, a.requests, a.max_tokens, f"c{clients}."))
            c1, m1 = thread_cpu_seconds(proc.pid), scheduler_counters(url)
            tokens = m1["llamaforge_generation_tokens_total"] - m0["llamaforge_generation_tokens_total"]
            per = sorted(((c1[t] - c0.get(t, 0.0), t) for t in c1), reverse=True)
            busy = ", ".join(f"{'main' if t == proc.pid else 'thread'} {1000 * v / max(tokens, 1):.2f}"
                             for v, t in per if v >= 0.01)
            print(f"{clients:>2} clients: {sum(v for v, _ in per) * 1000 / max(tokens, 1):.2f} ms CPU per token "
                  f"({busy}); {tokens:.0f} tokens, wall {wall:.1f}s, failed {sum(not r['ok'] for r in res)}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for both servers; 1 by default because on a shared machine a spinning "
                         "2-thread pool collapses (llama.cpp fell to ~1 tok/s with 2 threads under load)")
    ap.add_argument("--weights", default="blocks", choices=["blocks", "float"],
                    help="llamaforge computes with the GGUF's blocks (native kernels) or float32 weights "
                         "(the GGUF is 4-bit for llama.cpp too)")
    ap.add_argument("--mix", default="chat", choices=["chat", "tools"],
                    help="tools: half the clients make tool round trips (a call to a function named in "
                         "tool_choice, then its result sent back); writes section server-tools")
    ap.add_argument("--no-write", action="store_true", help="print the table without updating docs/benchmarks.md")
    ap.add_argument("--cpu", action="store_true",
                    help="llamaforge only: CPU time per generated token by thread (writes nothing)")
    a = ap.parse_args()

    from llamaforge.paths import default_model_path
    from llamaforge.tokenizer import Tokenizer
    gguf = Path(a.model) if a.model else default_model_path()
    tok = Tokenizer.load(gguf)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    max_batch = max(a.clients)
    ports = {"llamaforge": free_port(), "llama-cpp-python": free_port()}
    cmds = {
        "llamaforge": [sys.executable, "-m", "llamaforge.cli", "serve", "--model", str(gguf), "--port",
                       str(ports["llamaforge"]), "--max-batch", str(max_batch), "--ctx", "1024",
                       "--max-queue", "64", "--weights", a.weights],
        "llama-cpp-python": [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                             str(ports["llama-cpp-python"]), "--n_threads", str(a.threads), "--n_threads_batch",
                             str(a.threads), "--n_ctx", "1024",
                             # by default a new request interrupts the one streaming; queue them instead
                             "--interrupt_requests", "False"],
    }
    if a.cpu:
        return cpu_profile(a, gguf, env, logs)
    tools = a.mix == "tools"
    procs = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # so the servers are stopped below
    try:
        for name, cmd in cmds.items():
            procs[name] = start(cmd, f"http://127.0.0.1:{ports[name]}", env, logs / f"bench_server_{name}.log")
        models = {name: httpx.get(f"http://127.0.0.1:{ports[name]}/v1/models").json()["data"][0]["id"]
                  for name in cmds}
        # warm-up, alike for both: one request, then every concurrency level once with short answers
        # (first-call allocations, lazy init, kernels for each batch shape)
        for name in cmds:
            for clients in [1] + a.clients:
                asyncio.run(run_level(f"http://127.0.0.1:{ports[name]}", models[name], clients, 1, 8, f"w{clients}.",
                                      tools))
        load = os.getloadavg()[0]
        rows = {}
        for clients in a.clients:
            for rep in range(a.reps):
                order = list(cmds) if rep % 2 == 0 else list(cmds)[::-1]
                for name in order:
                    url = f"http://127.0.0.1:{ports[name]}"
                    before = scheduler_counters(url) if name == "llamaforge" else {}
                    wall, res = asyncio.run(run_level(f"http://127.0.0.1:{ports[name]}", models[name], clients,
                                                      a.requests, a.max_tokens, f"{clients}.{rep}.", tools))
                    ok = [r for r in res if r["ok"]]
                    tokens = sum(len(tok.encode(r["text"])) for r in ok)
                    row = rows.setdefault((clients, name), {"tps": [], "lat": [], "ttft": [], "failed": 0,
                                                            "tokens": []})
                    row["tps"].append(tokens / wall)
                    row["lat"] += [r["latency"] for r in ok]
                    row["ttft"] += [r["ttft"] for r in ok]
                    row["failed"] += len(res) - len(ok)
                    row["tokens"].append(tokens / max(len(ok), 1))
                    if before:
                        after = scheduler_counters(url)
                        for k in ("decode_steps_total", "decode_rows_total", "decode_seconds_total",
                                  "prefill_seconds_total", "prompt_tokens_total", "prompt_tokens_reused_total"):
                            row[k] = row.get(k, 0.0) + after.get("llamaforge_" + k, 0.0) - before.get("llamaforge_" + k, 0.0)
                        row["wall"] = row.get("wall", 0.0) + wall
                    print(f"{clients:>2} clients  {name:<17} {tokens / wall:7.1f} tok/s  wall {wall:6.1f}s  "
                          f"failed {len(res) - len(ok)}", flush=True)
                    for r in res:
                        if not r["ok"]:
                            print(f"   failed: {str(r['error'])[:300]}", flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    mix = ("Half the clients (the even ones) make tool round trips instead: a streamed request with "
           "`tools` (one function, get_weather, whose arguments schema has a string and an enum) and `tool_choice` "
           "naming it, the call's arguments checked (they must parse and validate against the schema, else the "
           "request counts as failed), then the call and a `tool` result sent back (with `tools`, tool_choice auto) "
           "for the answer: each of their requests is two. llama-cpp-python has tool calls only for a named "
           "tool_choice (its JSON-schema grammar; `auto` is plain chat for this model's template), so that is the "
           "mix both get; llamaforge also puts its tool prompt in the system message (SmolLM2's template has no "
           "tools; about 200 more prompt tokens) and with `auto` constrains the answer to text or calls. Tokens "
           "counted: the answer's text and a call's arguments as the client sees them (not llamaforge's "
           "`<tool_call>` markup around them); a call's name is taken from its first delta (llama-cpp-python "
           "repeats it in every delta, which the openai client's stream helper would concatenate). ") if tools else ""
    lines = [
        "## Serving: `llamaforge serve` vs `python -m llama_cpp.server`" + (", tool calling mix" if tools else ""),
        "",
        machine_line(),
        f"Load average at the start: {load:.1f} (other work shares this machine).",
        "",
        f"Command: `.venv/bin/python bench/bench_server.py --clients {' '.join(map(str, a.clients))} "
        f"--requests {a.requests} --max-tokens {a.max_tokens} --reps {a.reps} --threads {a.threads} "
        f"--weights {a.weights}" + (" --mix tools`" if tools else "`"),
        "",
        f"Model: `{gguf.name}`, {a.threads} thread{'s' if a.threads > 1 else ''} for both servers (OMP_NUM_THREADS / --n_threads), "
        f"llamaforge `--max-batch {max_batch}"
        f" --weights {a.weights}` (llama.cpp runs the GGUF's own "
        f"4-bit blocks). Each client streams {a.requests} chat requests one after "
        f"another (greedy, max_tokens {a.max_tokens}, the model's chat template with its default system prompt, "
        f"no two prompts alike). "
        f"{mix}Both servers are warmed up alike at every level first. Figures: aggregate tokens/s = median over {a.reps} "
        "repetitions; latency = request start to the last token's text, TTFT = to the first; latencies pooled "
        "over repetitions.",
        "",
        "| clients | server | aggregate tok/s | p50 latency s | p95 latency s | p50 TTFT s | tokens/answer | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (clients, name), r in rows.items():
        lines.append(f"| {clients} | {name} | {median(r['tps']):.1f} | {pct(r['lat'], 50):.2f} | {pct(r['lat'], 95):.2f} | "
                     f"{pct(r['ttft'], 50):.2f} | {median(r['tokens']):.0f} | {r['failed']} |")
    lines.append("")
    verdicts = []
    for clients in a.clients:
        lf, lc = rows[(clients, "llamaforge")], rows[(clients, "llama-cpp-python")]
        ratio = median(lf["tps"]) / median(lc["tps"])
        lat = pct(lf["lat"], 50) / pct(lc["lat"], 50)
        verdicts.append(f"- {clients} clients: throughput {ratio:.2f}x llama-cpp-python; p50 latency {lat:.2f}x")
    lines += ["Ratios (llamaforge / llama-cpp-python):", ""] + verdicts
    lines += ["", "Where llamaforge's time went (its own /metrics counters, summed over the repetitions):", "",
              "| clients | mean batch | ms per decode step | decode share of wall | prefill share of wall "
              "| prompt tokens from the prefix cache |",
              "|---:|---:|---:|---:|---:|---:|"]
    for clients in a.clients:
        r = rows[(clients, "llamaforge")]
        steps = max(r["decode_steps_total"], 1)
        lines.append(f"| {clients} | {r['decode_rows_total'] / steps:.1f} | {1000 * r['decode_seconds_total'] / steps:.0f} | "
                     f"{r['decode_seconds_total'] / r['wall']:.0%} | {r['prefill_seconds_total'] / r['wall']:.0%} | "
                     f"{r.get('prompt_tokens_reused_total', 0) / max(r.get('prompt_tokens_total', 0), 1):.0%} |")
    if 8 in a.clients and 1 in a.clients:
        r8 = median(rows[(8, "llamaforge")]["tps"]) / median(rows[(8, "llama-cpp-python")]["tps"])
        l1 = pct(rows[(1, "llamaforge")]["lat"], 50) / pct(rows[(1, "llama-cpp-python")]["lat"], 50)
        failed = sum(r["failed"] for r in rows.values())
        lines += ["", f"Targets: >= 3x aggregate throughput at 8 clients: {r8:.2f}x ({'met' if r8 >= 3 else 'not met'}); "
                      f"single-client latency <= 1.2x: {l1:.2f}x ({'met' if l1 <= 1.2 else 'not met'}); "
                      f"failed requests: {failed}."]
    if tools and 8 in a.clients:
        r8 = median(rows[(8, "llamaforge")]["tps"]) / median(rows[(8, "llama-cpp-python")]["tps"])
        failed = {name: sum(r["failed"] for (_, n), r in rows.items() if n == name) for name in cmds}
        lines += ["", f"Target (issue #17): >= 3x aggregate throughput at 8 clients, half calling tools: {r8:.2f}x "
                      f"({'met' if r8 >= 3 else 'not met'}); failed or malformed responses: "
                      + ", ".join(f"{n} {f}" for n, f in failed.items()) + "."]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        print(f"wrote {update_section('server-tools' if tools else 'server', body)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
