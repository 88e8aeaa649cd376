#!/usr/bin/env python3
"""Writes a model of Llama-3-8B's shape with random weights (no hub needed), in Hugging Face's
format and bf16, plus `--adapters` random rank-16 PEFT adapters on all seven projections for the
serving benchmark. The tokenizer is graft's tiny-model tokenizer (its ids fit any vocabulary).

    python tests/bench/gpu/make_model.py --out /data/llama3-8b-shaped --trainer <graft-trainer>
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", required=True, help="a graft-trainer binary (for the tokenizer)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=0)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="5GB")

    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join("the quick brown fox jumps over the lazy dog %d" % i for i in range(2000)))
        tiny = os.path.join(work, "tiny")
        subprocess.run([args.trainer, "make-tiny-model", "--out", tiny, "--corpus", corpus,
                        "--vocab-size", "1024"], check=True, capture_output=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(tiny, name)):
                shutil.copy(os.path.join(tiny, name), args.out)

    if args.adapters:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
        for i in range(args.adapters):
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    # f32 as PEFT trains them (and graft's trainer writes them).
                    param.data = param.data.float()
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.01)
            peft_model.save_pretrained(os.path.join(args.out, "adapters", f"a{i}"))
    print(json.dumps({"model": args.out, "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
