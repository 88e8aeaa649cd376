"""One training step's gradients, PEFT's against Graft's: loads a base model and a PEFT adapter
(trainable, dropout off), computes the mean next-token cross-entropy over the given ids, runs
backward, and compares the gradient of every lora_A / lora_B (and DoRA's
lora_magnitude_vector, and (IA)³'s ia3_l) with Graft's (trainer-image/tests/peft_oracle.rs writes them under the
names of PEFT's parameters, less the adapter's name):

    --model DIR        the base model
    --adapter DIR      a PEFT adapter (adapter_config.json, adapter_model.safetensors)
    --reference FILE   safetensors: input_ids (int64 [batch, seq]), loss (float32 [1]) and
                       one gradient per adapter tensor, named as in adapter_model.safetensors

Prints the loss difference and the largest gradient difference relative to that tensor's
largest gradient; exits 1 when the loss differs by more than --tolerance (default 1e-4) or a
gradient by more than --grad-tolerance (default 1e-3: f32 sums taken in another order, through
every layer's backward, differ by about 1e-4 of the largest entry).
"""

import argparse
import sys

import peft
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--adapter", required=True)
parser.add_argument("--reference", required=True)
parser.add_argument("--tolerance", type=float, default=1e-4)
parser.add_argument("--grad-tolerance", type=float, default=1e-3)
args = parser.parse_args()

reference = load_file(args.reference)
input_ids = reference.pop("input_ids").to(torch.int64)
graft_loss = reference.pop("loss").item()

base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
model.train()
for module in model.modules():
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
logits = model(input_ids=input_ids).logits
loss = torch.nn.functional.cross_entropy(
    logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
)
loss.backward()

worst, compared = 0.0, 0
for name, param in model.named_parameters():
    if "lora_" not in name and "ia3_l" not in name:
        continue
    key = name.replace(".default", "")
    if key not in reference:
        print(f"Graft has no gradient for {key}")
        sys.exit(1)
    theirs, ours = param.grad, reference[key]
    scale = theirs.abs().max().item()
    rel = (theirs - ours).abs().max().item() / max(scale, 1e-12)
    worst = max(worst, rel)
    compared += 1
print(
    f"loss {loss.item():.6f} vs Graft's {graft_loss:.6f}; {compared} gradients, largest "
    f"difference {worst:.3e} of each tensor's largest entry (peft {peft.__version__})"
)
if compared != len(reference) or abs(loss.item() - graft_loss) > args.tolerance or worst > args.grad_tolerance:
    print("PEFT's step differs from Graft's")
    sys.exit(1)
