"""Records what Hugging Face transformers makes of a GGUF file, for the engine's GGUF tests to
compare with (`from_pretrained(dir, gguf_file=name)`, which dequantizes it to f32):

    <out>/reference.safetensors
        input_ids (a chat rendered with the generation prompt, then a plain text) and the logits
        AutoModelForCausalLM computes for them, in float32 (`logits`) and in float64
        (`logits_f64`: the same weights, converted exactly)
    <out>/text_reference.json
        the special tokens, the added tokens, token ids of texts (with and without special
        tokens) and their decodes, chats rendered by the chat template, and the SHA-256 of
        each weight as transformers holds it (f32, little-endian, row-major)

    $GRAFT_ORACLE_PYTHON tests/oracle/gguf_reference.py --gguf PATH --out DIR
"""

import argparse
import hashlib
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--gguf", required=True, type=pathlib.Path)
parser.add_argument("--out", required=True, type=pathlib.Path)
args = parser.parse_args()

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they've said it's 12,345.67 or 2024-06-01 (or 1000000).",
    "  leading,   runs   of spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand \r\n carriage returns",
    "Ünïcödé café naïve — “quotes”",
    "日本語のテキスト",
    "emoji 😀🚀 and a skin tone 👍🏽",
    "",
    " ",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "def add(a, b):\n    return a + b  # code",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Arr, ahoy there!"},
        {"role": "user", "content": "And of Japan? 日本"},
    ],
]

directory, name = args.gguf.parent, args.gguf.name
tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

encodings = []
for text in TEXTS:
    for special in (True, False):
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        encodings.append({
            "text": text,
            "add_special_tokens": special,
            "ids": ids,
            "decoded": tokenizer.decode(ids, skip_special_tokens=False),
            "decoded_skipping_special": tokenizer.decode(ids, skip_special_tokens=True),
        })

chats = []
for messages in CHATS:
    for generation_prompt in (True, False):
        chats.append({
            "messages": messages,
            "add_generation_prompt": generation_prompt,
            "text": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt),
        })

backend = json.loads(tokenizer.backend_tokenizer.to_str())
reference = {
    "special_tokens": {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "eos_token_id": tokenizer.eos_token_id,
    },
    "vocab_size": len(tokenizer),
    "added_tokens": [
        {k: token[k] for k in ("id", "content", "special", "normalized", "lstrip", "rstrip", "single_word")}
        for token in backend["added_tokens"]
    ],
    "encodings": encodings,
    "chats": chats,
    "weights": {
        name: hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
        for name, tensor in model.state_dict().items()
        # A tied head is the embedding under a second name.
        if not (name == "lm_head.weight" and model.config.tie_word_embeddings)
    },
}
args.out.mkdir(parents=True, exist_ok=True)
(args.out / "text_reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

chat = tokenizer.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
ids = tokenizer(chat + "Arr, the capital be Tokyo, matey.", add_special_tokens=False, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
    logits_f64 = model.double()(input_ids=ids).logits
save_file(
    {"input_ids": ids.contiguous(), "logits": logits.contiguous(), "logits_f64": logits_f64.contiguous()},
    args.out / "reference.safetensors",
)
print(f"gguf_reference: {len(encodings)} encodings, {len(chats)} chats, logits {list(logits.shape)} -> {args.out}")
