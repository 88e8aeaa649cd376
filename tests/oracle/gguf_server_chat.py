"""Chats with a graft-server serving a GGUF file through the official `openai` client, and
checks what it answers against transformers loading the same file
(`from_pretrained(dir, gguf_file=name)`, f32): the prompt the chat template renders has the
same tokens, the first token's top-20 log-probabilities (and each later token's, through the
server's KV cache) agree within --tolerance, the greedy tokens are transformers' argmax, and
a streamed chat says what the plain one said. Exits 1 at the first difference.

    $GRAFT_ORACLE_PYTHON tests/oracle/gguf_server_chat.py --url URL --gguf PATH --model NAME
"""

import argparse
import pathlib
import sys

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", required=True)
parser.add_argument("--gguf", required=True, type=pathlib.Path)
parser.add_argument("--model", required=True, help="the served name of the base model")
parser.add_argument("--tolerance", type=float, default=1e-4)
args = parser.parse_args()

directory, name = args.gguf.parent, args.gguf.name
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
client = openai.OpenAI(base_url=args.url + "/v1", api_key="not-needed", max_retries=0, timeout=600)


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


check(args.model in {m.id for m in client.models.list().data}, f"models.list serves {args.model}")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a colour of the rainbow."},
    ],
]
worst_first = worst = 0.0
for messages in CHATS:
    answer = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=20,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    check(answer.usage.prompt_tokens == len(ids), f"the chat template gives the same {len(ids)} prompt tokens")
    entries = answer.choices[0].logprobs.content
    generated = [int(e.token.split(":")[1]) for e in entries]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + generated])).logits[0]
    reference = torch.log_softmax(logits, dim=-1)
    for step, entry in enumerate(entries):
        expected = reference[len(ids) - 1 + step]
        ours = {int(t.token.split(":")[1]): t.logprob for t in entry.top_logprobs}
        theirs = set(torch.topk(expected, 20).indices.tolist())
        check(len(ours.keys() & theirs) >= 19, f"step {step}: the top-20 tokens are transformers'")
        diff = max(abs(v - expected[i].item()) for i, v in ours.items())
        worst = max(worst, diff)
        if step == 0:
            worst_first = max(worst_first, diff)
        check(generated[step] == int(expected.argmax()), f"step {step}: the greedy token is transformers' argmax")
    text = tokenizer.decode(generated, skip_special_tokens=True)
    check(answer.choices[0].message.content == text, f"the answer is the decoded tokens: {text!r}")

    streamed = client.chat.completions.create(model=args.model, messages=messages, max_tokens=6, temperature=0, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    check(content == answer.choices[0].message.content, "a streamed chat says the same")

print(f"first-token log-probabilities: largest difference {worst_first:.2e}; any token: {worst:.2e} (tolerance {args.tolerance:g})")
sys.exit(0 if worst <= args.tolerance else 1)
