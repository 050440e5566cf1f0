"""Health, client authentication, unknown routes and methods, secret hygiene."""

import httpx
import openai
import pytest

from helpers import assert_no_secrets, assert_openai_error, chat_body


def test_healthz_needs_no_auth(gw):
    r = httpx.get(f"{gw.url}/healthz", timeout=10)
    assert r.status_code == 200
    assert "application/json" in r.headers.get("content-type", "")
    assert r.json() == {"status": "ok"}


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/freerelay/stats")])
def test_missing_key_is_401_missing_api_key(gw, shared, method, path):
    with gw.http(auth=False) as c:
        r = c.request(method, path, json=chat_body() if method == "POST" else None)
    assert_openai_error(r, 401, code="missing_api_key")
    assert shared.groq.requests() == []


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("GET", "/v1/freerelay/stats")])
def test_wrong_key_is_401_invalid_api_key(gw, shared, method, path):
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.request(method, path, json=chat_body() if method == "POST" else None,
                      headers={"Authorization": "Bearer fr-not-a-real-key"})
    assert_openai_error(r, 401, code="invalid_api_key")
    assert shared.groq.requests() == []


def test_malformed_authorization_header_is_401(gw):
    """Anything but `Bearer <token>` carries no key at all."""
    for value in ["Basic Zm9vOmJhcg==", "Bearer", gw.client_key, f"bearer-{gw.client_key}"]:
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            r = c.get("/v1/models", headers={"Authorization": value})
        assert r.status_code == 401, (value, r.text)
        assert_openai_error(r, 401, code="missing_api_key", type_="invalid_request_error")


def test_provider_key_is_not_a_client_key(gw, shared):
    """A provider key must not open the gateway."""
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {shared.groq.key}"})
    assert_openai_error(r, 401, code="invalid_api_key")


def test_sdk_wrong_key_raises_authentication_error(gw):
    c = gw.client(key="fr-wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"


def test_every_listed_client_key_is_accepted(gw, shared):
    """client_keys is a comma-separated list of digests: the second key works too."""
    c = gw.client(key=shared.second_client_key)
    r = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "second key"}])
    assert r.choices[0].message.content == "mock(groq): second key"


def test_client_key_goes_no_further_and_provider_key_does(gw, shared, client):
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "who am i"}])
    assert r.choices[0].message.content == "mock(groq): who am i"
    [req] = shared.groq.requests()
    assert req["headers"].get("authorization") == f"Bearer {shared.groq.key}"
    seen = " ".join(req["headers"].values()) + (req.get("body_text") or "") + str(req["body"])
    assert gw.client_key not in seen
    assert "fr-test-" not in seen


def test_provider_keys_never_in_responses(gw, shared):
    with gw.http() as c:
        responses = [
            (c.get("/healthz"), 200),
            (c.get("/v1/models"), 200),
            (c.post("/v1/chat/completions", json=chat_body()), 200),
            (c.post("/v1/chat/completions", json=chat_body(stream=True)), 200),
            (c.post("/v1/chat/completions", json=chat_body(model="no-such-model")), 404),
            (c.post("/v1/chat/completions", content=b"{oops"), 400),
            (c.get("/v1/freerelay/stats"), 200),
        ]
    for r, status in responses:
        assert r.status_code == status, (r.request.method, r.request.url.path, r.text[:300])
        assert_no_secrets(r, shared.provider_keys())
    assert len(shared.groq.requests()) == 2


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/nope", "/nope", "/v2/chat/completions"])
def test_unknown_path_is_404(gw, path):
    with gw.http() as c:
        r = c.get(path)
    assert_openai_error(r, 404, code="unknown_url", type_="invalid_request_error")


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("DELETE", "/v1/models"),
    ("POST", "/v1/models"),
    ("POST", "/healthz"),
])
def test_wrong_method_is_405(gw, method, path):
    with gw.http() as c:
        r = c.request(method, path, content=b"{}")
    assert_openai_error(r, 405, code="method_not_allowed", type_="invalid_request_error")
