"""Compares graft-server's next-token distribution with Hugging Face transformers + PEFT.

For the base model, an adapter PEFT creates here (random, non-zero B), a DoRA adapter PEFT
creates here (the same, with magnitudes moved off the adapted rows' norms), and an adapter Graft
trained (--graft-adapter, a directory), it asks the server for greedy tokens with the top-20
log-probabilities by token id (vLLM's `return_tokens_as_token_ids`) and checks each against
log_softmax of PEFT's logits for the same ids, at every generated position (so the server's
KV cache is exercised), and the prompt's own log-probabilities that `echo` with `logprobs`
returns against log_softmax of the prompt's logits. Exits 1 above --tolerance (default 1e-4).

    $GRAFT_ORACLE_PYTHON tests/oracle/server_logits.py --url URL --token T --model DIR \
        --graft-adapter DIR --work DIR
"""

import argparse
import hashlib
import json
import sys
import urllib.request
from pathlib import Path

import openai
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", required=True)
parser.add_argument("--token", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--base-name", required=True)
parser.add_argument("--graft-adapter", required=True)
parser.add_argument("--work", required=True)
parser.add_argument("--tolerance", type=float, default=1e-4)
args = parser.parse_args()

torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(args.model)
base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

peft_dir = Path(args.work) / "peft-created"
config = LoraConfig(
    r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), config).save_pretrained(peft_dir)

# DoRA's magnitudes start at the adapted rows' norms, where DoRA computes what LoRA does: they
# are moved off them by up to 20%.
dora_dir = Path(args.work) / "peft-dora"
dora_config = LoraConfig(
    r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, use_dora=True,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
dora_model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), dora_config)
with torch.no_grad():
    for param_name, param in dora_model.named_parameters():
        if "lora_magnitude_vector" in param_name:
            param.mul_(1.0 + 0.2 * (2.0 * torch.rand_like(param) - 1.0))
dora_model.save_pretrained(dora_dir)


def put(name, directory):
    weights = (Path(directory) / "adapter_model.safetensors").read_bytes()
    body = json.dumps({"versions": [{"uri": f"file://{Path(directory).resolve()}/", "sha256": hashlib.sha256(weights).hexdigest(), "weight": 100}]})
    request = urllib.request.Request(
        f"{args.url}/admin/adapters/{name}", data=body.encode(), method="PUT",
        headers={"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 200, response.read()


put("peft-created", peft_dir)
put("peft-dora", dora_dir)
put("graft-trained", args.graft_adapter)

client = openai.OpenAI(base_url=args.url + "/v1", api_key="not-needed", max_retries=0)
worst = 0.0
adapters = [(args.base_name, None), ("peft-created", peft_dir), ("peft-dora", dora_dir), ("graft-trained", Path(args.graft_adapter))]
for name, directory in adapters:
    model = base if directory is None else PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), directory
    ).eval()
    for prompt in ["colour red", "colour teal -> a long prompt"]:
        ids = tokenizer(prompt)["input_ids"]
        answer = client.completions.create(
            model=name, prompt=prompt, max_tokens=4, temperature=0, logprobs=20,
            extra_body={"return_tokens_as_token_ids": True},
        )
        if answer.usage.prompt_tokens != len(ids):
            print(f"{name}: the server read {answer.usage.prompt_tokens} prompt tokens, transformers {len(ids)}")
            sys.exit(1)
        generated = [int(t.split(":")[1]) for t in answer.choices[0].logprobs.tokens]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0]
        reference = torch.log_softmax(logits, dim=-1)
        for step, top in enumerate(answer.choices[0].logprobs.top_logprobs):
            expected = reference[len(ids) - 1 + step]
            ours = {int(k.split(":")[1]): v for k, v in top.items()}
            theirs = set(torch.topk(expected, 20).indices.tolist())
            if len(ours.keys() & theirs) < 19:
                print(f"{name} step {step}: top-20 ids differ: {sorted(ours)} vs {sorted(theirs)}")
                sys.exit(1)
            diff = max(abs(v - expected[i].item()) for i, v in ours.items())
            worst = max(worst, diff)
            if generated[step] != int(expected.argmax()):
                print(f"{name} step {step}: greedy token {generated[step]}, transformers' argmax {int(expected.argmax())}")
                sys.exit(1)
    # echo with logprobs: the prompt's own log-probabilities, the first null, here over a
    # prompt longer than one prefill chunk (256 tokens).
    for prompt in ["colour red", "colour blue owl and red fox " * 30]:
        ids = tokenizer(prompt)["input_ids"]
        answer = client.completions.create(
            model=name, prompt=prompt, max_tokens=1, temperature=0, logprobs=20, echo=True,
            extra_body={"return_tokens_as_token_ids": True},
        )
        scored = answer.choices[0].logprobs
        if [int(t.split(":")[1]) for t in scored.tokens[:len(ids)]] != ids:
            print(f"{name}: echo's tokens are not the prompt's")
            sys.exit(1)
        if scored.token_logprobs[0] is not None or scored.top_logprobs[0] is not None:
            print(f"{name}: the first prompt token has a log-probability")
            sys.exit(1)
        with torch.no_grad():
            reference = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        for position in range(1, len(ids)):
            expected = reference[position - 1]
            ours = {int(k.split(":")[1]): v for k, v in scored.top_logprobs[position].items()}
            theirs = set(torch.topk(expected, 20).indices.tolist())
            if len(ours.keys() & theirs) < 19:
                print(f"{name} prompt position {position}: top-20 ids differ")
                sys.exit(1)
            diff = max(abs(v - expected[i].item()) for i, v in ours.items())
            diff = max(diff, abs(scored.token_logprobs[position] - expected[ids[position]].item()))
            worst = max(worst, diff)
        print(f"{name}: {len(ids)} prompt tokens' log-probabilities checked (echo)")
    print(f"{name}: log-probabilities agree with transformers + PEFT (worst so far {worst:.2e})")
print(f"largest |logprob difference| {worst:.2e} (tolerance {args.tolerance:g})")
sys.exit(0 if worst <= args.tolerance else 1)
