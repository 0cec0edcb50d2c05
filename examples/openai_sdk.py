"""Chat with tollgate through the official OpenAI Python SDK, streamed and not.

    pip install openai
    python examples/openai_sdk.py            # against http://127.0.0.1:8080/v1
    TOLLGATE_BASE_URL=http://host:8080/v1 TOLLGATE_API_KEY=... python examples/openai_sdk.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("TOLLGATE_BASE_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ.get("TOLLGATE_API_KEY", "unused-for-the-demo"),
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
