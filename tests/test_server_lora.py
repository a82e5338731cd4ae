"""Many LoRA adapters behind one server (serve --lora NAME=DIR, --allow-lora-updates), with the
official `openai` client on loopback: requests naming different adapters share batches, and each
answer equals `Llama.load(base, adapter=DIR)` alone (greedy)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from llamaforge.api import Llama
from test_multilora import _loaded, make_adapters
from test_server import KEY, MODEL, ServerThread

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = ["The capital of France is", "Three facts about owls:", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def dirs(bundled_gguf, tmp_path_factory):
    specs = {"qv": (8, ("q", "v")), "mlp": (8, ("gate", "up", "down")), "attn": (4, ("q", "k", "v", "o"))}
    return make_adapters(bundled_gguf, tmp_path_factory.mktemp("adapters"), specs)


@pytest.fixture(scope="module")
def server(bundled_gguf, dirs):
    from llamaforge.server.app import create_app
    app = create_app(Llama.load(bundled_gguf), model_id=MODEL, api_key=KEY, max_batch=8, ctx=256, max_queue=8,
                     adapters={"qv": str(dirs["qv"]), "mlp": str(dirs["mlp"])}, lora_updates=True)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _alone(base, adapter, prompt: str) -> str:
    return _loaded(base, adapter).complete(prompt, max_tokens=12, temperature=0.0).text


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_adapters_are_models_and_answer_as_alone_in_shared_batches(client, bundled_gguf, dirs):
    listed = [m.id for m in client.models.list().data]
    assert listed == [MODEL, "qv", "mlp"]
    assert client.models.retrieve("qv").id == "qv"
    asks = [(name, p) for name in (MODEL, "qv", "mlp") for p in PROMPTS[:3]] + [("qv", PROMPTS[3])]

    def ask(item):
        r = client.completions.create(model=item[0], prompt=item[1], max_tokens=12, temperature=0.0)
        return r.model, r.choices[0].text
    with ThreadPoolExecutor(len(asks)) as pool:           # at once: rows of all three share decode steps
        got = list(pool.map(ask, asks))
    want = [(name, _alone(bundled_gguf, None if name == MODEL else dirs[name], p)) for name, p in asks]
    assert got == want
    assert len({text for (_, p), (_, text) in zip(asks, got) if p == PROMPTS[0]}) > 1   # adapters matter


def test_load_and_unload_at_run_time(server, client, bundled_gguf, dirs, tmp_path):
    with pytest.raises(openai.NotFoundError, match="attn"):
        client.completions.create(model="attn", prompt="Hi", max_tokens=2)
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "attn", "lora_path": str(dirs["attn"])})
    assert r.status_code == 200, r.text
    out = client.chat.completions.create(model="attn", messages=[{"role": "user", "content": "Hello!"}],
                                         max_tokens=10, temperature=0.0)
    want = _loaded(bundled_gguf, dirs["attn"]).chat([{"role": "user", "content": "Hello!"}], max_tokens=10,
                                                     temperature=0.0).text
    assert out.model == "attn" and out.choices[0].message.content == want
    # refusals: a taken name, a folder that is no adapter, an unknown adapter to unload
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": str(dirs["attn"])}).status_code == 400
    bad = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    assert _post(server, "/v1/load_lora_adapter", {"lora_name": "x"}).status_code == 400
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "attn"}).status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL, "qv", "mlp"]
    with pytest.raises(openai.BadRequestError, match="base model"):
        client.embeddings.create(model="qv", input="hello")


def test_updates_are_off_unless_allowed(bundled_gguf, dirs):
    from llamaforge.server.app import create_app
    app = create_app(Llama.load(bundled_gguf), model_id=MODEL, api_key=KEY, max_batch=1, ctx=64, max_queue=1)
    with ServerThread(app) as s:
        r = _post(s, "/v1/load_lora_adapter", {"lora_name": "qv", "lora_path": str(dirs["qv"])})
        assert r.status_code == 404 and "--allow-lora-updates" in r.json()["error"]["message"]
