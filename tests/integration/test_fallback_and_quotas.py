"""Issue 7, end to end: fallback that never stalls and free-tier quotas that are never hit.

Through `freerelay up` with the official openai SDK (httpx where the raw protocol is the point):
modes (`auto`, `free`, `paid`, and the `x-freerelay-mode` header), OpenRouter's per-request
`models` fallback list, named model groups (`model_groups`), what each kind of failure does next
(429 and its hints, per-day caps, 5xx and resets, short Retry-After, context length, content
filter), the per-request attempt budget, streams (first-token deadline, a stream without
`[DONE]`, rescue of a broken stream with an assistant prefill), local quotas (RPM/RPD/TPM per key,
under concurrency) and the one error a client gets when everything failed.

Every test that leaves state behind (cool-downs, quota counters) starts its own gateway. Times
are kept small through variables; only behaviour that *is* time (waiting out a Retry-After, not
waiting, a cool-down deadline) is checked against the clock, with generous bounds.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import json
import threading
import time

import httpx
import openai
import pytest

from helpers import (assert_openai_error, gateway_events, next_midnight_ms, retry_after_in_text,
                     sse_events, upstream_model, wait_for_event)

GROQ_8B = "groq/llama-3.1-8b-instant"          # 131,072-token window
GROQ_70B = "groq/llama-3.3-70b-versatile"      # 131,072-token window, same key, own limits
GEMINI_FLASH = "gemini/gemini-2.5-flash"       # 1,048,576-token window
GEMINI_LITE = "gemini/gemini-3.1-flash-lite"   # free, no list price
CEREBRAS_120B = "cerebras/gpt-oss-120b"        # 65,536-token window
OPENAI_MINI = "openai/gpt-4o-mini"             # paid
MISTRAL_SMALL = "mistral/mistral-small-latest"  # prefill (with `"prefix": true`)
OR_LLAMA_FREE = "openrouter/meta-llama/llama-3.3-70b-instruct:free"
OR_QWEN_FREE = "openrouter/qwen/qwen3-coder:free"
OR_DEEPSEEK_FREE = "openrouter/deepseek/deepseek-chat-v3-0324:free"  # prefill
CLAUDE_HAIKU = "anthropic/claude-haiku-4-5"     # prefill

PROMPT = "one two three four five six"

CONTEXT_LENGTH_BODY = {"error": {
    "message": "This model's maximum context length is 131072 tokens. However, you requested "
               "200000 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}

CONTENT_FILTER_BODY = {"error": {
    "code": "content_filter",
    "message": "The response was filtered due to the prompt triggering content management policy.",
    "type": "invalid_request_error", "param": "prompt"}}

# Plenty of room for the providers that absorb overflow in the quota tests (Gemini's documented
# free tier is 15 requests a minute).
ROOMY_GEMINI = {"SPIN_VARIABLE_GEMINI_RPM": "1000", "SPIN_VARIABLE_GEMINI_RPD": "100000"}


def user(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def fail(n: int, status: int = 503) -> list[dict]:
    return [{"kind": "status", "status": status} for _ in range(n)]


def complete(client: openai.OpenAI, *, stream: bool = False, **kw) -> tuple[httpx.Headers, str]:
    """One chat completion, JSON or streamed: the response headers and the whole content."""
    raw = client.chat.completions.with_raw_response.create(stream=stream, **kw)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    return raw.headers, text


def post(gw, body: dict, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    with gw.http(timeout=timeout) as c:
        return c.post("/v1/chat/completions", json=body, headers=headers or {})


def body_of(user_text: str = PROMPT, **kw) -> dict:
    return {"messages": user(user_text), **kw}


def sent_models(mock) -> list[str]:
    return [upstream_model(r) for r in mock.requests()]


def bearer(req: dict) -> str:
    return req["headers"].get("authorization", "").removeprefix("Bearer ")


def cooldown_event(gw, provider: str, model: str) -> dict:
    """The `attempt_failed` event of `provider`/`model` that set a cool-down."""
    e = wait_for_event(gw, "attempt_failed",
                       lambda e: e.get("provider") == provider and e.get("model") == model
                       and e.get("cooldown_until_ms") is not None)
    assert e is not None, (
        f"no attempt_failed event with cooldown_until_ms for {provider}/{model}; events: "
        f"{gateway_events(gw, 'attempt_failed')}")
    return e


def assert_until(until_ms: int, t0: float, t1: float, wait_ms: int, slack_ms: int = 2000) -> None:
    """A deadline `wait_ms` after the request (sent at `t0`, answered at `t1`, Unix seconds)."""
    lo, hi = int(t0 * 1000) + wait_ms - slack_ms, int(t1 * 1000) + wait_ms + slack_ms
    assert lo <= until_ms <= hi, (
        f"cool-down until {until_ms} is {until_ms - int(t0 * 1000)} ms after the request; "
        f"expected about {wait_ms} ms")


def assert_4xx_openai(r: httpx.Response) -> dict:
    assert 400 <= r.status_code < 500, f"expected a 4xx, got {r.status_code}: {r.text[:500]}"
    return assert_openai_error(r, r.status_code)


def assert_retry_after_text(err: dict, seconds: int) -> None:
    n = retry_after_in_text(err["message"])
    assert n is not None, f"the message does not say 'retry after N seconds': {err['message']!r}"
    assert n == seconds, (n, seconds, err["message"])


def stream_expected_text(provider: str, user_text: str = PROMPT) -> str:
    return f"mock({provider}): {user_text}"


def word_pieces(text: str) -> list[str]:
    """The mock's stream pieces: each word with the whitespace before it."""
    pieces, start, prev_ws = [], 0, True
    for i, ch in enumerate(text):
        ws = ch.isspace()
        if ws and not prev_ws and i > 0:
            pieces.append(text[start:i])
            start = i
        prev_ws = ws
    if start < len(text):
        pieces.append(text[start:])
    return pieces


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])


# ---------------------------------------------------------------------------------------------
# Modes: `auto` (default), `free`, `paid`, as models and as the `x-freerelay-mode` header


@pytest.mark.parametrize("how", ["model", "header"])
def test_free_never_reaches_a_paid_provider(make_mock, make_gateway, how):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    client = gw.client()
    kw = {"model": "free"} if how == "model" else {
        "model": "auto", "extra_headers": {"x-freerelay-mode": "free"}}

    headers, text = complete(client, messages=user(), **kw)
    assert headers["x-freerelay-provider"] == "groq" and text == stream_expected_text("groq")

    groq.script(*fail(8))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(messages=user(), **kw)
    assert e.value.status_code in (502, 504), e.value.response.text
    assert paid.requests() == [], "`free` reached a paid provider"


@pytest.mark.parametrize("how", ["model", "header"])
def test_paid_never_reaches_a_free_provider(make_mock, make_gateway, how):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    client = gw.client()
    kw = {"model": "paid"} if how == "model" else {
        "model": "auto", "extra_headers": {"x-freerelay-mode": "paid"}}

    headers, text = complete(client, messages=user(), **kw)
    assert headers["x-freerelay-provider"] == "openai" and text == stream_expected_text("openai")

    paid.script(*fail(8))
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(messages=user(), **kw)
    assert e.value.status_code in (502, 504), e.value.response.text
    assert groq.requests() == [], "`paid` reached a free provider"


@pytest.mark.parametrize("header", [None, "auto"])
def test_auto_falls_back_from_free_to_paid(make_mock, make_gateway, header):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    groq.script(*fail(8))
    extra = {"extra_headers": {"x-freerelay-mode": header}} if header else {}
    headers, text = complete(gw.client(), model="auto", messages=user(), **extra)
    assert headers["x-freerelay-provider"] == "openai"
    assert text == stream_expected_text("openai")
    assert groq.requests(), "auto tries the free tier first"


@pytest.mark.parametrize("via", ["models_list", "group"])
def test_free_never_reaches_a_paid_provider_through_a_list_or_a_group(make_mock, make_gateway, via):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid}, extra_env={
        "SPIN_VARIABLE_MODEL_GROUPS": "mixed=groq/llama-3.1-8b-instant,openai/gpt-4o-mini"})
    kw = ({"model": GROQ_8B, "extra_body": {"models": [OPENAI_MINI]}} if via == "models_list"
          else {"model": "mixed"})
    groq.script(*fail(8))
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(
            messages=user(), extra_headers={"x-freerelay-mode": "free"}, **kw)
    assert e.value.status_code in (502, 504), e.value.response.text
    assert paid.requests() == [], "`x-freerelay-mode: free` reached the paid member"

    # Without the header, the paid member is a fallback like any other.
    headers, _ = complete(gw.client(), messages=user(), **kw)
    assert headers["x-freerelay-provider"] == "openai"


@pytest.mark.parametrize("mode, model, refused", [
    ("free", OPENAI_MINI, "openai"),
    ("paid", GROQ_8B, "groq"),
    ("free", "paid", "openai"),
    ("paid", "free", "groq"),
])
def test_a_mode_header_conflicting_with_an_explicit_model_is_a_4xx(make_mock, make_gateway, mode,
                                                                   model, refused):
    groq, paid = make_mock("groq"), make_mock("openai")
    mocks = {"groq": groq, "openai": paid}
    gw = make_gateway(mocks)
    r = post(gw, body_of(model=model), headers={"x-freerelay-mode": mode})
    assert_4xx_openai(r)
    assert mocks[refused].requests() == [], f"`{mode}` sent a request to {refused}"

    # The same mode with a model of its own tier is served.
    ok_model = GROQ_8B if mode == "free" else OPENAI_MINI
    r = post(gw, body_of(model=ok_model), headers={"x-freerelay-mode": mode})
    assert r.status_code == 200, r.text
    assert mocks[refused].requests() == []


# ---------------------------------------------------------------------------------------------
# OpenRouter's per-request fallback list: `model`, then `models`, in order, deduplicated


@STREAM
def test_the_models_list_is_tried_in_order_after_model(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    # Gemini comes after Groq in the catalogue: the client's order must win.
    gemini.script({"kind": "status", "status": 429, "retry_after": "30"})
    headers, text = complete(gw.client(), stream=stream, model=GEMINI_FLASH,
                             extra_body={"models": [GROQ_8B]}, messages=user())
    assert headers["x-freerelay-provider"] == "groq", "the `models` list was not used"
    assert text == stream_expected_text("groq")
    assert headers["x-freerelay-attempts"] == "2"
    assert sent_models(gemini) == ["gemini-2.5-flash"], "`model` is tried first"
    assert sent_models(groq) == ["llama-3.1-8b-instant"]


def test_models_and_route_never_reach_the_provider(make_mock, make_gateway):
    groq, paid = make_mock("groq"), make_mock("openai")
    gw = make_gateway({"groq": groq, "openai": paid})
    client = gw.client()
    extra = {"models": [GROQ_8B, OPENAI_MINI], "route": "fallback"}

    headers, _ = complete(client, model=GROQ_8B, extra_body=extra, messages=user())
    assert headers["x-freerelay-provider"] == "groq"
    [first] = groq.requests()
    assert "models" not in first["body"] and "route" not in first["body"], first["body"]

    # The list member that answers gets a clean body too, with its own model.
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    headers, _ = complete(client, model=GROQ_8B, extra_body=extra, messages=user())
    assert headers["x-freerelay-provider"] == "openai"
    [second] = paid.requests()
    assert second["body"]["model"] == "gpt-4o-mini"
    assert "models" not in second["body"] and "route" not in second["body"], second["body"]


def test_the_models_list_is_deduplicated(make_mock, make_gateway):
    """`model` repeated in `models` (twice) is still one candidate: tried, retried once after its
    5xx, then the next one — never tried again as if it were new."""
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script(*fail(8))
    headers, text = complete(gw.client(), model=GROQ_8B,
                             extra_body={"models": [GROQ_8B, GEMINI_FLASH, GROQ_8B]}, messages=user())
    assert headers["x-freerelay-provider"] == "gemini"
    assert text == stream_expected_text("gemini")
    assert len(groq.requests()) == 2, f"groq asked {len(groq.requests())} times (1 try + 1 retry expected)"
    assert headers["x-freerelay-attempts"] == "3"


# ---------------------------------------------------------------------------------------------
# Named model groups (`model_groups`)

GROUPS = "fast=groq/llama-3.1-8b-instant,cerebras/gpt-oss-120b;smart=openai/gpt-4o-mini"


def test_model_groups_are_listed_by_models(make_mock, make_gateway):
    groq, cerebras, paid = make_mock("groq"), make_mock("cerebras"), make_mock("openai")
    gw = make_gateway({"groq": groq, "cerebras": cerebras, "openai": paid},
                      extra_env={"SPIN_VARIABLE_MODEL_GROUPS": GROUPS})
    models = {m.id: m for m in gw.client().models.list()}
    for group in ("fast", "smart"):
        assert group in models, f"group `{group}` missing from /v1/models: {sorted(models)}"
        assert models[group].owned_by == "freerelay", models[group]


@STREAM
def test_a_group_is_tried_in_its_order(make_mock, make_gateway, stream):
    groq, cerebras, paid = make_mock("groq"), make_mock("cerebras"), make_mock("openai")
    gw = make_gateway({"groq": groq, "cerebras": cerebras, "openai": paid},
                      extra_env={"SPIN_VARIABLE_MODEL_GROUPS": GROUPS})
    client = gw.client()

    headers, text = complete(client, stream=stream, model="fast", messages=user())
    assert headers["x-freerelay-provider"] == "groq"
    assert headers["x-freerelay-model"] == "llama-3.1-8b-instant"
    assert headers["x-freerelay-attempts"] == "1"
    assert text == stream_expected_text("groq")

    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    headers, text = complete(client, stream=stream, model="fast", messages=user())
    assert headers["x-freerelay-provider"] == "cerebras"
    assert text == stream_expected_text("cerebras")
    assert sent_models(cerebras) == ["gpt-oss-120b"]

    headers, _ = complete(client, stream=stream, model="smart", messages=user())
    assert headers["x-freerelay-provider"] == "openai"
    assert sent_models(paid) == ["gpt-4o-mini"], "only `smart` reaches the paid provider"


# ---------------------------------------------------------------------------------------------
# 429: move on at once; cool the model (Groq limits per model), not its siblings


@STREAM
def test_a_429_moves_on_at_once(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    client = gw.client()
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    # Named models: under `auto`, Groq's other models (their own per-model quotas) could serve.
    chain = {"model": GROQ_8B, "extra_body": {"models": [GEMINI_FLASH]}}
    t = time.monotonic()
    headers, text = complete(client, stream=stream, messages=user(), **chain)
    elapsed = time.monotonic() - t
    assert headers["x-freerelay-provider"] == "gemini"
    assert text == stream_expected_text("gemini")
    assert headers["x-freerelay-attempts"] == "2"
    assert elapsed < 5, f"took {elapsed:.1f}s: the 30 s Retry-After was waited on"

    # The next request skips groq without asking it.
    headers, _ = complete(client, stream=stream, messages=user(), **chain)
    assert headers["x-freerelay-provider"] == "gemini"
    assert headers["x-freerelay-attempts"] == "1", "a cooling candidate costs no attempt"
    assert len(groq.requests()) == 1


def test_a_cooled_model_is_skipped_while_its_siblings_serve(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    client = gw.client()
    fallback = {"models": [GEMINI_FLASH]}

    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    t0 = time.time()
    headers, _ = complete(client, model=GROQ_70B, extra_body=fallback, messages=user())
    t1 = time.time()
    assert headers["x-freerelay-provider"] == "gemini"
    assert_until(cooldown_event(gw, "groq", "llama-3.3-70b-versatile")["cooldown_until_ms"],
                 t0, t1, 30_000)

    # The cooled model is skipped: the mock never sees the request.
    headers, _ = complete(client, model=GROQ_70B, extra_body=fallback, messages=user())
    assert headers["x-freerelay-provider"] == "gemini"
    assert sent_models(groq) == ["llama-3.3-70b-versatile"]

    # Its sibling on the same key still serves.
    headers, text = complete(client, model=GROQ_8B, messages=user())
    assert headers["x-freerelay-provider"] == "groq" and text == stream_expected_text("groq")
    assert sent_models(groq) == ["llama-3.3-70b-versatile", "llama-3.1-8b-instant"]
    # And the key as a whole is not benched.
    assert [k["state"] for k in gw.stats()["keys"]["groq"]] == ["ok"]


# ---------------------------------------------------------------------------------------------
# Short Retry-After: wait it out only when nothing else is left


def test_a_short_retry_after_moves_on_when_another_candidate_is_free(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": "3"})
    t = time.monotonic()
    headers, _ = complete(gw.client(), model="auto", messages=user())
    elapsed = time.monotonic() - t
    assert headers["x-freerelay-provider"] == "gemini"
    assert elapsed < 2.5, f"took {elapsed:.2f}s: a 3 s Retry-After was waited on with gemini free"
    assert len(groq.requests()) == 1


@STREAM
def test_a_short_retry_after_is_waited_out_when_no_candidate_is_left(make_mock, make_gateway, stream):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 429, "retry_after": "1"}, {"kind": "ok"})
    t = time.monotonic()
    try:
        headers, text = complete(gw.client(), stream=stream, model=GROQ_8B, messages=user())
    except openai.RateLimitError as e:
        pytest.fail(f"a 1 s Retry-After with no other candidate was not waited out: {e.body}")
    elapsed = time.monotonic() - t
    assert text == stream_expected_text("groq")
    assert len(groq.requests()) == 2
    assert elapsed >= 0.95, f"retried after {elapsed:.2f}s, before the 1 s Retry-After"
    assert headers["x-freerelay-attempts"] == "2"


def test_a_retry_after_above_the_short_limit_is_not_waited(make_mock, make_gateway):
    """`short_retry_after_ms`: a 1 s Retry-After is waited out under the default (5000) and not
    under 500."""
    groq = make_mock("groq")
    default = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 429, "retry_after": "1"}, {"kind": "ok"})
    assert post(default, body_of(model=GROQ_8B)).status_code == 200
    assert len(groq.requests()) == 2
    groq.reset()

    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_SHORT_RETRY_AFTER_MS": "500"})
    groq.script({"kind": "status", "status": 429, "retry_after": "1"}, {"kind": "ok"})
    r = post(gw, body_of(model=GROQ_8B))
    assert_openai_error(r, 429)
    assert 0 < int(r.headers["retry-after"]) <= 1, r.headers
    assert len(groq.requests()) == 1, "short_retry_after_ms = 500: a 1 s Retry-After is not short"


# ---------------------------------------------------------------------------------------------
# Cool-down hints: Retry-After (seconds, HTTP date), Groq's reset durations, Gemini's retryDelay


def _http_date(unix_s: float) -> str:
    return email.utils.formatdate(unix_s, usegmt=True)


@pytest.mark.parametrize("hint", ["retry_after_seconds", "retry_after_http_date",
                                  "groq_reset_requests", "gemini_retry_delay"])
def test_the_cooldown_follows_the_providers_hint(make_mock, make_gateway, hint):
    name = "gemini" if hint == "gemini_retry_delay" else "groq"
    mock = make_mock(name)
    gw = make_gateway({name: mock})
    now = time.time()
    if hint == "retry_after_seconds":
        behaviour, wait_ms = {"retry_after": "20"}, 20_000
    elif hint == "retry_after_http_date":
        date_s = int(now) + 21  # whole seconds: an HTTP date has no fraction
        behaviour, wait_ms = {"retry_after": _http_date(date_s)}, int((date_s - now) * 1000)
    elif hint == "groq_reset_requests":
        behaviour, wait_ms = {"headers": {"x-ratelimit-reset-requests": "2m59.56s",
                                          "x-ratelimit-remaining-requests": "0",
                                          "x-ratelimit-limit-requests": "30"}}, 179_560
    else:
        behaviour, wait_ms = {"retry_delay": "7s"}, 7_000
    mock.script({"kind": "status", "status": 429, **behaviour})
    model = GEMINI_FLASH if name == "gemini" else GROQ_8B
    t0 = time.time()
    r = post(gw, body_of(model=model))
    t1 = time.time()
    assert_openai_error(r, 429)
    e = cooldown_event(gw, name, model.split("/", 1)[1])
    assert_until(e["cooldown_until_ms"], t0, t1, wait_ms)
    assert abs(int(r.headers["retry-after"]) - wait_ms / 1000) <= 2, r.headers
    assert len(mock.requests()) == 1


@pytest.mark.parametrize("form", ["seconds", "http_date"])
def test_a_whole_key_cooldown_shows_in_stats(make_mock, make_gateway, form):
    """NVIDIA limits per key: its 429 benches the key, which /v1/freerelay/stats reports."""
    nvidia = make_mock("nvidia")
    gw = make_gateway({"nvidia": nvidia})
    now = time.time()
    if form == "seconds":
        retry_after, wait_ms = "20", 20_000
    else:
        date_s = int(now) + 21
        retry_after, wait_ms = _http_date(date_s), int((date_s - now) * 1000)
    nvidia.script({"kind": "status", "status": 429, "retry_after": retry_after})
    model = "nvidia/meta/llama-3.3-70b-instruct"
    t0 = time.time()
    assert_openai_error(post(gw, body_of(model=model)), 429)
    t1 = time.time()
    [key] = gw.stats()["keys"]["nvidia"]
    assert key["state"] == "rate_limited", key
    assert_until(key["until_ms"], t0, t1, wait_ms)

    # Refused by the gateway itself while it cools: the mock never sees it.
    r = post(gw, body_of(model="nvidia/deepseek-ai/deepseek-r1"))
    assert_openai_error(r, 429)
    assert len(nvidia.requests()) == 1


# ---------------------------------------------------------------------------------------------
# Per-day caps cool until the provider's daily reset


def test_an_openrouter_daily_cap_cools_until_utc_midnight(make_mock, make_gateway):
    router = make_mock("openrouter")
    gw = make_gateway({"openrouter": router})
    t0 = time.time()
    reset_ms = next_midnight_ms(t0, "UTC")
    router.script({"kind": "status", "status": 429, "body": {"error": {
        "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free "
                   "model requests per day",
        "code": 429,
        "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                 "X-RateLimit-Reset": str(reset_ms)}}}}})
    r = post(gw, body_of(model=OR_LLAMA_FREE))
    t1 = time.time()
    assert_openai_error(r, 429)
    e = cooldown_event(gw, "openrouter", "meta-llama/llama-3.3-70b-instruct:free")
    want = {next_midnight_ms(t0, "UTC"), next_midnight_ms(t1, "UTC")}
    assert e["cooldown_until_ms"] in want, (
        f"cool-down until {e['cooldown_until_ms']}, the next UTC midnight is {sorted(want)}: "
        f"{(e['cooldown_until_ms'] - t1 * 1000) / 1000:.0f}s from now")

    # The daily quota is the account's, for every `:free` model: the next one is not asked.
    r = post(gw, body_of(model=OR_QWEN_FREE))
    assert_openai_error(r, 429)
    assert len(router.requests()) == 1
    left = (reset_ms - time.time() * 1000) / 1000
    assert abs(int(r.headers["retry-after"]) - left) <= 3, (r.headers.get("retry-after"), left)


@pytest.mark.parametrize("retry_info", [False, True], ids=["quota_only", "with_retry_delay"])
def test_a_gemini_daily_cap_cools_until_pacific_midnight(make_mock, make_gateway, retry_info):
    """The per-day QuotaFailure wins over the RetryInfo Gemini sends beside it (a few seconds,
    which would only bring the next request into the same spent quota)."""
    gemini = make_mock("gemini")
    gw = make_gateway({"gemini": gemini})
    details = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
            "quotaValue": "20"}]},
        {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
            "description": "Learn more about Gemini API quotas",
            "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
    ]
    if retry_info:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "41s"})
    gemini.script({"kind": "status", "status": 429, "body": {"error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details. "
                   "For more information on this error, head to: "
                   "https://ai.google.dev/gemini-api/docs/rate-limits.",
        "status": "RESOURCE_EXHAUSTED", "details": details}}})
    t0 = time.time()
    r = post(gw, body_of(model=GEMINI_FLASH))
    t1 = time.time()
    assert_openai_error(r, 429)
    e = cooldown_event(gw, "gemini", "gemini-2.5-flash")
    want = {next_midnight_ms(t0, "America/Los_Angeles"), next_midnight_ms(t1, "America/Los_Angeles")}
    assert e["cooldown_until_ms"] in want, (
        f"cool-down until {e['cooldown_until_ms']}, the next Pacific midnight is {sorted(want)}: "
        f"{(e['cooldown_until_ms'] - t1 * 1000) / 1000:.0f}s from now")
    r = post(gw, body_of(model=GEMINI_FLASH))
    assert_openai_error(r, 429)
    assert len(gemini.requests()) == 1, "the capped model was asked again"


# ---------------------------------------------------------------------------------------------
# 5xx and connection resets: the same model once more, then the next candidate


@STREAM
@pytest.mark.parametrize("failure", [{"kind": "status", "status": 503}, {"kind": "close"}],
                         ids=["503", "reset"])
def test_a_5xx_or_reset_is_retried_once_on_the_same_model(make_mock, make_gateway, failure, stream):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script(failure, {"kind": "ok"})
    try:
        headers, text = complete(gw.client(), stream=stream, model=GROQ_8B, messages=user())
    except openai.APIStatusError as e:
        pytest.fail(f"no retry on the same model after {failure}: {e.status_code} {e.body}")
    assert text == stream_expected_text("groq")
    assert sent_models(groq) == ["llama-3.1-8b-instant"] * 2
    assert headers["x-freerelay-attempts"] == "2"


@STREAM
def test_two_5xx_move_on_to_the_next_provider(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script(*fail(2))
    headers, text = complete(gw.client(), stream=stream, model="auto", messages=user())
    assert headers["x-freerelay-provider"] == "gemini"
    assert text == stream_expected_text("gemini")
    assert len(groq.requests()) == 2, f"groq asked {len(groq.requests())} times, expected 2"
    assert len(gemini.requests()) == 1
    assert headers["x-freerelay-attempts"] == "3"


# ---------------------------------------------------------------------------------------------
# Context length: only a larger window, never the same model again


@STREAM
def test_context_length_moves_to_a_larger_window(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini}, extra_env={
        "SPIN_VARIABLE_MODEL_GROUPS": "long=groq/llama-3.1-8b-instant,gemini/gemini-2.5-flash"})
    groq.script({"kind": "status", "status": 400, "body": CONTEXT_LENGTH_BODY}, {"kind": "ok"})
    headers, text = complete(gw.client(), stream=stream, model="long", messages=user())
    assert headers["x-freerelay-provider"] == "gemini"
    assert text == stream_expected_text("gemini")
    assert len(groq.requests()) == 1, "the model that was too small was asked again"
    assert sent_models(gemini) == ["gemini-2.5-flash"]


def test_context_length_skips_candidates_whose_window_is_not_larger(make_mock, make_gateway):
    groq, cerebras, gemini = make_mock("groq"), make_mock("cerebras"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "cerebras": cerebras, "gemini": gemini}, extra_env={
        # 131k, 131k (sibling), 65k, then 1M.
        "SPIN_VARIABLE_MODEL_GROUPS": "long=groq/llama-3.1-8b-instant,groq/llama-3.3-70b-versatile,"
                                      "cerebras/gpt-oss-120b,gemini/gemini-2.5-flash"})
    groq.script({"kind": "status", "status": 400, "body": CONTEXT_LENGTH_BODY}, {"kind": "ok"})
    headers, _ = complete(gw.client(), model="long", messages=user())
    assert headers["x-freerelay-provider"] == "gemini"
    assert sent_models(groq) == ["llama-3.1-8b-instant"], "a window no larger was tried"
    assert cerebras.requests() == [], "a smaller window was tried"


@pytest.mark.parametrize("how", ["explicit", "group"])
def test_context_length_without_a_larger_candidate_is_a_400(make_mock, make_gateway, how):
    groq, cerebras = make_mock("groq"), make_mock("cerebras")
    gw = make_gateway({"groq": groq, "cerebras": cerebras}, extra_env={
        "SPIN_VARIABLE_MODEL_GROUPS": "short=groq/llama-3.1-8b-instant,cerebras/gpt-oss-120b"})
    groq.script({"kind": "status", "status": 400, "body": CONTEXT_LENGTH_BODY}, {"kind": "ok"})
    r = post(gw, body_of(model=GROQ_8B if how == "explicit" else "short"))
    assert_openai_error(r, 400, code="context_length_exceeded")
    assert len(groq.requests()) == 1
    assert cerebras.requests() == []


# ---------------------------------------------------------------------------------------------
# Content filter: returned cleanly, not retried on the same model


@STREAM
def test_a_content_filter_refusal_is_returned_not_retried(make_mock, make_gateway, stream):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "status", "status": 400, "body": CONTENT_FILTER_BODY}, {"kind": "ok"})
    with pytest.raises(openai.BadRequestError) as e:
        complete(gw.client(), stream=stream, model=GROQ_8B, messages=user())
    assert e.value.status_code == 400
    assert e.value.code == "content_filter", e.value.body
    assert_openai_error(e.value.response, 400, code="content_filter")
    assert len(groq.requests()) == 1


# ---------------------------------------------------------------------------------------------
# The per-request attempt budget


def test_the_attempt_budget_bounds_every_request(make_mock, make_gateway):
    names = ["groq", "gemini", "openrouter", "cerebras"]
    mocks = {n: make_mock(n) for n in names}
    gw = make_gateway(mocks, extra_env={"SPIN_VARIABLE_MAX_ATTEMPTS": "3"})
    for m in mocks.values():
        m.script(*fail(4))
    r = post(gw, body_of(model="auto"))
    assert r.status_code in (502, 504), r.text
    assert_openai_error(r, r.status_code)
    sent = {n: len(m.requests()) for n, m in mocks.items()}
    assert sum(sent.values()) == 3, f"max_attempts = 3, upstream requests: {sent}"


def test_the_attempt_budget_bounds_the_keys_of_a_pool(make_mock, make_gateway):
    groq = make_mock("groq", keys=4)
    gw = make_gateway({"groq": groq}, extra_env={
        "SPIN_VARIABLE_GROQ_API_KEY": ",".join(groq.keys), "SPIN_VARIABLE_MAX_ATTEMPTS": "3"})
    groq.script(*[{"kind": "status", "status": 429, "retry_after": "30"}] * 8)
    r = post(gw, body_of(model=GROQ_8B))
    assert_openai_error(r, 429)
    assert len(groq.requests()) == 3, f"max_attempts = 3, groq asked {len(groq.requests())} times"


def test_the_default_attempt_budget_is_six(make_mock, make_gateway):
    """Seven providers, every one failing: six upstream requests at most, whatever the retries."""
    names = ["groq", "gemini", "openrouter", "cerebras", "nvidia", "mistral", "openai"]
    mocks = {n: make_mock(n, reject_stream_options=(n == "mistral")) for n in names}
    gw = make_gateway(mocks)
    for m in mocks.values():
        m.script(*fail(4))
    r = post(gw, body_of(model="auto"))
    assert r.status_code in (502, 504), r.text
    sent = {n: len(m.requests()) for n, m in mocks.items()}
    assert sum(sent.values()) == 6, f"default max_attempts = 6, upstream requests: {sent}"


# ---------------------------------------------------------------------------------------------
# Streams: first-token deadline, a complete stream without [DONE], rescue of a broken stream


@pytest.mark.parametrize("slow", [{"kind": "stall", "after_chunks": 0},
                                  {"kind": "ok", "latency_ms": 8000},
                                  {"kind": "stall", "after_chunks": 1}],
                         ids=["head_then_silence", "no_head", "role_chunk_then_silence"])
def test_the_first_token_deadline_moves_on_before_commit(make_mock, make_gateway, slow):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini},
                      extra_env={"SPIN_VARIABLE_FIRST_TOKEN_TIMEOUT_MS": "500"})
    groq.script(slow, slow)
    try:
        headers, text = complete(gw.client(timeout=6), stream=True, model="auto", messages=user())
    except openai.APITimeoutError:
        pytest.fail("the gateway waited on a stream with no first token (first_token_timeout_ms = 500)")
    assert headers["x-freerelay-provider"] == "gemini"
    assert text == stream_expected_text("gemini"), "one clean stream, from gemini alone"
    assert len(gemini.requests()) == 1


def test_the_first_token_deadline_never_stalls_with_no_other_candidate(make_mock, make_gateway):
    """The only candidate stays silent: the client gets an error, not a hung stream (the
    client's own 5 s timeout is the bound)."""
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_FIRST_TOKEN_TIMEOUT_MS": "500"})
    groq.script(*[{"kind": "stall", "after_chunks": 0}] * 3)
    try:
        r = post(gw, body_of(model=GROQ_8B, stream=True), timeout=5)
    except httpx.TimeoutException:
        pytest.fail("the gateway hung on a silent stream instead of answering with an error")
    assert r.status_code in (502, 504), r.text[:300]
    assert_openai_error(r, r.status_code)
    assert groq.requests()


@pytest.mark.parametrize("usage", [False, True], ids=["no_usage", "with_usage"])
def test_a_stream_complete_but_for_done_is_complete(make_mock, make_gateway, usage):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "ok", "omit_done": True})
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = list(gw.client().chat.completions.create(
        model=GROQ_8B, stream=True, messages=user(), **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stream_expected_text("groq")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    if usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    groq.script({"kind": "ok", "omit_done": True})
    with gw.http() as c:
        with c.stream("POST", "/v1/chat/completions",
                      json=body_of(model=GROQ_8B, stream=True, **extra)) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode())
    assert not [e for e in events if e != "[DONE]" and "error" in json.loads(e)], events
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    end = wait_for_event(gw, "stream_end", lambda e: e.get("provider") == "groq")
    assert end is not None and end["ok"] is True, end


def _raw_stream(gw, body: dict, headers: dict | None = None) -> tuple[httpx.Headers, list[str]]:
    with gw.http(timeout=15) as c:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=headers or {}) as r:
            assert r.status_code == 200, r.read()
            return r.headers, sse_events(r.read().decode())


def _assert_one_clean_stream(events: list[str]) -> str:
    """Exactly one role chunk, one finish_reason, one [DONE], no error; returns the content."""
    assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    deltas = [c["choices"][0] for c in chunks if c.get("choices")]
    roles = [d for d in deltas if d["delta"].get("role")]
    finishes = [d["finish_reason"] for d in deltas if d.get("finish_reason")]
    assert len(roles) == 1, f"{len(roles)} role chunks"
    assert finishes == ["stop"], finishes
    return "".join(d["delta"].get("content") or "" for d in deltas)


def _prefill_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):  # Anthropic content blocks
        return "".join(b.get("text", "") for b in content if b.get("type") == "text")
    return content


def test_a_broken_stream_is_rescued_with_a_prefill_on_mistral(make_mock, make_gateway):
    mistral = make_mock("mistral", reject_stream_options=True)
    gw = make_gateway({"mistral": mistral})
    # Events: the role chunk, then "mock(mistral):", " one", …: the drop leaves two content pieces.
    partial = "".join(word_pieces(stream_expected_text("mistral"))[:2])
    rest = "and the rest."
    mistral.script({"kind": "drop", "after_chunks": 3}, {"kind": "ok", "content": rest})
    headers, events = _raw_stream(gw, body_of(model=MISTRAL_SMALL, stream=True))
    content = _assert_one_clean_stream(events)
    assert content == partial + rest, content
    first, second = mistral.requests()
    assert upstream_model(first) == upstream_model(second) == "mistral-small-latest", \
        "the same model is asked first"
    assert second["body"]["messages"][:-1] == first["body"]["messages"]
    assert second["body"]["messages"][-1] == {"role": "assistant", "content": partial, "prefix": True}
    assert headers["x-freerelay-provider"] == "mistral"

    # The SDK sees one complete answer.
    mistral.script({"kind": "drop", "after_chunks": 3}, {"kind": "ok", "content": rest})
    chunks = list(gw.client().chat.completions.create(model=MISTRAL_SMALL, stream=True, messages=user()))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == partial + rest


def test_a_rescue_that_breaks_again_continues_from_everything_sent(make_mock, make_gateway):
    mistral = make_mock("mistral", reject_stream_options=True)
    gw = make_gateway({"mistral": mistral})
    partial = "".join(word_pieces(stream_expected_text("mistral"))[:2])
    mistral.script({"kind": "drop", "after_chunks": 3}, {"kind": "drop", "after_chunks": 3},
                   {"kind": "ok", "content": "end."})
    _, events = _raw_stream(gw, body_of(model=MISTRAL_SMALL, stream=True))
    content = _assert_one_clean_stream(events)
    # The second attempt answered "mock(mistral): one …" again and broke at the same place.
    assert content == partial + partial + "end.", content
    prefills = [r["body"]["messages"][-1] for r in mistral.requests()[1:]]
    assert prefills == [{"role": "assistant", "content": partial, "prefix": True},
                        {"role": "assistant", "content": partial + partial, "prefix": True}], prefills


def test_a_stream_broken_inside_a_tool_call_is_an_error_event(make_mock, make_gateway):
    """A half-sent tool call cannot be continued as text: the client gets a clean error event,
    never a [DONE] after broken arguments."""
    mistral = make_mock("mistral", reject_stream_options=True)
    gw = make_gateway({"mistral": mistral})
    weather = {"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "location": {"type": "string"}}, "required": ["location"]}}}
    # Events: the role chunk with the call's start, then the first piece of its arguments.
    mistral.script({"kind": "drop", "after_chunks": 2}, {"kind": "ok", "content": "and the rest."})
    _, events = _raw_stream(gw, body_of("weather in Oslo please", model=MISTRAL_SMALL, stream=True,
                                        tools=[weather]))
    assert "[DONE]" not in events, events[-3:]
    last = json.loads(events[-1])
    assert last.get("error", {}).get("code") == "upstream_stream_interrupted", events[-3:]


@pytest.mark.parametrize("model, name, after_chunks", [
    (OR_DEEPSEEK_FREE, "openrouter", 3),  # role chunk, "mock(openrouter):", " one"
    (CLAUDE_HAIKU, "anthropic", 5),        # message_start, ping, content_block_start, 2 deltas
], ids=["openrouter_deepseek", "anthropic_haiku"])
def test_a_broken_stream_is_rescued_on_other_prefill_models(make_mock, make_gateway, model, name,
                                                             after_chunks):
    mock = make_mock(name)
    gw = make_gateway({name: mock})
    rest = "and the rest."
    mock.script({"kind": "drop", "after_chunks": after_chunks}, {"kind": "ok", "content": rest})
    chunks = list(gw.client().chat.completions.create(model=model, stream=True, messages=user()))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.endswith(rest), content
    partial = content[: -len(rest)]
    assert partial and stream_expected_text(name).startswith(partial), (partial, content)
    assert [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role] == ["assistant"]
    reqs = mock.requests()
    assert len(reqs) == 2, f"{len(reqs)} upstream requests"
    last = reqs[1]["body"]["messages"][-1]
    assert last["role"] == "assistant" and _prefill_text(last) == partial, last


def test_a_broken_stream_on_a_model_without_prefill_ends_with_an_error_event(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq})
    groq.script({"kind": "drop", "after_chunks": 3}, {"kind": "ok", "content": "and the rest."})
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in gw.client().chat.completions.create(model=GROQ_8B, stream=True, messages=user()):
            got.append(chunk)
    assert not isinstance(e.value, (openai.APITimeoutError, openai.APIConnectionError)), repr(e.value)
    assert e.value.code == "upstream_stream_interrupted", (e.value.code, e.value.body)
    assert "and the rest." not in "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert len(groq.requests()) == 1, "a model without the prefill cap was asked to continue"


def test_rescue_off_turns_rescue_off(make_mock, make_gateway):
    """The same break is rescued without the header and raised with `x-freerelay-rescue: off`."""
    mistral = make_mock("mistral", reject_stream_options=True)
    gw = make_gateway({"mistral": mistral})
    mistral.script({"kind": "drop", "after_chunks": 3}, {"kind": "ok", "content": "and the rest."})
    try:
        _, text = complete(gw.client(), stream=True, model=MISTRAL_SMALL, messages=user())
    except openai.APIError as e:
        pytest.fail(f"not rescued without the header (so `off` cannot be told apart): {e}")
    assert text.endswith("and the rest."), text
    assert len(mistral.requests()) == 2
    mistral.reset()

    mistral.script({"kind": "drop", "after_chunks": 3}, {"kind": "ok", "content": "and the rest."})
    with pytest.raises(openai.APIError) as e:
        for _ in gw.client().chat.completions.create(
                model=MISTRAL_SMALL, stream=True, messages=user(),
                extra_headers={"x-freerelay-rescue": "off"}):
            pass
    assert not isinstance(e.value, (openai.APITimeoutError, openai.APIConnectionError)), repr(e.value)
    assert e.value.code == "upstream_stream_interrupted", (e.value.code, e.value.body)
    assert len(mistral.requests()) == 1


# ---------------------------------------------------------------------------------------------
# Quotas before 429s: RPM/RPD/TPM per key, atomic under concurrency


def _concurrently(n: int, call) -> list:
    """`call(i)` on `n` threads released together; every result (or exception) in order."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait(timeout=30)
        try:
            return call(i)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def within_one_minute(scenario):
    """Runs `scenario()` (which starts its own gateway and mocks) so that it lies inside one
    clock minute, and returns what it returns. Per-minute limits may be counted over windows
    aligned to the clock (they are in `src/quota.rs`): a burst that straddles a boundary may
    rightly send the limit on each side. If it did, the scenario runs once more, on fresh state;
    having just crossed a boundary, it fits in the next minute."""
    for _ in range(2):
        minute = int(time.time() // 60)
        result = scenario()
        if int(time.time() // 60) == minute:
            return result
    pytest.fail("the scenario could not be run inside one clock minute")


@STREAM
def test_rpm_is_never_exceeded_under_concurrency(make_mock, make_gateway, stream):
    # Groq limits per model (`scope = "model"`), and `auto` may use each of its models: the test
    # names one Groq model, then Gemini for the overflow, so groq_rpm = 5 bounds what Groq gets.
    def scenario():
        groq, gemini = make_mock("groq"), make_mock("gemini")
        gw = make_gateway({"groq": groq, "gemini": gemini},
                          extra_env={"SPIN_VARIABLE_GROQ_RPM": "5", **ROOMY_GEMINI})
        client = gw.client(timeout=60)

        def one(i):
            headers, text = complete(client, stream=stream, model=GROQ_8B,
                                     extra_body={"models": [GEMINI_LITE]}, messages=user(f"n{i}"))
            provider = headers["x-freerelay-provider"]
            assert text == f"mock({provider}): n{i}", text
            return provider

        return groq, gemini, _concurrently(32, one)

    groq, gemini, results = within_one_minute(scenario)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of 32 clients failed: {errors[:3]}"
    to_groq = len(groq.requests())
    assert to_groq <= 5, f"groq_rpm = 5, but groq received {to_groq} requests"
    assert set(sent_models(groq)) <= {"llama-3.1-8b-instant"}
    assert results.count("groq") == to_groq
    assert results.count("gemini") == 32 - to_groq == len(gemini.requests())


def test_rpm_applies_to_each_key_of_a_pool(make_mock, make_gateway):
    def scenario():
        groq, gemini = make_mock("groq", keys=2), make_mock("gemini")
        gw = make_gateway({"groq": groq, "gemini": gemini}, extra_env={
            "SPIN_VARIABLE_GROQ_API_KEY": ",".join(groq.keys), "SPIN_VARIABLE_GROQ_RPM": "3",
            **ROOMY_GEMINI})
        client = gw.client(timeout=60)
        # Named models: under `auto`, Groq's other models (each with its own per-model RPM) serve
        # too; this is about one model's limit on each key of a pool.
        return groq, gemini, _concurrently(20, lambda i: client.chat.completions.create(
            model=GROQ_8B, extra_body={"models": [GEMINI_FLASH]},
            messages=user(f"n{i}")).choices[0].message.content)

    groq, gemini, results = within_one_minute(scenario)
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} of 20 clients failed: {errors[:3]}"
    assert set(sent_models(groq)) == {"llama-3.1-8b-instant"}
    per_key = {k: 0 for k in groq.keys}
    for req in groq.requests():
        per_key[bearer(req)] += 1
    assert sum(per_key.values()) <= 6, per_key
    assert all(n <= 3 for n in per_key.values()), f"groq_rpm = 3 per key: {per_key}"
    assert sum(per_key.values()) + len(gemini.requests()) == 20


def test_rpm_spent_with_no_other_candidate_is_the_gateways_own_429(make_mock, make_gateway):
    # One named model: under `auto`, Groq's other models (limited per model) are candidates.
    def scenario():
        groq = make_mock("groq")
        gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_GROQ_RPM": "2"})
        statuses = [post(gw, body_of(model=GROQ_8B)).status_code for _ in range(2)]
        return groq, statuses, post(gw, body_of(model=GROQ_8B))

    groq, statuses, r = within_one_minute(scenario)
    assert statuses == [200, 200]
    err = assert_openai_error(r, 429)
    retry_after = int(r.headers["retry-after"])
    assert 0 < retry_after <= 60, r.headers
    assert_retry_after_text(err, retry_after)
    assert len(groq.requests()) == 2, "the request over the limit reached the provider"
    assert sent_models(groq) == ["llama-3.1-8b-instant"] * 2


@pytest.mark.parametrize("name, model, tz", [("groq", GROQ_8B, "UTC"),
                                           ("gemini", GEMINI_FLASH, "America/Los_Angeles")])
def test_rpd_spent_waits_for_the_providers_daily_reset(make_mock, make_gateway, name, model, tz):
    mock = make_mock(name)
    gw = make_gateway({name: mock}, extra_env={f"SPIN_VARIABLE_{name.upper()}_RPD": "2"})
    for i in range(2):
        assert post(gw, body_of(model=model)).status_code == 200
    r = post(gw, body_of(model=model))
    now = time.time()
    err = assert_openai_error(r, 429)
    assert len(mock.requests()) == 2, "the request over the daily limit reached the provider"
    left = (next_midnight_ms(now, tz) - now * 1000) / 1000
    retry_after = int(r.headers["retry-after"])
    assert abs(retry_after - left) <= 5, f"Retry-After {retry_after}s, next midnight ({tz}) in {left:.0f}s"
    assert_retry_after_text(err, retry_after)


def test_a_same_model_retry_counts_against_the_rpm(make_mock, make_gateway):
    """Each upstream request is counted, retries included: the mock never sees more than the
    limit in a minute."""
    def scenario():
        groq = make_mock("groq")
        gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_GROQ_RPM": "2"})
        groq.script({"kind": "status", "status": 503}, {"kind": "ok"})
        headers, _ = complete(gw.client(), model=GROQ_8B, messages=user())
        return groq, headers, post(gw, body_of(model=GROQ_8B))

    groq, headers, r = within_one_minute(scenario)
    assert headers["x-freerelay-attempts"] == "2"
    assert_openai_error(r, 429)
    assert len(groq.requests()) == 2, "groq_rpm = 2, but a third request reached groq"


def test_tpm_is_counted_per_key(make_mock, make_gateway):
    """groq_tpm = 10 and each answer costs 6 prompt + 7 completion tokens (the mock counts
    words): however the gateway counts (an estimate up front, or the usage once known), groq
    serves at most one of three requests; the others go to gemini."""
    def scenario():
        groq, gemini = make_mock("groq"), make_mock("gemini")
        gw = make_gateway({"groq": groq, "gemini": gemini},
                          extra_env={"SPIN_VARIABLE_GROQ_TPM": "10", **ROOMY_GEMINI})
        client = gw.client()
        return groq, gemini, [complete(client, model="auto", messages=user())[0]["x-freerelay-provider"]
                              for _ in range(3)]

    groq, gemini, served = within_one_minute(scenario)
    assert served.count("groq") == len(groq.requests()) <= 1, served
    assert served.count("gemini") == len(gemini.requests()) >= 2, served


# ---------------------------------------------------------------------------------------------
# When everything fails: one error listing each attempt
#
# Each test names its candidates (Groq's 8B, then Gemini's flash-lite, as a `models` fallback list):
# under `auto` each provider's other models would be candidates too, and a FIFO script per mock
# could not fail them all.

BOTH = {"model": GROQ_8B, "models": [GEMINI_LITE]}


def _assert_lists_attempts(err: dict, attempts: list[tuple[str, str, int]]) -> None:
    """Each (provider, model, upstream status) is named in the message text, and, when the
    error carries `attempts`, listed there with its reason."""
    for provider, model, status in attempts:
        for part in (provider, model, str(status)):
            assert part in err["message"], f"{part!r} not in the message: {err['message']!r}"
    if "attempts" in err:
        listed = err["attempts"]
        assert isinstance(listed, list) and listed, err
        for a in listed:
            assert {"provider", "model", "status", "reason"} <= set(a), a
        assert {(a["provider"], a["model"]) for a in listed} == {(p, m) for p, m, _ in attempts}, listed
        assert {a["status"] for a in listed} == {s for _, _, s in attempts}, listed


@STREAM
def test_all_rate_limited_is_one_429_with_the_shortest_retry_after(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    gemini.script({"kind": "status", "status": 429, "retry_delay": "7s"})
    t = time.monotonic()
    r = post(gw, body_of(stream=stream, **BOTH))
    assert time.monotonic() - t < 5, "a long Retry-After was waited on"
    err = assert_openai_error(r, 429)
    retry_after = int(r.headers["retry-after"])
    assert retry_after in (6, 7), f"shortest wait is gemini's 7 s, Retry-After: {retry_after}"
    assert_retry_after_text(err, retry_after)
    _assert_lists_attempts(err, [("groq", "llama-3.1-8b-instant", 429),
                                    ("gemini", "gemini-3.1-flash-lite", 429)])
    if "x-freerelay-attempts" in r.headers:
        assert r.headers["x-freerelay-attempts"] == "2"


@STREAM
def test_all_failed_is_one_error_listing_each_attempt(make_mock, make_gateway, stream):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script(*fail(4))
    gemini.script(*fail(4, 500))
    r = post(gw, body_of(stream=stream, **BOTH))
    assert r.status_code in (502, 504), r.text
    err = assert_openai_error(r, r.status_code)
    _assert_lists_attempts(err, [("groq", "llama-3.1-8b-instant", 503),
                                    ("gemini", "gemini-3.1-flash-lite", 500)])
    if "x-freerelay-attempts" in r.headers:
        sent = len(groq.requests()) + len(gemini.requests())
        assert r.headers["x-freerelay-attempts"] == str(sent), (r.headers["x-freerelay-attempts"], sent)


def test_rate_limits_mixed_with_other_failures_are_not_a_429(make_mock, make_gateway):
    groq, gemini = make_mock("groq"), make_mock("gemini")
    gw = make_gateway({"groq": groq, "gemini": gemini})
    groq.script({"kind": "status", "status": 429, "retry_after": "30"})
    gemini.script(*fail(4))
    r = post(gw, body_of(**BOTH))
    assert r.status_code in (502, 504), f"not every attempt was rate limited: {r.status_code} {r.text}"
    err = assert_openai_error(r, r.status_code)
    _assert_lists_attempts(err, [("groq", "llama-3.1-8b-instant", 429),
                                 ("gemini", "gemini-3.1-flash-lite", 503)])
