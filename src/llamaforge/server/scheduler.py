"""Continuous batching: one background thread drives a `generate.Batch` for all requests.

Requests wait in a bounded queue; between two decode steps the thread prefills waiting requests
into free slots, drops the ones whose client went away, runs one bounded chunk of embedding work
(prefill-only forwards without a KV cache, see `EmbedJob`), then runs one batched step for every
active sequence. Events go back to each request's asyncio queue on the server's event loop.
This is the batched form of `llamaforge.generate`, not a second decode loop: `Batch` does the
prefill, sampling, stop rules and detokenization.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence as Seq

import torch

from ..embedding import pool
from ..generate import Batch, Sequence, TokenEvent, check_prompt
from ..sampling import SamplingParams
from ..speculative import as_lookup

log = logging.getLogger(__name__)

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound."""


@dataclass(eq=False)
class Job:
    """One generation request as the scheduler sees it."""
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    logits_processor: LogitsProcessor | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None          # set once admitted; read by the app after the last event
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    adapter: str | None = None           # the LoRA adapter it runs with (None: the base model)


@dataclass(eq=False)
class EmbedJob:
    """One embeddings request: inputs pooled a chunk of rows at a time, between decode steps."""
    seqs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    order: list[int] = field(default_factory=list)    # input indices, longest first (rows of a chunk pad little)
    done: int = 0                                     # inputs of `order` already pooled
    out: torch.Tensor | None = None                   # [n, D], filled chunk by chunk
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Stats:
    """Counters for /metrics (written by the scheduler thread, read by the event loop)."""
    requests_total: int = 0         # admitted into the batch
    rejected_total: int = 0         # refused: queue full
    cancelled_total: int = 0        # client went away before the end
    failed_total: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)  # by finish_reason
    prompt_tokens_total: int = 0
    prompt_tokens_reused_total: int = 0   # of those, taken from a cached prefix instead of prefilled
    generated_tokens_total: int = 0
    steps_total: int = 0
    step_rows_total: int = 0        # sum of batch sizes over steps: mean batch = rows / steps
    step_seconds_total: float = 0.0
    prefill_seconds_total: float = 0.0
    queue_wait_seconds_total: float = 0.0
    ttft_seconds_total: float = 0.0
    ttft_count: int = 0
    embed_requests_total: int = 0
    embed_inputs_total: int = 0
    embed_tokens_total: int = 0
    embed_seconds_total: float = 0.0


class Scheduler:
    """Runs every request through one shared `Batch` on a background thread.

    Embedding chunks hold at most `embed_busy` padded tokens while sequences are decoding (a
    decode step waits for at most one such forward) and `embed_idle` when none is (bigger
    forwards, better throughput); an input is never split, so one longer than the budget runs whole,
    as a generation prompt's prefill does.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_seq: int | None = None, max_queue: int = 64,
                 prefix_reuse: bool = True, threads: int | None = None, embed_busy: int = 128,
                 embed_idle: int = 2048, adapters=None, lookup: int = 0, lookup_max_batch: int = 1):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if threads is not None and threads < 1:
            raise ValueError("threads must be >= 1")
        if lookup_max_batch < 1:
            raise ValueError("lookup_max_batch must be >= 1")
        self.lookup = as_lookup(lookup)   # prompt-lookup drafting (its stats feed /metrics), or None
        self.threads = threads
        self.threads_in_use: int | None = None
        # the Batch (its KV cache) is made on the scheduler thread, the only one that runs the model
        self._make_batch = lambda: Batch(model, tokenizer, max_batch=max_batch, max_seq=max_seq,
                                         prefix_reuse=prefix_reuse, adapters=adapters, lookup=self.lookup,
                                         lookup_max_batch=lookup_max_batch)
        self.adapters = adapters              # a multilora.AdapterBank, changed on this thread only (call())
        self._calls: collections.deque = collections.deque()   # (fn, future): run between two steps
        self.batch: Batch | None = None
        self._max_seq = min(max_seq or model.args.max_seq_len, model.args.max_seq_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stats = Stats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._model = model
        self._embeds: collections.deque[EmbedJob] = collections.deque()
        self.embed_busy, self.embed_idle = embed_busy, embed_idle
        self._running: dict[int, Job] = {}    # id(seq) -> job
        self._admitting = 0                   # taken off the queue, being prefilled
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # batch slots (free, busy, total) and the jobs holding them, as the scheduler thread saw them
        # between two steps: written there only, in one assignment, so always a consistent snapshot.
        # Invariants: free + busy == total, busy == jobs.
        self.slots = {"free": max_batch, "busy": 0, "total": max_batch, "jobs": 0}

    @property
    def max_seq(self) -> int:
        return self._max_seq

    def check_prompt(self, n: int) -> None:
        """Raise ContextOverflow/ValueError for a prompt that cannot be served."""
        check_prompt(n, self._max_seq)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running) + self._admitting

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread; returns once its KV cache is allocated (or raises why not)."""
        if self._thread is None:
            self._stop = False
            ready: list[BaseException | None] = []
            started = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready, started), name="llamaforge-scheduler",
                                            daemon=True)
            self._thread.start()
            started.wait()
            if ready[0] is not None:
                self._thread.join()
                self._thread = None
                raise ready[0]

    def _run(self, ready: list, started: threading.Event) -> None:
        # Every torch op of the server runs on this one thread: libgomp gives each thread that runs
        # parallel ops its own OpenMP team, and with more team threads than cores its workers stop
        # spinning between ops, which on 2 cores halved decode speed (see docs/serving.md).
        try:
            if self.threads is not None:   # OpenMP's thread count is per thread: set it on this one
                torch.set_num_threads(self.threads)
            self.threads_in_use = torch.get_num_threads()   # what the model runs with (/health)
            if self.batch is None:
                self.batch = self._make_batch()
            ready.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to start()
            ready.append(e)
            return
        finally:
            started.set()
        self._loop()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- called from the event loop ------------------------------------------------------------
    def submit(self, prompt: Seq[int], params: SamplingParams, logits_processor: LogitsProcessor | None = None) -> Job:
        """Queue a request; raises ContextOverflow/ValueError for a bad prompt, QueueFull when saturated."""
        return self.submit_all([(prompt, params, logits_processor)])[0]

    def submit_all(self, requests: Seq[tuple[Seq[int], SamplingParams, LogitsProcessor | None]],
                   adapter: str | None = None) -> list[Job]:
        """Queue several requests, all or none: QueueFull (nothing queued) if they do not all fit.

        adapter: the LoRA adapter (of self.adapters) every one of them runs with.
        """
        loop = asyncio.get_running_loop()
        jobs = []
        for prompt, params, processor in requests:
            prompt = [int(t) for t in prompt]
            self.check_prompt(len(prompt))
            jobs.append(Job(prompt, params, loop, processor, adapter=adapter))
        with self._cv:
            # free slots take waiting jobs at the next step; beyond them, at most max_queue may wait
            room = self.max_queue + self.max_batch - self.running - len(self._waiting)
            if len(jobs) > room:
                self.stats.rejected_total += len(jobs)
                raise QueueFull(f"the server is busy: {self.running} requests running and "
                                f"{len(self._waiting)} waiting (max_queue={self.max_queue}); "
                                f"{len(jobs)} more do not fit; retry later")
            self._waiting.extend(jobs)
            self._cv.notify()
        return jobs

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run fn() on the scheduler thread between two decode steps (e.g. loading an adapter, which
        changes the model's modules); the future gets its result or exception."""
        future = asyncio.get_running_loop().create_future()
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def adapter_in_use(self, name: str) -> bool:
        """Whether a running or waiting request runs with this adapter."""
        with self._cv:
            return any(j.adapter == name for j in list(self._running.values()) + list(self._waiting))

    def submit_embed(self, seqs: Seq[Seq[int]]) -> EmbedJob:
        """Queue an embeddings request (inputs already checked); QueueFull past max_queue waiting ones.
        Its future gets the [n, D] float32 embeddings."""
        loop = asyncio.get_running_loop()
        seqs = [[int(t) for t in s] for s in seqs]
        job = EmbedJob(seqs, loop, loop.create_future(), sorted(range(len(seqs)), key=lambda i: -len(seqs[i])))
        with self._cv:
            if len(self._embeds) >= max(self.max_queue, 1):
                self.stats.rejected_total += 1
                raise QueueFull(f"the server is busy: {len(self._embeds)} embeddings requests waiting "
                                f"(max_queue={self.max_queue}); retry later")
            self._embeds.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a running one frees its slot
        before the next step."""
        if job.cancelled:
            return
        with self._cv:
            job.cancelled = True
            try:
                self._waiting.remove(job)
            except ValueError:
                pass     # running, being admitted or finished
            self._cv.notify()

    async def stream(self, job: Job) -> AsyncIterator[TokenEvent]:
        """The job's TokenEvents; the last one carries finish_reason. Cancels the job if abandoned."""
        try:
            while True:
                ev = await job.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if ev.finish_reason:
                    return
        finally:
            if job.seq is None or not job.seq.finish_reason:
                self.cancel(job)

    # -- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            self._drop_cancelled()   # first, so their slots can take waiting requests right away
            self._snapshot()
            with self._cv:
                while (not self._stop and not self._waiting and not self._running and not self._embeds
                       and not self._calls):
                    self._cv.wait()
                if self._stop:
                    break
                calls = list(self._calls)
                self._calls.clear()
                admit = []
                while self._waiting and len(admit) < len(self.batch.free):
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
                self._admitting = len(admit)
            for fn, future in calls:
                try:
                    result = fn()
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    result = e
                future.get_loop().call_soon_threadsafe(_settle, future, result)
            try:
                for job in admit:
                    self._admit(job)
                    with self._cv:
                        self._admitting -= 1
                if self._embeds:
                    self._embed_chunk()
                if self._running:
                    self._step()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("decode step failed")
                self._fail_all(e)
            finally:
                with self._cv:
                    self._admitting = 0
                self._snapshot()
        self._fail_all(RuntimeError("the server is shutting down"))

    def _snapshot(self) -> None:
        free, busy, total = self.batch.slot_counts()
        self.slots = {"free": free, "busy": busy, "total": total, "jobs": len(self._running)}

    def _drop_cancelled(self) -> None:
        for key, job in list(self._running.items()):
            if job.cancelled:
                self.batch.release(job.seq)
                del self._running[key]
                self.stats.cancelled_total += 1

    def _admit(self, job: Job) -> None:
        t0 = time.perf_counter()
        self.stats.queue_wait_seconds_total += t0 - job.submitted
        try:
            seq = self.batch.add(job.prompt, job.params, adapter=job.adapter)
        except Exception as e:  # noqa: BLE001 - report it to that request only
            self.stats.failed_total += 1
            self._send(job, e)
            return
        seq.logits_processor = job.logits_processor
        job.seq = seq
        self.stats.requests_total += 1
        self.stats.prompt_tokens_total += len(job.prompt)
        self.stats.prompt_tokens_reused_total += seq.reused
        self.stats.prefill_seconds_total += time.perf_counter() - t0
        if seq.finish_reason:  # max_tokens == 0: nothing to generate
            self.batch.release(seq)
            self.stats.finished[seq.finish_reason] += 1
            self._send(job, TokenEvent(-1, "", None, seq.finish_reason))
            return
        self._running[id(seq)] = job

    def _embed_chunk(self) -> None:
        """Pool the next rows of the oldest embeddings request: as many of its remaining inputs (longest
        first) as fit the token budget, at least one."""
        job = self._embeds[0]
        if job.cancelled or job.future.done():
            with self._cv:
                self._embeds.popleft()
            return
        t0 = time.perf_counter()
        budget = self.embed_busy if self._running else self.embed_idle
        rest = job.order[job.done:]
        take = rest[:max(1, budget // len(job.seqs[rest[0]]))]
        try:
            vecs = pool(self._model, [job.seqs[i] for i in take])
        except Exception as e:  # noqa: BLE001 - that request fails, the server goes on
            log.exception("embedding failed")
            with self._cv:
                self._embeds.popleft()
            self.stats.failed_total += 1
            job.loop.call_soon_threadsafe(_settle, job.future, e)
            return
        if job.out is None:
            job.out = torch.empty(len(job.seqs), vecs.shape[-1])
        job.out[take] = vecs.cpu()
        job.done += len(take)
        self.stats.embed_tokens_total += sum(len(job.seqs[i]) for i in take)
        self.stats.embed_seconds_total += time.perf_counter() - t0
        if job.done == len(job.seqs):
            with self._cv:
                self._embeds.popleft()
            self.stats.embed_requests_total += 1
            self.stats.embed_inputs_total += len(job.seqs)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, job.out)
            except RuntimeError:   # the event loop is closed: nobody is listening any more
                pass

    def _step(self) -> None:
        t0 = time.perf_counter()
        events = self.batch.step(emit=self._emit)   # tokens go out before the forward that follows them
        self.stats.step_rows_total += len({id(seq) for seq, _ in events})   # forced or drafted tokens add events, not rows
        self.stats.steps_total += 1
        self.stats.step_seconds_total += time.perf_counter() - t0

    def _emit(self, events: list[tuple[Sequence, TokenEvent]]) -> None:
        now = time.perf_counter()
        out = []
        for seq, ev in events:
            job = self._running.get(id(seq))
            if job is None:
                continue
            if job.first_token is None:
                job.first_token = now
                self.stats.ttft_seconds_total += now - job.submitted
                self.stats.ttft_count += 1
            if ev.finish_reason:
                self.batch.release(seq)
                del self._running[id(seq)]
            if ev.error is not None:   # this sequence failed; the others go on
                self.stats.failed_total += 1
                out.append((job, ev.error))
                continue
            self.stats.generated_tokens_total += 1
            if ev.finish_reason:
                self.stats.finished[ev.finish_reason] += 1
            out.append((job, ev))
        self._send_all(out)

    def _fail_all(self, err: BaseException) -> None:
        for key, job in list(self._running.items()):
            self.batch.release(job.seq)
            del self._running[key]
            self.stats.failed_total += 1
            self._send(job, err)
        if self._stop:
            with self._cv:
                waiting, self._waiting = list(self._waiting), collections.deque()
                embeds, self._embeds = list(self._embeds), collections.deque()
            for job in waiting:
                self._send(job, err)
            for e in embeds:
                try:
                    e.loop.call_soon_threadsafe(_settle, e.future, err)
                except RuntimeError:
                    pass

    @staticmethod
    def _send(job: Job, item) -> None:
        Scheduler._send_all([(job, item)])

    @staticmethod
    def _send_all(items: list[tuple[Job, object]]) -> None:
        """Hand items to their jobs' queues with one event-loop wake-up per loop, not one per job.

        Each wake-up makes the event loop thread take the GIL, which the decode loop then waits for.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for job, _ in batch:
                    job.cancelled = True


def _deliver(items: list[tuple[Job, object]]) -> None:
    for job, item in items:
        job.events.put_nowait(item)


def _settle(future: asyncio.Future, result) -> None:
    """Resolve a future on its event loop (unless its request was cancelled meanwhile)."""
    if not future.done():
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
