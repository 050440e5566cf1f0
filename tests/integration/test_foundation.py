"""The relay keeps its promises: honest failures, state written when decided, request ids,
usage always known, configuration errors kept from clients, and bounded deadlines.

Each test drives the real gateway under `freerelay up` with the official openai SDK or httpx, and
synchronises on the mocks' request logs and pauses rather than on wall-clock time.
"""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from helpers import assert_openai_error, chat_body, sse_events, user, wait_until


def release(mock, n: int = 1) -> None:
    mock.http.post("/_mock/release", json={"count": n}).raise_for_status()


def paused(mock) -> int:
    return mock.http.get("/_mock/paused").json()["paused"]


def log_events(gw) -> list[dict]:
    """The gateway's structured events (JSON lines on its stderr)."""
    out = []
    for line in gw.stderr_tail(10**7).splitlines():
        line = line.strip()
        if line.startswith("{") and '"event"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def provider_stats(gw, provider: str) -> dict:
    return gw.stats()["providers"].get(provider, {})


# ---------------------------------------------------------------------------------------------
# Failures the client can trust


def test_stream_cut_mid_event_ends_with_a_parseable_error_event(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "drop", "after_chunks": 2, "mid_event": True})
    stream = gw.client().chat.completions.create(
        model="groq/llama-3.1-8b-instant", messages=user("tell me a story"), stream=True)
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk)
    assert info.value.code == "upstream_stream_interrupted", info.value
    assert len(got) == 2, "the two whole events before the cut reached the client"
    assert not isinstance(info.value, openai.APIStatusError), "the 200 was already sent"

    # Raw bytes: every event parses as JSON, the last is the error, and no [DONE] follows.
    groq.script({"kind": "drop", "after_chunks": 2, "mid_event": True})
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body(
            "groq/llama-3.1-8b-instant", stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events and events[-1] != "[DONE]"
    parsed = [json.loads(e) for e in events]
    assert parsed[-1]["error"]["code"] == "upstream_stream_interrupted"
    assert r.text.endswith("\n\n")


def test_json_answer_broken_after_its_200_is_a_502_not_a_truncated_200(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    # Head + half the JSON, then the socket closes; a broken answer is retried once.
    groq.script({"kind": "drop", "after_chunks": 1}, {"kind": "drop", "after_chunks": 1})
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body("groq/llama-3.1-8b-instant"))
    err = assert_openai_error(r, 502, code="upstream_error")
    assert "broke" in err["message"] or "broken" in err["message"], err
    assert len(groq.requests()) == 2
    assert provider_stats(gw, "groq")["errors"] == 2


def test_json_answer_broken_after_its_200_falls_back_under_auto(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "drop", "after_bytes": 40}, {"kind": "drop", "after_bytes": 40})
    resp = gw.client().chat.completions.with_raw_response.create(model="auto", messages=user("hi"))
    assert resp.headers["x-freerelay-provider"] == "gemini"
    assert resp.headers["x-freerelay-attempts"] == "3"
    assert resp.parse().choices[0].message.content.startswith("mock(gemini)")
    assert len(groq.requests()) == 2 and len(gemini.requests()) == 1


def test_streams_always_ask_upstream_for_usage_and_pass_it_on_only_when_asked(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    client = gw.client()
    chunks = list(client.chat.completions.create(
        model="groq/llama-3.1-8b-instant", messages=user("count my tokens"), stream=True))
    assert all(c.usage is None for c in chunks), "no usage chunk unless asked"
    assert all(c.choices for c in chunks), "the usage-only chunk (choices: []) was dropped"
    sent = groq.requests()[-1]["body"]
    assert sent["stream_options"]["include_usage"] is True
    # The stats still saw the tokens of that stream.
    assert wait_until(lambda: provider_stats(gw, "groq").get("completion_tokens", 0) > 0)
    first = provider_stats(gw, "groq")

    chunks = list(client.chat.completions.create(
        model="groq/llama-3.1-8b-instant", messages=user("count my tokens"), stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert wait_until(lambda: provider_stats(gw, "groq")["completion_tokens"]
                      == first["completion_tokens"] + chunks[-1].usage.completion_tokens)


def test_mistral_never_gets_stream_options(make_mock, make_gateway):
    mistral = make_mock("mistral")
    gw = make_gateway({"mistral": mistral})
    list(gw.client().chat.completions.create(
        model="mistral/mistral-small-latest", messages=user("hi"), stream=True,
        stream_options={"include_usage": True}))
    assert "stream_options" not in mistral.requests()[-1]["body"]


# ---------------------------------------------------------------------------------------------
# State is written when it is decided


def test_a_429_cooldown_is_visible_while_the_fallback_still_streams(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": 120})
    gemini.script({"kind": "ok", "pause_after_chunks": 1}, {"kind": "ok"})
    client = gw.client()
    stream = client.chat.completions.create(model="auto", messages=user("long answer"), stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert paused(gemini) == 1, "the fallback's stream is still running"
    # Another request now, while that stream is open: groq must already be cooling.
    other = client.chat.completions.with_raw_response.create(model="auto", messages=user("x"))
    assert other.headers["x-freerelay-provider"] == "gemini"
    assert len(groq.requests()) == 1, "the cooled provider was not asked again"
    release(gemini)
    rest = list(stream)
    assert rest and rest[-1].choices[0].finish_reason == "stop"


def test_a_client_leaving_mid_stream_loses_nothing(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    # The role chunk and the first word: the 200 is committed at the first token.
    groq.script({"kind": "ok", "pause_after_chunks": 2})
    rid = "stop-pressed-1"
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions",
                      headers={"Authorization": f"Bearer {gw.client_key}", "x-request-id": rid},
                      json=chat_body("groq/llama-3.1-8b-instant", stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    # The client is gone; only now does the upstream go on.
    assert wait_until(lambda: paused(groq) == 1, timeout=10)
    release(groq)
    # The attempt was counted when it started, and the departure when it was seen.
    assert wait_until(lambda: provider_stats(gw, "groq").get("client_gone") == 1, timeout=15), \
        gw.stats()
    s = provider_stats(gw, "groq")
    assert s["requests"] == 1
    events = [e for e in log_events(gw) if e.get("request_id") == rid]
    kinds = [e["event"] for e in events]
    # The router's decision (`routed`) is logged before the first attempt.
    assert kinds[:3] == ["request_start", "routed", "attempt_start"], kinds
    assert "client_gone" in kinds, kinds


def test_requests_refused_locally_are_counted_and_logged(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 429, "retry_after": 300})
    # One named model: under `auto`, Groq's other models (limited per model) would serve.
    with gw.http() as c:
        first = c.post("/v1/chat/completions", json=chat_body("groq/llama-3.1-8b-instant"))
        second = c.post("/v1/chat/completions", json=chat_body("groq/llama-3.1-8b-instant"))
    assert_openai_error(first, 429, code="rate_limit_exceeded")
    err = assert_openai_error(second, 429, code="rate_limit_exceeded")
    assert 0 < int(second.headers["retry-after"]) <= 300, err
    assert len(groq.requests()) == 1
    assert gw.stats()["gateway"]["refused"] == 1
    refused = [e for e in log_events(gw) if e["event"] == "refused"]
    assert len(refused) == 1 and refused[0]["request_id"] == second.headers["x-request-id"]


# ---------------------------------------------------------------------------------------------
# Request ids, configuration errors, model strings, deadlines


def test_every_response_carries_a_request_id(gw, shared):
    with gw.http() as c, gw.http(auth=False) as anon:
        mine = c.post("/v1/chat/completions", json=chat_body("auto"),
                      headers={"x-request-id": "trace-42"})
        made = c.post("/v1/chat/completions", json=chat_body("auto"))
        bad = c.post("/v1/chat/completions", json=chat_body("auto"),
                     headers={"x-request-id": "a b\tc"})
        unauth = anon.get("/v1/models")
        missing = c.get("/v2/nothing")
        health = anon.get("/healthz")
        streamed = c.post("/v1/chat/completions", json=chat_body("auto", stream=True))
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
    pattern = re.compile(r"^fr-[0-9a-f]{32}$")
    for r in (made, bad, unauth, missing, health, streamed):
        assert pattern.match(r.headers.get("x-request-id", "")), (r.status_code, r.headers)
    assert made.headers["x-request-id"] != bad.headers["x-request-id"]
    assert unauth.status_code == 401 and missing.status_code == 404
    ids = {e.get("request_id") for e in log_events(gw)}
    assert {"trace-42", made.headers["x-request-id"], unauth.headers["x-request-id"]} <= ids


def test_configuration_errors_are_a_fixed_500_after_authentication(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={
        "SPIN_VARIABLE_MAX_BODY_BYTES": "lots-of-secret-bytes",
        "SPIN_VARIABLE_UPSTREAM_TOTAL_TIMEOUT_MS": "secret-host-soon",
    })
    with gw.http(auth=False) as anon:
        r = anon.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_openai_error(r, 401, code="invalid_api_key")
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body("auto"))
    err = assert_openai_error(r, 500, code="gateway_misconfigured", type_="server_error")
    for leak in ("lots-of-secret-bytes", "secret-host", "max_body_bytes", "total_timeout"):
        assert leak not in r.text
    detail = [e for e in log_events(gw) if e["event"] == "config_error"]
    assert detail and "max_body_bytes" in detail[0]["detail"], "the operator gets the detail"
    assert err["message"] == (
        "The gateway is misconfigured; its operator can find the cause in the gateway's log.")


def test_broken_client_keys_are_a_fixed_500_that_leaks_nothing(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    gw.env["SPIN_VARIABLE_CLIENT_KEYS"] = "my-plaintext-key-by-mistake"
    gw.restart()
    with gw.http() as c:
        r = c.get("/v1/models")
    assert_openai_error(r, 500, code="gateway_misconfigured")
    assert "plaintext" not in r.text
    assert "plaintext" not in gw.stderr_tail(10**6), "not even the log quotes a key"


@pytest.mark.parametrize("model", ["groq/llama\r\nx-injected: 1", "gpt 4", "m" * 257, "modèle"])
def test_unusable_model_strings_are_refused_before_going_upstream(shared, gw, model):
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body(model))
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["param"] == "model"
    assert "x-injected" not in r.headers
    assert all(len(m.requests()) == 0 for m in shared.mocks.values())


def test_non_streaming_answers_have_their_own_total_deadline(make_mock, make_gateway):
    groq = make_mock("groq")
    # A JSON answer's head comes only when the answer is done: the first-byte timeout (meant
    # for streams) must not cut a long answer, the total deadline must.
    gw = make_gateway({"groq": groq}, extra_env={
        "SPIN_VARIABLE_UPSTREAM_FIRST_BYTE_TIMEOUT_MS": "300",
        "SPIN_VARIABLE_UPSTREAM_TOTAL_TIMEOUT_MS": "20000",
    })
    groq.script({"kind": "ok", "latency_ms": 1200})
    r = gw.client().chat.completions.create(model="groq/llama-3.1-8b-instant", messages=user("hi"))
    assert r.choices[0].message.content.startswith("mock(groq)")

    gw2 = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_UPSTREAM_TOTAL_TIMEOUT_MS": "500"})
    # Head and half the JSON, then silence (twice: a timed-out answer is retried once).
    groq.script({"kind": "ok", "pause_after_chunks": 1}, {"kind": "ok", "pause_after_chunks": 1})
    with gw2.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body("groq/llama-3.1-8b-instant"))
    assert_openai_error(r, 504, code="upstream_timeout")
    release(groq)
    release(groq)


def test_json_answers_and_errors_have_a_content_length(gw, shared):
    with gw.http() as c:
        ok = c.post("/v1/chat/completions", json=chat_body("auto"))
        models = c.get("/v1/models")
        bad = c.post("/v1/chat/completions", json={"model": "auto"})
    for r in (ok, models, bad):
        assert r.headers.get("content-length") == str(len(r.content)), r.headers
        assert "chunked" not in r.headers.get("transfer-encoding", "")


def test_log_events_failures_keeps_only_failing_requests_with_their_whole_trail(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini},
                      extra_env={"SPIN_VARIABLE_LOG_EVENTS": "failures"})
    groq.script({"kind": "status", "status": 429, "retry_after": 60})
    # Named candidates, Groq first: which model `auto` tries first is the router's choice.
    both = chat_body("groq/llama-3.1-8b-instant", models=["gemini/gemini-3.1-flash-lite"])
    with gw.http() as c:
        fell_back = c.post("/v1/chat/completions", json=both,
                           headers={"x-request-id": "had-a-429"})
        clean = c.post("/v1/chat/completions", json=both,
                       headers={"x-request-id": "all-good"})
        bad = c.post("/v1/chat/completions", json={"model": "auto"},
                     headers={"x-request-id": "bad-body"})
    assert fell_back.status_code == 200 and clean.status_code == 200 and bad.status_code == 400
    # A request's events are written when it ends: wait for the last request's, then read all.
    assert wait_until(lambda: any(e.get("request_id") == "bad-body" for e in log_events(gw)))
    events = log_events(gw)
    kinds = [e["event"] for e in events if e.get("request_id") == "had-a-429"]
    assert kinds[:3] == ["request_start", "routed", "attempt_start"], kinds
    assert "attempt_failed" in kinds and "fallback" in kinds and kinds[-1] == "response", kinds
    assert not [e for e in events if e.get("request_id") == "all-good"]


def test_log_events_off_writes_nothing(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_LOG_EVENTS": "off"})
    with gw.http() as c:
        assert c.post("/v1/chat/completions", json=chat_body("auto")).status_code == 200
        assert c.get("/v2/nothing").status_code == 404
    gw.stop()  # a graceful stop waits for every guest: the log is complete now
    assert log_events(gw) == []
