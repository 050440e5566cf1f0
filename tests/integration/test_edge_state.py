"""Edge state that loses nothing, end to end: circuit breakers, AIMD concurrency limits, budgets
in exact micro-dollars, the exact + semantic cache, and `GET /v1/freerelay/state`.

Through `freerelay up` with the official openai SDK (httpx where the raw protocol is the point:
headers, error bodies, SSE framing). Every test starts its own gateway and mocks, since all of
this is state. The mock's request log is the ground truth for "reached the provider"; its
standing rules (`Mock.fail_model`, `Mock.rules`) make one model fail, hold or recover while its
siblings serve. Fields of the state endpoint are read only through the helpers in helpers.py
(`breaker_state`, `aimd_limit`, `spent_micro`, `cache_counters`, ...).

Only what *is* time is waited for on the clock: a breaker's cool-down (kept at 1.5 s) and a cache
entry's TTL (1 s).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import re
import threading
import time

import httpx
import openai
import pytest

from helpers import (aimd_in_flight, complete, aimd_limit, assert_openai_error, breaker, breaker_failures,
                     breaker_level, breaker_state, breaker_until_ms, budget_scope, budget_tenant,
                     cache_counters, cache_status, cost_header_micro, micro, scope_limit_micro,
                     scope_spent_micro, scope_spent_usd, spent_micro, sse_events, state_now_ms,
                     tenant_id, upstream_model, usage_cost, user_pseudonym, wait_until)

GROQ_8B, GROQ_8B_ID = "groq/llama-3.1-8b-instant", "llama-3.1-8b-instant"
GROQ_70B, GROQ_70B_ID = "groq/llama-3.3-70b-versatile", "llama-3.3-70b-versatile"
CEREBRAS = "cerebras/gpt-oss-120b"
GPT_4O = "openai/gpt-4o"                                   # 2.50 / 10.0 USD per 1M tokens
GPT_4O_MINI = "openai/gpt-4o-mini"                          # 0.15 / 0.60
CLAUDE_HAIKU = "anthropic/claude-haiku-4-5"                 # 1.0 / 5.0
TOGETHER_LLAMA = "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"  # 0.88 / 0.88

PROMPT = "one two three four five six"
# gpt-4o on PROMPT: the mock counts 6 prompt and 7 completion tokens ("mock(openai): one … six"):
# 6 × 2.50 + 7 × 10.0 = 85 micro-dollars.
GPT_4O_PROMPT_COST = 85

MIN_SAMPLES = 4          # breaker_min_samples default
COOLDOWN_MS = 1500       # breaker_cooldown_ms in the tests that wait for it
LONG_COOLDOWN = {"SPIN_VARIABLE_BREAKER_COOLDOWN_MS": "60000"}
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


def user(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def env(**variables) -> dict[str, str]:
    """`env(breaker_cooldown_ms=1500)` -> {"SPIN_VARIABLE_BREAKER_COOLDOWN_MS": "1500"}."""
    return {f"SPIN_VARIABLE_{k.upper()}": str(v) for k, v in variables.items()}


def post(gw, body: dict, *, key: str | None = None, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        return c.post("/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key or gw.client_key}", **(headers or {})})


def markers_seen(mock, marker: str) -> int:
    return sum(1 for r in mock.requests() if marker in json.dumps(r["body"]))


def requests_for(mock, model_id: str) -> list[dict]:
    return [r for r in mock.requests() if upstream_model(r) == model_id]


def wait_clock_ms(until_ms: int, margin_ms: int = 50) -> None:
    """Waits (on the clock, which is the point) until `until_ms` has passed."""
    left = (until_ms + margin_ms) / 1000 - time.time()
    assert left < 120, f"until_ms is {left:.0f}s away"
    if left > 0:
        time.sleep(left)


def in_thread(fn, *args, **kw) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(fn, *args, **kw)
    pool.shutdown(wait=False)
    return fut


# ---------------------------------------------------------------------------------------------
# The state endpoint


def test_the_state_endpoint_needs_a_client_key(make_mock, make_gateway):
    gw = make_gateway({"groq": make_mock("groq")})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert_openai_error(c.get("/v1/freerelay/state"), 401)
        assert_openai_error(c.get("/v1/freerelay/state",
                                  headers={"Authorization": "Bearer fr-not-a-key"}), 401)
    state = gw.state()
    for k in ("now_ms", "breakers", "aimd", "budgets", "quotas", "cache"):
        assert k in state, f"state lacks {k!r}: {sorted(state)}"
    assert abs(state_now_ms(state) - time.time() * 1000) < 5000, state["now_ms"]
    assert budget_tenant(state) == tenant_id(gw.client_key), state["budgets"]


# ---------------------------------------------------------------------------------------------
# Circuit breakers: per provider-model; 5xx, timeouts, resets and broken streams are failures


def breaker_setup(make_mock, make_gateway, extra: dict | None = None, groq_keys: int = 1):
    groq, cerebras = make_mock("groq", keys=groq_keys), make_mock("cerebras")
    variables = dict(extra or {})
    if groq_keys > 1:
        variables["SPIN_VARIABLE_GROQ_API_KEY"] = ",".join(groq.keys)
    gw = make_gateway({"groq": groq, "cerebras": cerebras}, extra_env=variables)
    return gw, groq, cerebras


WITH_FALLBACK = {"model": GROQ_8B, "extra_body": {"models": [CEREBRAS]}}


def open_the_breaker(gw, groq, tag: str = "open") -> list[int]:
    """Sends requests for the failing 8B model (cerebras behind it) one at a time, 2 ×
    min_samples of them; checks each is answered by cerebras, that at most min_samples reached
    groq and that none did after that; returns which ones reached groq."""
    client = gw.client()
    reached = []
    for i in range(2 * MIN_SAMPLES):
        marker = f"{tag}-{i}-"
        headers, text, _ = complete(client, messages=user(f"{marker} {PROMPT}"), **WITH_FALLBACK)
        assert headers["x-freerelay-provider"] == "cerebras", dict(headers)
        assert text == f"mock(cerebras): {marker} {PROMPT}"
        if markers_seen(groq, marker):
            reached.append(i)
    assert len(reached) <= MIN_SAMPLES, (
        f"{len(reached)} requests reached the failing model (breaker_min_samples = {MIN_SAMPLES}): "
        f"{reached}")
    assert reached == list(range(len(reached))), (
        f"traffic reached the failing model again after it had stopped: {reached}")
    return reached


@pytest.mark.parametrize("failure", [
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 503},
    {"kind": "close"},
], ids=["500", "503", "connection_reset"])
def test_a_failing_model_gets_no_traffic_once_its_breaker_opens(make_mock, make_gateway, failure):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN)
    groq.rules({"model": GROQ_8B_ID, "behaviour": failure})
    t0 = time.time()
    reached = open_the_breaker(gw, groq)
    assert reached, "the failing model was never tried"

    state = gw.state()
    assert breaker_state(state, "groq", GROQ_8B_ID) == "open", state["breakers"]
    assert breaker_failures(state, "groq", GROQ_8B_ID) >= 1, breaker(state, "groq", GROQ_8B_ID)
    until = breaker_until_ms(state, "groq", GROQ_8B_ID)
    assert until is not None and t0 * 1000 + 60_000 - 2000 <= until <= time.time() * 1000 + 60_000 + 2000, (
        f"until_ms {until}: expected about breaker_cooldown_ms = 60000 after opening")
    # Per model: the sibling on the same provider and key still serves.
    assert breaker_state(state, "groq", GROQ_70B_ID) == "closed"
    headers, _, _ = complete(gw.client(), model=GROQ_70B, messages=user())
    assert headers["x-freerelay-provider"] == "groq"


def test_a_broken_stream_counts_as_a_failure(make_mock, make_gateway):
    gw, groq, _ = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN)
    # Cut before the first token: nothing reaches the client, cerebras answers instead.
    groq.rules({"model": GROQ_8B_ID, "behaviour": {"kind": "drop", "after_chunks": 0}})
    client = gw.client()
    reached = []
    for i in range(2 * MIN_SAMPLES):
        marker = f"stream-{i}-"
        headers, text, _ = complete(client, stream=True, messages=user(f"{marker} {PROMPT}"),
                                    **WITH_FALLBACK)
        assert headers["x-freerelay-provider"] == "cerebras"
        if markers_seen(groq, marker):
            reached.append(i)
    assert len(reached) <= MIN_SAMPLES and reached == list(range(len(reached))), reached
    assert breaker_state(gw.state(), "groq", GROQ_8B_ID) == "open"


def test_a_stream_broken_after_its_200_counts_as_a_failure(make_mock, make_gateway):
    """The 8B model (no prefill: nothing to rescue with) breaks each stream after two words;
    clients get an error event, and within min_samples requests the breaker opens and the
    plan's next candidate serves."""
    gw, groq, _ = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN)
    groq.rules({"model": GROQ_8B_ID, "behaviour": {"kind": "drop", "after_chunks": 3}})
    client = gw.client()
    outcomes = []
    for i in range(2 * MIN_SAMPLES):
        try:
            headers, text, _ = complete(client, stream=True, messages=user(f"broken-{i}- {PROMPT}"),
                                        **WITH_FALLBACK)
            outcomes.append(headers["x-freerelay-provider"])
        except openai.APIError as e:
            assert not isinstance(e, (openai.APITimeoutError, openai.APIConnectionError)), repr(e)
            outcomes.append("error")
    reached = [i for i in range(2 * MIN_SAMPLES) if markers_seen(groq, f"broken-{i}-")]
    assert len(reached) <= MIN_SAMPLES and reached == list(range(len(reached))), (reached, outcomes)
    assert outcomes[-MIN_SAMPLES:] == ["cerebras"] * MIN_SAMPLES, outcomes
    assert breaker_state(gw.state(), "groq", GROQ_8B_ID) == "open"


def test_when_every_candidate_is_open_the_answer_is_a_503_with_retry_after(make_mock, make_gateway):
    gw, groq, _ = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN)
    groq.fail_model(GROQ_8B_ID, 500)
    for i in range(MIN_SAMPLES):
        r = post(gw, {"model": GROQ_8B, "messages": user(f"single-{i}")})
        assert r.status_code >= 500, r.text
    assert breaker_state(gw.state(), "groq", GROQ_8B_ID) == "open"
    seen = len(groq.requests())
    r = post(gw, {"model": GROQ_8B, "messages": user("after open")})
    assert_openai_error(r, 503)
    assert 0 < int(r.headers["retry-after"]) <= 61, r.headers
    assert len(groq.requests()) == seen, "a request reached a model whose breaker is open"


def test_after_the_cooldown_exactly_one_probe_then_traffic_returns(make_mock, make_gateway):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway,
                                       env(breaker_cooldown_ms=COOLDOWN_MS))
    groq.fail_model(GROQ_8B_ID, 500)
    open_the_breaker(gw, groq)
    state = gw.state()
    assert breaker_state(state, "groq", GROQ_8B_ID) == "open"
    until = breaker_until_ms(state, "groq", GROQ_8B_ID)
    assert until is not None, breaker(state, "groq", GROQ_8B_ID)

    # Healthy again, but each answer held until released: the probe stays in flight.
    groq.rules({"model": GROQ_8B_ID, "behaviour": {"kind": "ok", "pause_after_chunks": 0}})
    before = len(groq.requests())
    wait_clock_ms(until)
    client = gw.client()
    probe = in_thread(complete, client, messages=user("probe"), **WITH_FALLBACK)
    assert wait_until(lambda: groq.paused() == 1, timeout=10), "the probe did not reach the model"
    assert breaker_state(gw.state(), "groq", GROQ_8B_ID) == "half_open"

    for i in range(4):
        headers, _, _ = complete(client, messages=user(f"during probe {i}"), **WITH_FALLBACK)
        assert headers["x-freerelay-provider"] == "cerebras", f"request {i} during the probe"
    assert len(groq.requests()) == before + 1, (
        f"{len(groq.requests()) - before} requests reached a half-open model (breaker_probes = 1)")

    groq.rules()
    groq.release(1)
    headers, text, _ = probe.result(timeout=30)
    assert headers["x-freerelay-provider"] == "groq" and text == "mock(groq): probe"
    assert wait_until(lambda: breaker_state(gw.state(), "groq", GROQ_8B_ID) == "closed", timeout=5), (
        breaker(gw.state(), "groq", GROQ_8B_ID))
    assert breaker_level(gw.state(), "groq", GROQ_8B_ID) == 0
    for i in range(3):
        headers, _, _ = complete(client, messages=user(f"closed {i}"), **WITH_FALLBACK)
        assert headers["x-freerelay-provider"] == "groq", "traffic did not return after the probe"


def test_a_failed_probe_reopens_with_a_longer_cooldown(make_mock, make_gateway):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway,
                                       env(breaker_cooldown_ms=COOLDOWN_MS))
    groq.fail_model(GROQ_8B_ID, 500)
    open_the_breaker(gw, groq)
    state = gw.state()
    until = breaker_until_ms(state, "groq", GROQ_8B_ID)
    assert breaker_level(state, "groq", GROQ_8B_ID) == 0, breaker(state, "groq", GROQ_8B_ID)
    before = len(groq.requests())
    wait_clock_ms(until)

    t0 = time.time()
    headers, _, _ = complete(gw.client(), messages=user("failing probe"), **WITH_FALLBACK)
    assert headers["x-freerelay-provider"] == "cerebras"
    assert len(groq.requests()) == before + 1, (
        f"the probe sent {len(groq.requests()) - before} requests (breaker_probes = 1)")

    state = gw.state()
    assert breaker_state(state, "groq", GROQ_8B_ID) == "open", breaker(state, "groq", GROQ_8B_ID)
    assert breaker_level(state, "groq", GROQ_8B_ID) == 1, breaker(state, "groq", GROQ_8B_ID)
    until2 = breaker_until_ms(state, "groq", GROQ_8B_ID)
    lo, hi = t0 * 1000 + 2 * COOLDOWN_MS - 300, time.time() * 1000 + 2 * COOLDOWN_MS + 1000
    assert lo <= until2 <= hi, (
        f"after a failed probe the cool-down is {until2 - t0 * 1000:.0f} ms; expected "
        f"2 × {COOLDOWN_MS}")

    # Still open in between: nothing reaches the model.
    complete(gw.client(), messages=user("still open"), **WITH_FALLBACK)
    assert len(groq.requests()) == before + 1


def test_429s_never_open_a_breaker(make_mock, make_gateway):
    """Four keys, each answering 429: one request meets four rate limits on the model (as many
    as breaker_min_samples), and the breaker stays closed."""
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN, groq_keys=4)
    groq.fail_model(GROQ_8B_ID, 429, retry_after="30")
    headers, _, _ = complete(gw.client(), messages=user(), **WITH_FALLBACK)
    assert headers["x-freerelay-provider"] == "cerebras"
    assert len(groq.requests()) == 4, "each key of the pool is tried once"
    state = gw.state()
    assert breaker_state(state, "groq", GROQ_8B_ID) == "closed", breaker(state, "groq", GROQ_8B_ID)
    assert breaker_failures(state, "groq", GROQ_8B_ID) == 0, breaker(state, "groq", GROQ_8B_ID)


def test_client_errors_never_open_a_breaker(make_mock, make_gateway):
    gw, groq, _ = breaker_setup(make_mock, make_gateway, LONG_COOLDOWN)
    groq.fail_model(GROQ_8B_ID, 400)
    for i in range(2 * MIN_SAMPLES):
        r = post(gw, {"model": GROQ_8B, "messages": user(f"bad-{i}")})
        assert 400 <= r.status_code < 500, r.text
    assert len(requests_for(groq, GROQ_8B_ID)) == 2 * MIN_SAMPLES, "a client error cut the model off"
    state = gw.state()
    assert breaker_state(state, "groq", GROQ_8B_ID) == "closed", breaker(state, "groq", GROQ_8B_ID)
    assert breaker_failures(state, "groq", GROQ_8B_ID) == 0
    groq.rules()
    headers, _, _ = complete(gw.client(), model=GROQ_8B, messages=user())
    assert headers["x-freerelay-provider"] == "groq"


def test_breaker_variables_are_honoured(make_mock, make_gateway):
    """breaker_min_samples = 12: five failing requests (ten attempts with the same-model retry)
    all reach the model, where the default (4) would have cut it off after two to four."""
    gw, groq, _ = breaker_setup(make_mock, make_gateway,
                                {**LONG_COOLDOWN, **env(breaker_min_samples=12)})
    groq.fail_model(GROQ_8B_ID, 500)
    client = gw.client()
    for i in range(MIN_SAMPLES + 1):
        complete(client, messages=user(f"m-{i}"), **WITH_FALLBACK)
    reached = {i for i in range(MIN_SAMPLES + 1) if markers_seen(groq, f"m-{i}")}
    assert reached == set(range(MIN_SAMPLES + 1)), f"opened before min_samples = 12: {reached}"
    assert breaker_state(gw.state(), "groq", GROQ_8B_ID) == "closed"


# ---------------------------------------------------------------------------------------------
# AIMD: a per-provider concurrency limit; overflow goes to the next candidate


def test_beyond_the_aimd_limit_a_request_goes_to_the_next_candidate(make_mock, make_gateway):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway, env(aimd_initial_limit=2))
    groq.rules({"model": GROQ_8B_ID, "behaviour": {"kind": "ok", "pause_after_chunks": 0}})
    client = gw.client(timeout=60)
    held = [in_thread(complete, client, messages=user(f"held {i}"), **WITH_FALLBACK)
            for i in range(2)]
    assert wait_until(lambda: groq.paused() == 2, timeout=10), f"paused: {groq.paused()}"
    state = gw.state()
    assert aimd_limit(state, "groq") == 2, state["aimd"]
    assert aimd_in_flight(state, "groq") == 2, state["aimd"]

    headers, text, _ = complete(client, messages=user("third"), **WITH_FALLBACK)
    assert headers["x-freerelay-provider"] == "cerebras", "the third concurrent request went to groq"
    assert text == "mock(cerebras): third"
    assert len(groq.requests()) == 2

    # With no other candidate, it is sent anyway.
    alone = in_thread(complete, client, model=GROQ_8B, messages=user("alone"))
    assert wait_until(lambda: groq.paused() == 3, timeout=10), (
        "a request with no other candidate was not sent beyond the limit")
    groq.rules()
    groq.release(3)
    for f in held + [alone]:
        headers, _, _ = f.result(timeout=30)
        assert headers["x-freerelay-provider"] == "groq"
    assert wait_until(lambda: aimd_in_flight(gw.state(), "groq") == 0, timeout=5), gw.state()["aimd"]


def test_a_burst_of_429s_halves_the_limit_once(make_mock, make_gateway):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway, env(aimd_initial_limit=8))
    # Three requests in flight together, each answered 429 after 300 ms: one burst.
    groq.rules({"model": GROQ_8B_ID, "times": 3, "behaviour": {
        "kind": "status", "status": 429, "retry_after": "30", "latency_ms": 300}})
    client = gw.client()
    barrier = threading.Barrier(3)

    def one(i):
        barrier.wait(timeout=10)
        return complete(client, messages=user(f"burst {i}"), **WITH_FALLBACK)[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for headers in pool.map(one, range(3)):
            assert headers["x-freerelay-provider"] == "cerebras"
    assert len(groq.requests()) == 3
    limit = aimd_limit(gw.state(), "groq")
    assert limit == 4, f"aimd_initial_limit = 8 and one burst of 429s: limit {limit}, expected 4"

    # A later 429 (sent after the decrease, on a sibling model of the provider) halves again.
    groq.rules({"model": GROQ_70B_ID, "times": 1, "behaviour": {
        "kind": "status", "status": 429, "retry_after": "30"}})
    headers, _, _ = complete(client, model=GROQ_70B, extra_body={"models": [CEREBRAS]},
                             messages=user("later"))
    assert headers["x-freerelay-provider"] == "cerebras"
    limit = aimd_limit(gw.state(), "groq")
    assert limit == 2, f"a second, separate 429: limit {limit}, expected 2"


def test_a_timeout_halves_the_limit_and_a_5xx_does_not(make_mock, make_gateway):
    gw, groq, cerebras = breaker_setup(make_mock, make_gateway,
                                       env(aimd_initial_limit=8, first_token_timeout_ms=500))
    client = gw.client()
    # A 5xx is the breaker's business, not congestion.
    groq.rules({"model": GROQ_8B_ID, "times": 1, "behaviour": {"kind": "status", "status": 500}})
    complete(client, stream=True, messages=user("server error"), **WITH_FALLBACK)
    assert len(groq.requests()) >= 1
    assert aimd_limit(gw.state(), "groq") == 8, gw.state()["aimd"]
    # A stream silent past its first-token deadline is.
    groq.rules({"model": GROQ_8B_ID, "times": 1, "behaviour": {"kind": "stall", "after_chunks": 0}})
    before = len(groq.requests())
    complete(client, stream=True, messages=user("silent"), **WITH_FALLBACK)
    assert len(groq.requests()) > before
    assert aimd_limit(gw.state(), "groq") == 4, gw.state()["aimd"]


def test_the_aimd_limit_stays_within_its_bounds(make_mock, make_gateway):
    gw, groq, _ = breaker_setup(make_mock, make_gateway,
                                env(aimd_initial_limit=2, aimd_max_limit=3))
    client = gw.client()

    def one(i):
        return complete(client, model=GROQ_8B, messages=user(f"grow {i}"))[0]

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(8)))
    limit = aimd_limit(gw.state(), "groq")
    assert limit is not None and 1 <= limit <= 3, f"aimd_max_limit = 3: limit {limit}"


# ---------------------------------------------------------------------------------------------
# Budgets: exact micro-dollars, refusals of paid candidates, free models keep serving


def budget_setup(make_mock, make_gateway, variables: dict, client_keys: list[str] | None = None):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid}, extra_env=env(**variables),
                      client_keys=client_keys)
    return gw, groq, paid


def spend_until_refused(gw, *, key: str | None = None, headers: dict | None = None,
                        limit: int = 12, model: str = GPT_4O):
    """Paid requests until one is refused: (the costs of those served, the refusal)."""
    costs = []
    for i in range(limit):
        r = post(gw, {"model": model, "messages": user()}, key=key, headers=headers)
        if r.status_code != 200:
            return costs, r
        assert r.headers["x-freerelay-provider"] == "openai"
        cost = cost_header_micro(r.headers)
        assert cost is not None and cost > 0, r.headers
        costs.append(cost)
    pytest.fail(f"{limit} paid requests were served; the budget never refused one: {costs}")


def assert_budget_refusal(r: httpx.Response, costs: list[int], limit_micro: int,
                          period_words: tuple[str, ...], horizon_s: int) -> dict:
    """`r` is the budget's 429 after `costs` were served against `limit_micro`."""
    err = assert_openai_error(r, 429, code="insufficient_quota", type_="insufficient_quota")
    assert sum(costs) >= limit_micro, f"refused at {sum(costs)} of {limit_micro} micro-USD spent"
    assert sum(costs[:-1]) < limit_micro, (
        f"served on after the budget was spent: {costs} against {limit_micro}")
    msg = err["message"]
    assert "budget" in msg.lower() and any(w in msg.lower() for w in period_words), msg
    m = RFC3339.search(msg)
    assert m and "resets at" in msg.lower(), f"no 'resets at <RFC 3339>' in {msg!r}"
    reset = dt.datetime.fromisoformat(m.group(0).replace("Z", "+00:00")).timestamp()
    now = time.time()
    assert now < reset <= now + horizon_s, f"resets at {m.group(0)}"
    retry_after = int(r.headers["retry-after"])
    assert abs(retry_after - (reset - now)) <= 5, (retry_after, reset - now)
    return err


@pytest.mark.parametrize("period, variable, words, horizon", [
    ("day", "tenant_budget_daily_usd", ("daily", "day"), 86_400),
    ("month", "tenant_budget_monthly_usd", ("monthly", "month"), 31 * 86_400),
], ids=["daily", "monthly"])
def test_a_spent_tenant_budget_refuses_paid_while_free_still_answers(make_mock, make_gateway,
                                                                      period, variable, words,
                                                                      horizon):
    gw, groq, paid = budget_setup(make_mock, make_gateway, {variable: "0.0002"})
    costs, r = spend_until_refused(gw)
    assert_budget_refusal(r, costs, 200, words, horizon)
    assert len(paid.requests()) == len(costs), "the refused request reached the paid provider"

    # Free models keep serving, by mode or in a plan.
    for body, extra in (({"model": "free"}, {}), ({"model": "auto"}, {"x-freerelay-mode": "free"}),
                        ({"model": GPT_4O, "models": [GROQ_8B]}, {})):
        r = post(gw, {**body, "messages": user()}, headers=extra)
        assert r.status_code == 200, (body, r.text)
        assert r.headers["x-freerelay-provider"] == "groq", body
    assert len(paid.requests()) == len(costs)
    assert_openai_error(post(gw, {"model": "paid", "messages": user()}), 429,
                        code="insufficient_quota")

    scope = budget_scope(gw.state(), "tenant", period, tenant_id(gw.client_key))
    assert scope is not None, gw.state()["budgets"]
    assert scope_spent_micro(scope) == sum(costs), scope
    assert scope_limit_micro(scope) == 200, scope


@pytest.mark.parametrize("header", ["X-OpenWebUI-User-Id", "X-OpenWebUI-User-Email"])
def test_user_budgets_are_per_user(make_mock, make_gateway, header):
    gw, groq, paid = budget_setup(make_mock, make_gateway, {"user_budget_daily_usd": "0.0001"})
    alice = {header: "alice@example.com" if header.endswith("Email") else "u-alice"}
    bob = {header: "bob@example.com" if header.endswith("Email") else "u-bob"}
    costs, r = spend_until_refused(gw, headers=alice)
    assert_budget_refusal(r, costs, 100, ("daily", "day"), 86_400)
    if header.endswith("Email"):
        # The same user, however the address is cased.
        r = post(gw, {"model": GPT_4O, "messages": user()}, headers={header: "Alice@Example.COM"})
        assert_openai_error(r, 429, code="insufficient_quota")
    # Another user of the same client key still has hers.
    r = post(gw, {"model": GPT_4O, "messages": user()}, headers=bob)
    assert r.status_code == 200 and r.headers["x-freerelay-provider"] == "openai", r.text
    who = (user_pseudonym(email=alice[header]) if header.endswith("Email")
           else user_pseudonym(user_id=alice[header]))
    scope = budget_scope(gw.state(headers=alice), "user", "day", who)
    assert scope is not None, (who, gw.state(headers=alice)["budgets"])
    assert scope_spent_micro(scope) == sum(costs), scope


def test_a_global_budget_covers_every_client_key(make_mock, make_gateway):
    from conftest import new_client_key

    keys = [new_client_key(), new_client_key()]
    gw, groq, paid = budget_setup(make_mock, make_gateway, {"budget_daily_usd": "0.0002"},
                                  client_keys=keys)
    costs, r = spend_until_refused(gw, key=keys[0])
    assert_budget_refusal(r, costs, 200, ("daily", "day"), 86_400)
    r = post(gw, {"model": GPT_4O, "messages": user()}, key=keys[1])
    assert_openai_error(r, 429, code="insufficient_quota")
    assert len(paid.requests()) == len(costs)
    assert spent_micro(gw.state(key=keys[1]), "global", "day") == sum(costs)


def test_tenant_budgets_override_one_key(make_mock, make_gateway):
    from conftest import new_client_key

    rich, poor = new_client_key(), new_client_key()
    gw, groq, paid = budget_setup(make_mock, make_gateway, {
        "tenant_budget_daily_usd": "0.0001",
        "tenant_budgets": f"{tenant_id(rich)}=daily:5,monthly:50; t0123456789=monthly:200",
    }, client_keys=[rich, poor])
    for i in range(4):   # 4 × 85 micro-USD, well over the default 100
        r = post(gw, {"model": GPT_4O, "messages": user()}, key=rich)
        assert r.status_code == 200, f"request {i} of the overridden key: {r.text}"
    costs, r = spend_until_refused(gw, key=poor)
    assert_budget_refusal(r, costs, 100, ("daily", "day"), 86_400)
    scope = budget_scope(gw.state(key=rich), "tenant", "day", tenant_id(rich))
    assert scope is not None and scope_limit_micro(scope) == 5_000_000, scope
    month = budget_scope(gw.state(key=rich), "tenant", "month", tenant_id(rich))
    assert month is not None and scope_limit_micro(month) == 50_000_000, month


@pytest.mark.parametrize("value", [
    "tdeadbeef00=daily:lots",
    "daily:5",
    "t0123456789=weekly:5",
    "t0123456789=daily:5,monthly",
], ids=["not_a_number", "no_tenant", "unknown_period", "no_amount"])
def test_a_bad_tenant_budgets_value_is_a_misconfiguration(make_mock, make_gateway, value):
    gw, groq, paid = budget_setup(make_mock, make_gateway, {"tenant_budgets": value})
    r = post(gw, {"model": GPT_4O, "messages": user()})
    err = assert_openai_error(r, 500, code="gateway_misconfigured")
    assert value not in err["message"], "the message quotes the value"
    assert paid.requests() == [] and groq.requests() == []


@pytest.mark.parametrize("variable, value", [
    ("budget_daily_usd", "five"),
    ("tenant_budget_monthly_usd", "0.0000001"),
    ("user_budget_daily_usd", "-1"),
    ("budget_lean_free_at", "lots"),
    ("breaker_failure_rate", "2"),
    ("breaker_min_samples", "many"),
    ("breaker_cooldown_ms", "soon"),
    ("aimd_initial_limit", "x"),
    ("cache", "sometimes"),
    ("cache_ttl_s", "forever"),
    ("cache_similarity", "1.5"),
])
def test_an_unusable_edge_variable_is_a_misconfiguration(make_mock, make_gateway, variable, value):
    gw, groq, paid = budget_setup(make_mock, make_gateway, {variable: value})
    r = post(gw, {"model": GROQ_8B, "messages": user()})
    err = assert_openai_error(r, 500, code="gateway_misconfigured")
    assert value not in err["message"], "the message quotes the value"
    assert groq.requests() == [] and paid.requests() == []


def test_recorded_spend_equals_the_sum_of_cost_headers(make_mock, make_gateway):
    mocks = {name: make_mock(name) for name in ("groq", "openai", "anthropic", "together")}
    gw = make_gateway(mocks, extra_env=env(budget_daily_usd=100, tenant_budget_daily_usd=100,
                                           tenant_budget_monthly_usd=1000))
    client = gw.client()
    costs = []
    plan = [(GPT_4O, False), (GPT_4O_MINI, True), (CLAUDE_HAIKU, False), (CLAUDE_HAIKU, True),
            (TOGETHER_LLAMA, False), (TOGETHER_LLAMA, True), (GROQ_8B, False), (GROQ_8B, True)]
    for i, (model, stream) in enumerate(plan):
        headers, _, cost = complete(client, stream=stream, model=model,
                                    messages=user(f"spend {i}: " + "many words here " * (i + 1)))
        provider = headers["x-freerelay-provider"]
        assert cost is not None, f"{model} ({'stream' if stream else 'json'}): no cost reported"
        if provider == "groq":
            assert cost == 0, f"a free tier cost {cost}"
        else:
            assert cost > 0, (model, cost)
        costs.append(cost)
    total = sum(costs)
    # Usage may be counted just after the answer left: poll, then compare exactly.
    wait_until(lambda: spent_micro(gw.state(), "global", "day") == total, timeout=5)
    state = gw.state()
    for scope, period in (("global", "day"), ("tenant", "day"), ("tenant", "month")):
        s = budget_scope(state, scope, period)
        assert s is not None, (scope, period, state["budgets"])
        assert scope_spent_micro(s) == total, (
            f"{scope}/{period}: {scope_spent_micro(s)} micro-USD recorded, answers cost {total}: {costs}")
        if scope_spent_usd(s) is not None:
            assert micro(str(scope_spent_usd(s))) == total, s
    # The exact arithmetic of one known answer: gpt-4o on PROMPT.
    headers, _, cost = complete(client, model=GPT_4O, messages=user())
    assert cost == GPT_4O_PROMPT_COST, f"gpt-4o on {PROMPT!r}: {cost} micro-USD"
    assert headers["x-freerelay-cost-usd"] == "0.000085", headers["x-freerelay-cost-usd"]
    # A stream that did not ask for the usage chunk is charged all the same.
    total += cost
    for _ in client.chat.completions.create(model=GPT_4O, messages=user(), stream=True):
        pass
    total += GPT_4O_PROMPT_COST
    assert wait_until(lambda: spent_micro(gw.state(), "tenant", "day") == total, timeout=5), (
        spent_micro(gw.state(), "tenant", "day"), total)


def test_a_thin_budget_leans_on_free_models_under_auto(make_mock, make_gateway):
    gw, groq, paid = budget_setup(make_mock, make_gateway, {"tenant_budget_daily_usd": "0.0001"})
    plan = {"model": GPT_4O, "models": [GROQ_8B]}
    r = post(gw, {**plan, "messages": user()})
    assert r.headers.get("x-freerelay-provider") == "openai", r.text
    cost = cost_header_micro(r.headers)
    assert 0 < (100 - cost) / 100 < 0.25, f"precondition: one answer should leave < 25 %: {cost}"

    # Thin: the paid candidate is dropped while a free one remains.
    r = post(gw, {**plan, "messages": user()})
    assert r.status_code == 200 and r.headers["x-freerelay-provider"] == "groq", r.text
    assert len(paid.requests()) == 1
    # With no free candidate left it is still served, until spent.
    r = post(gw, {"model": GPT_4O, "messages": user()})
    assert r.status_code == 200 and r.headers["x-freerelay-provider"] == "openai", r.text
    assert_openai_error(post(gw, {"model": GPT_4O, "messages": user()}), 429,
                        code="insufficient_quota")


@pytest.mark.parametrize("lean_free_at, second", [("0", "openai"), ("0.99", "groq")])
def test_budget_lean_free_at_is_honoured(make_mock, make_gateway, lean_free_at, second):
    """A $0.005 budget after one 85 µ$ answer: 98.3 % left, and at that pace (85 µ$ an hour) no
    run-out before midnight. Not thin at the default (0.25) nor at 0; thin at 0.99."""
    gw, groq, paid = budget_setup(make_mock, make_gateway, {
        "tenant_budget_daily_usd": "0.005", "budget_lean_free_at": lean_free_at})
    plan = {"model": GPT_4O, "models": [GROQ_8B]}
    r = post(gw, {**plan, "messages": user()})
    assert r.headers.get("x-freerelay-provider") == "openai", r.text
    r = post(gw, {**plan, "messages": user()})
    assert r.headers.get("x-freerelay-provider") == second, (
        f"budget_lean_free_at = {lean_free_at}, 98.3 % left: {r.headers.get('x-freerelay-provider')}; "
        f"budgets: {gw.state()['budgets']}")


# ---------------------------------------------------------------------------------------------
# Cache: exact and semantic (MinHash/LSH), per tenant and model; JSON and SSE replay

LONG = (
    "Our team maintains a small library that parses configuration files written by hand. Users "
    "report that when a section header is followed by an empty line and then a comment, the "
    "parser attaches the comment to the wrong section, and the values after it are silently "
    "dropped. We reproduced this on the latest release with the default options. The file in "
    "question has eight sections, each with three or four keys, and the problem only appears "
    "in the fifth one, right after a block of commented out settings that someone left behind "
    "during a migration. Could you explain what the most likely cause is, how we should write "
    "a regression test that captures the behaviour without depending on the exact file, and "
    "what a careful fix would look like so that existing users who rely on the current "
    "handling of blank lines are not surprised after they upgrade to the next version of the "
    "library in a few weeks from now"
)
LONG_ONE_WORD = LONG.replace("silently dropped", "quietly dropped")
assert LONG_ONE_WORD != LONG


def cache_setup(make_mock, make_gateway, variables: dict | None = None,
                client_keys: list[str] | None = None, provider: str = "groq"):
    mock = make_mock(provider)
    gw = make_gateway({provider: mock}, extra_env=env(**(variables or {})),
                      client_keys=client_keys)
    return gw, mock


def wait_stored(gw, n: int, key: str | None = None) -> None:
    assert wait_until(lambda: cache_counters(gw.state(key=key))["stores"] >= n, timeout=5), (
        f"the cache stored {cache_counters(gw.state(key=key))['stores']} entries, expected {n}")


def ask(client, content=None, *, messages=None, model=GROQ_8B, stream=False, **kw):
    return complete(client, stream=stream, model=model,
                    messages=messages or user(content), **kw)


def test_an_identical_request_is_an_exact_hit_that_costs_nothing(make_mock, make_gateway):
    gw, paid = cache_setup(make_mock, make_gateway, {"tenant_budget_daily_usd": 100},
                           provider="openai")
    client = gw.client()
    headers, text, cost = ask(client, "cache this answer", model=GPT_4O, temperature=0)
    assert cache_status(headers) == "miss", dict(headers)
    assert cost > 0
    wait_stored(gw, 1)
    spent = spent_micro(gw.state(), "tenant", "day")

    raw = client.chat.completions.with_raw_response.create(
        model=GPT_4O, temperature=0, messages=user("cache this answer"))
    assert cache_status(raw.headers) == "exact", dict(raw.headers)
    assert raw.headers["x-freerelay-cost-usd"] == "0.000000"
    c = raw.parse()
    assert c.object == "chat.completion" and c.choices[0].message.content == text
    assert c.choices[0].finish_reason == "stop"
    assert len(paid.requests()) == 1, "the hit reached the provider"
    assert spent_micro(gw.state(), "tenant", "day") == spent, "a hit was charged"
    counters = cache_counters(gw.state())
    assert (counters["hits_exact"], counters["misses"], counters["stores"]) == (1, 1, 1), counters


def test_a_cached_answer_is_served_after_the_budget_is_spent(make_mock, make_gateway):
    """A hit costs nothing, so a spent budget does not refuse it; an uncached paid request is
    refused."""
    gw, paid = cache_setup(make_mock, make_gateway, {"tenant_budget_daily_usd": "0.0001"},
                           provider="openai")
    client = gw.client()
    headers, text, cost = ask(client, PROMPT, model=GPT_4O, temperature=0)
    assert cache_status(headers) == "miss" and cost == GPT_4O_PROMPT_COST
    wait_stored(gw, 1)
    headers, _, _ = ask(client, "something else", model=GPT_4O, temperature=0)  # 170 of 100
    r = post(gw, {"model": GPT_4O, "temperature": 0, "messages": user("a third question")})
    assert_openai_error(r, 429, code="insufficient_quota")
    headers, again, cost = ask(client, PROMPT, model=GPT_4O, temperature=0)
    assert cache_status(headers) == "exact" and again == text and cost == 0
    assert len(paid.requests()) == 2


def test_cache_similarity_and_max_entries_are_honoured(make_mock, make_gateway):
    # One changed word in LONG is a Jaccard of about 0.96: under 0.99 it is a miss.
    gw, groq = cache_setup(make_mock, make_gateway, {"cache_similarity": "0.99"})
    client = gw.client()
    ask(client, LONG, temperature=0)
    wait_stored(gw, 1)
    headers, _, _ = ask(client, LONG_ONE_WORD, temperature=0)
    assert cache_status(headers) == "miss", dict(headers)

    # A ring of one entry: the second store evicts the first.
    gw, groq = cache_setup(make_mock, make_gateway, {"cache_max_entries": "1"})
    client = gw.client()
    ask(client, "first entry", temperature=0)
    wait_stored(gw, 1)
    ask(client, "second entry", temperature=0)
    wait_stored(gw, 2)
    headers, _, _ = ask(client, "second entry", temperature=0)
    assert cache_status(headers) == "exact"
    headers, _, _ = ask(client, "first entry", temperature=0)
    assert cache_status(headers) == "miss", "cache_max_entries = 1 kept two entries"


def sse_chunks(r: httpx.Response) -> tuple[list[dict], list[str]]:
    events = sse_events(r.text)
    return [json.loads(e) for e in events if e != "[DONE]"], events


@pytest.mark.parametrize("include_usage", [False, True], ids=["no_usage", "usage"])
def test_a_json_answer_is_replayed_to_a_stream_request(make_mock, make_gateway, include_usage):
    gw, groq = cache_setup(make_mock, make_gateway)
    body = {"model": GROQ_8B, "temperature": 0, "messages": user("replay me as a stream")}
    r = post(gw, body)
    assert cache_status(r.headers) == "miss"
    text = r.json()["choices"][0]["message"]["content"]
    wait_stored(gw, 1)

    stream_body = {**body, "stream": True}
    if include_usage:
        stream_body["stream_options"] = {"include_usage": True}
    r = post(gw, stream_body)
    assert r.status_code == 200, r.text
    assert cache_status(r.headers) == "exact", dict(r.headers)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, events = sse_chunks(r)
    assert events[-1] == "[DONE]", events[-3:]
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", chunks[0]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finishes == ["stop"], finishes
    usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage) == 1 and chunks[-1] is usage[0] and chunks[-1]["choices"] == [], chunks[-2:]
        assert micro(str(usage[0]["usage"].get("cost", "0"))) == 0, usage[0]
    else:
        assert usage == [], "a usage chunk nobody asked for"
    assert len(groq.requests()) == 1

    # The same through the SDK.
    headers, sdk_text, _ = ask(gw.client(), "replay me as a stream", stream=True, temperature=0)
    assert cache_status(headers) == "exact" and sdk_text == text
    assert len(groq.requests()) == 1


def test_a_streamed_answer_is_served_to_a_json_request(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    headers, text, _ = ask(client, "stream first, then JSON", stream=True, temperature=0)
    assert cache_status(headers) == "miss", dict(headers)
    assert text == "mock(groq): stream first, then JSON"
    wait_stored(gw, 1)
    headers, again, cost = ask(client, "stream first, then JSON", temperature=0)
    assert cache_status(headers) == "exact" and again == text
    assert cost == 0
    assert len(groq.requests()) == 1


def test_the_cache_header_off_bypasses_lookup_and_store(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    off = {"extra_headers": {"x-freerelay-cache": "off"}}
    headers, _, _ = ask(client, "no cache please", temperature=0, **off)
    assert cache_status(headers) not in ("exact", "semantic", "miss"), dict(headers)
    # Not stored: the same request without the header is a miss, and stores it.
    headers, _, _ = ask(client, "no cache please", temperature=0)
    assert cache_status(headers) == "miss"
    wait_stored(gw, 1)
    # Not looked up either.
    headers, _, _ = ask(client, "no cache please", temperature=0, **off)
    assert cache_status(headers) not in ("exact", "semantic"), dict(headers)
    assert len(groq.requests()) == 3
    assert cache_counters(gw.state())["stores"] == 1


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.7},
    {"temperature": 0, "n": 2},
    {"temperature": 0, "tools": [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
], ids=["default_temperature", "temperature_0.7", "n_2", "tools"])
def test_uncacheable_requests_never_come_from_the_cache(make_mock, make_gateway, kw):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=GROQ_8B, messages=user("not cacheable"), **kw)
        assert cache_status(raw.headers) not in ("exact", "semantic", "miss"), dict(raw.headers)
    assert len(groq.requests()) == 3
    assert cache_counters(gw.state())["stores"] == 0


def test_a_seed_makes_a_request_cacheable(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    headers, text, _ = ask(client, "seeded", seed=7)
    assert cache_status(headers) == "miss"
    wait_stored(gw, 1)
    headers, again, _ = ask(client, "seeded", seed=7)
    assert cache_status(headers) == "exact" and again == text
    # Another seed is another answer.
    headers, _, _ = ask(client, "seeded", seed=8)
    assert cache_status(headers) == "miss"
    assert len(groq.requests()) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_one_word_changed_in_a_long_prompt_is_a_semantic_hit(make_mock, make_gateway, stream):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    headers, text, _ = ask(client, LONG, temperature=0)
    assert cache_status(headers) == "miss"
    wait_stored(gw, 1)
    headers, again, cost = ask(client, LONG_ONE_WORD, temperature=0, stream=stream)
    assert cache_status(headers) == "semantic", dict(headers)
    assert again == text, "a semantic hit answers with the stored answer"
    assert cost in (None, 0) and headers.get("x-freerelay-cost-usd", "0.000000") == "0.000000"
    assert len(groq.requests()) == 1, "the semantic hit reached the provider"
    assert cache_counters(gw.state())["hits_semantic"] == 1, cache_counters(gw.state())


def conversation(first_turn: str, last: str = LONG) -> list[dict]:
    return [{"role": "user", "content": first_turn},
            {"role": "assistant", "content": "Sure, tell me more about the parser."},
            {"role": "user", "content": last}]


FIRST_TURN = ("I have a question about a configuration parser that my colleagues and I have "
              "been maintaining for a couple of years now, written in a plain subset of Python")


@pytest.mark.parametrize("first, second", [
    (conversation(FIRST_TURN), conversation(FIRST_TURN.replace("couple of years", "few years"))),
    (conversation(FIRST_TURN), conversation("Something else entirely: the weather in Oslo")),
    (user(LONG + " Also, what is 17*23?"), user(LONG + " Also, what is 17*24?")),
    (user("What is 17*23?"), user("What is 17*24?")),
], ids=["earlier_turn_one_word", "earlier_turn_other", "number_in_long_prompt", "number_short"])
def test_near_requests_that_differ_in_what_matters_are_misses(make_mock, make_gateway, first,
                                                                second):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    headers, text, _ = ask(client, messages=first, temperature=0)
    assert cache_status(headers) == "miss"
    wait_stored(gw, 1)
    headers, other, _ = ask(client, messages=second, temperature=0)
    assert cache_status(headers) == "miss", dict(headers)
    assert len(groq.requests()) == 2
    assert other == f"mock(groq): {second[-1]['content']}"


def test_a_different_model_never_hits(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway)
    client = gw.client()
    ask(client, LONG, temperature=0)
    wait_stored(gw, 1)
    for model in (GROQ_70B, "groq/openai/gpt-oss-20b"):
        headers, _, _ = ask(client, LONG, model=model, temperature=0)
        assert cache_status(headers) == "miss", (model, dict(headers))
    assert [upstream_model(r) for r in groq.requests()] == [
        GROQ_8B_ID, GROQ_70B_ID, "openai/gpt-oss-20b"]


def test_another_tenant_never_hits_an_entry(make_mock, make_gateway):
    from conftest import new_client_key

    mine, theirs, third = new_client_key(), new_client_key(), new_client_key()
    gw, groq = cache_setup(make_mock, make_gateway, client_keys=[mine, theirs, third])
    ask(gw.client(key=mine), LONG, temperature=0)
    wait_stored(gw, 1, key=mine)
    # Each other tenant asks once (its own answer is stored, and would be its own hit next).
    for key, content in ((theirs, LONG), (third, LONG_ONE_WORD)):
        headers, _, _ = ask(gw.client(key=key), content, temperature=0)
        assert cache_status(headers) == "miss", dict(headers)
    assert len(groq.requests()) == 3
    # The owner still hits.
    headers, _, _ = ask(gw.client(key=mine), LONG, temperature=0)
    assert cache_status(headers) == "exact"


def test_cache_off_serves_everything_from_the_provider(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway, {"cache": "off"})
    client = gw.client()
    for _ in range(3):
        headers, _, _ = ask(client, LONG, temperature=0)
        assert cache_status(headers) not in ("exact", "semantic", "miss"), dict(headers)
    assert len(groq.requests()) == 3
    counters = cache_counters(gw.state())
    assert counters["stores"] == 0 and counters["hits_exact"] == 0, counters


def test_cache_exact_has_no_semantic_hits(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway, {"cache": "exact"})
    client = gw.client()
    ask(client, LONG, temperature=0)
    wait_stored(gw, 1)
    headers, _, _ = ask(client, LONG_ONE_WORD, temperature=0)
    assert cache_status(headers) == "miss", dict(headers)
    headers, _, _ = ask(client, LONG, temperature=0)
    assert cache_status(headers) == "exact"
    assert len(groq.requests()) == 2


def test_an_entry_expires_after_cache_ttl_s(make_mock, make_gateway):
    gw, groq = cache_setup(make_mock, make_gateway, {"cache_ttl_s": 1})
    client = gw.client()
    ask(client, "short lived", temperature=0)
    t_stored = time.time()
    wait_stored(gw, 1)
    headers, _, _ = ask(client, "short lived", temperature=0)
    assert cache_status(headers) == "exact", "expired before its TTL"
    time.sleep(max(0.0, t_stored + 1.3 - time.time()))  # the TTL is the point
    headers, _, _ = ask(client, "short lived", temperature=0)
    assert cache_status(headers) == "miss", "served after its TTL"
    assert len(groq.requests()) == 2
