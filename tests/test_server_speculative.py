"""`serve --lookup K`: prompt-lookup speculative decoding inside the server's batched steps, against
the official `openai` client on loopback with the bundled SmolLM2. Answers must be those of plain
single-request generation (`Llama.chat`, no drafting), streamed or not, alone or side by side with
other requests, and /metrics must show drafts being kept.
"""
from __future__ import annotations

import threading

import pytest

from test_server import KEY, MODEL, ServerThread, llm, metrics  # noqa: F401 (llm: a fixture)
from test_speculative import PASSAGE

openai = pytest.importorskip("openai")

GROUNDED = [{"role": "user", "content": f"Repeat this text word for word:\n\n{PASSAGE}"}]
TOKENS = 48


@pytest.fixture(scope="module")
def server(llm):  # noqa: F811
    from llamaforge.server.app import create_app
    app = create_app(llm, model_id=MODEL, api_key=KEY, max_batch=4, ctx=512, max_queue=8, lookup=8)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_grounded_answer_is_plain_decoding_and_drafts_are_kept(server, client, llm):  # noqa: F811
    plain = llm.chat(GROUNDED, max_tokens=TOKENS)
    before = metrics(server)
    r = client.chat.completions.create(model=MODEL, messages=GROUNDED, max_tokens=TOKENS, temperature=0)
    after = metrics(server)
    assert r.choices[0].message.content == plain.text and r.usage.completion_tokens == len(plain.tokens)
    kept = after["llamaforge_speculative_accepted_tokens_total"] - before["llamaforge_speculative_accepted_tokens_total"]
    verifies = after["llamaforge_speculative_verifies_total"] - before["llamaforge_speculative_verifies_total"]
    assert kept >= 10 and verifies < kept                 # more than one token per verify forward
    steps = after["llamaforge_decode_steps_total"] - before["llamaforge_decode_steps_total"]
    assert steps < len(plain.tokens) - kept / 2           # fewer forwards than tokens
    # streamed: the same text, piece by piece
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=GROUNDED, max_tokens=TOKENS, temperature=0, stream=True)]
    assert "".join(pieces) == plain.text


def test_side_by_side_requests_and_sampling_options_keep_their_plain_answers(client, llm):  # noqa: F811
    """Requests running together (drafting pauses while more than one decodes, resumes when one is
    left) and a penalised one (drafted tokens go through the ordinary sampler) answer as alone."""
    free = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    jobs = [(GROUNDED, {}), (free, {}), (GROUNDED, {"presence_penalty": 0.5, "frequency_penalty": 0.3})]
    want = [llm.chat(m, max_tokens=TOKENS, **kw).text for m, kw in jobs]
    got: list[str | None] = [None] * len(jobs)

    def run(i: int) -> None:
        m, kw = jobs[i]
        got[i] = client.chat.completions.create(model=MODEL, messages=m, max_tokens=TOKENS,
                                                temperature=0, **kw).choices[0].message.content
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == want


def test_bad_lookup_settings_are_clear_errors(llm, capsys):  # noqa: F811
    from llamaforge.cli import main
    from llamaforge.server.app import create_app
    assert main(["serve", "--lookup", "-2"]) == 2
    assert "lookup must be" in capsys.readouterr().err
    assert main(["serve", "--lookup", "4", "--lookup-max-batch", "0"]) == 2
    assert "lookup_max_batch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lookup"):
        create_app(llm, lookup=-1)
