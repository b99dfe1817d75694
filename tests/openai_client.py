"""The official `openai` client against a running paddock: models, chat, streaming, completions, errors.

Usage: python openai_client.py BASE_URL MODEL
"""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="not-needed")
checks = 0

ids = [m.id for m in client.models.list().data]
assert model in ids, ids
checks += 1

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
)
message = chat.choices[0].message
assert message.role == "assistant", message
assert isinstance(message.content, str), message
assert 1 <= chat.usage.completion_tokens <= 6, chat.usage
assert chat.choices[0].finish_reason in ("stop", "length"), chat.choices[0]
checks += 1

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.choices:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert text == message.content, (text, message.content)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
assert finish == chat.choices[0].finish_reason, finish
checks += 1

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
assert completion.choices[0].text.strip(), completion
assert completion.usage.completion_tokens <= 4, completion.usage
checks += 1

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e
checks += 1

print(f"openai client: {checks} passed, 0 failed")
