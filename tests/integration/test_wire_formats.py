"""Every provider in its own wire format, through `freerelay up`, driven by the official openai
SDK: OpenAI pass-through, Anthropic Messages and Gemini generateContent, each JSON and streamed,
with parallel tool calls, tool results, thinking, images, max-tokens and safety endings, and a
mid-stream error; what reached each mock is checked in the provider's native shape."""

from __future__ import annotations

import base64
import json
import math

import openai
import pytest

from conftest import Gateway, Mock, gateway_env, new_client_key
from helpers import upstream_model

# (provider, model the client names, model sent upstream)
FORMATS = [
    ("openai", "openai/gpt-4o-mini", "gpt-4o-mini"),
    ("anthropic", "anthropic/claude-haiku-4-5", "claude-haiku-4-5"),
    ("gemini", "gemini/gemini-2.5-flash", "gemini-2.5-flash"),
]
IDS = [f[0] for f in FORMATS]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather at a place.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}, "utc": {"type": "boolean"}}}}}
WEATHER_ARGS = {"location": "Oslo", "unit": "celsius"}
TIME_ARGS = {"zone": "mock-zone", "utc": True}
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n tiny").decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("wire-formats")
    mocks = {name: Mock(name, d) for name in IDS}
    key = new_client_key()
    gw = Gateway(state_dir=d / "state", env=gateway_env(mocks, [key]), client_key=key, log_dir=d)
    (d / "state").mkdir()
    try:
        gw.start()
        yield gw, mocks
    finally:
        gw.close()
        for m in mocks.values():
            m.close()


@pytest.fixture
def gw(setup):
    gw, mocks = setup
    for m in mocks.values():
        m.reset()
    return gw


@pytest.fixture
def mocks(setup):
    return setup[1]


@pytest.fixture
def client(gw):
    return gw.client()


def _native(mocks, provider) -> dict:
    """The one request the provider's mock received, in its native format."""
    [req] = mocks[provider].requests()
    return req


def _collect(stream):
    """Content, reasoning, tool calls (by index), finish reason, usage and the chunks of a stream."""
    chunks = list(stream)
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            d = c.delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return chunks, content, reasoning, [calls[i] for i in sorted(calls)], finish, usage


@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_json_text_reaches_the_provider_natively(mocks, client, provider, model, upstream):
    raw = client.chat.completions.with_raw_response.create(
        model=model, max_tokens=300, temperature=0.5,
        messages=[{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "hello there"}])
    r = raw.parse()
    assert raw.headers["x-freerelay-provider"] == provider
    assert raw.headers["x-freerelay-model"] == upstream
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == f"mock({provider}): hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    req = _native(mocks, provider)
    assert upstream_model(req) == upstream
    body = req["body"]
    if provider == "anthropic":
        assert req["path"] == "/v1/messages" and req["headers"]["x-api-key"] == mocks[provider].key
        assert req["headers"]["anthropic-version"]
        assert body["system"] == "Be terse." and body["max_tokens"] == 300
        assert body["messages"] == [{"role": "user", "content": "hello there"}] or \
            body["messages"][0]["content"][0]["text"] == "hello there"
    elif provider == "gemini":
        assert req["path"] == f"/v1beta/models/{upstream}:generateContent"
        assert req["headers"]["x-goog-api-key"] == mocks[provider].key
        assert body["systemInstruction"]["parts"][0]["text"] == "Be terse."
        assert body["contents"][0]["role"] == "user"
        assert body["generationConfig"]["maxOutputTokens"] == 300
        assert body["generationConfig"]["temperature"] == 0.5
    else:
        assert req["path"] == "/v1/chat/completions" and body["max_completion_tokens"] == 300


@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_streams_start_with_the_role_and_end_with_finish_usage_and_done(
        mocks, gw, client, provider, model, upstream):
    stream = client.chat.completions.create(
        model=model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream four words please"}])
    chunks, content, _, calls, finish, usage = _collect(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content == f"mock({provider}): stream four words please"
    assert finish == "stop" and calls == []
    assert chunks[-1].choices == [] and usage.completion_tokens > 0
    if provider == "gemini":
        req = _native(mocks, provider)
        assert req["path"] == f"/v1beta/models/{upstream}:streamGenerateContent"
        assert req["query"] == "alt=sse"
    # Raw bytes: whole events, [DONE] last.
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "raw"}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n")
              if e.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not any(e.get("usage") for e in events), "no usage chunk unless asked"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_parallel_tool_calls_arrive_complete(mocks, client, provider, model, upstream, stream):
    mocks[provider].script({"kind": "ok", "tool_calls": 3})
    kw = dict(model=model, tools=[WEATHER, TIME], tool_choice="required",
              messages=[{"role": "user", "content": "What is the weather and time in Oslo?"}])
    if stream:
        _, content, _, calls, finish, _ = _collect(client.chat.completions.create(stream=True, **kw))
    else:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        content, finish = m.content, r.choices[0].finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in m.tool_calls]
    assert finish == "tool_calls", "a function call ends with tool_calls, never stop"
    assert [c["name"] for c in calls] == ["get_weather", "get_time", "get_weather"]
    assert [json.loads(c["arguments"]) for c in calls] == [WEATHER_ARGS, TIME_ARGS, WEATHER_ARGS]
    assert all(c["id"] for c in calls) and len({c["id"] for c in calls}) == 3
    assert not content
    body = _native(mocks, provider)["body"]
    if provider == "anthropic":
        assert body["tool_choice"]["type"] == "any"
        assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]
        assert body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
    elif provider == "gemini":
        assert body["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"
        decls = body["tools"][0]["functionDeclarations"]
        assert [d["name"] for d in decls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_tool_results_go_back_in_the_native_shape(mocks, client, provider, model, upstream):
    # The first leg: the model calls two tools; their ids come back with the results.
    mocks[provider].script({"kind": "ok", "tool_calls": 2})
    first = client.chat.completions.create(
        model=model, tools=[WEATHER, TIME],
        messages=[{"role": "user", "content": "What is the weather and time in Oslo?"}])
    calls = first.choices[0].message.tool_calls
    assert len(calls) == 2
    mocks[provider].reset()
    history = [
        {"role": "user", "content": "What is the weather and time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temp_c": 3})},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "14:05"},
        {"role": "user", "content": "summarise"},
    ]
    r = client.chat.completions.create(model=model, tools=[WEATHER, TIME], messages=history)
    assert r.choices[0].message.content == f"mock({provider}): summarise"
    body = _native(mocks, provider)["body"]
    if provider == "anthropic":
        turns = body["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant", "user"]
        uses = [b for b in turns[1]["content"] if b["type"] == "tool_use"]
        assert [u["id"] for u in uses] == [calls[0].id, calls[1].id]
        assert uses[0]["input"] == WEATHER_ARGS
        results = [b for b in turns[2]["content"] if b["type"] == "tool_result"]
        assert [b["tool_use_id"] for b in results] == [calls[0].id, calls[1].id]
        assert turns[2]["content"][-1] == {"type": "text", "text": "summarise"}
    elif provider == "gemini":
        turns = body["contents"]
        assert [t["role"] for t in turns] == ["user", "model", "user"]
        assert [p["functionCall"]["name"] for p in turns[1]["parts"]] == ["get_weather", "get_time"]
        responses = [p["functionResponse"] for p in turns[2]["parts"] if "functionResponse" in p]
        assert [x["name"] for x in responses] == ["get_weather", "get_time"]
        assert responses[0]["response"] == {"temp_c": 3}
        assert responses[1]["response"] == {"content": "14:05"}
    else:
        assert body["messages"][2]["tool_call_id"] == calls[0].id


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_thinking_comes_back_as_reasoning_content(mocks, client, provider, model, upstream, stream):
    mocks[provider].script({"kind": "ok", "thinking": "weighing the options", "content": "Done."})
    kw = dict(model=model, reasoning_effort="low", max_tokens=4000,
              messages=[{"role": "user", "content": "think first"}])
    if stream:
        _, content, reasoning, _, finish, _ = _collect(client.chat.completions.create(stream=True, **kw))
    else:
        r = client.chat.completions.create(**kw)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        reasoning = (r.choices[0].message.model_extra or {}).get("reasoning_content")
    assert reasoning == "weighing the options"
    assert content == "Done." and finish == "stop"
    body = _native(mocks, provider)["body"]
    if provider == "anthropic":
        assert body["thinking"]["type"] == "enabled"
        assert 1024 <= body["thinking"]["budget_tokens"] < body["max_tokens"]
    elif provider == "gemini":
        assert body["generationConfig"]["thinkingConfig"]["includeThoughts"] is True


@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_images_as_data_uris_and_urls(mocks, client, provider, model, upstream):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "compare these"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]}])
    assert r.choices[0].message.content == f"mock({provider}): compare these"
    body = _native(mocks, provider)["body"]
    if provider == "anthropic":
        blocks = body["messages"][0]["content"]
        assert blocks[1] == {"type": "image", "source": {
            "type": "base64", "media_type": "image/png", "data": PNG.split(",", 1)[1]}}
        assert blocks[2]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}
    elif provider == "gemini":
        parts = body["contents"][0]["parts"]
        assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": PNG.split(",", 1)[1]}}
        assert parts[2]["fileData"]["fileUri"] == "https://example.com/cat.jpg"
        assert parts[2]["fileData"]["mimeType"] == "image/jpeg"
    else:
        assert body["messages"][0]["content"][1]["image_url"]["url"] == PNG


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("finish,expected", [("length", "length"), ("content_filter", "content_filter")])
@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_max_tokens_and_safety_endings(mocks, client, provider, model, upstream, finish, expected, stream):
    mocks[provider].script({"kind": "ok", "finish": finish, "content": "partial answer"})
    kw = dict(model=model, messages=[{"role": "user", "content": "go on"}])
    if stream:
        _, _, _, _, got, _ = _collect(client.chat.completions.create(stream=True, **kw))
    else:
        got = client.chat.completions.create(**kw).choices[0].finish_reason
    assert got == expected


@pytest.mark.parametrize("provider,model,upstream", FORMATS, ids=IDS)
def test_a_mid_stream_error_reaches_the_client_as_an_error(mocks, client, provider, model, upstream):
    # Past the first token, so the 200 is committed (Anthropic: message_start, ping,
    # content_block_start, then two text deltas).
    after = 5 if provider == "anthropic" else 3
    mocks[provider].script({"kind": "stream_error", "after_chunks": after,
                            "message": "upstream overloaded"})
    stream = client.chat.completions.create(model=model, stream=True,
                                            messages=[{"role": "user", "content": "long answer please"}])
    got = []
    with pytest.raises(openai.APIError) as e:
        for ch in stream:
            got.append(ch)
    assert "upstream overloaded" in str(e.value)
    assert got and got[0].choices[0].delta.role == "assistant"


def test_gemini_malformed_function_call_is_an_error_not_a_stop(mocks, client, gw):
    # Twice for each request: a malformed call is a failed attempt, retried once. The stream's
    # comes before any answer, so the client gets a clean error, not an empty 200.
    mocks["gemini"].script(*[{"kind": "ok", "finish": "malformed_function_call"}] * 4)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gemini/gemini-2.5-flash", tools=[WEATHER],
                                       messages=[{"role": "user", "content": "weather in Oslo?"}])
    assert e.value.status_code == 502 and "malformed function call" in str(e.value).lower()
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(model="gemini/gemini-2.5-flash", tools=[WEATHER], stream=True,
                                            messages=[{"role": "user", "content": "weather in Oslo?"}]))
    assert "malformed" in str(e.value).lower()


def test_what_real_clients_send_passes_every_format(mocks, client):
    """Continue's 7 stop strings, a named tool_choice, a strict recursive json_schema."""
    stops = ["\n\n", "```", "<|end|>", "</s>", "\nUser:", "\nHuman:", "<fim_suffix>"]
    tree = {"type": "json_schema", "json_schema": {"name": "tree", "strict": True, "schema": {
        "$defs": {"node": {"type": "object", "properties": {
            "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["name", "children"], "additionalProperties": False}},
        "$ref": "#/$defs/node"}}}
    for provider, model, _ in FORMATS:
        r = client.chat.completions.create(model=model, stop=stops,
                                           messages=[{"role": "user", "content": "complete"}])
        assert r.choices[0].message.content
        body = _native(mocks, provider)["body"]
        if provider == "gemini":
            assert body["generationConfig"]["stopSequences"] == stops[:5]
        elif provider == "anthropic":
            # Anthropic refuses whitespace-only stop sequences: they are left out.
            assert body["stop_sequences"] == [x for x in stops if x.strip()]
        else:
            assert body["stop"] == stops[:4]
        mocks[provider].reset()

        mocks[provider].script({"kind": "ok", "tool_calls": 1})
        r = client.chat.completions.create(
            model=model, tools=[TIME, WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            messages=[{"role": "user", "content": "time in Oslo?"}])
        assert r.choices[0].message.tool_calls[0].function.name == "get_time"
        body = _native(mocks, provider)["body"]
        if provider == "anthropic":
            assert body["tool_choice"] == {"type": "tool", "name": "get_time"}
        elif provider == "gemini":
            cfg = body["toolConfig"]["functionCallingConfig"]
            assert cfg == {"mode": "ANY", "allowedFunctionNames": ["get_time"]}
        mocks[provider].reset()

        if provider == "anthropic":
            # The mock answers the forced tool as Claude would: with a tool_use of that tool.
            mocks[provider].script({"kind": "ok", "tool_calls": 1})
        r = client.chat.completions.create(model=model, response_format=tree,
                                           messages=[{"role": "user", "content": "a family tree"}])
        answer = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and not answer.tool_calls
        body = _native(mocks, provider)["body"]
        if provider == "anthropic":
            # A forced tool whose input is the answer: the client sees JSON content.
            [tool] = body["tools"]
            schema = tree["json_schema"]["schema"]
            # Pydantic's shape for a recursive model (a top-level $ref): the object definition
            # is lifted to the top, its $defs kept so the recursion still resolves.
            assert tool["input_schema"] == {**schema["$defs"]["node"], "$defs": schema["$defs"]}
            assert body["tool_choice"] == {"type": "tool", "name": tool["name"]}
            parsed = json.loads(answer.content)
            assert isinstance(parsed, dict) and "name" in parsed
        elif provider == "gemini":
            cfg = body["generationConfig"]
            assert cfg["responseMimeType"] == "application/json"
            assert cfg["responseJsonSchema"] == tree["json_schema"]["schema"]
        else:
            assert body["response_format"] == tree
        mocks[provider].reset()


def test_a_prefill_works_where_accepted_and_is_rewritten_where_refused(make_mock, make_gateway):
    """Continue's apply ends with an assistant prefill; newer Claude models answer 400 to it."""
    strict = make_mock("anthropic", reject_prefill=True)
    gw = make_gateway({"anthropic": strict})
    client = gw.client()
    history = [{"role": "user", "content": "rewrite the function"},
               {"role": "assistant", "content": "def add(a, b):\n    "}]
    r = client.chat.completions.create(model="anthropic/claude-opus-4-6", messages=history)
    assert r.choices[0].message.content
    [req] = strict.requests()
    assert req["body"]["messages"][-1]["role"] == "user"
    assert "def add(a, b):" in req["body"]["system"]

    lenient = make_mock("anthropic")
    gw = make_gateway({"anthropic": lenient})
    r = gw.client().chat.completions.create(model="anthropic/claude-haiku-4-5", messages=history)
    assert r.choices[0].message.content
    [req] = lenient.requests()
    last = req["body"]["messages"][-1]
    assert last["role"] == "assistant"
    text = last["content"] if isinstance(last["content"], str) else last["content"][0]["text"]
    assert text == "def add(a, b):", "a final assistant turn may not end in whitespace"


def test_anthropic_answers_are_priced(mocks, client):
    raw = client.chat.completions.with_raw_response.create(
        model="anthropic/claude-haiku-4-5", messages=[{"role": "user", "content": "price me"}])
    u = raw.parse().usage
    # Whole micro-dollars (a fraction rounds up once): exactly what the budgets count.
    expected = math.ceil(u.prompt_tokens * 1.0 + u.completion_tokens * 5.0) / 1e6
    assert float(raw.headers["x-freerelay-cost-usd"]) == pytest.approx(expected, rel=1e-6)
    assert raw.headers["x-freerelay-attempts"] == "1"
