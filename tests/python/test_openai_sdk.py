"""The official `openai` Python SDK against a running tollgate (base URL from TOLLGATE_BASE_URL).

Run by tests/openai_sdk.rs, which starts the real `tollgate serve` binary on 127.0.0.1:0.
Exits non-zero on the first failed check.
"""

import os
import sys

import openai
from openai import OpenAI

base_url = os.environ["TOLLGATE_BASE_URL"]
api_key = os.environ.get("TOLLGATE_API_KEY", "no-key-needed-for-the-demo")
client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

# Not streamed.
resp = client.chat.completions.create(
    model="demo-chat",
    messages=[{"role": "user", "content": "Hello from the SDK"}],
)
assert resp.object == "chat.completion", resp
text = resp.choices[0].message.content
assert "Hello from the SDK" in text, text
assert resp.usage is not None and resp.usage.completion_tokens > 0, resp.usage
# Billed: the usage object says what it cost, and so does a header.
raw = client.chat.completions.with_raw_response.create(
    model="demo-chat", messages=[{"role": "user", "content": "Hello from the SDK"}]
)
assert raw.headers.get("x-tollgate-cost"), dict(raw.headers)
assert raw.parse().model_dump()["usage"]["cost"] == raw.headers["x-tollgate-cost"]

# Streamed (charged once, when it ends; the cost rides in the usage chunk).
stream = client.chat.completions.create(
    model="demo-chat",
    messages=[{"role": "user", "content": "Hello from the SDK"}],
    stream=True,
    stream_options={"include_usage": True},
)
parts = []
stream_cost = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        stream_cost = chunk.model_dump()["usage"].get("cost")
assert stream_cost, "the usage chunk carries the cost"
assert "".join(parts) == text, ("".join(parts), text)

# Embeddings (the SDK asks for base64 and decodes it), billed on input tokens.
emb = client.embeddings.create(model="demo-embed", input=["hello world", "hello"])
assert emb.object == "list", emb
assert len(emb.data) == 2 and emb.data[1].index == 1, emb
assert len(emb.data[0].embedding) == 16, emb.data[0]
assert emb.usage.prompt_tokens == 3, emb.usage
floats = client.embeddings.create(model="demo-embed", input="hello world", encoding_format="float")
pairs = zip(floats.data[0].embedding, emb.data[0].embedding)
assert all(abs(a - b) < 1e-6 for a, b in pairs), (floats.data[0], emb.data[0])
try:
    client.embeddings.create(model="demo-embed", input="")
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "input", e.body

# Images (offline demo PNGs), billed per image.
import base64

img = client.images.generate(model="demo-image", prompt="a lighthouse at dusk", n=1)
assert len(img.data) == 1, img
png = base64.b64decode(img.data[0].b64_json)
assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]

# Speech (offline demo WAV), billed per character of the input.
speech = client.audio.speech.with_raw_response.create(
    model="demo-speech", voice="alloy", input="Hello from the SDK", response_format="wav"
)
assert speech.headers["content-type"] == "audio/wav", dict(speech.headers)
assert speech.headers.get("x-tollgate-cost"), dict(speech.headers)
wav = speech.parse().read()
assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE", wav[:12]
streamed = b""
with client.audio.speech.with_streaming_response.create(
    model="demo-speech", voice="alloy", input="Hello from the SDK", response_format="wav"
) as r:
    for part in r.iter_bytes():
        streamed += part
assert streamed == wav, (len(streamed), len(wav))
try:
    client.audio.speech.create(model="demo-speech", voice="alloy", input="x", speed=9)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "speed", e.body

# Models.
ids = [m.id for m in client.models.list()]
assert "demo-chat" in ids, ids

# Errors arrive as the SDK's typed exceptions, from OpenAI's error body.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404
    assert e.body["code"] == "model_not_found", e.body
    assert e.response.headers.get("x-request-id"), "x-request-id missing"

try:
    client.chat.completions.create(model="demo-chat", messages=[])
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.status_code == 400

print("openai sdk: all checks passed", file=sys.stderr)
