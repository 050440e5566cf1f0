"""Streaming: SSE relay, chunk-by-chunk delivery, include_usage, tool calls, OpenWebUI's pattern."""

import json
import time

import httpx

from helpers import chat_body, sse_events, words


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
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body(content="a b c", stream=True))
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
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 2
    finish_chunk = json.loads(events[-3])
    assert finish_chunk["choices"][0]["finish_reason"] == "stop"


def test_stream_is_delivered_chunk_by_chunk(gw, shared):
    """With 300 ms between upstream chunks, the first chunk reaches the client long before the end."""
    shared.groq.script({"kind": "ok", "chunk_delay_ms": 300})
    content = "one two three four five six seven"
    arrivals: list[tuple[float, str]] = []
    with gw.http(timeout=30) as c:
        start = time.monotonic()
        with c.stream("POST", "/v1/chat/completions", json=chat_body(content=content, stream=True)) as r:
            assert r.status_code == 200
            headers_at = time.monotonic() - start
            buf = ""
            for piece in r.iter_text():
                buf += piece
                while "\n\n" in buf:
                    event, buf = buf.split("\n\n", 1)
                    for data in sse_events(event + "\n\n"):
                        arrivals.append((time.monotonic() - start, data))
    datas = [d for _, d in arrivals]
    assert datas[-1] == "[DONE]"
    # role chunk + 8 word chunks + finish + [DONE]: 10 gaps of 300 ms upstream
    total = arrivals[-1][0]
    first_content = next(t for t, d in arrivals if d != "[DONE]" and
                         (json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content"))
    assert total >= 2.5, f"stream ended at {total:.2f}s; the upstream takes >= 3s"
    assert first_content < total - 1.5, (
        f"first content chunk at {first_content:.2f}s, end at {total:.2f}s: the stream was buffered")
    assert headers_at < total - 1.5, "response headers were held back until the stream ended"
    # Arrivals are spread out, not bunched at the end.
    distinct = {round(t, 1) for t, _ in arrivals}
    assert len(distinct) >= 5, arrivals


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
