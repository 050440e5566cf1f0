"""Hedging, end to end: a tenant policy's `hedge on` sends the first attempt to the plan's first
two candidates at once; the first good answer (a whole JSON answer, or a stream's first healthy
event) wins, the other is cancelled, and both are accounted (`x-freerelay-attempts`, the recorded
spend, the route's audit).

Each test starts its own gateway and mocks. The plan's order comes from a model group
(`model_groups`: members in order), so which candidate is first is known. The mock's request log
says where requests went; its pauses (`pause_after_chunks`, never released here) prove that the
gateway dropped a request it no longer needed: a held answer stops being held only when its
connection closes.
"""

from __future__ import annotations

import json
import threading
import time

import httpx

from helpers import (cost_header_micro, gateway_events, micro, spent_micro, sse_events,
                     wait_for_event, wait_until)

GROQ = "groq/llama-3.1-8b-instant"
CEREBRAS = "cerebras/llama3.1-8b"
MISTRAL = "mistral/mistral-small-latest"
OPENAI = "openai/gpt-4o-mini"
TOGETHER = "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"

GROUPS = f"trio={GROQ},{CEREBRAS},{MISTRAL};pair={TOGETHER},{OPENAI}"

SLOW_MS = 3000


def model_of(target: str) -> str:
    return target.split("/", 1)[1]


def start(make_mock, make_gateway, providers=("groq", "cerebras", "mistral"),
          policy: str | None = "hedge on\n", env: dict[str, str] | None = None):
    mocks = {p: make_mock(p) for p in providers}
    gw = make_gateway(mocks, extra_env={"SPIN_VARIABLE_MODEL_GROUPS": GROUPS, **(env or {})})
    if policy is not None:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            r = c.put("/v1/freerelay/policy", content=policy.encode(),
                      headers={"Authorization": f"Bearer {gw.client_key}", "content-type": "text/plain"})
        assert r.status_code == 200, r.text
    return gw, mocks


def chat(content: str, model: str = "trio", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def post(gw, body: dict, timeout: float = 30) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=timeout) as c:
        return c.post("/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {gw.client_key}"})


def route(gw, resp_or_headers) -> dict:
    """The route record of a response (or of a stream's headers)."""
    headers = getattr(resp_or_headers, "headers", resp_or_headers)
    rid = headers["x-freerelay-route-id"]
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.get(f"/v1/freerelay/routes/{rid}", headers={"Authorization": f"Bearer {gw.client_key}"})
    assert r.status_code == 200, r.text
    return r.json()


def served_by(resp) -> str:
    return f"{resp.headers['x-freerelay-provider']}/{resp.headers['x-freerelay-model']}"


def in_background(fn):
    """Runs `fn` on a thread; `.result()` waits for it (re-raising what it raised)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in result()
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    class Handle:
        def result(self, timeout: float = 30):
            t.join(timeout)
            assert not t.is_alive(), "the request did not finish"
            if "error" in box:
                raise box["error"]
            return box["value"]

    return Handle()


# ---------------------------------------------------------------------------------------------
# The fast one wins, the slow one is cancelled


def test_a_hedged_json_request_takes_the_faster_answer_and_cancels_the_slower(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway)
    m["groq"].rules({"model": model_of(GROQ), "behaviour": {"kind": "ok", "latency_ms": SLOW_MS}})

    t0 = time.monotonic()
    r = post(gw, chat("Name a colour of the sky."))
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    # The second-ranked answered; the gateway did not wait for the first.
    assert served_by(r) == CEREBRAS
    assert r.json()["choices"][0]["message"]["content"].startswith("mock(cerebras)")
    assert took < SLOW_MS / 1000 / 2, f"took {took:.2f}s: the gateway waited for the slow one"
    assert r.headers["x-freerelay-attempts"] == "2"
    # Both were asked, at once; the third candidate was not.
    assert len(m["groq"].requests()) == 1 and len(m["cerebras"].requests()) == 1
    assert m["mistral"].requests() == []
    gap = abs(m["groq"].requests()[0]["at_ms"] - m["cerebras"].requests()[0]["at_ms"])
    assert gap < 500, f"the two attempts were {gap} ms apart"

    rec = route(gw, r)
    assert rec["outcome"]["hedged"] is True
    assert rec["outcome"]["provider"] == "cerebras" and rec["outcome"]["attempts"] == 2
    assert any(t.startswith(f"{GROQ}: cancelled") for t in rec["outcome"]["trail"]), rec["outcome"]
    e = wait_for_event(gw, "hedged")
    assert e is not None and (e["winner"], e["loser"]) == (CEREBRAS, GROQ), e


def test_the_losing_request_is_dropped_not_left_running(make_mock, make_gateway):
    """The slow answer is held by the mock (its head sent, its body never released): it stops
    being held only when the gateway closes the connection."""
    gw, m = start(make_mock, make_gateway)
    groq, cerebras = m["groq"], m["cerebras"]
    groq.rules({"model": model_of(GROQ), "behaviour": {"kind": "ok", "pause_after_chunks": 0}})
    # The winner takes a moment, so the held answer can be seen held first.
    cerebras.rules({"model": model_of(CEREBRAS), "behaviour": {"kind": "ok", "latency_ms": 700}})

    pending = in_background(lambda: post(gw, chat("Say something short.")))
    assert wait_until(lambda: groq.paused() == 1, timeout=10), "the first attempt was not sent"
    r = pending.result()
    assert r.status_code == 200 and served_by(r) == CEREBRAS, r.text
    assert r.headers["x-freerelay-attempts"] == "2"
    assert wait_until(lambda: groq.paused() == 0, timeout=5), "the losing request was not cancelled"
    # A cancelled attempt is no failure of its model: its breaker has nothing against it.
    state = gw.state()
    assert all(b["failures"] == 0 for b in state.get("breakers") or [] if b["provider"] == "groq"), state


def test_a_hedged_stream_takes_the_first_healthy_stream(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway)
    groq, cerebras = m["groq"], m["cerebras"]
    # The first-ranked sends its head at once but no event; the second's first event comes later.
    groq.rules({"model": model_of(GROQ), "behaviour": {"kind": "ok", "pause_after_chunks": 0}})
    cerebras.rules({"model": model_of(CEREBRAS), "behaviour": {"kind": "ok", "latency_ms": 700}})

    def stream():
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=chat("Count to three.", stream=True),
                          headers={"Authorization": f"Bearer {gw.client_key}"}) as s:
                return s.status_code, dict(s.headers), s.read().decode()

    t0 = time.monotonic()
    pending = in_background(stream)
    assert wait_until(lambda: groq.paused() == 1, timeout=10), "the first attempt was not sent"
    status, headers, body = pending.result()
    took = time.monotonic() - t0
    assert status == 200, body
    assert f"{headers['x-freerelay-provider']}/{headers['x-freerelay-model']}" == CEREBRAS
    assert headers["x-freerelay-attempts"] == "2"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert "mock(cerebras)" in body and "mock(groq)" not in body
    assert took < SLOW_MS / 1000, f"took {took:.2f}s"
    assert wait_until(lambda: groq.paused() == 0, timeout=5), "the losing stream was not cancelled"
    rec = route(gw, headers)
    assert rec["outcome"]["hedged"] is True and rec["outcome"]["provider"] == "cerebras"


def test_a_hedged_stream_with_a_slow_first_ranked_answers_from_the_fast_one(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway)
    m["groq"].rules({"model": model_of(GROQ), "behaviour": {"kind": "ok", "latency_ms": SLOW_MS}})
    t0 = time.monotonic()
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=chat("Hello there.", stream=True),
                      headers={"Authorization": f"Bearer {gw.client_key}"}) as s:
            headers = s.headers
            body = s.read().decode()
    took = time.monotonic() - t0
    assert f"{headers['x-freerelay-provider']}/{headers['x-freerelay-model']}" == CEREBRAS
    assert headers["x-freerelay-attempts"] == "2"
    assert sse_events(body)[-1] == "[DONE]"
    assert took < SLOW_MS / 1000 / 2, f"took {took:.2f}s: the gateway waited for the slow stream"
    assert len(m["groq"].requests()) == 1


# ---------------------------------------------------------------------------------------------
# Failures


def test_when_one_hedged_attempt_fails_the_other_answers(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway)
    groq, cerebras, mistral = m["groq"], m["cerebras"], m["mistral"]
    groq.fail_model(model_of(GROQ), 500)
    cerebras.rules({"model": model_of(CEREBRAS), "behaviour": {"kind": "ok", "latency_ms": 300}})
    r = post(gw, chat("What is two plus two?"))
    assert r.status_code == 200, r.text
    assert served_by(r) == CEREBRAS
    assert r.headers["x-freerelay-attempts"] == "2"
    # The failed one is not retried while the other is on its way, and nothing else is asked.
    assert len(groq.requests()) == 1 and len(cerebras.requests()) == 1 and mistral.requests() == []
    rec = route(gw, r)
    assert rec["outcome"]["hedged"] is True
    assert any(t.startswith(f"{GROQ}:") for t in rec["outcome"]["trail"])
    # The failure counts against its model like any.
    # (Events reach the log when the request ends, which under Spin can be just after the
    # client has its answer.)
    def groq_failures():
        return [e for e in gateway_events(gw, "attempt_failed") if e["provider"] == "groq"]

    wait_until(lambda: groq_failures(), timeout=5)
    failed = groq_failures()
    assert len(failed) == 1 and failed[0]["upstream_status"] == 500, failed

    # And the other way round: the first-ranked answers when the second fails.
    groq.rules()
    cerebras.fail_model(model_of(CEREBRAS), 503)
    r = post(gw, chat("What is three plus three?"))
    assert r.status_code == 200 and served_by(r) == GROQ, r.text
    assert r.headers["x-freerelay-attempts"] == "2"


def test_when_both_hedged_attempts_fail_the_walk_goes_on_to_the_next_candidate(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway)
    groq, cerebras, mistral = m["groq"], m["cerebras"], m["mistral"]
    groq.fail_model(model_of(GROQ), 500)
    cerebras.fail_model(model_of(CEREBRAS), 502)
    r = post(gw, chat("Tell me a fact about otters."))
    assert r.status_code == 200, r.text
    assert served_by(r) == MISTRAL
    assert r.headers["x-freerelay-attempts"] == "3"
    # The hedged models had their turn: neither is retried.
    assert len(groq.requests()) == 1 and len(cerebras.requests()) == 1 and len(mistral.requests()) == 1
    rec = route(gw, r)
    assert rec["outcome"]["hedged"] is True and rec["outcome"]["provider"] == "mistral"
    trail = rec["outcome"]["trail"]
    assert any(t.startswith(f"{GROQ}:") for t in trail) and any(t.startswith(f"{CEREBRAS}:") for t in trail)

    # With nothing after them, the client gets both failures.
    mistral.fail_model(model_of(MISTRAL), 500)
    r = post(gw, chat("Tell me a fact about beavers."))
    assert r.status_code >= 500, r.text
    msg = r.json()["error"]["message"]
    assert GROQ in msg and CEREBRAS in msg, msg


# ---------------------------------------------------------------------------------------------
# Accounting


def test_a_hedged_paid_pair_records_both_costs_and_the_header_says_so(make_mock, make_gateway):
    # Budgets are kept where they have a limit.
    budgets = {"SPIN_VARIABLE_BUDGET_DAILY_USD": "100", "SPIN_VARIABLE_TENANT_BUDGET_DAILY_USD": "100"}
    gw, m = start(make_mock, make_gateway, providers=("together", "openai"), env=budgets)
    # The first-ranked (together) is held; openai answers.
    m["together"].rules({"model": model_of(TOGETHER), "behaviour": {"kind": "ok", "latency_ms": SLOW_MS}})
    r = post(gw, chat("Summarise the plot of Hamlet in one sentence, please.", model="pair"))
    assert r.status_code == 200, r.text
    assert served_by(r) == OPENAI
    assert r.headers["x-freerelay-attempts"] == "2"
    cost = cost_header_micro(r.headers)
    assert cost is not None and cost > 0
    # The winner's own cost: gpt-4o-mini at $0.15 / $0.60 per million tokens, rounded up once.
    u = r.json()["usage"]
    own = -(-(u["prompt_tokens"] * 150_000 + u["completion_tokens"] * 600_000) // 1_000_000)
    assert cost > own, (cost, own)  # the cancelled one's prompt is in it
    # Where the answer carries `usage.cost` (translated wires), it says the same.
    assert "cost" not in u or micro(str(u["cost"])) == cost, (u, cost)
    # Exactly what the budgets recorded for the request.
    assert wait_until(lambda: spent_micro(gw.state(), "tenant", "day") == cost, timeout=5), (
        spent_micro(gw.state(), "tenant", "day"), cost)
    assert spent_micro(gw.state(), "global", "day") == cost
    rec = route(gw, r)
    assert rec["outcome"]["hedged"] is True and micro(rec["outcome"]["cost_usd"]) == cost

    # A stream: its usage chunk shows the whole cost too.
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=chat("Name three rivers in Europe.", model="pair", stream=True,
                                stream_options={"include_usage": True}),
                      headers={"Authorization": f"Bearer {gw.client_key}"}) as s:
            assert s.headers["x-freerelay-attempts"] == "2"
            body = s.read().decode()
    usage = [json.loads(e)["usage"] for e in sse_events(body) if e != "[DONE]" and json.loads(e).get("usage")]
    assert len(usage) == 1 and "cost" in usage[0], body
    stream_cost = micro(repr(usage[0]["cost"]))
    assert wait_until(lambda: spent_micro(gw.state(), "tenant", "day") == cost + stream_cost, timeout=5), (
        spent_micro(gw.state(), "tenant", "day"), cost, stream_cost)


# ---------------------------------------------------------------------------------------------
# Without the policy


def test_no_hedging_without_the_policy(make_mock, make_gateway):
    gw, m = start(make_mock, make_gateway, policy=None)
    m["groq"].rules({"model": model_of(GROQ), "behaviour": {"kind": "ok", "latency_ms": 800}})
    t0 = time.monotonic()
    r = post(gw, chat("Name a colour of grass."))
    took = time.monotonic() - t0
    assert r.status_code == 200 and served_by(r) == GROQ, r.text
    assert took >= 0.8
    assert r.headers["x-freerelay-attempts"] == "1"
    assert len(m["groq"].requests()) == 1
    assert m["cerebras"].requests() == [] and m["mistral"].requests() == []
    assert "hedged" not in route(gw, r)["outcome"]
    assert gateway_events(gw, "hedged") == []

    # `hedge off` (or a rule that does not fire) is the same.
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        c.put("/v1/freerelay/policy", content=b"when family = math: hedge on\n",
              headers={"Authorization": f"Bearer {gw.client_key}", "content-type": "text/plain"}
              ).raise_for_status()
    r = post(gw, chat("Name a colour of snow."))
    assert r.status_code == 200 and r.headers["x-freerelay-attempts"] == "1"
    assert m["cerebras"].requests() == []
