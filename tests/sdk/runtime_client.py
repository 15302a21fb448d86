"""The official openai SDK against tollgate-runtime (OPENAI_BASE_URL): API conformance.

Run by local-runtime/tests/openai_sdk.rs. Exits non-zero with a message on the first mismatch.
"""
import os
import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])
PROMPT = [{"role": "user", "content": "Repeat this twice: the quick brown fox jumps over the lazy dog."}]


def check(cond, msg):
    if not cond:
        raise SystemExit("FAIL: " + msg)


# The runtime serves only whoever holds its token (the gateway that started it).
try:
    OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="not-the-token", max_retries=0).models.list()
    check(False, "a wrong token was accepted")
except openai.AuthenticationError as e:
    check(e.status_code == 401 and e.body["code"] == "invalid_api_key", str(e.body))


ids = [m.id for m in client.models.list().data]
check("default" in ids, f"models: {ids}")

whole = client.chat.completions.create(model="default", messages=PROMPT, temperature=0, max_tokens=40)
text = whole.choices[0].message.content
check(whole.object == "chat.completion" and whole.choices[0].message.role == "assistant", "shape")
check(whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason)
u = whole.usage
check(u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0, str(u))
spec = u.model_extra["speculative"]
check(spec["mode"] == "ngram" and spec["target_passes"] > 0, str(spec))

# Streaming: a role chunk, content chunks, a finish_reason chunk, a usage chunk, [DONE].
chunks = list(client.chat.completions.create(
    model="default", messages=PROMPT, temperature=0, max_tokens=40, stream=True,
    stream_options={"include_usage": True}))
check(chunks[0].choices[0].delta.role == "assistant", "first chunk carries the role")
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(streamed == text, f"stream {streamed!r} != whole {text!r}")
finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
check(len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason, "one finish_reason")
check(chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens, "usage chunk last")
check(all(c.id == chunks[0].id for c in chunks), "one id per stream")

# A stop sequence from the middle of the answer (inside a speculated block) cuts exactly there.
words = text.split(" ")
check(len(words) > 5, text)
stop = " " + words[3]
cut = text[: text.index(stop)]
for stream in (False, True):
    if stream:
        got = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="default", messages=PROMPT, temperature=0, max_tokens=40, stop=[stop], stream=True)
            if c.choices)
        reason = "stop"
    else:
        r = client.chat.completions.create(model="default", messages=PROMPT, temperature=0, max_tokens=40, stop=stop)
        got, reason = r.choices[0].message.content, r.choices[0].finish_reason
    check(got == cut and reason == "stop", f"stop {stop!r} (stream={stream}): {got!r} vs {cut!r}")

short = client.chat.completions.create(model="default", messages=PROMPT, temperature=0, max_tokens=3)
check(short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3, str(short.usage))

seeded = [client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Tell a story."}],
                                         temperature=0.9, top_p=0.95, seed=11, max_tokens=24).choices[0].message.content
          for _ in range(2)]
check(seeded[0] == seeded[1], f"seed: {seeded}")

done = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0)
check(done.object == "text_completion" and done.usage.completion_tokens <= 5 and done.choices[0].text, str(done))

try:
    client.chat.completions.create(model="no-such-model", messages=PROMPT)
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check(e.body["code"] == "model_not_found", str(e.body))
try:
    client.chat.completions.create(model="default", messages=PROMPT, temperature=5)
    check(False, "temperature 5 accepted")
except openai.BadRequestError as e:
    check("temperature" in e.body["message"], str(e.body))
print("ok")
