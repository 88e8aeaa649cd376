"""Drives a running graft-server with the official `openai` Python client, as users will:
models, completions and chat, streamed and not, logprobs, seeds, and the client's own error
types for bad requests. Exits non-zero at the first expectation that fails.

    $GRAFT_ORACLE_PYTHON tests/oracle/openai_client.py --url http://127.0.0.1:8000 \
        --base made --adapter support-bot
"""

import argparse
import sys

import openai

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", required=True)
parser.add_argument("--base", required=True)
parser.add_argument("--adapter", required=True)
args = parser.parse_args()

client = openai.OpenAI(base_url=args.url + "/v1", api_key="not-needed", max_retries=0)


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


models = {m.id: m for m in client.models.list().data}
check(set(models) == {args.base, args.adapter}, f"models.list gives the base and the adapter: {sorted(models)}")
check(models[args.adapter].model_extra.get("parent") == args.base, "the adapter's parent is the base model")

done = client.completions.create(model=args.base, prompt="colour red", max_tokens=6, temperature=0)
check(isinstance(done.choices[0].text, str) and done.choices[0].finish_reason == "length", "a completion")
check(done.usage.completion_tokens == 6 and done.usage.total_tokens == done.usage.prompt_tokens + 6, "its usage")

streamed = client.completions.create(model=args.base, prompt="colour red", max_tokens=6, temperature=0, stream=True)
text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
check(text == done.choices[0].text, "a streamed completion equals the plain one")

adapted = client.completions.create(model=args.adapter, prompt="colour red", max_tokens=6, temperature=0)
check(adapted.choices[0].text != done.choices[0].text and adapted.model == args.adapter, "the adapter answers differently")

messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "colour blue"}]
chat = client.chat.completions.create(model=args.adapter, messages=messages, max_tokens=8, temperature=0)
check(chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str), "a chat completion")

chunks = list(
    client.chat.completions.create(
        model=args.adapter, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
)
content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(content == chat.choices[0].message.content, "a streamed chat equals the plain one")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, "the stream ends with usage")
check([c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [chat.choices[0].finish_reason], "one finish_reason")

with_logprobs = client.chat.completions.create(
    model=args.base, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
)
entries = with_logprobs.choices[0].logprobs.content
check(len(entries) == 3 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries), "chat logprobs")
check(all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6 for e in entries), "greedy tokens are the most likely")

seeded = [
    client.completions.create(model=args.adapter, prompt="colour", max_tokens=8, temperature=1.0, seed=42).choices[0].text
    for _ in range(2)
]
check(seeded[0] == seeded[1], "a seed repeats a sample")

try:
    client.completions.create(model="no-such-adapter", prompt="hi")
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", "an unknown model is a NotFoundError with code model_not_found")
try:
    client.completions.create(model=args.base, prompt="hi", temperature=5)
    check(False, "a bad temperature is refused")
except openai.BadRequestError as e:
    check(e.param == "temperature", "a bad temperature is a BadRequestError naming the parameter")
try:
    client.chat.completions.create(model=args.base, messages=[{"role": "user", "content": "word " * 500}])
    check(False, "an over-long prompt is refused")
except openai.BadRequestError as e:
    check("maximum context length" in e.message, "an over-long prompt is a BadRequestError about the context")
after = client.completions.create(model=args.base, prompt="colour red", max_tokens=6, temperature=0)
check(after.choices[0].text == done.choices[0].text, "the server answers as before after the errors")
print("openai client: all checks passed")
