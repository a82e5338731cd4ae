"""POST /v1/embeddings against a real server on loopback (the official `openai` client, the bundled
SmolLM2): the vectors are `Llama.embed`'s (checked against transformers in
test_bundled_vs_transformers.py), in both encodings, for every input form; bad requests get 400s;
an embeddings request runs between the decode steps of a stream without changing its answer."""
from __future__ import annotations

import base64
import threading

import numpy as np
import pytest
import torch

from test_server import KEY, MODEL, ServerThread, ask, llm, metrics  # noqa: F401 (llm: a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CTX = 256
TEXTS = ["Hello world", "The cat sat on the mat.", "Embeddings map a text to a vector.",
         "A much longer sentence about the weather in Paris, which was rainy and cold all week long."]


@pytest.fixture(scope="module")
def server(llm):  # noqa: F811
    from llamaforge.server.app import create_app
    app = create_app(llm, model_id=MODEL, api_key=KEY, max_batch=4, ctx=CTX, max_queue=8)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def expected(llm):  # noqa: F811
    return llm.embed(TEXTS)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)


def test_openai_client_gets_the_python_api_vectors(server, client, llm, expected):  # noqa: F811
    before = metrics(server)
    r = client.embeddings.create(model=MODEL, input=TEXTS)     # the client asks for base64 and decodes it
    got = torch.tensor([d.embedding for d in r.data])
    assert [d.index for d in r.data] == list(range(len(TEXTS))) and r.object == "list" and r.model == MODEL
    assert got.shape == (len(TEXTS), llm.args.dim)
    assert (got - expected).abs().max() < 1e-5                # same code; chunks may pad differently
    n = sum(len(s) for s in llm.embedding_ids(TEXTS))
    assert r.usage.prompt_tokens == r.usage.total_tokens == n
    after = metrics(server)
    assert after["llamaforge_embedding_inputs_total"] - before["llamaforge_embedding_inputs_total"] == len(TEXTS)
    assert after["llamaforge_embedding_tokens_total"] - before["llamaforge_embedding_tokens_total"] == n
    floats = client.embeddings.create(model=MODEL, input=TEXTS[1], encoding_format="float")
    assert torch.allclose(torch.tensor(floats.data[0].embedding), expected[1], atol=1e-5)


def test_base64_is_little_endian_float32_and_every_input_form_works(server, llm, expected):  # noqa: F811
    ids = llm.embedding_ids(TEXTS)
    raw = post(server, {"input": TEXTS, "encoding_format": "base64", "dimensions": llm.args.dim}).json()
    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.abs(vecs - expected.numpy()).max() < 1e-5
    as_ids = post(server, {"input": ids, "encoding_format": "float"}).json()
    assert np.abs(np.array([d["embedding"] for d in as_ids["data"]]) - vecs).max() < 1e-5
    one = post(server, {"input": ids[2]}).json()           # a list of ints is one input
    assert len(one["data"]) == 1 and np.abs(np.array(one["data"][0]["embedding"]) - vecs[2]).max() < 1e-5
    assert one["usage"] == {"prompt_tokens": len(ids[2]), "total_tokens": len(ids[2])}


@pytest.mark.parametrize("body, fragment, code", [
    ({"input": ""}, "input 0 is empty", None),
    ({"input": []}, "input is empty", None),
    ({"input": ["a", ""]}, "input 1 is empty", None),
    ({"input": [[]]}, "input 0 is empty", None),
    ({"input": [1] * (CTX + 1)}, "context window is 256", "context_length_exceeded"),
    ({"input": ["word " * 400]}, "context window is 256", "context_length_exceeded"),
    ({"input": "x" * 10 ** 6}, "context window", "context_length_exceeded"),
    ({"input": [3, 10 ** 7]}, "token ids must be in", None),
    ({"input": [3, -1]}, "token ids must be in", None),
    ({"input": ["a"] * 2049}, "at most 2048 inputs", None),
    ({"input": "a", "dimensions": 100}, "576 dimensions", None),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": {"text": "a"}}, "input must be a string", None),
    ({"input": [1, "a"]}, "input must be a string", None),
    ({"input": [1.5]}, "input must be a string", None),
    ({}, "input", None),
])
def test_bad_requests_get_a_clear_400(server, body, fragment, code):
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["code"] == code


def test_unknown_model_is_404(server):
    assert post(server, {"input": "a", "model": "gpt-4"}).status_code == 404


def test_embeddings_run_between_the_decode_steps_of_a_stream(server, client, llm, expected):  # noqa: F811
    """The stream goes on while the embeddings are computed (the request is answered before the
    stream ends) and its greedy answer is the one generate() gives alone."""
    q = ask("Write a long story about a dragon.")
    reference = llm.chat(q, max_tokens=40).text
    pieces, first, done = [], threading.Event(), threading.Event()

    def stream() -> None:
        for chunk in client.chat.completions.create(model=MODEL, messages=q, max_tokens=40, temperature=0,
                                                    stream=True):
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                first.set()
        done.set()
    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    r = client.embeddings.create(model=MODEL, input=TEXTS)
    pieces_then = len(pieces)
    t.join(60)
    assert done.is_set()
    assert (torch.tensor([d.embedding for d in r.data]) - expected).abs().max() < 1e-5
    assert pieces_then < len(pieces)              # answered while the stream was still going
    assert "".join(pieces) == reference


def test_threads_option_sets_the_model_threads(server, llm):  # noqa: F811
    """`serve --threads N` reaches torch.set_num_threads on the scheduler thread (the one running the
    model), and /health says what it runs with."""
    from llamaforge.server.app import serve
    from llamaforge.server.scheduler import Scheduler
    assert "threads" in serve.__doc__
    s = Scheduler(llm.model, llm.tokenizer, max_batch=1, max_seq=16, threads=3)
    s.start()
    try:
        assert s.threads_in_use == 3
    finally:
        s.close()
    assert httpx.get(server.url + "/health").json()["threads"] >= 1
