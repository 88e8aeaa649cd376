"""Writes a LoRA adapter made by Hugging Face PEFT for the tiny Llama, and the logits of the
adapted model, for engine/tests/peft_adapter.rs:

    engine/tests/data/tiny/llama-peft/adapter_config.json, adapter_model.safetensors
    engine/tests/data/tiny/llama-peft/reference.safetensors   (input_ids, logits)

Run tests/oracle/tiny_models.py first; then:
    .venv/bin/python tests/oracle/peft_adapter.py
"""

import pathlib

import peft
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"
OUT = DATA / "llama-peft"

torch.manual_seed(1)
base = AutoModelForCausalLM.from_pretrained(DATA / "llama", torch_dtype=torch.float32).eval()
config = LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
model = get_peft_model(base, config).eval()
# A trained-looking adapter: B is zero at init, which would make the test vacuous.
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.normal_(0.0, 0.3)
model.save_pretrained(OUT)
input_ids = torch.randint(0, base.config.vocab_size, (2, 9))
with torch.no_grad():
    logits = model(input_ids=input_ids).logits
save_file(
    {"input_ids": input_ids, "logits": logits.contiguous()},
    OUT / "reference.safetensors",
    metadata={"peft": peft.__version__, "torch": torch.__version__},
)
print(OUT, tuple(logits.shape))
