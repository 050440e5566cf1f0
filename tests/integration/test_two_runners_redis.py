"""Two edge instances, one store: two `freerelay up` processes on one Redis database
(`--runtime-config-file` with `[key_value_store.default] type = "redis"`), same variables, same
mock providers. Whatever one instance learns or spends, the other honours: an open circuit
breaker, the money spent against a budget, an exact cache entry, a provider's requests-per-minute.

The Redis server is the session's (`redis_server` in conftest.py); each test gets a database of
its own. Without `redis-server` these tests are skipped, unless FREERELAY_REQUIRE_REDIS=1 (as
scripts/test sets it), which makes that a failure.
"""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from helpers import (assert_openai_error, complete, breaker_state, cache_status, cost_header_micro, micro,
                     quota_entries, spent_micro, upstream_model, usage_cost, wait_until)

GROQ_8B = "groq/llama-3.1-8b-instant"
GROQ_8B_ID = "llama-3.1-8b-instant"
CEREBRAS = "cerebras/gpt-oss-120b"
GEMINI_FLASH = "gemini/gemini-2.5-flash"
GEMINI_LITE = "gemini/gemini-3.1-flash-lite"
GPT_4O = "openai/gpt-4o"          # paid: 2.50 / 10.0 USD per million tokens
CLAUDE_HAIKU = "anthropic/claude-haiku-4-5"  # paid: 1.0 / 5.0

MIN_SAMPLES = 4


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def two_runners(make_gateway, redis_store, new_keys):
    """`two_runners(mocks, extra_env)`: gateways A and B with the same variables and client keys,
    sharing one fresh Redis database."""

    def make(mocks: dict, extra_env: dict[str, str] | None = None):
        rc = redis_store()
        a = make_gateway(mocks, extra_env=extra_env, client_keys=new_keys, runtime_config=rc)
        b = make_gateway(mocks, extra_env=extra_env, client_keys=new_keys, runtime_config=rc)
        return a, b

    return make


@pytest.fixture
def new_keys() -> list[str]:
    from conftest import new_client_key

    return [new_client_key(), new_client_key()]


def redis_db(runtime_config) -> int:
    return int(re.search(r"/(\d+)\"", runtime_config.read_text()).group(1))


# ---------------------------------------------------------------------------------------------
# The fixture itself: both runners serve, and they share the store (existing behaviour: a 429's
# cool-down is written to the store the moment it is judged).


def test_two_runners_share_one_redis_database(make_mock, two_runners, redis_server):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    a, b = two_runners({"groq": groq, "gemini": gemini})
    for gw in (a, b):
        assert httpx.get(f"{gw.url}/healthz", timeout=10).status_code == 200
    assert a.runtime_config == b.runtime_config
    db = redis_db(a.runtime_config)

    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    headers, text, _ = complete(a.client(), model="auto", messages=user("cool groq via A"))
    assert headers["x-freerelay-provider"] == "gemini", text
    assert int(redis_server.command("DBSIZE", db=db)) > 0, "runner A wrote nothing to Redis"

    # Runner B knows groq is cooling without asking it.
    headers, _, _ = complete(b.client(), model="auto", messages=user("via B"))
    assert headers["x-freerelay-provider"] == "gemini"
    assert headers["x-freerelay-attempts"] == "1", "B tried the model A saw cooling"
    assert len(groq.requests()) == 1


def test_rpm_is_shared_between_runners(make_mock, two_runners):
    """groq_rpm = 3 across both instances: four requests alternating between A and B, groq
    sees three, the fourth is served by gemini (no instance sends more than the shared limit).
    The candidates are named (Groq's 8B, then Gemini): Groq limits per model, so under `auto`
    its other models would serve the overflow."""
    for _ in range(2):
        minute = int(time.time() // 60)
        groq, gemini = make_mock("groq"), make_mock("gemini")
        a, b = two_runners({"groq": groq, "gemini": gemini}, {
            "SPIN_VARIABLE_GROQ_RPM": "3", "SPIN_VARIABLE_GEMINI_RPM": "1000"})
        served = []
        for i in range(6):
            gw = (a, b)[i % 2]
            headers, text, _ = complete(gw.client(), model=GROQ_8B, extra_body={"models": [GEMINI_LITE]},
                                        messages=user(f"rpm {i}"))
            served.append(headers["x-freerelay-provider"])
        if int(time.time() // 60) == minute:
            break
    assert len(groq.requests()) == 3, f"groq_rpm = 3 shared, groq saw {len(groq.requests())}: {served}"
    assert served[:3] == ["groq"] * 3 and served[3:] == ["gemini"] * 3, served
    assert {upstream_model(r) for r in groq.requests()} == {GROQ_8B_ID}
    # Either runner's state shows the one shared count.
    for gw in (a, b):
        [rpm] = [q for q in quota_entries(gw.state(), "groq", "rpm")
                 if q["ledger"] == GROQ_8B_ID]
        assert (rpm["count"], rpm["limit"]) == (3, 3), rpm


# ---------------------------------------------------------------------------------------------
# Edge state shared through the store


def test_a_breaker_opened_through_one_runner_is_honoured_by_the_other(make_mock, two_runners):
    groq, cerebras = make_mock("groq"), make_mock("cerebras")
    a, b = two_runners({"groq": groq, "cerebras": cerebras},
                       {"SPIN_VARIABLE_BREAKER_COOLDOWN_MS": "60000"})
    groq.fail_model(GROQ_8B_ID, 500)
    kw = {"model": GROQ_8B, "extra_body": {"models": [CEREBRAS]}}
    ca, cb = a.client(), b.client()

    # Through A until its breaker opens (at most min_samples requests reach groq).
    for i in range(MIN_SAMPLES + 2):
        headers, _, _ = complete(ca, messages=user(f"via A {i}"), **kw)
        assert headers["x-freerelay-provider"] == "cerebras"
    assert breaker_state(a.state(), "groq", GROQ_8B_ID) == "open", a.state()
    seen = len(groq.requests())

    # B reads the same breaker: groq gets nothing through B.
    assert breaker_state(b.state(), "groq", GROQ_8B_ID) == "open", b.state()
    for i in range(5):
        headers, text, _ = complete(cb, messages=user(f"via B {i}"), **kw)
        assert headers["x-freerelay-provider"] == "cerebras"
        assert text == f"mock(cerebras): via B {i}"
    through_b = [r for r in groq.requests() if "via B" in str(r["body"])]
    assert through_b == [], f"runner B sent {len(through_b)} requests to a model whose breaker is open"
    assert len(groq.requests()) == seen

    # Only that model: B still reaches the provider's other models.
    headers, _, _ = complete(cb, model="groq/llama-3.3-70b-versatile", messages=user("sibling"))
    assert headers["x-freerelay-provider"] == "groq"


def test_spend_through_both_runners_adds_up_exactly(make_mock, two_runners):
    paid, anthropic = make_mock("openai"), make_mock("anthropic")
    a, b = two_runners({"openai": paid, "anthropic": anthropic}, {
        "SPIN_VARIABLE_BUDGET_DAILY_USD": "100", "SPIN_VARIABLE_TENANT_BUDGET_DAILY_USD": "100"})
    costs = []
    for i in range(8):
        gw = (a, b)[i % 2]
        model = (GPT_4O, CLAUDE_HAIKU)[(i // 2) % 2]
        headers, _, cost = complete(gw.client(), stream=i % 3 == 0, model=model,
                                    messages=user(f"spend number {i} " + "word " * i))
        assert cost is not None and cost > 0, f"request {i} through {'AB'[i % 2]}: no cost"
        costs.append(cost)
    total = sum(costs)

    def recorded(gw, scope):
        return spent_micro(gw.state(), scope, "day")

    # Usage may be counted just after an answer is sent: poll, then compare exactly.
    wait_until(lambda: recorded(a, "global") == total, timeout=5)
    for gw in (a, b):
        for scope in ("global", "tenant"):
            assert recorded(gw, scope) == total, (
                f"{scope} spend via {gw.name}: {recorded(gw, scope)} micro-USD, the answers' "
                f"costs add up to {total} ({costs})")


def test_an_exact_cache_entry_stored_through_one_runner_is_a_hit_through_the_other(make_mock,
                                                                                     two_runners):
    groq = make_mock("groq")
    a, b = two_runners({"groq": groq}, {"SPIN_VARIABLE_CACHE": "exact"})
    kw = {"model": GROQ_8B, "temperature": 0, "messages": user("cache me across instances")}
    headers, text, _ = complete(a.client(), **kw)
    assert cache_status(headers) == "miss", headers
    assert wait_until(lambda: a.state()["cache"]["stores"] >= 1, timeout=5), a.state()["cache"]

    headers, cached, _ = complete(b.client(), **kw)
    assert cache_status(headers) == "exact", f"via B: {dict(headers)}"
    assert cached == text
    assert len(groq.requests()) == 1, "the hit through B reached the provider"

    # And streamed through A again, replayed from the same entry.
    headers, streamed, _ = complete(a.client(), stream=True, **kw)
    assert cache_status(headers) == "exact"
    assert streamed == text
    assert len(groq.requests()) == 1


def test_all_candidates_open_through_either_runner_is_a_503(make_mock, two_runners):
    groq = make_mock("groq")
    a, b = two_runners({"groq": groq}, {"SPIN_VARIABLE_BREAKER_COOLDOWN_MS": "60000"})
    groq.fail_model(GROQ_8B_ID, 500)
    for i in range(MIN_SAMPLES + 1):
        r = a.http().post("/v1/chat/completions",
                          json={"model": GROQ_8B, "messages": user(f"A {i}")})
        assert r.status_code >= 500, r.text
    seen = len(groq.requests())
    r = b.http().post("/v1/chat/completions", json={"model": GROQ_8B, "messages": user("B")})
    assert_openai_error(r, 503)
    assert int(r.headers["retry-after"]) > 0, r.headers
    assert len(groq.requests()) == seen, "B sent a request to the open model"
    assert [upstream_model(x) for x in groq.requests()] == [GROQ_8B_ID] * seen
