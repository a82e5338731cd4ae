"""GET /metrics: the scheduler's counters and gauges in Prometheus text format (version 0.0.4)."""
from __future__ import annotations

from .service import Server


def prometheus(srv: Server) -> str:
    """The server's counters and gauges in Prometheus text format."""
    s, st = srv.scheduler, srv.scheduler.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("llamaforge_requests_running", "gauge", "Sequences decoding in the batch.", [("", s.running)])
    metric("llamaforge_requests_waiting", "gauge", "Requests queued for a batch slot.", [("", s.waiting)])
    metric("llamaforge_batch_slots", "gauge", "Batch slots (max concurrent sequences).", [("", s.max_batch)])
    metric("llamaforge_context_tokens", "gauge", "Context window per sequence.", [("", s.max_seq)])
    metric("llamaforge_requests_total", "counter", "Requests admitted into the batch.", [("", st.requests_total)])
    metric("llamaforge_requests_rejected_total", "counter", "Requests refused because the queue was full.",
           [("", st.rejected_total)])
    metric("llamaforge_requests_cancelled_total", "counter", "Requests whose client left before the end.",
           [("", st.cancelled_total)])
    metric("llamaforge_requests_failed_total", "counter", "Requests that failed in the scheduler.",
           [("", st.failed_total)])
    metric("llamaforge_requests_finished_total", "counter", "Requests finished, by finish_reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(dict(st.finished).items())] or [('{finish_reason="stop"}', 0)])
    metric("llamaforge_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
           [("", st.prompt_tokens_total)])
    metric("llamaforge_prompt_tokens_reused_total", "counter",
           "Prompt tokens whose keys/values were copied from a cached common prefix instead of prefilled.",
           [("", st.prompt_tokens_reused_total)])
    metric("llamaforge_generation_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens_total)])
    metric("llamaforge_decode_steps_total", "counter", "Batched decode steps.", [("", st.steps_total)])
    metric("llamaforge_decode_rows_total", "counter", "Sequences advanced, summed over steps (mean batch = rows/steps).",
           [("", st.step_rows_total)])
    metric("llamaforge_decode_seconds_total", "counter", "Time in decode steps.", [("", round(st.step_seconds_total, 6))])
    metric("llamaforge_prefill_seconds_total", "counter", "Time prefilling prompts.",
           [("", round(st.prefill_seconds_total, 6))])
    metric("llamaforge_queue_wait_seconds_total", "counter", "Time requests waited for a slot.",
           [("", round(st.queue_wait_seconds_total, 6))])
    metric("llamaforge_time_to_first_token_seconds", "summary", "Submission to first generated token.",
           [("_sum", round(st.ttft_seconds_total, 6)), ("_count", st.ttft_count)])
    metric("llamaforge_embedding_requests_total", "counter", "Embeddings requests answered.",
           [("", st.embed_requests_total)])
    metric("llamaforge_embedding_inputs_total", "counter", "Inputs embedded.", [("", st.embed_inputs_total)])
    metric("llamaforge_embedding_tokens_total", "counter", "Tokens of embedded inputs.", [("", st.embed_tokens_total)])
    metric("llamaforge_embedding_seconds_total", "counter", "Time in embedding forwards (between decode steps).",
           [("", round(st.embed_seconds_total, 6))])
    if s.lookup is not None:
        ls = s.lookup.stats
        metric("llamaforge_speculative_verifies_total", "counter", "Forwards that verified a prompt-lookup draft.",
               [("", ls.verifies)])
        metric("llamaforge_speculative_draft_tokens_total", "counter", "Draft tokens verified.", [("", ls.drafted)])
        metric("llamaforge_speculative_accepted_tokens_total", "counter",
               "Draft tokens kept (each saved a decode step).", [("", ls.accepted)])
    metric("llamaforge_http_errors_total", "counter", "Error responses, by status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(srv.http_errors.items())] or [('{status="400"}', 0)])
    return "\n".join(lines) + "\n"
