"""Request validation: bad input is a 4xx with an OpenAI-shaped error, never a 500, never upstream."""

import json

import pytest

from helpers import assert_openai_error, chat_body

MIB = 1024 * 1024


def _post(gw, content: bytes, content_type: str = "application/json"):
    with gw.http() as c:
        return c.post("/v1/chat/completions", content=content, headers={"Content-Type": content_type})


def test_malformed_json_is_400(gw, shared):
    r = _post(gw, b'{"model": "auto", "messages": [')
    assert_openai_error(r, 400, type_="invalid_request_error")
    assert shared.groq.all_requests() == []


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null", b"true"])
def test_body_not_an_object_is_400(gw, shared, body):
    r = _post(gw, body)
    assert_openai_error(r, 400, type_="invalid_request_error")
    assert shared.groq.all_requests() == []


@pytest.mark.parametrize("body,param", [
    ({"model": "auto"}, "messages"),
    ({"model": "auto", "messages": []}, "messages"),
    ({"model": "auto", "messages": "hello"}, "messages"),
    ({"model": "auto", "messages": None}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": None, "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": 7, "messages": [{"role": "user", "content": "hi"}]}, "model"),
])
def test_missing_or_invalid_field_names_param(gw, shared, body, param):
    r = _post(gw, json.dumps(body).encode())
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["param"] == param, err
    assert shared.groq.all_requests() == []


@pytest.mark.parametrize("messages,param", [
    ([{"content": "no role"}], "messages[0].role"),
    ([{"role": "wizard", "content": "bad role"}], "messages[0].role"),
    ([{"role": 5, "content": "role not a string"}], "messages[0].role"),
    ([{"role": "user", "content": "fine"}, {"role": "", "content": "empty role"}], "messages[1].role"),
    (["not an object"], "messages[0]"),
])
def test_message_without_valid_role_is_400(gw, shared, messages, param):
    r = _post(gw, json.dumps({"model": "auto", "messages": messages}).encode())
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["param"] == param, err
    assert shared.groq.all_requests() == []


def test_body_over_default_limit_is_413(gw, shared):
    filler = "x" * (4 * MIB)
    r = _post(gw, ('{"model":"auto","messages":[{"role":"user","content":"%s"}]}' % filler).encode())
    assert_openai_error(r, 413, code="request_too_large")
    assert shared.groq.all_requests() == []


def test_body_under_default_limit_is_accepted(gw, shared):
    filler = "word " * (3 * MIB // 5)
    with gw.http(timeout=60) as c:
        r = c.post("/v1/chat/completions", json=chat_body(content=filler.strip()))
    assert r.status_code == 200, r.text[:300]
    # Which model `auto` picks for ~3 MB of text is the router's choice: the one that answered
    # got the request, once, and no other provider did.
    provider = r.headers["x-freerelay-provider"]
    assert len(shared.mocks[provider].requests()) == 1
    assert all(m.requests() == [] for p, m in shared.mocks.items() if p != provider)


def test_max_body_bytes_is_configurable(make_mock, make_gateway):
    groq = make_mock("groq")
    gw = make_gateway({"groq": groq}, extra_env={"SPIN_VARIABLE_MAX_BODY_BYTES": "2048"})
    small = chat_body(content="small")
    big = chat_body(content="y" * 3000)
    with gw.http() as c:
        assert c.post("/v1/chat/completions", json=small).status_code == 200
        r = c.post("/v1/chat/completions", json=big)
        assert_openai_error(r, 413, code="request_too_large")
        # Declared length alone decides nothing: a chunked upload over the limit is refused too.
        r = c.post("/v1/chat/completions", content=iter([b'{"model":"auto","messages":[',
                                                         b'{"role":"user","content":"' + b"z" * 4000 + b'"}]}']))
        assert_openai_error(r, 413, code="request_too_large")
    assert len(groq.requests()) == 1


@pytest.mark.parametrize("content,ctype,param", [
    (b"", "application/json", None),
    (b"\xff\xfe\x00garbage", "application/json", None),
    (b'{"model":"auto","messages":[{"role":"user","content":"hi"}]', "application/json", None),
    (b'{"model":"auto","messages":[{"role":"user","content":{"deep":[[[[]]]]}}]}', "application/json",
     "messages[0].content"),
    (b'{"model":"' + b"m" * 5000 + b'","messages":[{"role":"user","content":"hi"}]}', "application/json",
     "model"),
    (b'{"model":"auto","messages":[1,2,3]}', "application/json", "messages[0]"),
    (b'{"model":"auto","messages":[{"role":"user"}]}', "application/json", "messages[0].content"),
    (b'{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":"yes"}', "application/json",
     "stream"),
    (b"[" * 10000 + b"]" * 10000, "application/json", None),
])
def test_odd_input_is_400_naming_the_field(gw, shared, content, ctype, param):
    r = _post(gw, content, ctype)
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["param"] == param, err
    assert shared.groq.all_requests() == []


def test_content_type_is_not_judged(gw, shared):
    """A JSON body sent as text/plain (curl -d without -H) is served like any other."""
    r = _post(gw, b'{"model":"auto","messages":[{"role":"user","content":"hi"}]}', "text/plain")
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"] == "mock(groq): hi"
    assert len(shared.groq.requests()) == 1
