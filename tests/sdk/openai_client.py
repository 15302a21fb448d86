"""Drives the gateway with the official `openai` Python SDK, as an application would.

Run by tests/e2e/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway.
Exits non-zero on the first failed expectation.
"""

import os
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
expected_text = os.environ["EXPECTED_TEXT"]

# Chat, not streamed.
reply = client.chat.completions.create(
    model="gpt-test", messages=[{"role": "user", "content": "Hello from the SDK"}]
)
assert reply.choices[0].message.content == expected_text, reply
assert reply.usage is not None and reply.usage.prompt_tokens > 0, reply.usage

# Chat, streamed, without asking for usage: no usage chunk may appear.
chunks = list(
    client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "Stream it"}], stream=True
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == expected_text, text
assert all(c.usage is None for c in chunks), "usage chunk shown to a client that did not ask"

# Streamed, asking for usage: the last chunk carries it.
chunks = list(
    client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "Stream it with usage"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]

# Embeddings.
emb = client.embeddings.create(model="embed-test", input=["one", "two", "three"])
assert len(emb.data) == 3 and len(emb.data[0].embedding) == 3, emb

# Errors surface as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    sys.exit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

try:
    OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="tg-wrong", max_retries=0).models.list()
    sys.exit("expected AuthenticationError")
except openai.AuthenticationError:
    pass

models = [m.id for m in client.models.list()]
assert models == ["gpt-test", "embed-test"], models
print("sdk ok")
