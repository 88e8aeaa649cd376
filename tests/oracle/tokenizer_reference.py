"""Records what Hugging Face transformers makes of the tiny model that the engine's own maker
(graft_trainer::tiny::write_tiny_model) wrote, for trainer-image/tests/tiny_made.rs:

    engine/tests/data/tiny/made/tokenizer_reference.json
        token ids (with and without special tokens) and decodes of texts; chat templates
        rendered, tokenized and with assistant masks; extra templates exercising the Jinja
        features chat templates use (tojson, namespace, Python string methods, ...)
    engine/tests/data/tiny/made/reference.safetensors
        input_ids and the logits LlamaForCausalLM.from_pretrained computes for them

The directory must exist first (GRAFT_BLESS_TINY=1 cargo test -p graft-trainer --test
tiny_made made_directory). Then:

    .venv/bin/pip install torch transformers safetensors
    .venv/bin/python tests/oracle/tokenizer_reference.py
"""

import json
import pathlib

import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

DIR = pathlib.Path(__file__).resolve().parents[2] / "engine/tests/data/tiny/made"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading,   runs   of spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand \r\n carriage returns",
    "Ünïcödé café naïve — “quotes”",
    "日本語のテキスト",
    "emoji 😀🚀 and a skin tone 👍🏽 and a flag 🇫🇷",
    "",
    " ",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "words never seen: zyxwvut qqqq",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Japan? 日本"},
        {"role": "assistant", "content": "  Tokyo 🗼 — 東京.\n\n"},
    ],
    [
        {"role": "user", "content": "  write code\n"},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
]

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <b>\"there\"</b> & 'you' \\ é 😀\n\ttab"},
    {"role": "assistant", "content": "  Hello!  "},
]

# Features of the Jinja environment transformers renders templates in.
TEMPLATES = [
    "{{ messages | tojson }}",
    "{{ messages[1] | tojson(indent=2) }}",
    "{{ messages[0] | tojson(indent=4, sort_keys=true) }}",
    "{{ messages[1].content | tojson(ensure_ascii=true) }}",
    "{{ [1, 2.0, 0.1, 1e-07, 1e16, none, true, false, [], {}] | tojson }}",
    "{{ {'b': 1, 'a': [1, {'c': none}]} | tojson(separators=[',', ':']) }}",
    "{% set ns = namespace(users=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.users = ns.users + 1 %}{% endif %}{{ loop.index0 }}:{{ m.role | upper }}"
    "{% if not loop.last %}, {% endif %}{% endfor %} users={{ ns.users }}",
    "{% for m in messages %}{{ m['content'].strip().split(' ') | join('_') }}|"
    "{{ m.content.startswith('Hi') }}|{{ m.content | length }}|{{ m.role.title() }}"
    "|{{ m.content.rstrip().endswith('!') }}|{{ m.content.replace('e', 'E') }}\n{% endfor %}",
    "{% for key, value in messages[0].items() %}{{ key }}={{ value }};{% endfor %}",
    "{{ add_generation_prompt }} {{ none }} {{ tools }} {{ documents is none }} {{ 3 / 2 }} {{ 7 // 2 }}",
    "  {% for m in messages %}\n    {{ m.role }}\n  {% endfor %}\n\n",
    "{%- for m in messages -%}\n  [{{- m.role -}}]  \n{%- endfor %}\n",
    "{{ messages | map(attribute='role') | join(',') }} {{ messages | length }} "
    "{{ (messages | last).content | trim }} {{ messages[1:] | length }}",
    "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}"
    "{% if m.role == 'user' %}{% break %}{% endif %}{% endfor %}",
    # A Llama 3 shaped template: system prompt split off, headers, content trimmed.
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = 'Default system.' %}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>system\\n\\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|im_end|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n\\n'+ message['content'] | trim + '<|im_end|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n\\n' }}\n"
    "{%- endif %}\n",
]


def ids_of(result):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(result["input_ids"] if hasattr(result, "keys") else result)


tokenizer = AutoTokenizer.from_pretrained(DIR)
texts = []
for text in TEXTS:
    ids = tokenizer(text)["input_ids"]
    texts.append(
        {
            "text": text,
            "ids": ids,
            "ids_without_special": tokenizer(text, add_special_tokens=False)["input_ids"],
            "decoded": tokenizer.decode(ids),
            "decoded_skipping_special": tokenizer.decode(ids, skip_special_tokens=True),
        }
    )

chats = []
for messages in CHATS:
    for add_generation_prompt in (False, True):
        case = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "rendered": tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            ),
            "ids": ids_of(
                tokenizer.apply_chat_template(
                    messages, tokenize=True, add_generation_prompt=add_generation_prompt
                )
            ),
            "assistant_masks": None,
        }
        if not add_generation_prompt and any(m["role"] == "assistant" for m in messages):
            # Uses the template's {% generation %} tags, as TRL's assistant-only loss does.
            encoded = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            assert list(encoded["input_ids"]) == case["ids"]
            case["assistant_masks"] = list(encoded["assistant_masks"])
        chats.append(case)

templates = []
for template in TEMPLATES:
    for add_generation_prompt in (False, True):
        templates.append(
            {
                "template": template,
                "messages": MESSAGES,
                "add_generation_prompt": add_generation_prompt,
                "rendered": tokenizer.apply_chat_template(
                    MESSAGES,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                ),
            }
        )

config = transformers.AutoConfig.from_pretrained(DIR)
assert len(tokenizer) == config.vocab_size, (len(tokenizer), config.vocab_size)
reference = {
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "vocab_size": len(tokenizer),
    "eos_token_id": tokenizer.eos_token_id,
    "texts": texts,
    "chats": chats,
    "templates": templates,
}
(DIR / "tokenizer_reference.json").write_text(
    json.dumps(reference, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
)

model = LlamaForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()
torch.manual_seed(0)
input_ids = torch.randint(0, config.vocab_size, (2, 13))
input_ids[0, :] = torch.tensor(ids_of(tokenizer.apply_chat_template(CHATS[2], tokenize=True))[:13])
with torch.no_grad():
    logits = model(input_ids=input_ids).logits
save_file(
    {"input_ids": input_ids.to(torch.int64), "logits": logits.contiguous()},
    DIR / "reference.safetensors",
    metadata={"transformers": transformers.__version__, "torch": torch.__version__},
)
print(DIR, len(texts), "texts", len(chats), "chats", len(templates), "templates", tuple(logits.shape))
