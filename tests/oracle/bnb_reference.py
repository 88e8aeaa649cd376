"""Writes pre-quantized checkpoints as transformers + bitsandbytes save them, for the engine's
test of loading them (engine/tests/bnb_checkpoint.rs):

    engine/tests/data/tiny/<name>-bnb-4bit/config.json, model.safetensors
        the tiny model `tiny_models.py` wrote, loaded with
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True) on the CPU and saved with save_pretrained (packed
        `weight`, `weight.absmax`, `weight.nested_absmax`, the code maps and
        `weight.quant_state.bitsandbytes__nf4` per projection; lm_head left dense)
    engine/tests/data/tiny/<name>-bnb-4bit/reference.safetensors
        input_ids, each projection's weight as bitsandbytes' `dequantize_4bit` gives it
        (`<module>.dequantized`), and the logits of the model computing with those weights in
        float32 (as QLoRA's compute does). Not Linear4bit's own CPU forward: on a CPU with
        AVX512-BF16 it repacks the weights and multiplies in bfloat16, so its logits would
        depend on the machine that ran this script.

    .venv/bin/pip install torch transformers bitsandbytes safetensors
    .venv/bin/python tests/oracle/bnb_reference.py
"""

import pathlib
import warnings

import bitsandbytes
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

TINY = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
config = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)
for name in ("llama", "qwen2"):
    out = TINY / f"{name}-bnb-4bit"
    model = AutoModelForCausalLM.from_pretrained(
        TINY / name, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).eval()
    model.save_pretrained(out)
    # save_pretrained writes what the loader needs; the generation config is the tiny one's.
    (out / "generation_config.json").unlink(missing_ok=True)

    tensors = {}
    dense = AutoModelForCausalLM.from_pretrained(TINY / name, dtype=torch.float32).eval()
    for module_name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            weight = module.weight
            dequantized = F.dequantize_4bit(weight.data, weight.quant_state).contiguous()
            tensors[f"{module_name}.dequantized"] = dequantized
            with torch.no_grad():
                dense.get_submodule(module_name).weight.copy_(dequantized)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = dense(input_ids=ids).logits
    tensors["input_ids"] = ids
    tensors["logits"] = logits.contiguous()
    save_file(tensors, out / "reference.safetensors")
    print(f"bnb_reference: {name}-bnb-4bit: {len(tensors) - 2} quantized projections")
