"""Tool calling against a real server on loopback (the official `openai` client, the bundled SmolLM2,
whose ChatML template has no tools, so the server's tool prompt is used): a round trip (call,
result, answer), tool_choice required / named / none, streamed calls reassembled by the client,
and the 400s for malformed tools. The grammar, the stream parser and a template that renders tools
are checked directly.
"""
from __future__ import annotations

import json

import pytest

from test_server import KEY, MODEL, ServerThread, ask, llm  # noqa: F401 (llm: a fixture)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
BOOKING = {"type": "object", "properties": {
    "guests": {"type": "integer", "minimum": 1, "maximum": 9},
    "nights": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    "options": {"type": "object", "properties": {"breakfast": {"type": "boolean"}}, "required": ["breakfast"],
                "additionalProperties": False}},
    "required": ["guests", "nights", "options"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_hotel", "description": "Book a hotel room",
                                           "parameters": BOOKING}}]
SCHEMAS = {"get_weather": WEATHER, "book_hotel": BOOKING}


@pytest.fixture(scope="module")
def server(llm):  # noqa: F811
    """A server with room for the tool prompt (ctx 1024), its `openai` client as .client."""
    from llamaforge.server.app import create_app
    with ServerThread(create_app(llm, model_id=MODEL, api_key=KEY, max_batch=4, ctx=1024, max_queue=8)) as s:
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        yield s


@pytest.fixture
def client(server):
    return server.client


def valid_calls(message, names=None) -> list:
    """The message's tool calls, each checked: a given function, arguments that parse and validate."""
    assert message.role == "assistant" and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


def test_round_trip_call_result_answer(client, llm):  # noqa: F811
    messages = ask("What is the weather in Paris, in celsius?")
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = valid_calls(choice.message)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=40)
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content.strip()
    # the call and the result are in the prompt: the second one extends the first, token for token
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_tool_choice_required_and_named_validate(client):
    for i, q in enumerate(["Book a room for 2 guests on Friday and Saturday with breakfast.", "Hello there!"]):
        # sampled (temperature 1): the grammar, not the model's habits, keeps the arguments valid. One call
        # each: given parallel calls, this small model repeats its call until max_tokens
        r = client.chat.completions.create(model=MODEL, messages=ask(q), tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=i, n=2, max_tokens=120)
        for c in r.choices:
            assert c.finish_reason == "tool_calls", c
            assert len(valid_calls(c.message)) == 1
        named = client.chat.completions.create(
            model=MODEL, messages=ask(q), tools=TOOLS, temperature=1.0, seed=i, max_tokens=120,
            tool_choice={"type": "function", "function": {"name": "book_hotel"}})
        assert named.choices[0].finish_reason == "tool_calls"
        assert len(valid_calls(named.choices[0].message, ["book_hotel"])) == 1


def test_tool_choice_none_and_auto_text(client):
    kw = dict(model=MODEL, tools=TOOLS, temperature=0, max_tokens=16)
    r = client.chat.completions.create(messages=ask("What is the weather in Rome?"), tool_choice="none", **kw)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    # auto: this model answers a greeting in text (greedy), and the text is not parsed as calls
    r = client.chat.completions.create(messages=ask("Say hello to me."), tool_choice="auto", **kw)
    assert r.choices[0].message.tool_calls is None and "<tool_call>" not in r.choices[0].message.content


def test_streamed_calls_reassemble_to_the_whole_answer(client):
    kw = dict(model=MODEL, messages=ask("Weather in Tokyo, please."), tools=TOOLS, parallel_tool_calls=False,
              tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kw)
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls = valid_calls(whole.choices[0].message)
    streamed = valid_calls(final.choices[0].message)
    assert [(c.function.name, c.function.arguments) for c in streamed] == \
        [(c.function.name, c.function.arguments) for c in calls]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    deltas = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or ())]
    heads = [d for d in deltas if d.id]
    assert [d.index for d in heads] == list(range(len(calls)))
    assert [d.function.name for d in heads] == [c.function.name for c in calls]
    assert len(deltas) > 2 * len(heads)        # the arguments came in pieces, as generated
    assert "".join(d.function.arguments for d in deltas) == calls[0].function.arguments


def _error(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_malformed_tools_are_refused(server, client):
    url, auth = server.url + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 1}
    fn = {"name": "f", "parameters": {"type": "object", "properties": {}}}
    for extra, words in (
            ({"tools": {"type": "function"}}, ["tools", "list"]),
            ({"tools": [{"type": "retrieval"}]}, ["tools[0]", '"type": "function"']),
            ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, ["tools[0].function.name"]),
            ({"tools": [{"type": "function", "function": fn}] * 2}, ["tools[1]", "'f'", "twice"]),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
             ["parameters", "object"]),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"x": {"type": "nonsense"}}}}}]},
             ["tools[0].function.parameters (f)", "JSON schema"]),
            ({"tools": [{"type": "function", "function": fn}], "tool_choice": "always"}, ["tool_choice", "'always'"]),
            ({"tools": [{"type": "function", "function": fn}], "tool_choice": {"type": "function",
                                                                               "function": {"name": "g"}}},
             ["'g'", "not in tools"]),
            ({"tool_choice": "required"}, ["tool_choice", "needs tools"]),
            ({"functions": [fn]}, ["functions", "tools"]),
            ({"messages": [*ask("hi"), {"role": "assistant", "tool_calls": [{"function": {"name": "f",
                                                                               "arguments": {}}}]}]},
             ["messages[1].tool_calls[0]", "arguments"])):
        _error(httpx.post(url, json={**body, **extra}, headers=auth), *words)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=MODEL, messages=ask("hi"), tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "send_email"}})


def test_grammar_and_parser_directly(llm):  # noqa: F811
    import llguidance as ll

    from llamaforge.server.structured import build_lltokenizer
    from llamaforge.server.tools import ToolCallParser, grammar, merge_calls, plan

    lt = build_lltokenizer(llm.tokenizer, llm.args.vocab_size)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'

    def accepts(g: str, text: str) -> bool:
        m = ll.LLMatcher(lt, g, log_level=0)
        return m.consume_tokens(llm.tokenizer.encode(text, bos=False)) and m.is_accepting()

    auto = grammar(plan(TOOLS, "auto", True))
    assert accepts(auto, "Plain text, no call.") and accepts(auto, call) and accepts(auto, call + "\n" + call)
    assert not accepts(auto, "Text, then " + call)                       # text or calls, not both
    assert not accepts(auto, call.replace('"celsius"', '"kelvin"'))       # outside the schema
    single = grammar(plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True))
    assert accepts(single, call) and not accepts(single, call + "\n" + call) and not accepts(single, "Hi")

    # fed one character at a time, the parser finds the same calls as from the whole text
    text = call + "\n" + call.replace("Oslo", 'Quo\\"te {x}')
    parser, deltas = ToolCallParser(), []
    for ch in text:
        deltas += parser.feed(ch)[1]
    assert parser.finish() == "" and parser.called
    calls = merge_calls(deltas)
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Oslo", 'Quo"te {x}']
    plain = ToolCallParser()
    assert plain.feed("<tool") == ("", []) and plain.feed("s are fun") == ("<tools are fun", [])


def test_a_template_with_tools_renders_them(llm):  # noqa: F811
    from llamaforge.chat import LLAMA2_TEMPLATE, encode_chat, supports_tools
    from llamaforge.server.tools import plan, template_messages

    template = ("{% if tools %}<|im_start|>system\nTOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}"
                "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
                "{{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
                "{% endfor %}<|im_start|>assistant\n")
    assert supports_tools(template) and not supports_tools(llm.chat_template) and not supports_tools(LLAMA2_TEMPLATE)
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    ids = encode_chat(llm.tokenizer, template_messages(history), template, tools=plan(TOOLS, "auto", True).tools)
    text = llm.tokenizer.decode(ids, skip_special=False)
    assert "TOOLS get_weather book_hotel" in text and "CALL get_weather Oslo" in text
    assert "<|im_start|>tool\nsunny" in text
