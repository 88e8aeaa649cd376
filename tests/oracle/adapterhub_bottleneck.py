"""Writes bottleneck adapters made by the AdapterHub `adapters` library for the tiny Llama, and
the logits of each adapted model, for engine/tests/bottleneck.rs: Houlsby's (`DoubleSeqBnConfig`,
after attention and after the feed-forward block, swish) and Pfeiffer's (`SeqBnConfig`, after
the feed-forward block, relu, a per-layer reduction factor and a constant scaling):

    engine/tests/data/tiny/llama-adapterhub-<houlsby|pfeiffer>/adapter_config.json, adapter.safetensors
    engine/tests/data/tiny/llama-adapterhub-<houlsby|pfeiffer>/reference.safetensors   (input_ids, logits)

`adapters` pins transformers 4.x, so this runs in its own environment
(tests/oracle/venv.sh adapterhub); run tests/oracle/tiny_models.py first; then:
    $(bash tests/oracle/venv.sh adapterhub) tests/oracle/adapterhub_bottleneck.py
"""

import pathlib

import adapters
import torch
from adapters import DoubleSeqBnConfig, SeqBnConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DATA = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"


def write(name, seed, kind, config):
    torch.manual_seed(seed)
    out = DATA / f"{name}-adapterhub-{kind}"
    model = AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    adapters.init(model)
    model.add_adapter(kind, config=config)
    model.set_active_adapters(kind)
    # A trained-looking adapter: the library's start (weights of standard deviation 0.02)
    # moves the logits too little for the comparison to mean much.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"adapters.{kind}." in param_name:
                param.normal_(0.0, 0.3)
    model.save_adapter(str(out), kind, with_head=False, use_safetensors=True)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_file(
        {"input_ids": input_ids, "logits": logits.contiguous()},
        out / "reference.safetensors",
        metadata={"adapters": adapters.__version__, "torch": torch.__version__},
    )
    print(out, tuple(logits.shape))


write("llama", 11, "houlsby", DoubleSeqBnConfig(reduction_factor=4))
write(
    "llama",
    12,
    "pfeiffer",
    SeqBnConfig(reduction_factor={"1": 8, "default": 4}, scaling=0.5),
)
