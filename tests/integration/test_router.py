"""The brain, end to end: the router component (reached by the gateway through Spin's local
service chaining), the task profile it decides on, expected-utility routing that learns, sticky
conversations, the context optimizer, tenant policies, background calls kept on free models in a
lower priority class, and the audit of every decision (`x-freerelay-route-id`,
`GET /v1/freerelay/routes/{id}`).

Through `freerelay up` with the official openai SDK (its raw-response API for headers) and httpx
where the protocol is the point. Each test starts its own gateway and mocks: routing learns, and
what one test teaches must not steer another. The mock's request log is the ground truth for
where a request went.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import MANIFEST, REPO, TARGET, Gateway, new_client_key
from helpers import assert_openai_error, gateway_events, sse_events, upstream_model, wait_for_event

# The `freerelay` CLI (explain), whichever runner serves the app.
CLI = TARGET / "release" / "freerelay"

DIMENSIONS = ("family", "depth", "precision", "latency", "context", "tools", "determinism",
              "security", "output", "economic")

# What OpenWebUI sends for a new chat's title (open-webui DEFAULT_TITLE_GENERATION_PROMPT_TEMPLATE,
# its chat history filled in), on the model the user picked.
OPENWEBUI_TITLE = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Guidelines:
- The title should clearly represent the main theme or subject of the conversation.
- Use emojis that enhance understanding of the topic, but avoid quotation marks or special formatting.
- Write the title in the chat's primary language; default to English if multilingual.
- Prioritize accuracy over excessive creativity; keep it clear and simple.
- Your entire response must consist solely of the JSON object, without any introductory or concluding text.
- The output must be a single, raw JSON object, without any markdown code fences or other encapsulating text.
- Ensure no conversational text, affirmations, or explanations precede or follow the raw JSON output, as this will cause direct parsing failure.
### Output:
JSON format: { "title": "your concise title here" }
### Examples:
- { "title": "📉 Stock Market Trends" },
- { "title": "🍪 Perfect Chocolate Chip Recipe" },
### Chat History:
<chat_history>
USER: How do I keep my sourdough starter alive while travelling for two weeks?
ASSISTANT: Feed it, let it rise for an hour, then refrigerate it in a sealed jar.
</chat_history>"""

# A request a careful engineer would not leave to a small free model: a concurrency bug in pasted
# code with its stack trace, a refactor and the invariants argued step by step.
HARD_CODE = """You are reviewing a production incident. The service below deadlocks under load.

```python
import threading

class Ledger:
    def __init__(self):
        self.lock_a = threading.Lock()
        self.lock_b = threading.Lock()
        self.balances = {}

    def transfer(self, src, dst, amount):
        with self.lock_a:
            with self.lock_b:
                self.balances[src] -= amount
                self.balances[dst] += amount

    def audit(self):
        with self.lock_b:
            with self.lock_a:
                return sum(self.balances.values())
```

Traceback (most recent call last):
  File "/srv/app/worker.py", line 88, in run
    ledger.audit()
  File "/srv/app/ledger.py", line 17, in audit
    with self.lock_a:
RuntimeError: watchdog: thread blocked for 30.0s

Find the root cause, refactor the class so that transfers stay atomic and audits consistent
without deadlocks, prove that your lock ordering cannot deadlock, and analyse the trade-offs of
a single global lock versus per-account locks step by step."""

SIMPLE = "What is the capital of Portugal?"


def env(**variables) -> dict[str, str]:
    return {f"SPIN_VARIABLE_{k.upper()}": str(v) for k, v in variables.items()}


def post(gw, body: dict, *, headers: dict | None = None, key: str | None = None,
         path: str = "/v1/chat/completions") -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        return c.post(path, json=body,
                      headers={"Authorization": f"Bearer {key or gw.client_key}", **(headers or {})})


def route(gw, route_id: str, key: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        return c.get(f"/v1/freerelay/routes/{route_id}",
                     headers={"Authorization": f"Bearer {key or gw.client_key}"})


def put_policy(gw, text: str, key: str | None = None) -> httpx.Response:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        return c.put("/v1/freerelay/policy", content=text.encode(),
                     headers={"Authorization": f"Bearer {key or gw.client_key}",
                              "content-type": "text/plain"})


def chat(content: str, model: str = "auto", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def served_by(resp: httpx.Response) -> str:
    return f"{resp.headers['x-freerelay-provider']}/{resp.headers['x-freerelay-model']}"


# ---------------------------------------------------------------------------------------------
# The audit


def test_every_response_carries_a_route_id_and_its_tenant_can_read_the_decision(make_mock, make_gateway):
    groq, openai_ = make_mock("groq"), make_mock("openai")
    other = new_client_key()
    gw = make_gateway({"groq": groq, "openai": openai_}, client_keys=[new_client_key(), other])
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": SIMPLE}])
    rid = raw.headers["x-freerelay-route-id"]
    assert rid.startswith("rt_") and len(rid) == 19, rid
    answer = raw.parse()
    assert answer.choices[0].message.content

    r = route(gw, rid)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["id"] == rid and rec["object"] == "freerelay.route"
    # One entry per dimension, each with its value and the features that set it.
    for d in DIMENSIONS:
        assert d in rec["profile"], d
        assert "value" in rec["profile"][d] and isinstance(rec["profile"][d]["reasons"], list), d
    assert rec["profile"]["family"]["value"] == "chat"
    # Every candidate with its score breakdown; the served one ranked first.
    cands = rec["candidates"]
    assert len(cands) >= 2
    ranked = sorted((c for c in cands if c["rank"]), key=lambda c: c["rank"])
    for c in ranked:
        for f in ("utility", "p_success", "quality", "value_usd", "expected_cost_usd",
                  "latency_ms", "risk_usd", "bonus_usd"):
            assert f in c["score"], (c, f)
    assert rec["outcome"]["status"] == 200
    assert f'{rec["outcome"]["provider"]}/{rec["outcome"]["model"]}' == served_by(raw)
    assert rec["policy"]["fired"] == []
    # A simple question goes free.
    assert raw.headers["x-freerelay-provider"] == "groq"
    assert ranked[0]["tier"] == "free"

    # Another tenant cannot read it; an unknown id is a 404 alike.
    assert_openai_error(route(gw, rid, key=other), 404, code="route_not_found")
    assert_openai_error(route(gw, "rt_0000000000000000"), 404, code="route_not_found")
    assert_openai_error(route(gw, "nonsense"), 404, code="route_not_found")


def test_streams_and_errors_carry_the_route_id_too(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=chat(SIMPLE, stream=True),
                      headers={"Authorization": f"Bearer {gw.client_key}"}) as s:
            rid = s.headers["x-freerelay-route-id"]
            body = s.read().decode()
    assert sse_events(body)[-1] == "[DONE]"
    rec = route(gw, rid).json()
    assert rec["outcome"]["status"] == 200 and rec["outcome"]["provider"] == "groq"

    groq.fail_model("llama-3.1-8b-instant", 400, times=None)
    groq.rules({"behaviour": {"kind": "status", "status": 400}})
    r = post(gw, chat(SIMPLE, model="groq/llama-3.1-8b-instant"))
    assert r.status_code == 400
    rec = route(gw, r.headers["x-freerelay-route-id"]).json()
    assert rec["outcome"]["status"] == 400 and rec["outcome"]["error"]


# ---------------------------------------------------------------------------------------------
# Tiers: simple work stays free, work that needs it goes paid


def test_auto_sends_simple_work_free_and_hard_work_paid(make_mock, make_gateway):
    groq, openai_ = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": openai_})
    easy = post(gw, chat(SIMPLE))
    assert easy.status_code == 200 and easy.headers["x-freerelay-provider"] == "groq"
    hard = post(gw, chat(HARD_CODE))
    assert hard.status_code == 200, hard.text
    assert hard.headers["x-freerelay-provider"] == "openai", served_by(hard)
    rec = route(gw, hard.headers["x-freerelay-route-id"]).json()
    assert rec["profile"]["tier"]["value"] == "paid"
    assert rec["profile"]["family"]["value"] == "code"
    # `free` mode keeps even hard work on free models (the best of them).
    r = post(gw, chat(HARD_CODE), headers={"x-freerelay-mode": "free"})
    assert r.status_code == 200 and r.headers["x-freerelay-provider"] == "groq"


# ---------------------------------------------------------------------------------------------
# Background calls


def test_an_openwebui_title_call_on_a_paid_model_is_kept_on_a_free_one(make_mock, make_gateway):
    groq, openai_ = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": openai_})
    r = post(gw, chat(OPENWEBUI_TITLE, model="openai/gpt-4o", stream=False))
    assert r.status_code == 200, r.text
    assert r.headers["x-freerelay-provider"] == "groq", served_by(r)
    assert not openai_.requests()
    rec = route(gw, r.headers["x-freerelay-route-id"]).json()
    assert rec["profile"]["family"]["value"] == "background"
    assert rec["profile"]["background"] == "title"
    assert rec["profile"]["latency"]["value"] == "background"
    # The cheapest free model: the one with the most requests a day to spare.
    assert r.headers["x-freerelay-model"] == "llama-3.1-8b-instant"


def test_a_429_on_a_background_call_never_refuses_the_users_next_message(make_mock, make_gateway):
    # One free provider; its next answer is a 429 with a long Retry-After.
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    m = "groq/llama-3.1-8b-instant"
    groq.rules({"times": 1, "behaviour": {"kind": "status", "status": 429, "retry_after": "30"}})
    title = post(gw, chat(OPENWEBUI_TITLE, model=m))
    assert title.status_code == 429
    # The user's message right after is sent and answered.
    user = post(gw, chat("Thanks! And how often should I feed it once I am back home?", model=m))
    assert user.status_code == 200, user.text
    assert len(groq.requests()) == 2
    # Another chore is still held back by the background cool-down.
    again = post(gw, chat(OPENWEBUI_TITLE, model=m))
    assert again.status_code == 429
    assert len(groq.requests()) == 2


def test_background_calls_may_use_only_part_of_a_quota(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={
        **env(groq_rpm=4, background_reserve="0.5"),
    })
    m = "groq/llama-3.1-8b-instant"
    assert post(gw, chat(OPENWEBUI_TITLE, model=m)).status_code == 200
    assert post(gw, chat(OPENWEBUI_TITLE, model=m)).status_code == 200
    held = post(gw, chat(OPENWEBUI_TITLE, model=m))
    assert_openai_error(held, 429)
    assert len(groq.requests()) == 2
    # The user's own requests still have the reserved half.
    assert post(gw, chat(SIMPLE, model=m)).status_code == 200
    assert post(gw, chat(SIMPLE, model=m)).status_code == 200
    assert len(groq.requests()) == 4


# ---------------------------------------------------------------------------------------------
# Learning, stickiness


def test_outcomes_are_learned_and_move_traffic(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    # Breakers out of the way: this is the router's own learning.
    gw = make_gateway({"groq": groq, "gemini": gemini},
                      extra_env=env(breaker_min_samples=1000, breaker_failure_rate=1))
    first = post(gw, chat(SIMPLE))
    top = served_by(first)
    provider, model = top.split("/", 1)
    mock = groq if provider == "groq" else gemini
    mock.fail_model(model, 500)
    for _ in range(6):
        r = post(gw, chat(SIMPLE))
        assert r.status_code == 200
    mock.rules()
    r = post(gw, chat(SIMPLE))
    assert served_by(r) != top, "the failing model still ranks first"
    rec = route(gw, r.headers["x-freerelay-route-id"]).json()
    failing = next(c for c in rec["candidates"]
                   if c["provider"] == provider and c["model"] == model)
    # Failures learned (until it stopped ranking first), its chance of success down from its
    # prior.
    assert failing["score"]["learned_outcomes"] >= 2
    assert failing["score"]["p_success"] < 0.8


def test_a_conversation_stays_on_the_model_that_served_it(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini},
                      extra_env=env(breaker_min_samples=1000, breaker_failure_rate=1))
    chat_id = {"x-openwebui-chat-id": "chat-7d1c"}
    top = served_by(post(gw, chat("Say hello in Italian.")))
    provider, model = top.split("/", 1)
    mock = groq if provider == "groq" else gemini
    # The first turn's best model fails: another serves the conversation...
    mock.fail_model(model, 500)
    first = post(gw, chat("Tell me about Lisbon."), headers=chat_id)
    assert first.status_code == 200
    served = served_by(first)
    assert served != top
    mock.rules()
    # ...and keeps it on the next turn, though the first is healthy again.
    follow = {"model": "auto", "messages": [
        {"role": "user", "content": "Tell me about Lisbon."},
        {"role": "assistant", "content": "Lisbon is the capital of Portugal."},
        {"role": "user", "content": "What about its trams?"}]}
    second = post(gw, follow, headers=chat_id)
    assert served_by(second) == served
    rec = route(gw, second.headers["x-freerelay-route-id"]).json()
    assert rec["sticky"]["model"] == served.split("/", 1)[1]


# ---------------------------------------------------------------------------------------------
# Policies


def test_policies_are_validated_stored_per_tenant_and_steer_routing(make_mock, make_gateway):
    groq, openai_ = make_mock("groq"), make_mock("openai")
    other = new_client_key()
    gw = make_gateway({"groq": groq, "openai": openai_}, client_keys=[new_client_key(), other])
    bad = put_policy(gw, "prefer groq\nwhen family = cod: mode paid\ncap temperature hot\n")
    err = assert_openai_error(bad, 400)
    assert "line 2, column" in err["message"] and "line 3, column" in err["message"], err
    assert err["param"] == "policy"

    text = ("# chores stay free, hard code goes to OpenAI, nobody runs hot\n"
            "when family = code: prefer openai\n"
            "cap temperature 0.3\n")
    ok = put_policy(gw, text)
    assert ok.status_code == 200, ok.text
    assert ok.json()["rules"] == 2
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        got = c.get("/v1/freerelay/policy", headers={"Authorization": f"Bearer {gw.client_key}"})
    assert got.json()["policy"] == text

    r = post(gw, chat("Write a Python function that reverses a string.", temperature=0.9))
    assert r.headers["x-freerelay-provider"] == "openai", served_by(r)
    assert openai_.requests()[-1]["body"]["temperature"] == 0.3
    rec = route(gw, r.headers["x-freerelay-route-id"]).json()
    assert [f["line"] for f in rec["policy"]["fired"]] == [2, 3]
    # The other tenant has no policy.
    r2 = post(gw, chat("Write a Python function that reverses a string.", temperature=0.9),
              key=other)
    assert r2.headers["x-freerelay-provider"] == "groq"
    assert groq.requests()[-1]["body"]["temperature"] == 0.9

    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert c.delete("/v1/freerelay/policy",
                        headers={"Authorization": f"Bearer {gw.client_key}"}).status_code == 200
    r3 = post(gw, chat("Write a Python function that reverses a string."))
    assert r3.headers["x-freerelay-provider"] == "groq"


def test_a_policy_can_exclude_providers_and_force_a_mode(make_mock, make_gateway):
    groq, gemini, openai_ = make_mock("groq"), make_mock("gemini"), make_mock("openai")
    gw = make_gateway({"groq": groq, "gemini": gemini, "openai": openai_})
    assert put_policy(gw, "exclude groq\nwhen family = translation: mode paid\n").status_code == 200
    r = post(gw, chat(SIMPLE))
    assert r.headers["x-freerelay-provider"] == "gemini"
    t = post(gw, chat("Translate into German: the weather is lovely today."))
    assert t.headers["x-freerelay-provider"] == "openai", served_by(t)
    assert not groq.requests()


# ---------------------------------------------------------------------------------------------
# The context optimizer


def test_a_conversation_larger_than_a_window_is_cut_keeping_system_and_latest_turns(make_mock, make_gateway):
    local = make_mock("custom")
    gw = make_gateway({"custom": local}, extra_env=env(
        custom_models="small-model", custom_context_window=1500, custom_api_key=local.key))
    filler = "This paragraph is background about an unrelated topic. " * 40
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        messages.append({"role": "user", "content": f"Old question {i}. {filler}"})
        messages.append({"role": "assistant", "content": f"Old answer {i}."})
    messages.append({"role": "user", "content": "Finally: what is 2 + 2?"})
    r = post(gw, {"model": "auto", "messages": messages, "max_tokens": 50})
    assert r.status_code == 200, r.text
    sent = local.requests()[-1]["body"]["messages"]
    assert sent[0] == messages[0]
    assert sent[-1] == messages[-1]
    assert len(sent) < len(messages)
    assert any("omitted" in (m.get("content") or "") for m in sent)
    ev = wait_for_event(gw, "context")
    assert ev and ev["model"] == "small-model"


# ---------------------------------------------------------------------------------------------
# The router component and its fallback


def test_the_router_component_decides_and_a_failing_router_falls_back_locally(make_mock, make_gateway, tmp_path):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    assert post(gw, chat(SIMPLE)).status_code == 200
    routed = wait_for_event(gw, "routed")
    assert routed and routed["via"] == "component", routed

    # The same app with a router that cannot decide (its own configuration is broken, so it
    # answers 500): the gateway plans locally and says so. (A manifest without the router
    # component at all is a deployment error: real Spin fails the gateway's invocation.)
    app = tmp_path / "app-with-broken-router"
    app.mkdir()
    text = MANIFEST.read_text()
    cut = text.index("[component.router.variables]")
    broken = text[cut:].replace('max_attempts = "{{ max_attempts }}"', 'max_attempts = "lots"', 1)
    assert broken != text[cut:]
    (app / "spin.toml").write_text(text[:cut] + broken)
    os.symlink(REPO / "components", app / "components")
    alone = Gateway(state_dir=tmp_path / "alone", env=gw.env, client_key=gw.client_key,
                    log_dir=tmp_path, name="alone")
    alone.state_dir.mkdir()
    import conftest
    saved = conftest.MANIFEST
    conftest.MANIFEST = app / "spin.toml"
    try:
        alone.start()
    finally:
        conftest.MANIFEST = saved
    try:
        r = post(alone, chat(SIMPLE))
        assert r.status_code == 200, r.text
        fb = wait_for_event(alone, "router_fallback")
        assert fb and fb["reason"], fb
        rec = route(alone, r.headers["x-freerelay-route-id"]).json()
        assert rec["outcome"]["router_fallback"]
        assert rec["profile"]["family"]["value"] == "chat"
    finally:
        alone.close()


# ---------------------------------------------------------------------------------------------
# The CLI


def test_freerelay_explain_prints_the_decision_offline(tmp_path):
    body = tmp_path / "req.json"
    body.write_text(json.dumps(chat(HARD_CODE)))
    e = {**{k: v for k, v in os.environ.items() if not k.startswith("SPIN_VARIABLE_")},
         "SPIN_VARIABLE_GROQ_API_KEY": "gsk-offline", "SPIN_VARIABLE_OPENAI_API_KEY": "sk-offline"}
    out = subprocess.run([str(CLI), "explain", str(body), "--json", "-f", str(MANIFEST)],
                         capture_output=True, text=True, env=e, timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["profile"]["tier"]["value"] == "paid"
    first = next(c for c in d["candidates"] if c["rank"] == 1)
    assert first["tier"] == "paid" and first["provider"] == "openai"
    assert d["plan"][0]["provider"] == "openai"
    assert "gsk-offline" not in out.stdout and "sk-offline" not in out.stdout
    text = subprocess.run([str(CLI), "explain", "-f", str(MANIFEST)], input=json.dumps(chat(SIMPLE)),
                          capture_output=True, text=True, env=e, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "family" in text.stdout and "groq" in text.stdout
