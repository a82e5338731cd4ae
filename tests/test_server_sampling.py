"""The rest of OpenAI's sampling API against a real server on loopback (the official `openai`
client, the bundled SmolLM2): n choices (streamed too), per-choice seeds, best_of, presence and
frequency penalties, logit_bias, and the 400s for values out of range.

References are computed here from full causal forwards (`Llama.logits`) and OpenAI's formulas;
the sampling functions themselves are unit-tested in test_sampling.py.
"""
from __future__ import annotations

import pytest
import torch

from test_server import KEY, MODEL, ServerThread, ask, llm, metrics  # noqa: F401 (llm: a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MAX_BATCH = 4


@pytest.fixture(scope="module")
def server(llm):  # noqa: F811
    from llamaforge.server.app import create_app
    app = create_app(llm, model_id=MODEL, api_key=KEY, max_batch=MAX_BATCH, ctx=256, max_queue=8)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(llm, prompt: str, steps: int, adjust=lambda logits, out: logits) -> list[int]:  # noqa: F811
    """Greedy ids after prompt, each from a full forward whose last logits go through adjust."""
    ids = llm.tokenizer.encode(prompt, bos=llm.tokenizer.add_bos)
    out: list[int] = []
    for _ in range(steps):
        tid = int(adjust(llm.logits(ids + out)[-1], out).argmax())
        if tid in llm.tokenizer.eog_ids:
            break
        out.append(tid)
    return out


def test_n_seeded_choices_are_reproducible_and_share_one_prefill(server, client, llm):  # noqa: F811
    messages = ask("Invent a name for a cat.")
    kw = dict(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, seed=7)
    before = metrics(server)
    first = client.chat.completions.create(n=3, **kw)
    reused = metrics(server)["llamaforge_prompt_tokens_reused_total"] - before["llamaforge_prompt_tokens_reused_total"]
    again = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in again.choices] == texts
    assert len(set(texts)) > 1                       # each choice draws from its own seed
    # choice 0 keeps the request's seed: it is the n=1 answer
    assert client.chat.completions.create(**kw).choices[0].message.content == texts[0]
    n_prompt = len(llm.encode_chat(messages))
    assert first.usage.prompt_tokens == n_prompt       # the prompt counts once
    assert 3 <= first.usage.completion_tokens <= 18
    assert first.usage.total_tokens == n_prompt + first.usage.completion_tokens
    assert reused >= 2 * n_prompt                     # choices 1 and 2 copied choice 0's prefill


def test_completions_n_and_best_of(client):
    # seed 5: choice 2 has the highest mean logprob, then choice 1, then choice 0
    kw = dict(model=MODEL, prompt="Once upon a time, in a small village,", max_tokens=4, temperature=1.0, seed=5)
    three = client.completions.create(n=3, logprobs=0, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in three.choices)   # no end token: the mean is over 4 tokens
    assert three.usage.completion_tokens == 12
    means = [sum(c.logprobs.token_logprobs) / 4 for c in three.choices]
    ranked = sorted(range(3), key=lambda i: -means[i])
    assert ranked[0] != 0, means                       # else choosing would not be tested
    best = client.completions.create(n=2, best_of=3, **kw)
    assert [c.text for c in best.choices] == [three.choices[i].text for i in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 12   # all three were generated
    # two prompts x two choices: prompt-major indices
    two = client.completions.create(model=MODEL, prompt=["The sky is", "Grass is"], n=2, max_tokens=2,
                                    temperature=0, echo=True)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text.split(" ")[0] for c in two.choices] == ["The", "The", "Grass", "Grass"]
    assert two.choices[0].text == two.choices[1].text     # greedy: n equal answers


def test_frequency_and_presence_penalties_follow_openais_formula(client, llm):  # noqa: F811
    prompt, steps = "My favourite words are", 6          # greedy: ':\n\n* "The', a newline twice
    vocab = llm.args.vocab_size

    def penalized(freq: float, pres: float):
        def adjust(logits, out):
            c = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float()
            return logits - c * freq - (c > 0).float() * pres
        return adjust

    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0).choices[0].text
    assert plain == llm.tokenizer.decode(greedy(llm, prompt, steps))
    for freq, pres in ((1.5, 0.0), (0.0, 1.5), (0.8, 0.8)):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0,
                                      frequency_penalty=freq, presence_penalty=pres)
        expect = llm.tokenizer.decode(greedy(llm, prompt, steps, penalized(freq, pres)))
        assert r.choices[0].text == expect, (freq, pres)
        assert r.choices[0].text != plain, (freq, pres)


def test_logit_bias_bans_and_forces_tokens(client, llm):  # noqa: F811
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt, bos=llm.tokenizer.add_bos)
    logits = llm.logits(ids)[-1]
    top, runner_up = logits.topk(2).indices.tolist()

    def first(bias):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logit_bias=bias)
        return r.choices[0].text

    assert first(None) == llm.tokenizer.decode([top])
    assert first({str(top): -100}) == llm.tokenizer.decode([runner_up])
    forced = llm.tokenizer.encode(" banana", bos=False)[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.8, seed=1,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == llm.tokenizer.decode([forced] * 3)
    chat = client.chat.completions.create(model=MODEL, messages=ask("Say hi."), max_tokens=2, temperature=0,
                                          logit_bias={str(forced): 100}, user="test-user")
    assert chat.choices[0].message.content == llm.tokenizer.decode([forced] * 2)


def test_streaming_n_choices_carry_their_index(client):
    kw = dict(model=MODEL, messages=ask("Name a color."), max_tokens=5, temperature=1.0, seed=11, n=2,
              logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finals, tokens = {0: "", 1: ""}, {0: [], 1: []}, {0: 0, 1: 0}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finals[c.index].append(c.finish_reason)
            if c.logprobs and c.logprobs.content:
                assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
                tokens[c.index] += len(c.logprobs.content)
    assert texts == {i: whole.choices[i].message.content for i in (0, 1)}
    assert all(len(f) == 1 for f in finals.values())
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == tokens[0] + tokens[1]
    assert all(len(c.logprobs.content[0].top_logprobs) == 2 for c in whole.choices)
    done = list(client.completions.create(model=MODEL, prompt="Red, green,", max_tokens=3, n=2, stream=True,
                                          temperature=0))
    assert {c.index for ch in done for c in ch.choices} == {0, 1}


def _error(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_invalid_sampling_values_are_refused(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    chat, cmpl = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    m = {"model": MODEL, "messages": ask("hi"), "max_tokens": 1}
    p = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for body, words in (({"n": 0}, ["n"]), ({"n": 17}, ["n", "16"]), ({"n": MAX_BATCH + 1}, ["n=5", "--max-batch"]),
                        ({"presence_penalty": 2.5}, ["presence_penalty", "2"]),
                        ({"frequency_penalty": -3}, ["frequency_penalty", "-2"]),
                        ({"logit_bias": {"hello": 1}}, ["logit_bias", "token ids"]),
                        ({"logit_bias": {"99999999": 1}}, ["logit_bias", "99999999"]),
                        ({"logit_bias": {"5": 101}}, ["logit_bias", "100"]),
                        ({"logit_bias": {str(i): 1 for i in range(301)}}, ["logit_bias", "300"]),
                        ({"functions": [{"name": "f"}]}, ["functions", "tools"]),
                        ({"user": 5}, ["user"])):
        _error(httpx.post(chat, json={**m, **body}, headers=auth), *words)
    for body, words in (({"n": 2, "best_of": 1}, ["best_of", "n"]),
                        ({"best_of": 2, "stream": True}, ["best_of", "stream"]),
                        ({"best_of": MAX_BATCH + 1}, ["best_of", "--max-batch"]),
                        ({"prompt": ["a"] * 5, "n": 3}, ["5 prompts x 3"]),
                        ({"suffix": " the end."}, ["suffix"])):
        _error(httpx.post(cmpl, json={**p, **body}, headers=auth), *words)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ask("hi"), frequency_penalty=2.01)
    # accepted: user, an unknown field, empty tools, neutral values
    ok = httpx.post(chat, json={**m, "user": "u-1", "some_extension": True, "tools": [], "presence_penalty": 0,
                                "logit_bias": {}}, headers=auth)
    assert ok.status_code == 200, ok.text
