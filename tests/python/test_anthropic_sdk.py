"""The official `anthropic` Python SDK against tollgate's `POST /v1/messages` (base URL from
TOLLGATE_BASE_URL, the gateway's root: the SDK appends `/v1/messages`; a funded key from
TOLLGATE_API_KEY, which the SDK sends in `x-api-key`).

Run by tests/it/messages.rs against an in-process gateway whose `paid` model is the mock
upstream's `gpt-test` (billed) and `tools` its tool-calling model. Exits non-zero on the first
failed check.
"""

import os
import sys

import anthropic
from anthropic import Anthropic

base_url = os.environ["TOLLGATE_BASE_URL"]
key = os.environ["TOLLGATE_API_KEY"]
client = Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=30)
hello = [{"role": "user", "content": "Say hello"}]

# Create: Anthropic's message, billed (the mock reports 19 tokens in, 10 out).
msg = client.messages.create(model="paid", max_tokens=64, messages=hello)
assert msg.type == "message" and msg.role == "assistant", msg
assert msg.id.startswith("msg_"), msg.id
assert msg.content[0].type == "text", msg.content
assert msg.content[0].text == "Hello! How can I assist you today?", msg.content
assert msg.stop_reason == "end_turn", msg.stop_reason
assert (msg.usage.input_tokens, msg.usage.output_tokens) == (19, 10), msg.usage
assert msg._request_id, "the SDK reads request-id"
raw = client.messages.with_raw_response.create(model="paid", max_tokens=64, messages=hello)
assert raw.headers.get("x-tollgate-cost"), dict(raw.headers)
assert raw.parse().model_dump()["usage"]["cost"] == raw.headers["x-tollgate-cost"]

# Stream: the SDK's helper puts the events together (9 in, 2 out).
with client.messages.stream(model="paid", max_tokens=64, messages=hello) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == "Hello!", text
assert final.content[0].text == "Hello!", final.content
assert final.stop_reason == "end_turn", final.stop_reason
assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 2), final.usage

# A tool call, whole, then its result sent back, then streamed.
tools = [
    {
        "name": "get_current_weather",
        "description": "The weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    }
]
ask = {"role": "user", "content": "Weather in Boston?"}
call = client.messages.create(
    model="tools", max_tokens=100, tools=tools, tool_choice={"type": "any"}, messages=[ask]
)
assert call.stop_reason == "tool_use", call
use = call.content[0]
assert use.type == "tool_use" and use.name == "get_current_weather", call.content
assert use.input == {"location": "Boston, MA"}, use.input
after = client.messages.create(
    model="tools",
    max_tokens=100,
    tools=tools,
    messages=[
        ask,
        {"role": "assistant", "content": call.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "72F and sunny"}],
        },
    ],
)
assert after.type == "message", after
with client.messages.stream(model="tools", max_tokens=100, tools=tools, messages=[ask]) as stream:
    streamed = stream.get_final_message()
assert streamed.stop_reason == "tool_use", streamed
assert streamed.content[0].type == "tool_use", streamed.content
assert streamed.content[0].input == {"location": "Boston, MA"}, streamed.content

# Errors arrive as the SDK's typed exceptions, from Anthropic's error body.
try:
    client.messages.create(
        model="paid", max_tokens=10, messages=[{"role": "system", "content": "x"}]
    )
    raise SystemExit("expected BadRequestError")
except anthropic.BadRequestError as e:
    assert e.status_code == 400
    assert e.body["error"]["type"] == "invalid_request_error", e.body
try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=hello)
    raise SystemExit("expected NotFoundError")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
try:
    Anthropic(base_url=base_url, api_key="tg_wrong", max_retries=0).messages.create(
        model="paid", max_tokens=10, messages=hello
    )
    raise SystemExit("expected AuthenticationError")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401
    assert e.request_id, "the SDK reads request-id"

print("anthropic sdk: all checks passed", file=sys.stderr)
