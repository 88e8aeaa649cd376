"""Loads an adapter that graft-trainer trained into Hugging Face PEFT and checks that PEFT's
logits are the ones Graft computed for it (trainer-image/tests/peft_oracle.rs writes them):

    --model DIR        the base model (config.json, model.safetensors)
    --adapter DIR      what graft-trainer published (adapter_config.json,
                       adapter_model.safetensors)
    --reference FILE   safetensors: input_ids (int64 [batch, seq]) and logits (float32
                       [batch, seq, vocab]) from Graft's engine with the adapter applied
    --merged DIR       optional: the merged model graft-trainer wrote (output.merged), which
                       transformers alone must load to the same logits

A prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) is compared on the input's
positions.

Prints the largest absolute difference; exits 1 above --tolerance (default 1e-4). The model is
loaded as users load it: AutoModelForCausalLM.from_pretrained in float32 on CPU, then
PeftModel.from_pretrained, so PEFT reads the adapter's own adapter_config.json.

    GRAFT_ORACLE_PYTHON=$(bash tests/oracle/venv.sh)
    $GRAFT_ORACLE_PYTHON tests/oracle/graft_adapter_in_peft.py --model M --adapter A --reference R
"""

import argparse
import sys

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--adapter", required=True)
parser.add_argument("--reference", required=True)
parser.add_argument("--merged")
parser.add_argument("--tolerance", type=float, default=1e-4)
args = parser.parse_args()

reference = load_file(args.reference)
input_ids = reference["input_ids"].to(torch.int64)
expected = reference["logits"].to(torch.float32)

base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, args.adapter, is_trainable=False).eval()
config = model.active_peft_config
# A prompt-learning adapter's output has a row per virtual token before the input's (but for
# prefix tuning's, whose virtual tokens are keys and values only); Graft's reference holds the
# input's rows.
prefix = config.peft_type == "PREFIX_TUNING"
skip = config.num_virtual_tokens if config.is_prompt_learning and not prefix else 0
with torch.no_grad():
    logits = model(input_ids=input_ids).logits[:, skip:]
    with model.disable_adapter():
        base_logits = model(input_ids=input_ids).logits

if logits.shape != expected.shape:
    print(f"logits have shape {tuple(logits.shape)}, Graft's {tuple(expected.shape)}")
    sys.exit(1)
diff = (logits - expected).abs().max().item()
effect = (logits - base_logits).abs().max().item()
print(
    f"max abs diff {diff:.3e} over {expected.numel()} logits "
    f"(the adapter moves PEFT's logits by up to {effect:.3e}; "
    f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__})"
)
if not diff <= args.tolerance:
    print(f"PEFT's logits differ from Graft's by {diff:.3e} > {args.tolerance:.0e}")
    sys.exit(1)
if args.merged:
    merged = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
    merged_diff = (merged_logits - expected).abs().max().item()
    print(f"merged model: max abs diff {merged_diff:.3e} from Graft's base + adapter logits")
    if not merged_diff <= args.tolerance:
        print(f"the merged model's logits differ by {merged_diff:.3e} > {args.tolerance:.0e}")
        sys.exit(1)
