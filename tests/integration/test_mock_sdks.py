"""The mock provider is honest: the official SDKs, pointed straight at `freerelay-mock`, parse
what it sends. Anthropic's `anthropic` SDK (Messages: JSON, streams, tools, thinking, refusals,
errors), Google's `google-genai` SDK (generateContent and its SSE stream: text, function calls,
thoughts, usage, SAFETY, the 429 with its retry delay) and OpenAI's `openai` SDK for what the
OpenAI rendering gained (parallel tool calls, reasoning, mid-stream errors).

Needs only the mock binary: cargo build --release -p freerelay-testkit
"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conftest import Mock

CLAUDE = "claude-sonnet-4-6"
GEMINI = "gemini-2.5-flash"

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather at a place.",
    "input_schema": {
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["location"],
    },
}
TIME_TOOL = {
    "name": "get_time",
    "description": "Current time in a time zone.",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}, "utc": {"type": "boolean"}}},
}
# What the mock means to call the tools with, for a question about Oslo.
WEATHER_ARGS = {"location": "Oslo", "unit": "celsius"}
TIME_ARGS = {"zone": "mock-zone", "utc": True}


@pytest.fixture(scope="module")
def mock_proc(tmp_path_factory):
    m = Mock("sdk", tmp_path_factory.mktemp("mock-sdks"), keys=2)
    yield m
    m.close()


@pytest.fixture
def mock(mock_proc) -> Mock:
    mock_proc.reset()
    return mock_proc


@pytest.fixture
def claude(mock) -> anthropic.Anthropic:
    with anthropic.Anthropic(api_key=mock.key, base_url=mock.url, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def gemini(mock) -> genai.Client:
    c = genai.Client(api_key=mock.key, http_options=types.HttpOptions(base_url=mock.url, timeout=10_000))
    yield c
    c.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Anthropic


def test_anthropic_text(mock, claude):
    msg = claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("hello big world"))
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.id.startswith("msg_")
    assert msg.model == CLAUDE
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "mock(sdk): hello big world"
    assert msg.stop_reason == "end_turn"
    assert msg.stop_sequence is None
    assert msg.usage.input_tokens == 3
    assert msg.usage.output_tokens == 4
    [req] = mock.requests()
    assert req["kind"] == "anthropic"
    assert req["path"] == "/v1/messages"
    # anthropic 2.x sends the key as a bearer token; the mock takes that or x-api-key.
    assert req["headers"]["authorization"] == f"Bearer {mock.key}"
    assert req["headers"]["anthropic-version"]
    assert req["body"]["max_tokens"] == 100
    assert mock.requests(kind="anthropic") == [req]
    assert mock.requests(kind="gemini") == []


def test_anthropic_parallel_tool_use(mock, claude):
    mock.script({"kind": "ok", "tool_calls": 3})
    msg = claude.messages.create(model=CLAUDE, max_tokens=200, tools=[WEATHER_TOOL, TIME_TOOL],
                                 messages=user("What's the weather in Oslo?"))
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather", "get_time", "get_weather"]
    assert [u.input for u in uses] == [WEATHER_ARGS, TIME_ARGS, WEATHER_ARGS]
    assert len({u.id for u in uses}) == 3 and all(u.id.startswith("toolu_") for u in uses)
    # The results go back as the API requires: every tool_use answered in the next message.
    # (Left to its default, the mock would call the weather tool again: the last user text
    # still asks about the weather.)
    mock.script({"kind": "ok", "content": "Fine in Oslo."})
    follow = claude.messages.create(
        model=CLAUDE, max_tokens=200, tools=[WEATHER_TOOL, TIME_TOOL],
        messages=[*user("What's the weather in Oslo?"), {"role": "assistant", "content": msg.content},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": u.id, "content": "fine"} for u in uses]}])
    assert follow.stop_reason == "end_turn" and follow.content[0].text == "Fine in Oslo."
    assert mock.requests()[-1]["body"]["messages"][1]["content"][0]["type"] == "tool_use"
    # One missing → the API's 400.
    with pytest.raises(anthropic.BadRequestError, match="without `tool_result`"):
        claude.messages.create(
            model=CLAUDE, max_tokens=200, tools=[WEATHER_TOOL, TIME_TOOL],
            messages=[*user("x"), {"role": "assistant", "content": msg.content},
                      {"role": "user", "content": [
                          {"type": "tool_result", "tool_use_id": uses[0].id, "content": "fine"}]}])


def test_anthropic_default_weather_call_stays(mock, claude):
    msg = claude.messages.create(model=CLAUDE, max_tokens=50, tools=[WEATHER_TOOL],
                                 messages=user("weather in Bergen?"))
    [use] = msg.content
    assert use.type == "tool_use" and use.input == {"location": "Bergen"}


def test_anthropic_thinking(mock, claude):
    mock.script({"kind": "ok", "thinking": "the user greets me so I greet back", "content": "Hello!"})
    msg = claude.messages.create(model=CLAUDE, max_tokens=2048, messages=user("hi"),
                                 thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "the user greets me so I greet back"
    assert msg.content[0].signature
    assert msg.content[1].text == "Hello!"
    assert msg.usage.output_tokens == 8 + 1
    # Without thinking enabled the model does not think.
    mock.script({"kind": "ok", "thinking": "unseen", "content": "Hello!"})
    msg = claude.messages.create(model=CLAUDE, max_tokens=2048, messages=user("hi"))
    assert [b.type for b in msg.content] == ["text"]


def test_anthropic_max_tokens_ending(mock, claude):
    msg = claude.messages.create(model=CLAUDE, max_tokens=2, messages=user("one two three four"))
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].text == "mock(sdk): one"
    assert msg.usage.output_tokens == 2
    mock.script({"kind": "ok", "finish": "length", "content": "cut"})
    assert claude.messages.create(model=CLAUDE, max_tokens=99, messages=user("x")).stop_reason == "max_tokens"


def test_anthropic_refusal(mock, claude):
    mock.script({"kind": "ok", "finish": "content_filter"})
    msg = claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("something bad"))
    assert msg.stop_reason == "refusal"
    assert msg.content == []
    assert msg.stop_details.type == "refusal"
    mock.script({"kind": "ok", "finish": "content_filter"})
    with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=user("bad")) as s:
        final = s.get_final_message()
    assert final.stop_reason == "refusal"


def test_anthropic_stream_text(mock, claude):
    with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=user("stream these words")) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) == 4
    assert "".join(pieces) == "mock(sdk): stream these words"
    assert final.content[0].text == "mock(sdk): stream these words"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 3 and final.usage.output_tokens == 4
    assert mock.requests()[-1]["body"]["stream"] is True


def test_anthropic_stream_tool_input_assembled(mock, claude):
    mock.script({"kind": "ok", "tool_calls": 2, "thinking": "two tools then", "content": "Checking."})
    with claude.messages.stream(model=CLAUDE, max_tokens=2048, tools=[WEATHER_TOOL, TIME_TOOL],
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=user("What's the weather in Oslo?")) as s:
        events = list(s)
        final = s.get_final_message()
    partial = [e for e in events if e.type == "input_json"]
    assert len(partial) >= 4, "each tool input arrives in several input_json_delta pieces"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "two tools then" and final.content[0].signature
    assert final.content[1].text == "Checking."
    assert final.content[2].name == "get_weather" and final.content[2].input == WEATHER_ARGS
    assert final.content[3].name == "get_time" and final.content[3].input == TIME_ARGS
    assert final.stop_reason == "tool_use"


def test_anthropic_raw_stream_event_order(mock, claude):
    stream = claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("a b"), stream=True)
    kinds = [e.type for e in stream]
    assert kinds == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    # On the wire: named events and a ping after message_start (the SDK skips pings).
    r = httpx.post(f"{mock.url}/v1/messages", headers={"x-api-key": mock.key, "anthropic-version": "2023-06-01"},
                   json={"model": CLAUDE, "max_tokens": 10, "stream": True, "messages": user("a")})
    names = [line[len("event: "):] for line in r.text.split("\n") if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]


def test_anthropic_mid_stream_error_raises(mock, claude):
    mock.script({"kind": "stream_error", "after_chunks": 4})
    received = []
    with pytest.raises(anthropic.APIStatusError) as err:
        with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=user("one two three")) as s:
            for text in s.text_stream:
                received.append(text)
    assert err.value.body["type"] == "error"
    assert err.value.body["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert received == ["mock(sdk):"], "what came before the error was delivered"
    mock.script({"kind": "stream_error", "error_type": "api_error", "message": "boom"})
    with pytest.raises(anthropic.InternalServerError) as err:
        claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("x"))
    assert err.value.status_code == 500 and err.value.body["error"]["message"] == "boom"


def test_anthropic_status_errors(mock, claude):
    mock.script({"kind": "status", "status": 429, "retry_after": 12}, {"kind": "status", "status": 529})
    with pytest.raises(anthropic.RateLimitError) as err:
        claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("x"))
    assert err.value.body["error"]["type"] == "rate_limit_error"
    assert err.value.response.headers["retry-after"] == "12"
    assert err.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    with pytest.raises(anthropic.OverloadedError) as err:
        claude.messages.create(model=CLAUDE, max_tokens=100, messages=user("x"))
    assert err.value.body["error"]["type"] == "overloaded_error"


def test_anthropic_keys_and_headers(mock):
    for key in mock.keys:
        with anthropic.Anthropic(api_key=key, base_url=mock.url, max_retries=0) as c:
            assert c.messages.create(model=CLAUDE, max_tokens=10, messages=user("k")).content
    with anthropic.Anthropic(api_key="sk-ant-wrong", base_url=mock.url, max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as err:
            c.messages.create(model=CLAUDE, max_tokens=10, messages=user("k"))
    assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid x-api-key"}}
    r = httpx.post(f"{mock.url}/v1/messages", headers={"x-api-key": mock.key},
                   json={"model": CLAUDE, "max_tokens": 10, "messages": user("a")})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "first message"),
    ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], "top-level `system`"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "so "}], "trailing whitespace"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}],
     "unexpected `tool_use_id`"),
])
def test_anthropic_validation(claude, messages, needle):
    with pytest.raises(anthropic.BadRequestError, match=needle) as err:
        claude.messages.create(model=CLAUDE, max_tokens=10, messages=messages)
    assert err.value.body["error"]["type"] == "invalid_request_error"


def test_anthropic_max_tokens_required(mock):
    r = httpx.post(f"{mock.url}/v1/messages", headers={"x-api-key": mock.key, "anthropic-version": "2023-06-01"},
                   json={"model": CLAUDE, "messages": user("a")})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "max_tokens: Field required"}}


def test_anthropic_prefill(tmp_path):
    prefill = [*user("Pick A or B"), {"role": "assistant", "content": "The answer is"}]
    strict = Mock("strict", tmp_path, reject_prefill=True)
    lenient = Mock("lenient", tmp_path)
    try:
        with anthropic.Anthropic(api_key=lenient.key, base_url=lenient.url, max_retries=0) as c:
            assert c.messages.create(model=CLAUDE, max_tokens=10, messages=prefill).stop_reason == "end_turn"
        with anthropic.Anthropic(api_key=strict.key, base_url=strict.url, max_retries=0) as c:
            with pytest.raises(anthropic.BadRequestError, match="does not support assistant message prefill"):
                c.messages.create(model=CLAUDE, max_tokens=10, messages=prefill)
            assert c.messages.create(model=CLAUDE, max_tokens=10, messages=user("ok")).content
    finally:
        strict.close()
        lenient.close()


# ---------------------------------------------------------------------------------------------
# Gemini

def weather_tools(json_schema: bool = False) -> types.GenerateContentConfig:
    if json_schema:
        weather = types.FunctionDeclaration(name="get_weather", description="Weather at a place.",
                                            parameters_json_schema=WEATHER_TOOL["input_schema"])
    else:
        weather = types.FunctionDeclaration(
            name="get_weather", description="Weather at a place.",
            parameters=types.Schema(type=types.Type.OBJECT, properties={
                "location": types.Schema(type=types.Type.STRING),
                "unit": types.Schema(type=types.Type.STRING, enum=["celsius", "fahrenheit"])}))
    time = types.FunctionDeclaration(name="get_time", description="Time in a zone.",
                                     parameters_json_schema=TIME_TOOL["input_schema"])
    return types.GenerateContentConfig(tools=[types.Tool(function_declarations=[weather, time])])


def test_gemini_text_and_usage(mock, gemini):
    r = gemini.models.generate_content(model=GEMINI, contents="hello big world")
    assert r.text == "mock(sdk): hello big world"
    cand = r.candidates[0]
    assert cand.finish_reason == types.FinishReason.STOP
    assert cand.content.role == "model"
    assert r.usage_metadata.prompt_token_count == 3
    assert r.usage_metadata.candidates_token_count == 4
    assert r.usage_metadata.total_token_count == 7
    assert r.model_version == GEMINI
    assert r.response_id
    [req] = mock.requests()
    assert req["kind"] == "gemini"
    assert req["path"].endswith(f"/models/{GEMINI}:generateContent")
    assert req["headers"]["x-goog-api-key"] == mock.key
    assert req["body"]["contents"] == [{"role": "user", "parts": [{"text": "hello big world"}]}]


@pytest.mark.parametrize("json_schema", [False, True])
def test_gemini_parallel_function_calls(mock, gemini, json_schema):
    mock.script({"kind": "ok", "tool_calls": 3})
    r = gemini.models.generate_content(model=GEMINI, contents="What's the weather in Oslo?",
                                       config=weather_tools(json_schema))
    calls = r.function_calls
    assert [c.name for c in calls] == ["get_weather", "get_time", "get_weather"]
    assert [c.args for c in calls] == [WEATHER_ARGS, TIME_ARGS, WEATHER_ARGS]
    assert r.candidates[0].finish_reason == types.FinishReason.STOP
    # The results go back as function responses.
    mock.script({"kind": "ok", "content": "Fine in Oslo."})
    follow = gemini.models.generate_content(model=GEMINI, config=weather_tools(json_schema), contents=[
        types.Content(role="user", parts=[types.Part(text="What's the weather in Oslo?")]),
        r.candidates[0].content,
        types.Content(role="user", parts=[types.Part.from_function_response(name=c.name, response={"ok": 1})
                                          for c in calls]),
    ])
    assert follow.text == "Fine in Oslo."
    sent = mock.requests()[-1]["body"]["contents"]
    assert [p["functionResponse"]["name"] for p in sent[2]["parts"]] == [c.name for c in calls]


def test_gemini_thoughts(mock, gemini):
    mock.script({"kind": "ok", "thinking": "a short thought here", "content": "Answer."})
    config = types.GenerateContentConfig(thinking_config=types.ThinkingConfig(include_thoughts=True))
    r = gemini.models.generate_content(model=GEMINI, contents="think", config=config)
    parts = r.candidates[0].content.parts
    assert parts[0].thought is True and parts[0].text == "a short thought here"
    assert not parts[1].thought and parts[1].text == "Answer."
    assert r.text == "Answer."
    assert r.usage_metadata.thoughts_token_count == 4
    assert r.usage_metadata.total_token_count == 1 + 1 + 4
    # Without include_thoughts: counted, not shown.
    mock.script({"kind": "ok", "thinking": "hidden thought", "content": "Answer."})
    r = gemini.models.generate_content(model=GEMINI, contents="think")
    assert [p.text for p in r.candidates[0].content.parts] == ["Answer."]
    assert r.usage_metadata.thoughts_token_count == 2


def test_gemini_safety_and_other_finishes(mock, gemini):
    mock.script({"kind": "ok", "finish": "content_filter"})
    r = gemini.models.generate_content(model=GEMINI, contents="bad")
    cand = r.candidates[0]
    assert cand.finish_reason == types.FinishReason.SAFETY
    assert r.text is None
    blocked = [s for s in cand.safety_ratings if s.blocked]
    assert [s.category for s in blocked] == [types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT]
    mock.script({"kind": "ok", "finish": "malformed_function_call"})
    r = gemini.models.generate_content(model=GEMINI, contents="x", config=weather_tools())
    assert r.candidates[0].finish_reason == types.FinishReason.MALFORMED_FUNCTION_CALL
    r = gemini.models.generate_content(model=GEMINI, contents="one two three four",
                                       config=types.GenerateContentConfig(max_output_tokens=3))
    assert r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert r.text == "mock(sdk): one two"


def test_gemini_stream(mock, gemini):
    chunks = list(gemini.models.generate_content_stream(model=GEMINI, contents="stream these words"))
    assert len(chunks) == 4
    assert "".join(c.text for c in chunks) == "mock(sdk): stream these words"
    assert all(c.candidates[0].finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata.candidates_token_count == 4
    assert {c.response_id for c in chunks} == {last.response_id}
    [req] = mock.requests()
    assert req["path"].endswith(f"/models/{GEMINI}:streamGenerateContent")
    assert "alt=sse" in req["query"]


def test_gemini_stream_thoughts_and_calls(mock, gemini):
    mock.script({"kind": "ok", "tool_calls": 2, "thinking": "use both tools"})
    config = weather_tools()
    config.thinking_config = types.ThinkingConfig(include_thoughts=True)
    chunks = list(gemini.models.generate_content_stream(model=GEMINI, contents="weather in Oslo", config=config))
    thoughts = "".join(p.text for c in chunks for p in c.candidates[0].content.parts if p.thought)
    assert thoughts == "use both tools"
    calls = [fc for c in chunks for fc in (c.function_calls or [])]
    assert [(c.name, c.args) for c in calls] == [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)]
    assert chunks[-1].usage_metadata.thoughts_token_count == 3


def test_gemini_429_with_retry_delay(mock, gemini):
    mock.script({"kind": "status", "status": 429, "retry_delay": "7s"})
    with pytest.raises(genai_errors.ClientError) as err:
        gemini.models.generate_content(model=GEMINI, contents="x")
    e = err.value
    assert e.code == 429 and e.status == "RESOURCE_EXHAUSTED"
    details = e.details["error"]["details"]
    retry = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
    assert "7s" in str(e)
    mock.script({"kind": "status", "status": 503})
    with pytest.raises(genai_errors.ServerError) as err:
        gemini.models.generate_content(model=GEMINI, contents="x")
    assert err.value.status == "UNAVAILABLE"


def test_gemini_mid_stream_error_raises(mock, gemini):
    mock.script({"kind": "stream_error", "after_chunks": 2, "message": "backend went away"})
    seen = []
    with pytest.raises(genai_errors.ServerError) as err:
        for chunk in gemini.models.generate_content_stream(model=GEMINI, contents="one two three four"):
            seen.append(chunk.text)
    assert seen == ["mock(sdk):", " one"]
    assert err.value.code == 500 and err.value.status == "INTERNAL"
    assert err.value.message == "backend went away"


def test_gemini_keys(mock):
    for key in mock.keys:
        c = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=mock.url))
        assert c.models.generate_content(model=GEMINI, contents="k").text
    bad = genai.Client(api_key="AIza-wrong", http_options=types.HttpOptions(base_url=mock.url))
    with pytest.raises(genai_errors.ClientError) as err:
        bad.models.generate_content(model=GEMINI, contents="k")
    assert err.value.code == 400 and err.value.status == "INVALID_ARGUMENT"
    assert "API key not valid" in err.value.message
    url = f"{mock.url}/v1beta/models/{GEMINI}:generateContent"
    body = {"contents": [{"parts": [{"text": "q"}]}]}
    assert httpx.post(url, params={"key": mock.keys[1]}, json=body).status_code == 200
    r = httpx.post(url, json=body)
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"


def test_gemini_validation(gemini):
    config = types.GenerateContentConfig(stop_sequences=list("abcdef"))
    with pytest.raises(genai_errors.ClientError, match="stop_sequences"):
        gemini.models.generate_content(model=GEMINI, contents="x", config=config)
    bad_role = types.Content(role="assistant", parts=[types.Part(text="x")])
    with pytest.raises(genai_errors.ClientError, match="valid role"):
        gemini.models.generate_content(model=GEMINI, contents=[bad_role])


def test_gemini_json_array_stream(mock):
    r = httpx.post(f"{mock.url}/v1beta/models/{GEMINI}:streamGenerateContent",
                   headers={"x-goog-api-key": mock.key}, json={"contents": [{"parts": [{"text": "a b"}]}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    chunks = json.loads(r.text)
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == "mock(sdk): a b"
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


# ---------------------------------------------------------------------------------------------
# OpenAI: what its rendering gained


@pytest.fixture
def oai(mock) -> openai.OpenAI:
    with openai.OpenAI(api_key=mock.keys[1], base_url=f"{mock.url}/v1", max_retries=0, timeout=10) as c:
        yield c


OPENAI_TOOLS = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
                for t in (WEATHER_TOOL, TIME_TOOL)]


def test_openai_parallel_tool_calls_and_reasoning(mock, oai):
    mock.script({"kind": "ok", "tool_calls": 2, "thinking": "both then"})
    r = oai.chat.completions.create(model="m", messages=user("weather in Oslo"), tools=OPENAI_TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)]
    assert msg.model_extra["reasoning_content"] == "both then"
    assert r.usage.completion_tokens_details.reasoning_tokens == 2
    mock.script({"kind": "ok", "tool_calls": 2})
    with oai.chat.completions.stream(model="m", messages=user("weather in Oslo"), tools=OPENAI_TOOLS) as s:
        final = s.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)]


def test_openai_mid_stream_error_and_finishes(mock, oai):
    mock.script({"kind": "stream_error", "after_chunks": 2, "message": "upstream broke"})
    with pytest.raises(openai.APIError, match="upstream broke"):
        for _ in oai.chat.completions.create(model="m", messages=user("a b c"), stream=True):
            pass
    mock.script({"kind": "ok", "finish": "content_filter"})
    r = oai.chat.completions.create(model="m", messages=user("x"))
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content is None
    r = oai.chat.completions.create(model="m", messages=user("one two three"), max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "mock(sdk): one"
    with pytest.raises(openai.BadRequestError, match="maximum length 4"):
        oai.chat.completions.create(model="m", messages=user("x"), stop=list("abcde"))


def test_openai_reject_stream_options(tmp_path):
    m = Mock("mistral", tmp_path, reject_stream_options=True)
    try:
        with openai.OpenAI(api_key=m.key, base_url=f"{m.url}/v1", max_retries=0) as c:
            with pytest.raises(openai.UnprocessableEntityError) as err:
                c.chat.completions.create(model="m", messages=user("x"), stream=True,
                                          stream_options={"include_usage": True})
            assert err.value.body["message"]["detail"][0]["loc"] == ["body", "stream_options"]
            chunks = list(c.chat.completions.create(model="m", messages=user("x"), stream=True))
            assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        m.close()
