"""One training step's loss and gradients of a prompt-learning adapter in Hugging Face PEFT, for
Graft's tests to compare with theirs (engine/tests/peft_prompt.rs,
trainer-image/tests/peft_oracle.rs):

    --model DIR      the base model
    --adapter DIR    a PROMPT_TUNING, P_TUNING or PREFIX_TUNING adapter (adapter_config.json,
                     adapter_model.safetensors); a P_TUNING one, or a PREFIX_TUNING one with
                     prefix_projection, with its encoder's parameters beside it
                     (encoder.safetensors, PEFT's names), since PEFT saves only the encoder's
                     output
    --ids FILE       safetensors: input_ids (int64 [batch, seq])
    --out FILE       written: loss (float32 []) and grad (float32, the table's shape) for a
                     table (prompt tuning's, prefix tuning's); with an encoder, grad.<name> for
                     each of its parameters

The loss is PEFT's causal-LM loss with labels = input_ids: PEFT puts -100 labels on the virtual
tokens, so the last virtual token's logits score the first input token, and the mean is over
every input token. Behind a prefix (keys and values in the cache, no input rows) the first
input token is scored by nothing, as without an adapter.
"""

import argparse

import torch
from peft import PeftConfig, get_peft_model
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
# its config and given the saved parameters.
config = PeftConfig.from_pretrained(args.adapter)
config.inference_mode = False
model = get_peft_model(base, config)
encoder = model.prompt_encoder["default"]
has_encoder = config.peft_type == "P_TUNING" or (
    config.peft_type == "PREFIX_TUNING" and config.prefix_projection
)
with torch.no_grad():
    if has_encoder:
        saved = load_file(f"{args.adapter}/encoder.safetensors")
        missing, unexpected = encoder.load_state_dict(saved, strict=True)
    else:
        saved = load_file(f"{args.adapter}/adapter_model.safetensors")["prompt_embeddings"]
        encoder.embedding.weight.copy_(saved)
model.train()
loss = model(input_ids=input_ids, labels=input_ids).loss
loss.backward()
out = {"loss": loss.detach().reshape(())}
if has_encoder:
    for name, param in encoder.named_parameters():
        out[f"grad.{name}"] = param.grad.contiguous()
else:
    out["grad"] = encoder.embedding.weight.grad.contiguous()
save_file(out, args.out)
norm = torch.sqrt(sum((g.double() ** 2).sum() for k, g in out.items() if k != "loss"))
print(f"loss {loss.item():.6f}, gradient norm {norm.item():.6f}")
