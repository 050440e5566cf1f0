"""What the client sees when a provider fails: status mapping, timeouts, rate limits and fallback,
broken streams. Explicit `<provider>/<model>` ids keep fallback out of the way unless tested."""

import json
import time

import httpx
import openai
import pytest

from conftest import free_port
from helpers import assert_no_secrets, assert_openai_error, chat_body, sse_events

GROQ = "groq/llama-3.1-8b-instant"
GEMINI_LITE = "gemini/gemini-3.1-flash-lite"


@pytest.fixture
def solo(make_mock, make_gateway):
    """A fresh gateway with groq alone, so failures (and any state they leave) stay in one test."""
    groq = make_mock("groq")
    return make_gateway({"groq": groq}), groq


def _post(gw, body, timeout=30):
    with gw.http(timeout=timeout) as c:
        return c.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_is_502_upstream_error(solo, status):
    gw, groq = solo
    # A 5xx is retried once on the same model, then reported.
    groq.script({"kind": "status", "status": status}, {"kind": "status", "status": status})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 502, type_="upstream_error")
    assert len(groq.requests()) == 2
    assert r.headers["x-freerelay-attempts"] == "2"
    assert_no_secrets(r, [groq.key])


def test_upstream_500_via_sdk_raises(solo):
    gw, groq = solo
    client = gw.client()
    groq.script({"kind": "status", "status": 500}, {"kind": "status", "status": 500})
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=GROQ, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    assert e.value.code == "upstream_error"


def test_upstream_unreachable_is_502(make_mock, make_gateway):
    groq = make_mock("groq")
    groq.url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = make_gateway({"groq": groq})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 502, code="upstream_error", type_="upstream_error")
    assert_no_secrets(r, [groq.key])


def test_upstream_connection_closed_without_answer_is_502(solo):
    gw, groq = solo
    groq.script({"kind": "close"}, {"kind": "close"})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 502, code="upstream_error", type_="upstream_error")
    assert len(groq.requests()) == 2, "a broken connection is retried once"


def test_first_byte_timeout_is_504(make_mock, make_gateway):
    """A stream whose head does not come within the first-byte timeout is a 504 (nothing was sent
    yet). The mock would answer after a minute and the client gives up after 20 s, so a 504 at
    all proves the gateway's 500 ms timer fired; no wall-clock bound needed."""
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_UPSTREAM_FIRST_BYTE_TIMEOUT_MS": "500"})
    groq.script({"kind": "ok", "latency_ms": 60_000}, {"kind": "ok", "latency_ms": 60_000})
    r = _post(gw, chat_body(model=GROQ, stream=True), timeout=20)
    assert_openai_error(r, 504, code="upstream_timeout", type_="upstream_error")
    assert len(groq.requests()) == 2, "a timeout is retried once"


@pytest.mark.parametrize("status", [400, 422])
def test_upstream_4xx_relayed_with_its_message(solo, status):
    gw, groq = solo
    msg = f"upstream says no ({status}): max_tokens is too large for this model"
    groq.script({"kind": "status", "status": status, "body": {"error": {
        "message": msg, "type": "invalid_request_error", "param": "max_tokens", "code": None}}})
    r = _post(gw, chat_body(model=GROQ, max_tokens=10**9))
    err = assert_openai_error(r, status)
    assert msg in err["message"], err


def test_upstream_4xx_with_non_openai_body_still_openai_shaped(solo):
    gw, groq = solo
    groq.script({"kind": "status", "status": 400, "body": ["not", "an", "object"]})
    r = _post(gw, chat_body(model=GROQ))
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["code"] is None, err


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_502_never_401(solo, status):
    gw, groq = solo
    groq.script({"kind": "status", "status": status})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 502, code="upstream_error", type_="upstream_error")


def test_upstream_error_echoing_the_provider_key_is_redacted(solo):
    gw, groq = solo
    """Real providers echo (parts of) a bad key in their 401 message; it must not reach clients."""
    key = groq.key
    groq.script({"kind": "status", "status": 401, "body": {"error": {
        "message": f"Incorrect API key provided: {key}", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 502, code="upstream_error")
    assert_no_secrets(r, [key])


def test_relayed_400_message_never_carries_the_provider_key(solo):
    gw, groq = solo
    key = groq.key
    groq.script({"kind": "status", "status": 400, "body": {"error": {
        "message": f"bad request made with key {key}", "type": "invalid_request_error",
        "param": None, "code": None}}})
    r = _post(gw, chat_body(model=GROQ))
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert "bad request made with key" in err["message"], err
    assert_no_secrets(r, [key])


def test_429_explicit_model_relays_retry_after(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": "7"})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
    assert r.headers.get("retry-after") == "7"
    assert gemini.requests() == [], "an explicit model must not fall back"
    assert_no_secrets(r, [groq.key, gemini.key])


def test_429_explicit_model_via_sdk(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 429, "retry_after": "7"})
    with pytest.raises(openai.RateLimitError) as e:
        gw.client().chat.completions.create(model=GROQ, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers.get("retry-after") == "7"


def test_429_auto_falls_back_and_cools_down(make_mock, make_gateway):
    """After a 429 with Retry-After: 4, `auto` answers from gemini without asking groq, and asks
    groq first again once the 4 s have passed. Judged by what each request could have seen: the
    cool-down ends at least 4 s after `t0` (taken before the 429 was even asked for), so a request
    finished before then cannot have reached groq, and one served by groq cannot have finished
    sooner. Requests are polled until groq is back, with a generous limit.

    The fallback chain is named (Groq's 8B, then Gemini): under `auto` the router learns from
    Gemini's answers and may rightly keep it first after the cool-down, which is not the point
    here."""
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    client = gw.client()
    msgs = [{"role": "user", "content": "fallback please"}]
    chain = {"model": GROQ, "extra_body": {"models": [GEMINI_LITE]}}
    retry_after = 4.0

    groq.script({"kind": "status", "status": 429, "retry_after": "4"})
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(messages=msgs, **chain)
    assert raw.headers["x-freerelay-provider"] == "gemini"
    assert raw.parse().choices[0].message.content == "mock(gemini): fallback please"
    assert len(groq.requests()) == 1
    [req] = gemini.requests()
    assert req["path"] == "/v1beta/models/gemini-3.1-flash-lite:generateContent"
    assert req["headers"]["x-goog-api-key"] == gemini.key

    served: list[tuple[float, str]] = []  # (finished at, provider)
    while not served or served[-1][1] != "groq":
        assert time.monotonic() - t0 < retry_after + 20, f"groq never came back: {served}"
        raw = client.chat.completions.with_raw_response.create(messages=msgs, **chain)
        served.append((time.monotonic() - t0, raw.headers["x-freerelay-provider"]))
        if served[-1][1] != "groq":
            time.sleep(0.25)
    during = [p for t, p in served if t < retry_after - 0.1]
    assert during, f"test too slow to observe the cool-down: {served}"
    assert set(during) == {"gemini"}, served
    assert served[-1][0] >= retry_after - 0.1, f"groq asked again during its cool-down: {served}"
    assert all(p == "gemini" for _, p in served[:-1]), served
    assert len(groq.requests()) == 2, "groq was asked again during its cool-down"
    assert [r["body"]["model"] for r in groq.requests()] == ["llama-3.1-8b-instant"] * 2


def test_429_auto_fallback_streaming(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    stream = gw.client().chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "stream fallback"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "mock(gemini): stream fallback"


def test_429_auto_with_no_other_provider_is_429(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    # Longer than short_retry_after_ms (5 s): not waited out. One named model: under `auto`,
    # Groq's other models (it limits per model) are candidates of their own.
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    r = _post(gw, chat_body(model=GROQ))
    assert_openai_error(r, 429, code="rate_limit_exceeded", type_="rate_limit_error")
    assert 25 <= int(r.headers["retry-after"]) <= 30, r.headers
    assert "Retry after" in r.json()["error"]["message"]
    assert len(groq.requests()) == 1


def _stream_raw(gw, timeout=15):
    with gw.http(timeout=timeout) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=chat_body(model=GROQ, content="one two three four five six", stream=True)) as r:
            status = r.status_code
            ctype = r.headers.get("content-type", "")
            try:
                text = r.read().decode()
                transport_error = None
            except httpx.HTTPError as e:  # the gateway broke its own stream
                text, transport_error = "", e
    return status, ctype, text, transport_error


def _assert_interrupted(status, ctype, text, transport_error):
    assert status == 200
    assert "text/event-stream" in ctype
    assert transport_error is None, f"gateway broke the connection instead of sending an error event: {transport_error!r}"
    events = sse_events(text)
    assert "[DONE]" not in events, "a broken upstream stream must not end with [DONE]"
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors, f"no error event in: {events}"
    assert errors[-1]["code"] == "upstream_stream_interrupted", errors[-1]
    assert errors[-1].get("message")


def _assert_stream_error_event(exc: openai.APIError) -> None:
    """The SDK raised because of the gateway's error event, not a client-side timeout or a
    broken connection (APITimeoutError and APIConnectionError are APIErrors too)."""
    assert not isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)), repr(exc)
    assert exc.code == "upstream_stream_interrupted", (exc.code, exc.body)


def test_mid_stream_drop_becomes_error_event(solo):
    gw, groq = solo
    groq.script({"kind": "drop", "after_chunks": 3})
    _assert_interrupted(*_stream_raw(gw))


def test_mid_stream_drop_raises_in_sdk(solo):
    gw, groq = solo
    client = gw.client()
    groq.script({"kind": "drop", "after_chunks": 3})
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(
                model=GROQ, stream=True, messages=[{"role": "user", "content": "one two three four"}]):
            got.append(chunk)
    _assert_stream_error_event(e.value)
    assert len(got) >= 1, "the chunks before the drop should have been relayed"


def test_mid_stream_stall_becomes_error_event(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_UPSTREAM_BETWEEN_BYTES_TIMEOUT_MS": "500"})
    groq.script({"kind": "stall", "after_chunks": 2})
    # The stall never ends: only the gateway's 500 ms between-bytes timer can end this stream
    # before the client's 10 s read timeout (which would fail the assertion as a transport error).
    _assert_interrupted(*_stream_raw(gw, timeout=10))


def test_mid_stream_stall_raises_in_sdk(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_UPSTREAM_BETWEEN_BYTES_TIMEOUT_MS": "500"})
    groq.script({"kind": "stall", "after_chunks": 2})
    # As above: a client-side timeout would be an APITimeoutError, which the check refuses.
    with pytest.raises(openai.APIError) as e:
        for _ in gw.client(timeout=10).chat.completions.create(
                model=GROQ, stream=True, messages=[{"role": "user", "content": "a b c d"}]):
            pass
    _assert_stream_error_event(e.value)


def test_gateway_recovers_after_failures(make_mock, make_gateway):
    # Nothing a failure leaves behind wedges the next request. (Six failures in a row would open
    # the model's circuit breaker, which then recovers after its cool-down and one probe: that
    # is test_edge_state's subject; here the breaker is kept out of the way.)
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_BREAKER_MIN_SAMPLES": "1000"})
    client = gw.client()
    groq.script({"kind": "status", "status": 500}, {"kind": "status", "status": 500},
                {"kind": "close"}, {"kind": "close"},
                # Past the first token (role chunk, one word), so the 200 is committed.
                {"kind": "drop", "after_chunks": 2})
    assert_openai_error(_post(gw, chat_body(model=GROQ)), 502, code="upstream_error")
    assert_openai_error(_post(gw, chat_body(model=GROQ)), 502, code="upstream_error")
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(model=GROQ, stream=True,
                                                messages=[{"role": "user", "content": "x y"}]):
            pass
    _assert_stream_error_event(e.value)
    r = client.chat.completions.create(model=GROQ, messages=[{"role": "user", "content": "fine now"}])
    assert r.choices[0].message.content == "mock(groq): fine now"
    assert len(groq.requests()) == 6
