"""Streaming: SSE relay, chunk-by-chunk delivery, include_usage, tool calls, OpenWebUI's pattern."""

import json

import httpx

from helpers import chat_body, sse_events, wait_until, words


def test_sdk_stream_text(shared, client):
    stream = client.chat.completions.create(
        model="auto", stream=True,
        messages=[{"role": "user", "content": "stream these words now"}])
    chunks = list(stream)
    assert chunks, "no chunks"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock(groq): stream these words now"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    [req] = shared.groq.requests()
    assert req["body"]["stream"] is True


def test_raw_sse_framing(gw):
    # Groq named: its OpenAI-format stream is relayed as is (which model `auto` picks is the
    # router's choice, and Gemini's native stream is translated).
    with gw.http() as c:
        r = c.post("/v1/chat/completions",
                   json=chat_body("groq/llama-3.1-8b-instant", content="a b c", stream=True))
    assert r.status_code == 200
    assert "text/event-stream" in r.headers["content-type"]
    assert r.headers["x-freerelay-provider"] == "groq"
    assert r.headers["x-freerelay-model"].endswith("llama-3.1-8b-instant")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == "mock(groq): a b c"
    assert all("usage" not in ch or ch["usage"] is None for ch in chunks)


def test_include_usage_final_chunk(client):
    prompt = "count my words please"
    stream = client.chat.completions.create(
        model="auto", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": prompt}])
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == words(prompt)
    assert last.usage.completion_tokens == words("mock(groq): " + prompt)
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    for c in chunks[:-1]:
        assert c.usage is None
        assert len(c.choices) == 1


def test_include_usage_raw_order(gw):
    body = chat_body(content="x y", stream=True, stream_options={"include_usage": True})
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert "text/event-stream" in r.headers["content-type"]
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 2
    finish_chunk = json.loads(events[-3])
    assert finish_chunk["choices"][0]["finish_reason"] == "stop"


def _data_lines(r: httpx.Response):
    """The `data:` payloads of a streaming response, each as soon as its line has arrived."""
    for line in r.iter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def test_stream_is_delivered_chunk_by_chunk(gw, shared):
    """The head and the first chunks reach the client while the upstream provably has not sent
    the rest: the mock holds its stream after two events until the test, having read them,
    releases it. A buffering gateway would block the read below until the client's timeout."""
    groq = shared.groq
    groq.script({"kind": "ok", "pause_after_chunks": 2})
    content = "one two three four five six seven"
    with gw.http(timeout=20) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat_body(content=content, stream=True)) as r:
            assert r.status_code == 200
            assert "text/event-stream" in r.headers["content-type"]
            events = _data_lines(r)
            early = [json.loads(next(events)), json.loads(next(events))]
            assert wait_until(lambda: groq.paused() == 1), "the mock is not holding the rest"
            groq.release()
            late = list(events)
    assert early[0]["choices"][0]["delta"]["role"] == "assistant"
    assert early[1]["choices"][0]["delta"]["content"] == "mock(groq):"
    assert late[-1] == "[DONE]"
    chunks = early + [json.loads(e) for e in late[:-1]]
    assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks) == \
        "mock(groq): " + content
    # role chunk + 8 word chunks + finish chunk
    assert len(chunks) == 10
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_tool_call(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    stream = client.chat.completions.create(
        model="auto", stream=True, tools=tools,
        messages=[{"role": "user", "content": "weather in Lisbon?"}])
    name, args, ids, finish = "", "", set(), None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        for tc in ch.delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
            if tc.function and tc.function.name:
                name += tc.function.name
            if tc.function and tc.function.arguments:
                args += tc.function.arguments
        finish = ch.finish_reason or finish
    assert name == "get_weather"
    assert len(ids) == 1
    assert json.loads(args) == {"city": "Lisbon"}
    assert finish == "tool_calls"


def test_openwebui_pattern(gw, shared):
    """OpenWebUI: list models with Bearer, then stream with include_usage, judge by Content-Type."""
    headers = {"Authorization": f"Bearer {gw.client_key}"}
    with httpx.Client(timeout=10) as c:
        r = c.get(f"{gw.url}/v1/models", headers=headers)
        assert r.status_code == 200
        ids = [m["id"] for m in r.json()["data"]]
        assert "auto" in ids
        model = next(i for i in ids if i.startswith("groq/"))
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello from openwebui"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        owui = {**headers, "X-OpenWebUI-User-Name": "Ada", "X-OpenWebUI-User-Id": "u1",
                "X-OpenWebUI-Chat-Id": "c1", "Content-Type": "application/json"}
        with c.stream("POST", f"{gw.url}/v1/chat/completions", headers=owui, json=body) as r:
            assert r.status_code == 200
            assert "text/event-stream" in r.headers.get("content-type", "")
            text = r.read().decode()
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    content = "".join((json.loads(e)["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
                      for e in events[:-1])
    assert content == "mock(groq): hello from openwebui"
