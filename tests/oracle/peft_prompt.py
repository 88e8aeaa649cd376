"""Writes prompt-learning adapters made by Hugging Face PEFT for the tiny Llama and Gemma 3 (whose
embeddings are scaled: PEFT's virtual tokens are not), and the logits of each adapted model, for
engine/tests/peft_prompt.rs:

    engine/tests/data/tiny/<model>-peft-<method>/adapter_config.json, adapter_model.safetensors
    engine/tests/data/tiny/<model>-peft-<method>/reference.safetensors   (input_ids, logits)

<method> is `prompt` (PROMPT_TUNING, random init), `ptuning-mlp` and `ptuning-lstm` (P_TUNING; PEFT saves the encoder's output
as `prompt_embeddings`; encoder.safetensors beside it holds the encoder's parameters under
PEFT's names, `embedding.weight`, `mlp_head.N.*`, `lstm_head.*`). The logits are those of the input's positions (PEFT's output also has a
row per virtual token) from the saved adapter read back with PeftModel.from_pretrained, as users
load it.

    engine/tests/data/tiny/made-peft-prompt-text/   PROMPT_TUNING with TEXT init, untrained: the
                                                    init text's embeddings, repeated

Run tests/oracle/tiny_models.py first; then:
    .venv/bin/python tests/oracle/peft_prompt.py
"""

import json
import pathlib

import peft
import torch
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"
VIRTUAL = 5


def configs():
    return {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "ptuning-mlp": PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=VIRTUAL,
            encoder_reparameterization_type="MLP",
            encoder_hidden_size=24,
        ),
        "ptuning-lstm": PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=VIRTUAL,
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=12,
        ),
    }


def write(name, method, config, seed):
    torch.manual_seed(seed)
    out = DATA / f"{name}-peft-{method}"
    base = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    if method.startswith("ptuning"):
        # The encoder itself, which PEFT's file leaves out: what Graft's encoder must turn into
        # the saved prompt_embeddings.
        encoder = {
            name: param.detach().contiguous()
            for name, param in model.prompt_encoder["default"].named_parameters()
        }
        save_file(encoder, out / "encoder.safetensors")
    # PEFT's model card names the path the script ran from; nothing reads it.
    (out / "README.md").unlink(missing_ok=True)
    base = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, out, is_trainable=False).eval()
    input_ids = torch.randint(0, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, VIRTUAL:]
    save_file(
        {"input_ids": input_ids, "logits": logits.contiguous()},
        out / "reference.safetensors",
        metadata={"peft": peft.__version__, "torch": torch.__version__},
    )
    print(out, tuple(logits.shape))


def write_text_init():
    """PEFT's TEXT init on the tiny model with a tokenizer (tiny/made): the saved, untrained
    table is the embeddings of the init text's tokens, repeated to 20 virtual tokens."""
    name = "made"
    out = DATA / f"{name}-peft-prompt-text"
    base = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=20,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=TEXT,
        tokenizer_name_or_path=str(DATA / name),
    )
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    # The tokenizer's path is the one the script ran from: the test reads tiny/made itself.
    saved = json.loads((out / "adapter_config.json").read_text())
    saved["tokenizer_name_or_path"] = None
    (out / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    print(out, "TEXT init", repr(TEXT))


TEXT = "colour red is a colour"
write_text_init()

for seed, (name, method) in enumerate(
    [
        ("llama", "prompt"),
        ("llama", "ptuning-mlp"),
        ("llama", "ptuning-lstm"),
        ("gemma3", "prompt"),
    ]
):
    write(name, method, configs()[method], 40 + seed)
