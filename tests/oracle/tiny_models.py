"""Writes tiny random Llama-family models and the logits Hugging Face transformers computes
for them, for the engine's parity tests (engine/tests/llama_transformers.rs):

    engine/tests/data/tiny/<name>/config.json, model.safetensors   (as save_pretrained writes)
    engine/tests/data/tiny/<name>/reference.safetensors            (input_ids, logits)

One model per architecture feature the engine must honour: Llama with grouped-query
attention and untied embeddings, Llama 3 rope scaling, Qwen2 (q/k/v bias, tied embeddings),
Mistral, Qwen3, Gemma 3, YaRN, Gemma 2, Phi-3 (fused projections, LongRoPE, partial rotary,
a sliding window) and dynamic NTK rope.

The rope schedules that depend on the sequence's length (Phi-3's LongRoPE, dynamic) also get
`stepwise_logits`: row 0 fed as a prompt of STEPWISE_PREFILL tokens and then one token at a
time with a cache, as `generate` feeds it; the rotation changes as the sequence grows past the
original context, so these differ from the full forward's.

    .venv/bin/pip install torch transformers safetensors
    .venv/bin/python tests/oracle/tiny_models.py
"""

import pathlib

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

OUT = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny"
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
MODELS = {
    "llama": LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0),
    "llama3": LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0),
    "mistral": MistralConfig(**COMMON, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
    "qwen3": Qwen3Config(
        **{**COMMON, "vocab_size": 384},
        head_dim=24,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        attention_bias=False,
    ),
    "gemma3": Gemma3TextConfig(
        **{**COMMON, "vocab_size": 384},
        head_dim=16,
        query_pre_attn_scalar=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        final_logit_softcapping=5.0,
        tie_word_embeddings=True,
    ),
    "llama-yarn": LlamaConfig(
        **COMMON,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "gemma2": Gemma2Config(
        **{**COMMON, "vocab_size": 384},
        head_dim=16,
        query_pre_attn_scalar=32,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        tie_word_embeddings=True,
    ),
    # Phi-4-mini's shape of Phi-3: a quarter of each head passes through unrotated, LongRoPE
    # stretching an original context of 9 (the reference's 11 tokens use the long factors, the
    # PEFT reference's 9 the short ones) to 36.
    "phi3": Phi3Config(
        **{**COMMON, "vocab_size": 384, "max_position_embeddings": 36},
        original_max_position_embeddings=9,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
        },
        sliding_window=6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "llama-dynamic": LlamaConfig(
        **{**COMMON, "max_position_embeddings": 8},
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
}
LENGTH_DEPENDENT = {"phi3", "llama-dynamic"}
STEPWISE_PREFILL = 3


def stepwise_logits(directory, row):
    """Logits at every position of `row`, fed as `generate` feeds it: a prompt, then one token
    per step with the cache (a freshly loaded model: transformers' dynamic rope keeps state)."""
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    cache = DynamicCache()
    chunks = [row[:STEPWISE_PREFILL]] + [row[i : i + 1] for i in range(STEPWISE_PREFILL, len(row))]
    out, seen = [], 0
    with torch.no_grad():
        for chunk in chunks:
            positions = torch.arange(seen, seen + len(chunk)).unsqueeze(0)
            result = model(
                input_ids=chunk.unsqueeze(0), past_key_values=cache, position_ids=positions, use_cache=True
            )
            cache = result.past_key_values
            out.append(result.logits[0])
            seen += len(chunk)
    return torch.cat(out, 0)

torch.manual_seed(0)
for name, config in MODELS.items():
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    # Random weights of a realistic spread (the default init leaves norms at 1, biases at 0).
    with torch.no_grad():
        for name_, param in model.named_parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.5)
            if param.dim() == 1 and (param.numel() == config.hidden_size or name_.endswith("_norm.weight")):
                param.add_(1.0)
    directory = OUT / name
    model.save_pretrained(directory, safe_serialization=True)
    input_ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    tensors = {"input_ids": input_ids.to(torch.int64), "logits": logits.contiguous()}
    if name in LENGTH_DEPENDENT:
        tensors["stepwise_logits"] = stepwise_logits(directory, input_ids[0]).contiguous()
    save_file(
        tensors,
        directory / "reference.safetensors",
        metadata={"transformers": transformers.__version__, "torch": torch.__version__},
    )
    print(name, directory, tuple(logits.shape))
