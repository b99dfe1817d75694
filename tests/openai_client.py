"""The official `openai` client against a running paddock: models, chat, streaming, completions, errors,
structured output, tool calls, embeddings, logprobs and several choices.

Usage: python openai_client.py BASE_URL MODEL API_KEY OTHER_INSTANCE_KEY
(API_KEY: an inference key for all instances; OTHER_INSTANCE_KEY: one limited to another instance)
"""
import base64
import json
import math
import struct
import sys

import jsonschema
import openai
from openai import OpenAI

base, model, api_key, other_key = sys.argv[1:5]
client = OpenAI(base_url=base + "/v1", api_key=api_key)
checks = 0

try:
    OpenAI(base_url=base + "/v1", api_key="pdk_0_wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key must be refused")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
try:
    OpenAI(base_url=base + "/v1", api_key=other_key, max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    raise AssertionError("a key for another instance must be refused")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403 and model in str(e), e
checks += 1

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

# Structured output: whatever the (weak) model says, it parses and validates.
schemas = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["name", "age", "color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
]
for schema in schemas:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}},
    )
    assert r.choices[0].finish_reason == "stop", r
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    checks += 1

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Reply in JSON."}],
    max_tokens=60,
    temperature=0,
    response_format={"type": "json_object"},
)
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
checks += 1

# Forced tool calls: valid arguments for the schema, named or required, whole or streamed.
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
clock = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]},
    },
}
schemas_by_name = {t["function"]["name"]: t["function"]["parameters"] for t in (weather, clock)}
for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather, clock],
        tool_choice=choice,
        max_tokens=80,
        temperature=0,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", r
    assert len(c.message.tool_calls) == 1, c.message
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_"), call
    if isinstance(choice, dict):
        assert call.function.name == "get_weather", call
    jsonschema.validate(json.loads(call.function.arguments), schemas_by_name[call.function.name])
    checks += 1

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[weather],
    tool_choice="required",
    max_tokens=80,
    temperature=0,
    stream=True,
)
names, arguments, finish = "", "", None
for chunk in stream:
    if chunk.choices:
        for tc in chunk.choices[0].delta.tool_calls or []:
            names += tc.function.name or ""
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls" and names == "get_weather", (finish, names)
jsonschema.validate(json.loads(arguments), weather["function"]["parameters"])
checks += 1

# A tool result goes back through the template and the conversation goes on.
r = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ],
    tools=[weather],
    max_tokens=4,
    temperature=0,
)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r
checks += 1

# Embeddings: shape, and similar texts closer than unrelated ones.
texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue grew by eight percent."]
e = client.embeddings.create(model=model, input=texts)
vectors = [d.embedding for d in sorted(e.data, key=lambda d: d.index)]
assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 16, [len(v) for v in vectors]
cosine = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]), (cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2]))
assert e.usage.prompt_tokens > 0, e.usage
one = client.embeddings.create(model=model, input="The cat sat on the mat.", encoding_format="base64")
raw = base64.b64decode(one.data[0].embedding)  # asked for base64, the client hands it over as is
decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
assert len(decoded) == len(vectors[0]) and abs(cosine(decoded, vectors[0]) - 1) < 1e-4
checks += 1

# Log-probabilities and several choices.
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=3, temperature=0,
    logprobs=True, top_logprobs=2,
)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, r
for entry in content:
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2, entry
    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob, entry
    assert abs(entry.logprob - entry.top_logprobs[0].logprob) < 1e-4, entry  # greedy takes the best
checks += 1

r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3, n=3, temperature=1.0, seed=7)
assert sorted(c.index for c in r.choices) == [0, 1, 2], r
assert 3 <= r.usage.completion_tokens <= 9, r.usage  # every choice generated, within max_tokens
checks += 1

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}},
    )
    raise AssertionError("an invalid schema must fail")
except openai.BadRequestError as e:
    assert "schema" in str(e), e
checks += 1

try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], tools=[weather],
        tool_choice={"type": "function", "function": {"name": "nope"}},
    )
    raise AssertionError("a tool_choice naming no tool must fail")
except openai.BadRequestError as e:
    assert "nope" in str(e), e
checks += 1

print(f"openai client: {checks} passed, 0 failed")
