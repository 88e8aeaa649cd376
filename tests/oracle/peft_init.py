"""OLoRA's and PiSSA's start, PEFT's against Graft's: builds the PEFT model with
`LoraConfig(init_lora_weights="olora" | "pissa")` on a base model and compares, for every
adapted projection, the initial product B·A and the residual base weight PEFT leaves
(`W − scaling·B·A`) with Graft's; then one step (dropout off, mean next-token cross-entropy
over the given ids) and the gradients of every lora_A / lora_B
(trainer-image/tests/peft_oracle.rs writes Graft's):

    --model DIR        the base model
    --init NAME        olora or pissa
    --rank R --alpha A --targets q_proj,v_proj,...
    --reference FILE   safetensors: input_ids (int64 [batch, seq]), loss (float32 [1]) and, per
                       module M (PEFT's name, base_model.model.model.layers.N.…):
                       M.lora_A.weight, M.lora_B.weight (Graft's start), M.residual (the base
                       weight Graft froze), M.lora_A.grad, M.lora_B.grad

Singular vectors have a sign of their own: PiSSA's rank components are matched to PEFT's by
the sign of each A row's dot product with PEFT's, and Graft's gradients turned with them.
OLoRA's QR follows LAPACK's signs, so its A and B are compared as they are.

Prints the largest differences; exits 1 when B·A, the residual or (OLoRA) A and B differ by
more than --tolerance (default 1e-4), the loss by more than 1e-4, or a gradient by more than
--grad-tolerance (default 1e-3) of its tensor's largest entry.
"""

import argparse
import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--init", required=True, choices=["olora", "pissa"])
parser.add_argument("--rank", type=int, required=True)
parser.add_argument("--alpha", type=float, required=True)
parser.add_argument("--targets", required=True)
parser.add_argument("--reference", required=True)
parser.add_argument("--tolerance", type=float, default=1e-4)
parser.add_argument("--grad-tolerance", type=float, default=1e-3)
args = parser.parse_args()

reference = load_file(args.reference)
input_ids = reference.pop("input_ids").to(torch.int64)
graft_loss = reference.pop("loss").item()

base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
config = LoraConfig(
    r=args.rank,
    lora_alpha=args.alpha,
    lora_dropout=0.0,
    target_modules=args.targets.split(","),
    init_lora_weights=args.init,
)
model = get_peft_model(base, config)
model.train()
modules = dict(model.named_modules())

names = sorted(k[: -len(".lora_A.weight")] for k in reference if k.endswith(".lora_A.weight"))
adapted = [n for n, m in modules.items() if hasattr(m, "lora_A") and "default" in m.lora_A]
if sorted(adapted) != names:
    print(f"PEFT adapted {sorted(adapted)}, Graft {names}")
    sys.exit(1)

worst_product, worst_residual, worst_raw, signs = 0.0, 0.0, 0.0, {}
for name in names:
    m = modules[name]
    a, b = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()
    ours_a, ours_b = reference[f"{name}.lora_A.weight"], reference[f"{name}.lora_B.weight"]
    worst_product = max(worst_product, (b @ a - ours_b @ ours_a).abs().max().item())
    residual = m.base_layer.weight.detach()
    worst_residual = max(worst_residual, (residual - reference[f"{name}.residual"]).abs().max().item())
    if args.init == "olora":
        worst_raw = max(worst_raw, (a - ours_a).abs().max().item(), (b - ours_b).abs().max().item())
        signs[name] = torch.ones(a.shape[0])
    else:
        signs[name] = torch.sign((a * ours_a).sum(dim=1))

logits = model(input_ids=input_ids).logits
loss = torch.nn.functional.cross_entropy(
    logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
)
loss.backward()

worst_grad = 0.0
for name in names:
    m, s = modules[name], signs[name]
    for half, theirs, ours in [
        ("A", m.lora_A["default"].weight.grad, reference[f"{name}.lora_A.grad"] * s[:, None]),
        ("B", m.lora_B["default"].weight.grad, reference[f"{name}.lora_B.grad"] * s[None, :]),
    ]:
        scale = theirs.abs().max().item()
        worst_grad = max(worst_grad, (theirs - ours).abs().max().item() / max(scale, 1e-12))

print(
    f"{args.init}: {len(names)} projections; B·A max abs diff {worst_product:.3e}, residual "
    f"{worst_residual:.3e}" + (f", A and B {worst_raw:.3e}" if args.init == "olora" else "")
    + f"; loss {loss.item():.6f} vs Graft's {graft_loss:.6f}; gradients {worst_grad:.3e} of "
    f"each tensor's largest entry (peft {peft.__version__}, torch {torch.__version__})"
)
failed = [
    what
    for what, bad in [
        ("B·A", not worst_product <= args.tolerance),
        ("the residual", not worst_residual <= args.tolerance),
        ("A and B", not worst_raw <= args.tolerance),
        ("the loss", not abs(loss.item() - graft_loss) <= args.tolerance),
        ("the gradients", not worst_grad <= args.grad_tolerance),
    ]
    if bad
]
if failed:
    print("PEFT differs from Graft in " + ", ".join(failed))
    sys.exit(1)
