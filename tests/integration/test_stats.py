"""GET /v1/freerelay/stats: counted from the key-value store, exact under concurrency, durable."""

import concurrent.futures

import pytest

from helpers import assert_openai_error, wait_until, words

PROMPT = "count these five words"
EXPECTED_PROMPT = words(PROMPT)
EXPECTED_COMPLETION = words("mock(groq): " + PROMPT)


def _groq(stats: dict) -> dict:
    return stats["providers"].get("groq", {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                           "completion_tokens": 0})


def _counts(p: dict, want: dict) -> dict:
    """The counters of `p` that `want` names (the report may carry more)."""
    return {k: p.get(k, 0) for k in want}


def _settled(gw, pred, timeout=5.0) -> dict:
    """Stats are written after the response is finished: poll until `pred(stats)` holds."""
    seen = {}

    def check():
        seen["s"] = gw.stats()
        return pred(seen["s"])

    wait_until(check, timeout=timeout)
    return seen["s"]


def test_stats_shape(gw):
    s = gw.stats()
    assert s["object"] == "freerelay.stats"
    assert isinstance(s["providers"], dict)
    for pid, p in s["providers"].items():
        for k in ("requests", "errors", "prompt_tokens", "completion_tokens"):
            assert isinstance(p[k], int) and p[k] >= 0, (pid, p)


def test_stats_count_json_and_streamed_usage(gw, shared, client):
    before = _groq(gw.stats())
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="auto", messages=msgs)
    assert r.choices[0].message.content == "mock(groq): " + PROMPT
    chunks = list(client.chat.completions.create(model="auto", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == EXPECTED_COMPLETION
    want = {
        "requests": before["requests"] + 2,
        "prompt_tokens": before["prompt_tokens"] + 2 * EXPECTED_PROMPT,
        "completion_tokens": before["completion_tokens"] + 2 * EXPECTED_COMPLETION,
    }
    after = _groq(_settled(gw, lambda s: _counts(_groq(s), want) == want))
    assert _counts(after, want) == want
    assert after["errors"] == before["errors"]


def test_stats_count_upstream_errors(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 500}, {"kind": "status", "status": 500})
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "groq/llama-3.1-8b-instant",
            "messages": [{"role": "user", "content": "x"}]})
    assert_openai_error(r, 502, code="upstream_error")
    s = _groq(_settled(gw, lambda s: _groq(s)["errors"] >= 2))
    assert s["errors"] == 2, "the failure and its one retry"
    assert s["prompt_tokens"] == 0 and s["completion_tokens"] == 0


def test_stats_separate_per_provider(gw, shared, client):
    before = gw.stats()["providers"]
    r = client.chat.completions.create(model="gemini/gemini-2.5-flash",
                                       messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].message.content == "mock(gemini): " + PROMPT
    g0 = before.get("gemini", {})
    want = {
        "requests": g0.get("requests", 0) + 1,
        "prompt_tokens": g0.get("prompt_tokens", 0) + EXPECTED_PROMPT,
        "completion_tokens": g0.get("completion_tokens", 0) + words("mock(gemini): " + PROMPT),
    }
    after = _settled(gw, lambda s: _counts(s["providers"].get("gemini", {}), want) == want)["providers"]
    assert _counts(after["gemini"], want) == want
    assert _groq({"providers": after}) == _groq({"providers": before})


@pytest.mark.parametrize("stream", [False, True])
def test_stats_exact_under_32_concurrent_requests(make_mock, make_gateway, stream):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    n = 32

    def one(i):
        c = gw.client(timeout=60)
        msgs = [{"role": "user", "content": PROMPT}]
        if stream:
            chunks = list(c.chat.completions.create(model="auto", messages=msgs, stream=True,
                                                    stream_options={"include_usage": True}))
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return c.chat.completions.create(model="auto", messages=msgs).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    assert results == ["mock(groq): " + PROMPT] * n
    assert len(groq.requests()) == n
    want = {"requests": n, "errors": 0, "prompt_tokens": n * EXPECTED_PROMPT,
            "completion_tokens": n * EXPECTED_COMPLETION}
    s = _groq(_settled(gw, lambda s: _counts(_groq(s), want) == want, timeout=10))
    assert _counts(s, want) == want
    assert s.get("client_gone", 0) == 0


def test_stats_survive_restart(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    client = gw.client()
    msgs = [{"role": "user", "content": PROMPT}]
    for _ in range(3):
        r = client.chat.completions.create(model="auto", messages=msgs)
        assert r.choices[0].message.content == "mock(groq): " + PROMPT

    def totals(k):
        return {"requests": k, "prompt_tokens": k * EXPECTED_PROMPT,
                "completion_tokens": k * EXPECTED_COMPLETION}

    before = _groq(_settled(gw, lambda s: _counts(_groq(s), totals(3)) == totals(3)))
    assert _counts(before, totals(3)) == totals(3)

    gw.restart()
    assert _groq(gw.stats()) == before

    r = gw.client().chat.completions.create(model="auto", messages=msgs)
    assert r.choices[0].message.content == "mock(groq): " + PROMPT
    after = _groq(_settled(gw, lambda s: _counts(_groq(s), totals(4)) == totals(4)))
    assert _counts(after, totals(4)) == totals(4)
