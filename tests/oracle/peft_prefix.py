"""Writes prefix-tuning adapters made by Hugging Face PEFT for the tiny Llama and Qwen3 (whose
grouped-query attention PEFT's prefix follows: `token_dim` is kv_heads x head_dim), and the logits
of each adapted model, for engine/tests/peft_prompt.rs:

    engine/tests/data/tiny/<model>-peft-<method>/adapter_config.json, adapter_model.safetensors
    engine/tests/data/tiny/<model>-peft-<method>/reference.safetensors   (input_ids, logits)

<method> is `prefix` (PREFIX_TUNING, the table itself) or `prefix-projection` (with PEFT's
reparameterisation MLP, which PEFT saves as its output). PEFT's saved `prompt_embeddings` is
`[num_virtual_tokens, num_layers * 2 * token_dim]`: per layer a key then a value, each
`[kv_heads, head_dim]` per virtual token, put in the attention's cache as they are (not
rotated). The logits are the input's, from the saved adapter read back with
PeftModel.from_pretrained, as users load it.

Run tests/oracle/tiny_models.py first; then:
    .venv/bin/python tests/oracle/peft_prefix.py
"""

import pathlib

import peft
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"
VIRTUAL = 6


def write(name, method, config, seed):
    torch.manual_seed(seed)
    out = DATA / f"{name}-peft-{method}"
    base = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    model = get_peft_model(base, config)
    if config.prefix_projection:
        # PEFT starts the MLP's last layer small; drawn larger, the prefix changes the logits.
        with torch.no_grad():
            for param in model.prompt_encoder["default"].transform.parameters():
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    base = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out, is_trainable=False).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        with model.disable_adapter():
            plain = model(input_ids=input_ids).logits
    assert (logits - plain).abs().max() > 1e-2, "the prefix changes the logits"
    save_file(
        {"input_ids": input_ids, "logits": logits.contiguous()},
        out / "reference.safetensors",
        metadata={"peft": peft.__version__, "torch": torch.__version__},
    )
    print(out, tuple(logits.shape), model.active_peft_config.token_dim)


for seed, (name, method, projection) in enumerate(
    [("llama", "prefix", False), ("qwen3", "prefix-projection", True)]
):
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=VIRTUAL,
        prefix_projection=projection,
        encoder_hidden_size=16,
    )
    write(name, method, config, 60 + seed)
