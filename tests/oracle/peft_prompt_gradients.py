"""One training step's loss and gradient of a prompt-tuning adapter in Hugging Face PEFT, for
engine/tests/peft_prompt.rs to compare with Graft's:

    --model DIR      the base model
    --adapter DIR    a PROMPT_TUNING adapter (adapter_config.json, adapter_model.safetensors)
    --ids FILE       safetensors: input_ids (int64 [batch, seq])
    --out FILE       written: loss (float32 []) and grad (float32 [num_virtual_tokens, token_dim])

The loss is PEFT's causal-LM loss with labels = input_ids: PEFT puts -100 labels on the virtual
tokens, so the last virtual token's logits score the first input token, and the mean is over
every input token. The gradient is that of the trainable prompt embedding table.
"""

import argparse

import torch
from peft import PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--adapter", required=True)
parser.add_argument("--ids", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

input_ids = load_file(args.ids)["input_ids"].to(torch.int64)
base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
# PEFT loads a saved prompt-learning adapter for inference only; a trainable one is made from
# its config and given the saved table.
config = PromptTuningConfig.from_pretrained(args.adapter)
config.inference_mode = False
model = get_peft_model(base, config)
with torch.no_grad():
    saved = load_file(f"{args.adapter}/adapter_model.safetensors")["prompt_embeddings"]
    model.prompt_encoder["default"].embedding.weight.copy_(saved)
model.train()
loss = model(input_ids=input_ids, labels=input_ids).loss
loss.backward()
table = model.prompt_encoder["default"].embedding.weight
save_file({"loss": loss.detach().reshape(()), "grad": table.grad.contiguous()}, args.out)
print(f"loss {loss.item():.6f}, grad norm {table.grad.norm().item():.6f}")
