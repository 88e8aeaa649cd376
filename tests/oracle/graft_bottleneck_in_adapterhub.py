"""A bottleneck adapter Graft wrote, in the AdapterHub `adapters` library: loads the base model
with transformers, `adapters.init`, `load_adapter` of Graft's directory and activates it, then
either compares the logits Graft computed with the library's, or (with --gradients) one
training step's loss and gradients:

    --model DIR        the base model
    --adapter DIR      the adapter (adapter_config.json, adapter.safetensors)
    --reference FILE   safetensors: input_ids (int64 [batch, seq]) and logits [batch, seq, vocab];
                       with --gradients, loss (float32 [1]) and one gradient per adapter tensor,
                       named as in adapter.safetensors

Prints the largest difference; exits 1 when logits differ by more than --tolerance (default
1e-4), or, with --gradients, the loss by more than --tolerance or a gradient by more than
--grad-tolerance (default 1e-3) of that tensor's largest entry.
"""

import argparse
import json
import pathlib
import sys

import adapters
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--adapter", required=True)
parser.add_argument("--reference", required=True)
parser.add_argument("--gradients", action="store_true")
parser.add_argument("--tolerance", type=float, default=1e-4)
parser.add_argument("--grad-tolerance", type=float, default=1e-3)
args = parser.parse_args()

reference = load_file(args.reference)
input_ids = reference.pop("input_ids").to(torch.int64)

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
adapters.init(model)
name = model.load_adapter(args.adapter, use_safetensors=True)
saved = json.loads((pathlib.Path(args.adapter) / "adapter_config.json").read_text())
if name != saved["name"]:
    print(f"loaded as {name!r}, saved as {saved['name']!r}")
    sys.exit(1)
if args.gradients:
    model.train_adapter(name)
    model.train()
else:
    model.set_active_adapters(name)
    model.eval()

if not args.gradients:
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    diff = (logits - reference["logits"]).abs().max().item()
    print(f"adapters {adapters.__version__}: logits within {diff:.3e} of Graft's")
    sys.exit(0 if diff <= args.tolerance else 1)

logits = model(input_ids=input_ids).logits
loss = torch.nn.functional.cross_entropy(
    logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
)
loss.backward()
loss_diff = abs(loss.item() - reference.pop("loss").item())
worst, compared = 0.0, 0
for key, param in model.named_parameters():
    if f".adapters.{name}." not in key:
        continue
    if key not in reference:
        print(f"Graft has no gradient for {key}")
        sys.exit(1)
    theirs, ours = param.grad, reference.pop(key)
    scale = max(theirs.abs().max().item(), 1e-12)
    worst = max(worst, (theirs - ours).abs().max().item() / scale)
    compared += 1
if reference:
    print(f"the library has no parameter for {sorted(reference)}")
    sys.exit(1)
print(
    f"adapters {adapters.__version__}: loss within {loss_diff:.3e}, {compared} gradients within "
    f"{worst:.3e} of their largest entry"
)
sys.exit(0 if compared and loss_diff <= args.tolerance and worst <= args.grad_tolerance else 1)
