"""Assertion and request helpers shared by the integration tests."""

from __future__ import annotations

import json
import time
from typing import Callable, Iterable

import httpx


def assert_openai_error(resp: httpx.Response, status: int, *, code: str | None = None,
                        type_: str | None = None) -> dict:
    """The response is `status` with an OpenAI-shaped error body; returns the `error` object."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert "application/json" in resp.headers.get("content-type", ""), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    for k in ("message", "type", "param", "code"):
        assert k in err, f"error lacks {k!r}: {err}"
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def assert_no_secrets(resp: httpx.Response, secrets_: Iterable[str]) -> None:
    """No provider key in the body or any header of a response."""
    try:
        text = resp.text
    except httpx.ResponseNotRead:
        text = ""
    for s in secrets_:
        assert s not in text, "provider key leaked in response body"
        for name, value in resp.headers.items():
            assert s not in value, f"provider key leaked in header {name}"


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = [ln[5:].lstrip(" ") if ln.startswith("data:") else None for ln in block.split("\n")]
        data = [d for d in data if d is not None]
        if data:
            out.append("\n".join(data))
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def words(text: str) -> int:
    return len(text.split())


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def chat_body(model: str = "auto", content: str = "hello there", **extra) -> dict:
    return {"model": model, "messages": user(content), **extra}


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


# Native wire formats: what the gateway must have sent each provider.
GEMINI = "gemini"
ANTHROPIC = "anthropic"


def upstream_path(provider: str, model: str, api_path: str, stream: bool = False) -> str:
    """The path a chat request to `provider` must reach: Gemini and Anthropic natively."""
    if provider == GEMINI:
        method = "streamGenerateContent" if stream else "generateContent"
        return f"{api_path}/models/{model}:{method}"
    if provider == ANTHROPIC:
        return f"{api_path}/messages"
    return f"{api_path}/chat/completions"


def upstream_model(req: dict) -> str:
    """The model a recorded upstream request asked for (Gemini names it in the path)."""
    if ":generateContent" in req["path"] or ":streamGenerateContent" in req["path"]:
        return req["path"].rsplit("/models/", 1)[1].split(":", 1)[0]
    return req["body"]["model"]


def upstream_auth(provider: str, req: dict) -> str:
    """The key a recorded upstream request carried, in the provider's own header."""
    h = req["headers"]
    if provider == GEMINI:
        return h.get("x-goog-api-key", "")
    if provider == ANTHROPIC:
        return h.get("x-api-key", "")
    return h.get("authorization", "").removeprefix("Bearer ")


# ---------------------------------------------------------------------------------------------
# The gateway's structured events, daily resets and retry-after texts (fallback and quota tests).


def gateway_events(gw, event: str | None = None) -> list[dict]:
    """The gateway's events so far (one JSON object per stderr line), or only those of one kind."""
    out = []
    for line in gw.stderr_tail(50_000_000).splitlines():
        if not line.startswith("{"):
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if event is None or e.get("event") == event:
            out.append(e)
    return out


def wait_for_event(gw, event: str, pred: Callable[[dict], bool] = lambda e: True,
                   timeout: float = 5.0) -> dict | None:
    """The first event of kind `event` matching `pred`, polling the log (events are written when
    a request ends, which may be just after the client has its answer); None if none came."""
    found: list[dict] = []

    def check() -> bool:
        found[:] = [e for e in gateway_events(gw, event) if pred(e)]
        return bool(found)

    wait_until(check, timeout=timeout)
    return found[0] if found else None


def next_midnight_ms(now_s: float, tz: str = "UTC") -> int:
    """The next midnight after `now_s` (Unix seconds) in time zone `tz`, in Unix milliseconds."""
    import datetime as _dt
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)
    today = _dt.datetime.fromtimestamp(now_s, zone).date()
    midnight = _dt.datetime.combine(today + _dt.timedelta(days=1), _dt.time(0), tzinfo=zone)
    return int(midnight.timestamp() * 1000)


def retry_after_in_text(text: str) -> int | None:
    """N from a "retry after N seconds" phrase in an error message, if there is one."""
    import re as _re

    m = _re.search(r"retry after (\d+) seconds?", text, _re.IGNORECASE)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Edge state (`GET /v1/freerelay/state`): each field is read in exactly one function below, so a
# renamed field is a one-line change. Money is compared in integer micro-dollars (Decimal, never
# float arithmetic).

from decimal import Decimal  # noqa: E402


def tenant_id(client_key: str) -> str:
    """The tenant a client key is budgeted as: `t` + the first 10 hex of its SHA-256."""
    import hashlib as _hashlib

    return "t" + _hashlib.sha256(client_key.encode()).hexdigest()[:10]


def micro(usd) -> int:
    """USD (a header string, a Decimal, or a JSON number) as exact integer micro-dollars."""
    d = Decimal(usd if isinstance(usd, (str, Decimal)) else repr(usd))
    m = d * 1_000_000
    assert m == m.to_integral_value(), f"{usd!r} is not a whole number of micro-dollars"
    return int(m)


def state_now_ms(state: dict) -> int:
    return state["now_ms"]


def breakers(state: dict) -> list[dict]:
    return state.get("breakers") or []


def breaker(state: dict, provider: str, model: str) -> dict | None:
    """The breaker of `provider`/`model`, None when the gateway has none for it (never failed)."""
    for b in breakers(state):
        if b["provider"] == provider and b["model"] == model:
            return b
    return None


def breaker_state(state: dict, provider: str, model: str) -> str:
    """`closed`, `open` or `half_open`; a model without a breaker entry is closed."""
    b = breaker(state, provider, model)
    return "closed" if b is None else b["state"]


def breaker_until_ms(state: dict, provider: str, model: str) -> int | None:
    b = breaker(state, provider, model)
    return None if b is None else b.get("until_ms")


def breaker_level(state: dict, provider: str, model: str) -> int:
    """How many probes failed in a row (the cool-down is `breaker_cooldown_ms` × 2^level)."""
    b = breaker(state, provider, model)
    return 0 if b is None else int(b.get("level") or 0)


def breaker_failures(state: dict, provider: str, model: str) -> int:
    b = breaker(state, provider, model)
    return 0 if b is None else int(b.get("failures") or 0)


def aimd_entries(state: dict) -> list[dict]:
    return state.get("aimd") or []


def aimd_entry(state: dict, provider: str) -> dict | None:
    for a in aimd_entries(state):
        if a["provider"] == provider:
            return a
    return None


def entry_limit(a: dict) -> int:
    """An AIMD entry's allowed concurrency (whole requests)."""
    return int(a["limit"])


def entry_in_flight(a: dict) -> int:
    return int(a["in_flight"])


def aimd_limit(state: dict, provider: str) -> int | None:
    a = aimd_entry(state, provider)
    return None if a is None else entry_limit(a)


def aimd_in_flight(state: dict, provider: str) -> int:
    a = aimd_entry(state, provider)
    return 0 if a is None else entry_in_flight(a)


def budget_tenant(state: dict) -> str:
    return state["budgets"]["tenant"]


def user_pseudonym(user_id: str | None = None, email: str | None = None) -> str:
    """The name an end user is budgeted as: `u` + the first 10 hex of the SHA-256 of the trimmed
    id, or else of the trimmed, lower-cased email."""
    import hashlib as _hashlib

    text = user_id.strip() if user_id is not None else (email or "").strip().lower()
    return "u" + _hashlib.sha256(text.encode()).hexdigest()[:10]


def budget_entries(state: dict) -> list[dict]:
    """Every budget scope × period of the state."""
    b = state.get("budgets")
    if isinstance(b, dict):
        for k in ("scopes", "budgets"):
            if isinstance(b.get(k), list):
                return b[k]
    return b if isinstance(b, list) else []


def scope_level(s: dict) -> str:
    """`global`, `tenant` or `user`."""
    return s["level"] if s.get("level") in ("global", "tenant", "user") else s["scope"]


def scope_id(s: dict) -> str | None:
    """The tenant (`t…`) or user (`u…`, maybe as `t…:u…`) a scope belongs to."""
    return s.get("scope") if "level" in s else s.get("id")


def scope_period(s: dict) -> str:
    return s["period"]


def scope_spent_micro(s: dict) -> int:
    return int(s["spent_micro_usd"])


def scope_limit_micro(s: dict) -> int | None:
    if s.get("limit_micro_usd") is not None:
        return int(s["limit_micro_usd"])
    return None if s.get("limit_usd") is None else micro(str(s["limit_usd"]))


def scope_spent_usd(s: dict):
    """The spend as USD, where the state gives it (None otherwise)."""
    return s.get("spent_usd")


def budget_scope(state: dict, scope: str, period: str = "day", id_: str | None = None) -> dict | None:
    """A budget scope (`global`, `tenant`, `user`) for `period` (`day`, `month`); `id_` picks
    one tenant (`t…`) or user (`u…`)."""
    for s in budget_entries(state):
        if scope_level(s) != scope or scope_period(s) != period:
            continue
        sid = scope_id(s) or ""
        if id_ is None or sid == id_ or sid.endswith(":" + id_) or sid.startswith(id_ + ":"):
            return s
    return None


def spent_micro(state: dict, scope: str, period: str = "day", id_: str | None = None) -> int:
    """Recorded spend of a scope in micro-dollars (0 when the scope is not listed)."""
    s = budget_scope(state, scope, period, id_)
    return 0 if s is None else scope_spent_micro(s)


def quota_entries(state: dict, provider: str | None = None, kind: str | None = None) -> list[dict]:
    return [q for q in state.get("quotas") or []
            if (provider is None or q["provider"] == provider) and (kind is None or q["kind"] == kind)]


def cache_counters(state: dict) -> dict:
    """`hits_exact`, `hits_semantic`, `misses`, `stores`, `too_large`."""
    return state["cache"]


# ---------------------------------------------------------------------------------------------
# Response headers of the edge features, read in one place too.

COST_HEADER = "x-freerelay-cost-usd"
CACHE_HEADER = "x-freerelay-cache"


def cost_header_micro(headers) -> int | None:
    v = headers.get(COST_HEADER)
    return None if v is None else micro(v)


def cache_status(headers) -> str | None:
    """`exact`, `semantic`, `miss`, or None (not cacheable / cache off)."""
    return headers.get(CACHE_HEADER)


def usage_cost(usage) -> object | None:
    """`usage.cost` of an SDK usage object or a dict (the cost of a stream)."""
    if usage is None:
        return None
    if isinstance(usage, dict):
        return usage.get("cost")
    extra = getattr(usage, "model_extra", None) or {}
    return extra.get("cost", getattr(usage, "cost", None))


def complete(client, *, stream: bool = False, **kw):
    """One chat completion through the SDK: (headers, content, cost in micro-dollars or None).
    Streams ask for the usage chunk, where their cost is (`usage.cost`)."""
    if stream:
        kw.setdefault("stream_options", {"include_usage": True})
    raw = client.chat.completions.with_raw_response.create(stream=stream, **kw)
    if not stream:
        c = raw.parse()
        return raw.headers, c.choices[0].message.content, cost_header_micro(raw.headers)
    text, cost = "", None
    for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None and usage_cost(chunk.usage) is not None:
            cost = micro(usage_cost(chunk.usage))
    return raw.headers, text, cost
