"""Batched log-likelihood scoring and the `llamaforge evaluate` entry point.

`LM` wraps a loaded `Llama` and offers what tasks need: `loglikelihood` of (context, continuation)
string pairs, `rolling` log-likelihood of a long token stream, and greedy `generate`. Scoring groups
requests by context: each distinct context runs once into a KV cache, the cache rows are copied to
every continuation of that context, and all continuations of a batch run in one more forward pass.
Pairs are tokenized the way lm-evaluation-harness does (trailing context whitespace moves into the
continuation; continuation ids are the tail of encode(context + continuation)).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..api import Weights
from ..commands import Quantize, load_model
from ..fileio import atomic_write_json
from ..generate import Batch
from ..sampling import SamplingParams
from .base import RunConfig
from .tasks import get_task

log = logging.getLogger(__name__)

# Tokens of one batch (rows x padded length): bounds activation and attention memory.
MAX_BATCH_TOKENS = 8192


class LM:
    """A model + tokenizer seen through the three request types of an evaluation."""

    def __init__(self, llm, batch_size: int = 16, progress: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.llm = llm
        self.model = llm.model
        self.tok = llm.tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.max_len = llm.model.args.max_seq_len
        self.device = llm.model.rope_cos.device
        # an empty context still needs one token to predict from (lm-eval's prefix token)
        self.prefix_id = self.tok.bos_id if self.tok.bos_id is not None and self.tok.bos_id >= 0 else self.tok.eos_id

    # -- tokenization ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        return self.tok.encode(text, bos=self.tok.add_bos if bos is None else bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-evaluation-harness splits them."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_id], self.encode(continuation, bos=False)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring -----------------------------------------------------------------------------
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it, per pair."""
        return self.score_ids([self.encode_pair(c, x) for c, x in pairs], desc=desc)

    @torch.inference_mode()
    def score_ids(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "scoring",
                  token_logprobs: bool = False) -> list[Any]:
        """Score (context ids, continuation ids) requests; deterministic for a given batch_size.

        Returns (sum logprob, is_greedy) per request, or the per-token logprob lists when
        token_logprobs is set. Contexts longer than the window are cut from the left, as lm-eval does.
        """
        reqs = [self._fit(list(map(int, c)), list(map(int, x))) for c, x in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(reqs):
            groups.setdefault(tuple(ctx), []).append(i)
        # longest first, so padding stays small and an out-of-memory shows up at once
        order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(reqs[i][1]) for i in kv[1])))
        units = [(ctx, idx[k:k + self.batch_size]) for ctx, idx in order for k in range(0, len(idx), self.batch_size)]
        out: list[Any] = [None] * len(reqs)
        bar = _bar(len(reqs), desc, self.progress)
        for batch in self._batches(units, reqs):
            # sharing pays when a context has several continuations; padded positions must also stay
            # inside the model's window (RoPE table) or the flat path, which needs no padding rows, runs
            widest = max(len(ctx) for ctx, _ in batch) + max(len(reqs[i][1]) for _, idx in batch for i in idx)
            shared = any(len(idx) > 1 for _, idx in batch) and widest <= self.max_len
            results = self._run_shared(batch, reqs) if shared else self._run_flat(batch, reqs)
            for i, lps in results:
                out[i] = lps if token_logprobs else (float(sum(lp for lp, _ in lps)), all(g for _, g in lps))
                bar.update(1)
        bar.close()
        if token_logprobs:
            return [[lp for lp, _ in r] for r in out]
        return out

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        if not cont:
            raise ValueError("a continuation encodes to no tokens")
        if len(cont) > self.max_len:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the context window of {self.max_len}")
        if not ctx:
            ctx = [self.prefix_id]
        room = self.max_len + 1 - len(cont)          # the model reads ctx + cont[:-1]
        return ctx[-room:], cont

    def _batches(self, units, reqs):
        batch, rows, width = [], 0, 0
        for ctx, idx in units:
            w = len(ctx) + max(len(reqs[i][1]) for i in idx)
            if batch and (rows + len(idx) > self.batch_size or (rows + len(idx)) * max(width, w) > MAX_BATCH_TOKENS):
                yield batch
                batch, rows, width = [], 0, 0
            batch.append((ctx, idx))
            rows, width = rows + len(idx), max(width, w)
        if batch:
            yield batch

    def _pick(self, hidden: torch.Tensor, targets: list[list[int]]) -> list[list[tuple[float, bool]]]:
        """hidden [N, D] rows in order of the concatenated targets -> (logprob, is_argmax) per target."""
        flat = torch.tensor([t for ts in targets for t in ts], device=hidden.device)
        lps, greedy = [], []
        for s in range(0, hidden.shape[0], 1024):  # bounded [chunk, vocab] logits
            logits = self.model.output(hidden[s:s + 1024]).float()
            tgt = flat[s:s + 1024]
            logp = torch.log_softmax(logits, -1)
            lps.append(logp.gather(1, tgt[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == tgt)
        lp, gr = torch.cat(lps).tolist(), torch.cat(greedy).tolist()
        out, k = [], 0
        for ts in targets:
            out.append(list(zip(lp[k:k + len(ts)], gr[k:k + len(ts)])))
            k += len(ts)
        return out

    def _run_flat(self, batch, reqs):
        """One causal pass over ctx + cont[:-1] per request (no context is shared)."""
        rows = [(list(ctx) + reqs[i][1][:-1], len(ctx), i) for ctx, idx in batch for i in idx]
        width = max(len(r) for r, _, _ in rows)
        toks = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (r, _, _) in enumerate(rows):
            toks[b, :len(r)] = torch.tensor(r)
        h = self.model.hidden(toks.to(self.device))                       # [R, T, D]
        picked = torch.cat([h[b, n - 1:n - 1 + len(reqs[i][1])] for b, (_, n, i) in enumerate(rows)])
        res = self._pick(picked, [reqs[i][1] for _, _, i in rows])
        return [(i, r) for (_, _, i), r in zip(rows, res)]

    def _run_shared(self, batch, reqs):
        """Each context once into the cache, copied to its continuations' rows, then all continuations."""
        row_of = []                                   # (request index, group number)
        for g, (_, idx) in enumerate(batch):
            row_of += [(i, g) for i in idx]
        R, G = len(row_of), len(batch)
        ctx_lens = [len(ctx) for ctx, _ in batch]
        cont_in = [reqs[i][1][:-1] for i, _ in row_of]
        Lk = max(len(c) for c in cont_in)
        need = max(ctx_lens) + Lk
        cache = self.model.exact_cache(R, need)
        first = []                                    # the cache row each group's context goes to
        for g in range(G):
            first.append(next(r for r, (_, gg) in enumerate(row_of) if gg == g))
        # 1) contexts, right-padded (pad keys land beyond each context and are overwritten below)
        Lc = max(ctx_lens)
        toks = torch.zeros(G, Lc, dtype=torch.long)
        for g, (ctx, _) in enumerate(batch):
            toks[g, :len(ctx)] = torch.tensor(ctx)
        pos = torch.arange(Lc).expand(G, Lc)
        slots = torch.tensor(first)
        h = self.model.hidden(toks.to(self.device), pos.to(self.device), cache, slots.to(self.device))
        last = h[torch.arange(G), torch.tensor(ctx_lens) - 1]           # [G, D] predicts each cont[0]
        # 2) fork: every row gets a copy of its group's context keys/values
        src = torch.tensor([first[g] for _, g in row_of], device=self.device)
        cache.k.copy_(cache.k[:, src])
        cache.v.copy_(cache.v[:, src])
        # 3) the continuations (minus their last token) at positions after their context, in runs of
        #    similar length so that short choices are not padded to the longest one
        h2: dict[int, torch.Tensor] = {}
        for run in _length_runs([len(c) for c in cont_in]):
            width = len(cont_in[run[0]])
            toks = torch.zeros(len(run), width, dtype=torch.long)
            for b, r in enumerate(run):
                toks[b, :len(cont_in[r])] = torch.tensor(cont_in[r])
            pos = torch.tensor([ctx_lens[row_of[r][1]] for r in run])[:, None] + torch.arange(width)[None]
            h = self.model.hidden(toks.to(self.device), pos.to(self.device), cache,
                                  torch.tensor(run, device=self.device))
            for b, r in enumerate(run):
                h2[r] = h[b, :len(cont_in[r])]
        pieces = []
        for r, (i, g) in enumerate(row_of):
            pieces.append(last[g:g + 1])
            if r in h2:
                pieces.append(h2[r])
        res = self._pick(torch.cat(pieces), [reqs[i][1] for i, _ in row_of])
        return [(i, rr) for (i, _), rr in zip(row_of, res)]

    def rolling(self, ids: Sequence[int], window: int, stride: int, limit: int | None = None,
                desc: str = "perplexity") -> tuple[float, int]:
        """Sliding-window log-likelihood of a token stream: (sum logprob, tokens scored).

        Windows of `window` tokens move by `stride`; each scores only the tokens the previous window
        did not, so every token after the first is scored once with at least window - stride tokens
        of context (the first is predicted from the prefix token). limit: score only that many windows.
        """
        window = min(window, self.max_len)
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
        ids = [self.prefix_id] + [int(t) for t in ids]
        requests, done = [], 1                        # ids[0] is the prefix: nothing to score
        while done < len(ids):
            end = min(done + stride, len(ids))
            start = max(0, end - 1 - window)          # the model reads ids[start:end-1]
            requests.append((ids[start:done], ids[done:end]))
            done = end
        if limit is not None:
            requests = requests[:limit]
        lls = self.score_ids(requests, desc=desc)
        return sum(ll for ll, _ in lls), sum(len(c) for _, c in requests)

    # -- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], *, max_tokens: int, stop: Sequence[str] = (),
                 desc: str = "generating") -> list[str]:
        """Greedy completions by continuous batching: up to batch_size sequences decode together.

        Each sequence stops on its own (a stop string, an end-of-generation token or max_tokens) and
        its slot goes at once to the next prompt, so the batch stays full instead of waiting for its
        longest answer. Prompts go longest first (similar lengths share a step's attention width).
        Prompts too long for the window lose their oldest tokens, keeping room for max_tokens, as
        lm-eval does. The result depends only on the inputs and batch_size.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        keep = max(1, self.max_len - max_tokens)
        ids = [(self.encode(p) if isinstance(p, str) else [int(t) for t in p])[-keep:] for p in prompts]
        if any(not x for x in ids):
            raise ValueError("a prompt encodes to no tokens")
        out: list[str] = [""] * len(ids)
        if not ids:
            return out
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))
        need = min(max(len(x) for x in ids) + max_tokens, self.max_len)
        batch = Batch(self.model, self.tok, max_batch=min(self.batch_size, len(ids)), max_seq=need,
                      prefill_chunk=need)
        todo = sorted(range(len(ids)), key=lambda i: -len(ids[i]))[::-1]   # pop() takes the longest
        owner: dict[int, int] = {}                     # id(Sequence) -> prompt index
        bar = _bar(len(ids), desc, self.progress)
        while todo or batch.active:
            while todo and batch.free:
                i = todo.pop()
                owner[id(batch.add(ids[i], params))] = i
            # rows in slot order: when every slot is busy the cache is read in place, not gathered
            batch.active.sort(key=lambda s: s.slot)
            batch.step()
            for seq in [s for s in batch.active if s.finish_reason]:
                out[owner.pop(id(seq))] = seq.stream.text
                batch.release(seq)
                bar.update(1)
        bar.close()
        return out


def _length_runs(lengths: Sequence[int], pass_cost: int = 16) -> list[list[int]]:
    """Rows with tokens, longest first, cut into runs minimising padded tokens + pass_cost per run.

    pass_cost is the fixed cost of one more forward pass, in tokens' worth of compute.
    """
    order = sorted((r for r in range(len(lengths)) if lengths[r]), key=lambda r: -lengths[r])
    n = len(order)
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):   # run order[i:j] is padded to its first (longest) row
            cost = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def _bar(total: int, desc: str, enabled: bool):
    """A tqdm bar; without one (--no-progress), INFO log lines every 5% so long runs stay observable."""
    from tqdm.auto import tqdm
    if enabled:
        return tqdm(total=total, desc=desc, unit="req", disable=False, leave=False, dynamic_ncols=True)
    return _LogProgress(total, desc)


class _LogProgress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.perf_counter()
        self.step = max(1, math.ceil(total / 20))

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.step > before // self.step or self.done == self.total:
            dt = time.perf_counter() - self.t0
            log.info("%s: %d/%d done in %.0f s (%.3f/s)", self.desc, self.done, self.total, dt, self.done / max(dt, 1e-9))

    def close(self) -> None:
        pass


# -- running tasks ---------------------------------------------------------------------------
def resolve_tasks(tasks: Sequence[str], data: str | None = None, limit: int | None = None,
                  shots: int = 0) -> list[tuple[Any, Path]]:
    """Check the options and find every task's data file (before any model is loaded, so typos fail fast)."""
    if not tasks:
        raise ValueError("no task given; see `llamaforge evaluate --help` for the task names")
    if data is not None and len(tasks) != 1:
        raise ValueError("--data names one file: use it with a single --task, or write --task NAME=FILE")
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1")
    if shots < 0:
        raise ValueError("shots must be >= 0")
    specs = []
    for t in tasks:
        name, _, path = t.partition("=")
        task = get_task(name)
        specs.append((task, task.resolve_data(path or data)))
    return specs


def run_evaluation(llm, tasks: Sequence[str], *, data: str | None = None, limit: int | None = None,
                   shots: int = 0, batch_size: int = 16, seed: int = 1234, progress: bool = True,
                   window: int = 1024, stride: int = 512, max_tokens: int | None = None,
                   guard_only: bool = False, details: dict | None = None,
                   weights: Weights | None = None, quantize: Quantize = "none") -> dict[str, dict[str, Any]]:
    """Evaluate a loaded `Llama` (or a checkpoint path, None = bundled model, loaded only if a task needs it) on tasks.

    Returns {"TASK": {"metric": value, ..., "n": count, "seconds": s, "examples_per_s": r}}.
    A task may be written NAME=FILE to read another file in the same format; `data` does that for a
    single task. details: if a dict is given, per-example records are stored in it by task name.
    weights / quantize are passed to `Llama.load` when a path is loaded here (float32 weights by default).
    """
    specs = resolve_tasks(tasks, data, limit, shots)
    cfg = RunConfig(limit=limit, shots=shots, seed=seed, window=window, stride=stride, max_tokens=max_tokens,
                    guard_only=guard_only)
    lm = None
    if any(task.needs_model(cfg) for task, _ in specs):
        if isinstance(llm, (str, Path)) or llm is None:
            t0 = time.perf_counter()
            name = llm or "the bundled model"
            # evaluation defaults to float32 weights (the reference figures); the deprecated
            # --quantize auto still means the GGUF's blocks
            llm = load_model(llm, weights or (None if quantize == "auto" else "float"), quantize)
            log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
        lm = LM(llm, batch_size=batch_size, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    for task, path in specs:
        t0 = time.perf_counter()
        metrics, records = task.run(lm, path, cfg)
        dt = time.perf_counter() - t0
        metrics["seconds"] = round(dt, 2)
        metrics["examples_per_s"] = round(metrics["n"] / dt, 3) if dt > 0 else None
        results[task.name] = metrics
        if details is not None:
            details[task.name] = records
        log.info("%s: %s", task.name, metrics)
    return results


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """Results as a markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for k, v in metrics.items():
            if isinstance(v, float):
                v = f"{v:.4f}"
            lines.append(f"| {task} | {k} | {v} |")
    return "\n".join(lines)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def evaluate(*, model: str | None = None, task: list[str], data: str | None = None, limit: int | None = None,
             shots: int = 0, output: str | None = None, batch_size: int = 16, seed: int = 1234,
             weights: Weights | None = None, quantize: Quantize = "none", window: int = 1024, stride: int = 512,
             max_tokens: int | None = None, guard_only: bool = False, details: str | None = None,
             progress: bool = True) -> int:
    """Evaluate a checkpoint on benchmarks, perplexity, GSM8K and safety prompt sets.

    model: checkpoint path (Meta folder, HF folder or .gguf); the bundled SmolLM2 when omitted
    task: arc_easy arc_challenge piqa winogrande hellaswag lambada_openai wikitext2 gsm8k advbench strongreject harmbench xstest refusal guard (NAME=FILE reads another file; guard: the default guard's held-out split, no language model)
    data: data file for a single task (default: ../shared/data next to the repository)
    limit: first N examples of each task (perplexity: first N windows)
    shots: few-shot examples in each prompt (GSM8K draws them from its train file)
    output: write the results JSON here
    batch_size: continuations (or prompts) per forward pass
    seed: seed for the choice of few-shot examples
    weights: float (the default) evaluates a GGUF's blocks dequantized to float32; blocks computes with them as they are (native kernels)
    quantize: int8 or int4 repack the weights for PyTorch's weight-only kernels; none keeps them (auto: deprecated spelling of --weights blocks)
    window: perplexity window in tokens
    stride: perplexity stride in tokens (new tokens scored per window)
    max_tokens: generation budget per answer (GSM8K 256, safety 64 by default)
    guard_only: safety tasks: only run the guard over the prompts, no generation
    details: write per-example records (scores, predictions, generated answers) to this JSON file
    progress: show progress bars
    """
    records: dict | None = {} if details else None
    # the model is loaded there, after the tasks are checked, and only if one of them needs it
    results = run_evaluation(model, task, data=data, limit=limit, shots=shots, batch_size=batch_size, seed=seed,
                             progress=progress, window=window, stride=stride, max_tokens=max_tokens,
                             guard_only=guard_only, details=records, weights=weights, quantize=quantize)
    print(markdown_table(results))
    if output:
        write_json_atomic(output, results)
        print(f"results written to {output}")
    if details:
        write_json_atomic(details, records)
        print(f"per-example records written to {details}")
    return 0
