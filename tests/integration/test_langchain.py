"""LangChain's ChatOpenAI pointed at the gateway."""

from langchain_openai import ChatOpenAI


# The tests that check what reached the provider name its model: which one `auto` picks is the
# router's choice (and it learns from the shared gateway's earlier tests).
GROQ_8B = "groq/llama-3.1-8b-instant"


def _llm(gw, model: str = "auto", **kw) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{gw.url}/v1", api_key=gw.client_key, model=model,
                      max_retries=0, timeout=30, **kw)


def test_langchain_invoke(gw, shared):
    msg = _llm(gw, GROQ_8B).invoke("hello from langchain")
    assert msg.content == "mock(groq): hello from langchain"
    meta = msg.response_metadata
    assert meta.get("finish_reason") == "stop"
    usage = msg.usage_metadata
    assert usage["input_tokens"] == 3
    assert usage["output_tokens"] == 4
    [req] = shared.groq.requests()
    assert req["body"]["model"] == "llama-3.1-8b-instant"


def test_langchain_stream(gw, shared):
    chunks = list(_llm(gw, GROQ_8B, stream_usage=True).stream("streaming from langchain"))
    assert len(chunks) > 2
    text = "".join(c.content for c in chunks)
    assert text == "mock(groq): streaming from langchain"
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == 4


def test_langchain_tool_binding(gw):
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return "sunny"

    msg = _llm(gw).bind_tools([get_weather]).invoke("What is the weather in Rome?")
    [call] = msg.tool_calls
    assert call["name"] == "get_weather"
    assert call["args"] == {"city": "Rome"}
