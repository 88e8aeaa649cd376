"""Writes a LoRA adapter made by Hugging Face PEFT for the tiny Llama, Qwen3, Gemma 3, Gemma 2 and Phi-3, and
the logits of each adapted model, for engine/tests/peft_adapter.rs and engine/tests/serving.rs;
also Llama's with rank and alpha patterns, and DoRA adapters for Qwen2 (whose q/k/v have a bias,
which DoRA's magnitude must leave out) and Phi-3 (fused projections); and (IA)³ adapters for
Llama (PEFT's default modules) and Qwen2 (q/k/v with a bias, which the output's vector scales too):

    engine/tests/data/tiny/<model>-peft/adapter_config.json, adapter_model.safetensors
    engine/tests/data/tiny/<model>-peft/reference.safetensors   (input_ids, logits)

Run tests/oracle/tiny_models.py first; then:
    .venv/bin/python tests/oracle/peft_adapter.py
"""

import pathlib

import peft
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"


SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Phi-3 fuses q/k/v and gate/up; PEFT targets the fused modules.
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def write(name, seed, targets=SEPARATE, suffix="peft", ia3=None, **patterns):
    torch.manual_seed(seed)
    out = DATA / f"{name}-{suffix}"
    base = AutoModelForCausalLM.from_pretrained(DATA / name, torch_dtype=torch.float32).eval()
    if ia3 is not None:
        config = IA3Config(target_modules=targets, feedforward_modules=ia3, task_type="CAUSAL_LM")
    else:
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
            **patterns,
        )
    model = get_peft_model(base, config).eval()
    # A trained-looking adapter: B is zero at init, which would make the test vacuous.
    # DoRA's magnitudes start at the base rows' norms; they are moved off them by up to 20%.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "ia3_l" in param_name:
                # The vectors start at ones, which would leave the model as it was.
                param.add_(torch.randn_like(param) * 0.3)
            elif "lora_magnitude_vector" in param_name:
                param.mul_(1.0 + 0.2 * (2.0 * torch.rand_like(param) - 1.0))
            elif "lora_" in param_name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    input_ids = torch.randint(0, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_file(
        {"input_ids": input_ids, "logits": logits.contiguous()},
        out / "reference.safetensors",
        metadata={"peft": peft.__version__, "torch": torch.__version__},
    )
    print(out, tuple(logits.shape))


write("llama", 1)
write("qwen3", 2)
write("gemma3", 3)
write("gemma2", 4)
write("phi3", 5, FUSED)
# Per-module ranks and alphas: regular expressions over module names, the first match winning.
write(
    "llama",
    6,
    suffix="peft-patterns",
    rank_pattern={"layers.1.mlp.down_proj": 2, "q_proj": 8, r"layers\.0\..*\.up_proj": 6},
    alpha_pattern={"v_proj": 16, "o_proj": 2},
)
# DoRA: a magnitude per output row of every adapted projection (Phi-3's of the fused ones).
write("qwen2", 7, suffix="peft-dora", use_dora=True)
write("phi3", 8, FUSED, suffix="peft-dora", use_dora=True)
# (IA)³: PEFT's defaults for Llama (k_proj, v_proj and down_proj, whose input is scaled); for
# Qwen2 more modules, two of them feed-forward.
write("llama", 9, ["k_proj", "v_proj", "down_proj"], suffix="peft-ia3", ia3=["down_proj"])
write(
    "qwen2",
    10,
    ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    suffix="peft-ia3",
    ia3=["up_proj", "down_proj"],
)
