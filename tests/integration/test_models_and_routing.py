"""GET /v1/models and how chat requests are routed to providers."""

import json

import openai
import pytest

from conftest import API_PATHS
from helpers import assert_openai_error, chat_body, upstream_auth, upstream_model, upstream_path, words

CONFIGURED = {"groq", "gemini", "openrouter"}
UNCONFIGURED = {"mistral", "nvidia", "together", "openai", "anthropic"}


def test_models_list_shape(gw):
    with gw.http() as c:
        r = c.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    assert isinstance(body["data"], list) and body["data"]
    for m in body["data"]:
        assert isinstance(m["id"], str) and m["id"]
        assert m["object"] == "model"
        assert isinstance(m["created"], int)
        assert isinstance(m["owned_by"], str) and m["owned_by"]
    ids = [m["id"] for m in body["data"]]
    assert len(ids) == len(set(ids)), "duplicate model ids"


def test_models_auto_and_configured_providers_only(client):
    models = {m.id: m for m in client.models.list()}
    assert "auto" in models
    assert models["auto"].owned_by == "freerelay"
    assert "groq/llama-3.1-8b-instant" in models
    assert "gemini/gemini-2.5-flash" in models
    assert "openrouter/meta-llama/llama-3.3-70b-instruct:free" in models
    # Virtual models: `free` only when a free-tier provider is configured, `paid` only for a paid one.
    assert models["free"].owned_by == "freerelay"
    assert "paid" not in models, "no paid provider is configured"
    for mid in models:
        if mid in ("auto", "free"):
            continue
        provider = mid.split("/", 1)[0]
        assert provider in CONFIGURED, f"{mid} listed but {provider} is not configured"
    for p in UNCONFIGURED:
        assert not any(mid.startswith(p + "/") for mid in models), p


def test_models_list_does_not_call_providers(gw, shared, client):
    ids = {m.id for m in client.models.list()}
    assert {"auto", "groq/llama-3.1-8b-instant", "gemini/gemini-2.5-flash"} <= ids, ids
    for m in shared.mocks.values():
        assert m.all_requests() == []


def _raw(client, **kw):
    return client.chat.completions.with_raw_response.create(**kw)


def _route(gw, route_id: str) -> dict:
    """The router's decision for a response (`x-freerelay-route-id`)."""
    with gw.http() as c:
        r = c.get(f"/v1/freerelay/routes/{route_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _ranked(rec: dict) -> list[dict]:
    """The candidates handed to the gateway, in the order they are tried."""
    return sorted((c for c in rec["candidates"] if c["rank"]), key=lambda c: c["rank"])


def _assert_each_providers_best_first(rec: dict) -> None:
    """`auto`'s plan (README, Routing, "The plan"): the tier the profile calls for first; within
    a tier, each provider's best model (by utility) before any provider's second, the providers'
    best in order of utility; at most two models per provider, eight in all. (No policy, sticky
    model, breaker or budget here.)"""
    kept = [c for c in rec["candidates"] if not c["excluded"]]
    assert not any(c["held"] for c in kept), kept
    need = rec["profile"]["tier"]["value"]
    ranked = _ranked(rec)
    assert 0 < len(ranked) <= 8, ranked
    tiers = [c["tier"] for c in ranked]
    assert tiers == sorted(tiers, key=lambda t: t != need), f"the {need} tier first: {tiers}"
    for tier in (need, "paid" if need == "free" else "free"):
        group = [c for c in ranked if c["tier"] == tier]
        providers = {c["provider"] for c in kept if c["tier"] == tier}
        seen: list[str] = []
        for c in group:
            if c["provider"] in seen:
                assert set(seen) == providers, (
                    f"{c['provider']}/{c['model']} (rank {c['rank']}) comes before the best of "
                    f"{sorted(providers - set(seen))}")
            else:
                best = max(x["score"]["utility"] for x in kept
                           if x["provider"] == c["provider"] and x["tier"] == tier)
                assert c["score"]["utility"] == best, (c, best)
                seen.append(c["provider"])
        firsts = [c["score"]["utility"] for c in group[:len(providers)]]
        assert firsts == sorted(firsts, reverse=True), group
    for p in {c["provider"] for c in ranked}:
        assert sum(c["provider"] == p for c in ranked) <= 2, (p, ranked)


def test_auto_routes_a_simple_request_to_a_free_model(make_mock, make_gateway):
    """`auto` weighs every model of every configured provider: a simple request goes to a free
    model while free providers are configured, to a paid one when only paid providers are. The
    answer comes from the model the router ranked first, over that provider's own API."""
    free = {p: make_mock(p) for p in ("groq", "gemini")}
    paid = {p: make_mock(p) for p in ("openai", "anthropic")}
    for mocks, tier in (({**free, **paid}, "free"), (paid, "paid")):
        for m in mocks.values():
            m.reset()
        gw = make_gateway(mocks)
        client = gw.client()
        listed = {m.id: m for m in client.models.list()}
        raw = _raw(client, model="auto", messages=[{"role": "user", "content": "route me please"}])
        provider, model = raw.headers["x-freerelay-provider"], raw.headers["x-freerelay-model"]
        assert provider in mocks, provider
        assert (listed[f"{provider}/{model}"].model_extra or {})["tier"] == tier, (provider, model)
        assert raw.parse().choices[0].message.content == f"mock({provider}): route me please"
        rec = _route(gw, raw.headers["x-freerelay-route-id"])
        top = _ranked(rec)[0]
        assert (top["provider"], top["model"], top["tier"]) == (provider, model, tier), top
        _assert_each_providers_best_first(rec)
        [req] = mocks[provider].requests()
        assert req["method"] == "POST"
        assert req["path"] == upstream_path(provider, model, API_PATHS[provider])
        assert upstream_model(req) == model
        assert upstream_auth(provider, req) == mocks[provider].key
        for other, m in mocks.items():
            if other != provider:
                assert m.requests() == [], other


@pytest.mark.parametrize("provider,model", [
    ("groq", "llama-3.3-70b-versatile"),
    ("gemini", "gemini-2.5-flash"),
    ("openrouter", "meta-llama/llama-3.3-70b-instruct:free"),
])
def test_explicit_provider_model(shared, client, provider, model):
    raw = _raw(client, model=f"{provider}/{model}", messages=[{"role": "user", "content": "explicit"}])
    assert raw.headers["x-freerelay-provider"] == provider
    assert raw.headers["x-freerelay-model"].endswith(model)
    assert raw.parse().choices[0].message.content == f"mock({provider}): explicit"
    [req] = shared.mocks[provider].requests()
    assert req["path"] == upstream_path(provider, model, API_PATHS[provider])
    assert upstream_model(req) == model
    for other, m in shared.mocks.items():
        if other != provider:
            assert m.requests() == []


def test_uncatalogued_model_passes_through_to_configured_provider(shared, client):
    raw = _raw(client, model="groq/brand-new-model-2027", messages=[{"role": "user", "content": "new"}])
    assert raw.headers["x-freerelay-provider"] == "groq"
    [req] = shared.groq.requests()
    assert req["body"]["model"] == "brand-new-model-2027"


def test_bare_catalogue_id_routes_to_its_provider(shared, client):
    raw = _raw(client, model="gemini-2.5-flash", messages=[{"role": "user", "content": "bare"}])
    assert raw.headers["x-freerelay-provider"] == "gemini"
    [req] = shared.gemini.requests()
    assert upstream_model(req) == "gemini-2.5-flash"
    assert shared.groq.requests() == []


@pytest.mark.parametrize("model", ["no-such-model", "mistral/mistral-small-latest",
                                   "anthropic/claude-x", "nosuchprovider/x"])
def test_unroutable_model_is_404_model_not_found(shared, gw, client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=chat_body(model=model))
    assert_openai_error(r, 404, code="model_not_found")
    for m in shared.mocks.values():
        assert m.all_requests() == []


def test_upstream_body_is_client_body_with_only_model_replaced(gw, shared):
    # A named OpenAI-format model: the body passes through (Gemini's, say, would be translated).
    sent = {
        "model": "groq/llama-3.1-8b-instant",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "part one"},
                                         {"type": "text", "text": "part two"}]},
        ],
        "temperature": 0.25,
        "max_tokens": 42,
        "seed": 7,
        "response_format": {"type": "text"},
        "x_vendor_extension": {"nested": [1, 2, {"deep": None}], "flag": True},
        "user": "user-123",
    }
    with gw.http() as c:
        r = c.post("/v1/chat/completions", json=sent)
    assert r.status_code == 200, r.text
    [req] = shared.groq.requests()
    assert req["body"] == {**sent, "model": "llama-3.1-8b-instant"}
    assert r.json()["choices"][0]["message"]["content"] == "mock(groq): part one part two"


def test_json_response_is_relayed(shared, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    r = client.chat.completions.create(model="auto", messages=msgs)
    assert r.id.startswith("chatcmpl-mock")
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "mock(groq): one two three"
    assert r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == words("mock(groq): one two three")
    assert r.usage.total_tokens == 5 + 4
    assert r.system_fingerprint == "fp_mock0000001"


def test_tool_call_is_relayed(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    r = client.chat.completions.create(
        model="auto", tools=tools,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


def test_multi_turn_tool_result_is_forwarded(shared, client):
    msgs = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees and rain"},
        {"role": "user", "content": "thanks"},
    ]
    r = client.chat.completions.create(model="auto", messages=msgs)
    assert r.choices[0].message.content == "mock(groq): thanks"
    [req] = shared.groq.requests()
    assert req["body"]["messages"] == msgs


def test_all_providers_paths_and_auto_order(make_mock, make_gateway):
    """All nine configured: `auto` ranks each provider's best model before any provider's second,
    and its fallbacks reach every provider, each on its own API path and wire format.

    Once a provider has answered, it answers 429 (long Retry-After) to everything: the next
    request that tries it cools that model and moves on, so each request is answered by a
    provider that has not answered yet, until all nine have.
    """
    from conftest import PROVIDERS
    order = ["groq", "gemini", "openrouter", "cerebras", "mistral", "nvidia", "together", "openai",
             "anthropic"]
    assert sorted(order) == sorted(PROVIDERS)
    mocks = {p: make_mock(p) for p in order}
    gw = make_gateway(mocks)
    client = gw.client()

    models = {m.id for m in client.models.list()}
    for p in order:
        assert any(mid.startswith(p + "/") for mid in models), f"no {p} models listed"

    answered: list[str] = []
    http = gw.http()
    for k in range(len(order)):
        raw = http.post("/v1/chat/completions", json=chat_body(content=f"request {k}"))
        rec = _route(gw, raw.headers["x-freerelay-route-id"])
        plan = [f"{c['provider']}/{c['model']}" for c in _ranked(rec)]
        if k == 0:
            _assert_each_providers_best_first(rec)
            assert _ranked(rec)[0]["tier"] == "free", plan
        assert raw.status_code == 200, (
            f"with {answered} answering 429, `auto` answered {raw.status_code}: "
            f"{raw.text[:300]}; plan: {plan}")
        p, model = raw.headers["x-freerelay-provider"], raw.headers["x-freerelay-model"]
        assert p not in answered, f"{p} answers 429 to everything, yet served request {k}"
        assert raw.json()["choices"][0]["message"]["content"] == f"mock({p}): request {k}"
        req = mocks[p].requests()[-1]
        assert req["path"] == upstream_path(p, model, API_PATHS[p])
        assert upstream_model(req) == model
        assert upstream_auth(p, req) == mocks[p].key
        answered.append(p)
        mocks[p].rules({"behaviour": {"kind": "status", "status": 429, "retry_after": "600"}})
    assert sorted(answered) == sorted(order)

    for p in order:
        # Its first request was the one it answered; after that, each 429 cooled the model it
        # was asked for, and a cooled model is not asked again.
        after = [upstream_model(r) for r in mocks[p].requests()[1:]]
        assert len(after) == len(set(after)), (p, after)
