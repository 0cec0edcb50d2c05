"""Chat with tollgate through the official OpenAI Python SDK, streamed and not.

    pip install openai
    TOLLGATE_API_KEY=tg_... python examples/openai_sdk.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("TOLLGATE_BASE_URL", "http://127.0.0.1:8080/v1"),
    # A key from `tollgate keys create` (README); the demo model also answers without one,
    # but the SDK insists on sending some key, so create one.
    api_key=os.environ["TOLLGATE_API_KEY"],
)
model = os.environ.get("TOLLGATE_MODEL", "demo-chat")

reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello, who are you?"}]
)
print(reply.choices[0].message.content)
print("usage:", reply.usage)

for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Stream a few words, please."}],
    stream=True,
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
