"""The catalogue as data: per-provider quirks, cost headers, key pools, tier and limit overrides,
and a custom provider declared only by variables — through `freerelay up` with the openai SDK."""

import json

import httpx
import openai
from decimal import ROUND_CEILING, Decimal

import pytest

from helpers import assert_openai_error

# The catalogue's prices (src/catalog.toml), USD per million tokens.
GPT_4O_MINI = (0.15, 0.60)


def _raw(client, **kw):
    return client.chat.completions.with_raw_response.create(**kw)


def _usage_cost(usage, price) -> float:
    """USD in whole micro-dollars, the request's fraction rounded up once (what budgets count)."""
    micro = Decimal(usage.prompt_tokens) * Decimal(str(price[0])) + \
        Decimal(usage.completion_tokens) * Decimal(str(price[1]))
    return float(micro.to_integral_value(rounding=ROUND_CEILING) / Decimal(1_000_000))


def test_free_answers_cost_zero_and_paid_answers_their_price(make_mock, make_gateway):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    client = gw.client()

    raw = _raw(client, model="auto", messages=[{"role": "user", "content": "free please"}])
    assert raw.headers["x-freerelay-provider"] == "groq"
    assert raw.headers["x-freerelay-cost-usd"] == "0.000000"
    assert raw.headers["x-freerelay-attempts"] == "1"

    raw = _raw(client, model="paid", messages=[{"role": "user", "content": "one two three four five"}])
    r = raw.parse()
    assert raw.headers["x-freerelay-provider"] == "openai"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    cost = float(raw.headers["x-freerelay-cost-usd"])
    assert cost == pytest.approx(_usage_cost(r.usage, GPT_4O_MINI), rel=1e-6)
    assert cost > 0

    # Streams: the head leaves before the usage is known; the usage chunk carries the cost.
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream the cost"}])
    chunks = list(stream)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    extra = usage_chunk.usage.model_extra or {}
    assert extra["cost"] == pytest.approx(_usage_cost(usage_chunk.usage, GPT_4O_MINI), rel=1e-6)

    events = [json.loads(line) for line in gw.stderr_tail(200_000).splitlines() if line.startswith("{")]
    answers = [e for e in events if e.get("event") == "answer"]
    assert answers[-1]["provider"] == "openai" and answers[-1]["cost_usd"] == pytest.approx(cost)
    ends = [e for e in events if e.get("event") == "stream_end"]
    assert ends[-1]["cost_usd"] == pytest.approx(extra["cost"]) and ends[-1]["finish_reason"] == "stop"


def test_quirks_reach_each_provider_as_data(make_mock, make_gateway):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    client = gw.client()
    seven_stops = ["\n\n", "```", "<|end|>", "</s>", "\nUser:", "\nHuman:", "<fim_suffix>"]

    # Continue's autocomplete sends 7 stop strings; OpenAI and Groq take 4: trimmed, not failed.
    for model in ["groq/llama-3.1-8b-instant", "openai/gpt-4o-mini"]:
        r = client.chat.completions.create(
            model=model, stop=seven_stops, max_tokens=64, seed=3, logit_bias={"50256": -100},
            messages=[{"role": "user", "content": "complete this"}])
        assert r.choices[0].message.content
    [to_groq] = groq.requests()
    assert to_groq["body"]["stop"] == seven_stops[:4]
    assert "logit_bias" not in to_groq["body"], "Groq rejects logit_bias"
    assert to_groq["body"]["max_tokens"] == 64
    [to_openai] = paid.requests()
    assert to_openai["body"]["stop"] == seven_stops[:4]
    assert to_openai["body"]["max_completion_tokens"] == 64 and "max_tokens" not in to_openai["body"]
    assert to_openai["body"]["logit_bias"] == {"50256": -100}

    # An assistant message with content null and tool_calls, then the tool's result, passes.
    r = client.chat.completions.create(
        model="groq/llama-3.1-8b-instant",
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
        ])
    assert r.choices[0].finish_reason == "stop"
    sent = groq.requests()[-1]["body"]["messages"]
    assert sent[1]["content"] is None and sent[1]["tool_calls"][0]["id"] == "call_1"


def test_a_custom_provider_is_declared_by_variables_alone(make_mock, make_gateway):
    local = make_mock("custom")
    gw = make_gateway({}, extra_env={
        "SPIN_VARIABLE_CUSTOM_MODELS": "llama3.2:3b, qwen2.5-coder:7b",
        "SPIN_VARIABLE_CUSTOM_BASE_URL": local.url,
        "SPIN_VARIABLE_CUSTOM_API_KEY": local.key,
        "SPIN_VARIABLE_CUSTOM_TIER": "paid",
        "SPIN_VARIABLE_CUSTOM_PRICE_INPUT": "1",
        "SPIN_VARIABLE_CUSTOM_PRICE_OUTPUT": "2",
    })
    client = gw.client()
    models = {m.id: m for m in client.models.list()}
    assert {"custom/llama3.2:3b", "custom/qwen2.5-coder:7b", "paid"} <= set(models)
    assert (models["custom/llama3.2:3b"].model_extra or {})["tier"] == "paid"

    raw = _raw(client, model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "local"}])
    r = raw.parse()
    assert raw.headers["x-freerelay-provider"] == "custom"
    assert r.choices[0].message.content == "mock(custom): local"
    assert float(raw.headers["x-freerelay-cost-usd"]) == pytest.approx(
        _usage_cost(r.usage, (1.0, 2.0)), rel=1e-6)
    # `auto` (here: only a paid provider) routes to one of the custom models: which one is the
    # router's choice by expected utility, not the order of `custom_models`.
    raw = _raw(client, model="auto", messages=[{"role": "user", "content": "auto"}])
    assert raw.headers["x-freerelay-provider"] == "custom"
    auto_model = raw.headers["x-freerelay-model"]
    assert auto_model in {"llama3.2:3b", "qwen2.5-coder:7b"}
    assert raw.parse().choices[0].message.content == "mock(custom): auto"
    [first, second] = local.requests()
    assert first["path"] == "/v1/chat/completions" and first["body"]["model"] == "qwen2.5-coder:7b"
    assert second["path"] == "/v1/chat/completions" and second["body"]["model"] == auto_model


def test_tier_and_limit_overrides_are_validated(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_GROQ_TIER": "paid"})
    client = gw.client()
    ids = {m.id for m in client.models.list()}
    assert "paid" in ids and "free" not in ids
    raw = _raw(client, model="paid", messages=[{"role": "user", "content": "priced"}])
    assert raw.headers["x-freerelay-provider"] == "groq"
    assert float(raw.headers["x-freerelay-cost-usd"]) > 0, "a paid tier has a price"

    bad = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_GROQ_RPM": "lots"})
    with pytest.raises(openai.InternalServerError) as e:
        bad.client().chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert_openai_error(e.value.response, 500, code="gateway_misconfigured")
    assert "lots" not in e.value.response.text
    assert "groq_rpm" in bad.stderr_tail()


def test_mistral_gets_no_stream_options_and_the_client_still_gets_its_usage_chunk(make_mock, make_gateway):
    mistral = make_mock("mistral", reject_stream_options=True)
    gw = make_gateway({"mistral": mistral})
    client = gw.client()
    chunks = list(client.chat.completions.create(
        model="mistral/mistral-small-latest", stream=True, stream_options={"include_usage": True},
        seed=7, messages=[{"role": "user", "content": "usage please"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "mock(mistral): usage please"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 3 and last.usage.prompt_tokens == 2
    [req] = mistral.requests()
    assert "stream_options" not in req["body"], "Mistral answers 422 to stream_options"
    assert req["body"]["random_seed"] == 7 and "seed" not in req["body"]
    stats = gw.stats()["providers"]["mistral"]
    assert stats["completion_tokens"] == 3, "usage recorded from the finish chunk"

    # Continue's apply: a trailing assistant message continues only with `prefix: true` there.
    client.chat.completions.create(model="mistral/codestral-latest", messages=[
        {"role": "user", "content": "finish this"}, {"role": "assistant", "content": "def f():"}])
    assert mistral.requests()[-1]["body"]["messages"][-1] == {
        "role": "assistant", "content": "def f():", "prefix": True}


def test_a_key_pool_rotates_and_a_refused_key_is_set_aside_once(make_mock, make_gateway):
    groq = make_mock("groq", keys=2)
    bad = "gsk-revoked-0123456789"
    gw = make_gateway({"groq": groq}, extra_env={
        "SPIN_VARIABLE_GROQ_API_KEY": f"{groq.keys[0]},{bad},{groq.keys[1]}"})
    client = gw.client()
    for i in range(30):
        r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": f"n{i}"}])
        assert r.choices[0].message.content == f"mock(groq): n{i}"
    sent = [r["headers"]["authorization"].removeprefix("Bearer ") for r in groq.requests()]
    # Rotation puts each key first a third of the time: the bad one is met (1 - (2/3)^30).
    assert sent.count(bad) == 1, "a refused key is tried once, then set aside for everyone"
    assert {groq.keys[0], groq.keys[1]} <= set(sent), "both good keys carry traffic"
    answered = [k for k in sent if k != bad]
    assert len(answered) == 30
    keys = gw.stats()["keys"]["groq"]
    assert [k["state"] for k in keys].count("ok") >= 2
    assert [k["state"] for k in keys].count("set_aside") == 1
    events = gw.stderr_tail(400_000)
    assert '"event":"key_set_aside"' in events and bad not in events
    assert bad not in json.dumps(gw.stats())

    # Every key refused: one clear error, and no retry storm on later requests. (`auto` may try
    # several Groq models in one request; a key refused on one is refused on all of them.)
    dead = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_GROQ_API_KEY": "gsk-dead-1,gsk-dead-2"})
    before = len(groq.requests())
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as e:
            dead.client().chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 502
        assert "groq_api_key" in e.value.message and "gsk-dead" not in e.value.message
    tried = [(r["body"]["model"], r["headers"]["authorization"].removeprefix("Bearer "))
             for r in groq.requests()[before:]]
    assert len(tried) == 2, f"each refused key was tried exactly once: {tried}"
