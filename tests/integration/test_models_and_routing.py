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


def test_auto_routes_to_groq_default_model(shared, client):
    raw = _raw(client, model="auto", messages=[{"role": "user", "content": "route me please"}])
    assert raw.headers["x-freerelay-provider"] == "groq"
    assert raw.headers["x-freerelay-model"].endswith("llama-3.1-8b-instant")
    r = raw.parse()
    assert r.choices[0].message.content == "mock(groq): route me please"
    [req] = shared.groq.requests()
    assert req["method"] == "POST"
    assert req["path"] == API_PATHS["groq"] + "/chat/completions"
    assert req["body"]["model"] == "llama-3.1-8b-instant"
    assert shared.gemini.requests() == [] and shared.openrouter.requests() == []


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
    sent = {
        "model": "auto",
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
    """All nine configured: each is called on its own API path, and `auto` walks them in order.

    Request k makes the provider `auto` picks first answer 429 (long Retry-After), so the next one
    in the order answers it, and the 429'd one stays cooled down for the rest of the test.
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

    for first, second in zip(order, order[1:]):
        mocks[first].script({"kind": "status", "status": 429, "retry_after": "600"})
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"after {first}"}])
        assert raw.headers["x-freerelay-provider"] == second, f"after {first} cooled down"
        assert raw.parse().choices[0].message.content == f"mock({second}): after {first}"
        [req] = mocks[second].requests()[-1:]
        assert req["path"] == upstream_path(second, upstream_model(req), API_PATHS[second])
        assert upstream_auth(second, req) == mocks[second].key

    for p in order:
        # groq was only 429'd, anthropic only answered; each one between answered, then was 429'd.
        assert len(mocks[p].requests()) == (1 if p in ("groq", "anthropic") else 2), p
