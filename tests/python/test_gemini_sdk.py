"""The official `openai` Python SDK asking a Gemini image model through tollgate, the way the
reference's Nano-Banana-Pro example does: `extra_body={"google": {"image_config": ...}}` (the SDK
merges `extra_body` into the request body). Base URL from TOLLGATE_BASE_URL, a funded key from
TOLLGATE_API_KEY; the PNG the mock
upstream answers, base64, in TOLLGATE_EXPECT_PNG_B64.

Run by tests/it/gemini.rs against an in-process gateway and the mock Gemini API. Exits non-zero
on the first failed check.
"""

import base64
import os
import urllib.request

from openai import OpenAI

base_url = os.environ["TOLLGATE_BASE_URL"]
expected = base64.b64decode(os.environ["TOLLGATE_EXPECT_PNG_B64"])
client = OpenAI(
    base_url=base_url, api_key=os.environ["TOLLGATE_API_KEY"], max_retries=0, timeout=30
)

resp = client.chat.completions.create(
    model="nano-banana-pro",
    messages=[{"role": "user", "content": "A banana wearing sunglasses"}],
    extra_body={"google": {"image_config": {"aspect_ratio": "3:4", "image_size": "4K"}}},
)
message = resp.choices[0].message
assert message.content == "Here is your banana.", message
# `images` is not in the SDK's types: it comes through as an extra field.
images = message.model_dump()["images"]
url = images[0]["image_url"]["url"]
if url.startswith("data:image/png;base64,"):
    png = base64.b64decode(url.split(",", 1)[1])
else:
    origin = base_url.rsplit("/v1", 1)[0]
    assert url.startswith(origin + "/"), url
    png = urllib.request.urlopen(url, timeout=30).read()
assert png == expected, "not the PNG the upstream made"
assert resp.usage.completion_tokens == 1300, resp.usage
# Billed by the tokens Google reported: 12 in at $2 / 1M, 1300 out at $120 / 1M.
assert resp.model_dump()["usage"]["cost_picodollars"] == 12 * 2_000_000 + 1300 * 120_000_000, resp.usage
print("gemini image via the openai SDK: ok")
