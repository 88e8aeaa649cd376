#!/usr/bin/env python3
"""What each parameter-efficient method costs, on one model, measured by one command: trainable
parameters (and their share of the base's), adapter file size, graft-trainer's training tokens/s
and peak memory, and graft-server's tokens/s with 32 clients over 32 distinct adapters of the
method against the same server's base-only figure.

    cargo build --release -p graft-trainer -p graft-server
    $(bash tests/oracle/venv.sh) tests/bench/methods.py

The model is SmolLM2-135M-Instruct as `peers.py` prepares it (an f32 Hugging Face checkpoint,
made once under `--work`). Each method trains `--steps` optimizer steps of `--batch` rows of
exactly `--seq` tokens, base unquantized (`quantization: none`, f32 on the CPU), no dropout, in
its own `graft-trainer train` process: tokens/s is graft's own figure over its training loop,
peak memory that process's peak RSS (`ru_maxrss` from wait4). The published adapter's
`graft.json` gives the trainable parameters and the file's size.

Serving: 32 adapters are made from the trained one (its tensors times 1 + 0.05·N(0, 1), a seed
each), loaded into one graft-server through its admin API, and `--clients` clients each send
`--rounds` chat completions of `--max-tokens` tokens (temperature 0, end of sequence ignored),
client i through adapter i; then the same clients through the base model, on the same server.
Tokens/s is completion tokens over the wall time of the load.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402 - the model, prompts and graft-server peer are peers.py's
from trainer_vs_peft import corpus, peak_rss_of  # noqa: E402

TARGETS = peers.TARGETS
# (label, spec.method, --max-lora-rank the served adapters need)
METHODS = [
    ("LoRA r16, all 7 projections", f"{{lora: {{rank: 16, alpha: 32, dropout: 0, targetModules: {json.dumps(TARGETS)}}}}}", 16),
    ("LoRA r8, q_proj v_proj", "{lora: {rank: 8, alpha: 16, dropout: 0, targetModules: [q_proj, v_proj]}}", 8),
    ("DoRA r16, all 7 projections", f"{{lora: {{rank: 16, alpha: 32, dropout: 0, useDora: true, targetModules: {json.dumps(TARGETS)}}}}}", 16),
    ("(IA)³ (PEFT's modules)", "{ia3: {}}", 16),
    ("prompt tuning, 20 tokens", "{promptTuning: {numVirtualTokens: 20}}", 16),
    ("P-tuning, 20 tokens, MLP 128", "{pTuning: {numVirtualTokens: 20, encoderHiddenSize: 128}}", 16),
    ("prefix tuning, 20 tokens", "{prefixTuning: {numVirtualTokens: 20}}", 16),
    ("prefix tuning, 20 tokens, MLP 128", "{prefixTuning: {numVirtualTokens: 20, prefixProjection: true, encoderHiddenSize: 128}}", 16),
    ("bottleneck, Pfeiffer, reduction 16", "{bottleneck: {placement: pfeiffer}}", 16),
    ("bottleneck, Houlsby, reduction 16", "{bottleneck: {placement: houlsby}}", 16),
]


def train(args, label: str, method: str, hf: str, data: str, work: str) -> dict:
    out = os.path.join(work, "adapter")
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""\
            baseModel: {{uri: 'file://{hf}'}}
            dataset: {{uri: 'file://{data}', validationFraction: 0}}
            method: {{quantization: none, {method[1:-1]}}}
            training: {{epochs: 1, learningRate: 0.001, batchSize: {args.batch},
              gradientAccumulationSteps: 1, maxSequenceLength: {args.seq}, warmupSteps: 0,
              scheduler: constant, seed: 1, checkpointEverySteps: 1000000}}
            output: {{uri: 'file://{out}/'}}
            resources: {{gpus: 0}}
            """))
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    stdout, stderr, rss = peak_rss_of(
        [args.trainer, "train", "--config", config, "--cache-dir", os.path.join(work, "cache")],
        env=env,
    )
    steps = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(steps) == args.steps, f"{label}: graft ran {len(steps)} steps:\n{stderr[-2000:]}"
    artifact = json.load(open(os.path.join(out, "graft.json")))["adapter"]
    return {
        "tokens_per_second": steps[-1]["tokensPerSecond"],
        "peak_rss": rss,
        "parameters": artifact["trainableParameters"],
        "file_bytes": artifact["sizeBytes"],
        "adapter": out,
    }


def copies(trained: str, count: int, work: str) -> list[tuple[str, str]]:
    """`count` distinct adapters from `trained`: its tensors times 1 + 0.05·N(0, 1)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = peers.weights_file(trained)
    tensors = load_file(weights)
    made = []
    for i in range(count):
        path = os.path.join(work, f"m{i:02d}")
        os.makedirs(path, exist_ok=True)
        shutil.copy(os.path.join(trained, "adapter_config.json"), path)
        generator = torch.Generator().manual_seed(100 + i)
        save_file({name: t * (1 + 0.05 * torch.randn(t.shape, generator=generator))
                   for name, t in tensors.items()},
                  os.path.join(path, os.path.basename(weights)), metadata={"format": "pt"})
        made.append((f"m{i:02d}", path))
    return made


def serve(args, hf: str, adapters: list[tuple[str, str]], rank: int, texts) -> tuple[float, float]:
    """Tokens/s through 32 distinct adapters, then through the base model, on one server."""
    stack = []
    try:
        server_args = argparse.Namespace(**vars(args), rank=rank)
        peer = peers.graft_peer(server_args, {"hf": hf, "adapters": adapters}, dict(os.environ), stack)
        peer.load(texts[:4], 1, 1, 8)  # warm-up
        adapted, _ = peer.load(texts, len(adapters), args.rounds, args.max_tokens)
        base, _ = peer.load(texts, 0, args.rounds, args.max_tokens)
        return adapted, base
    finally:
        for undo in reversed(stack):
            undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", default=os.path.join(peers.ROOT, "target/release/graft-trainer"))
    parser.add_argument("--graft-server", default=os.path.join(peers.ROOT, "target/release/graft-server"))
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/graft/bench/peers"))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--port", type=int, default=8461)
    parser.add_argument("--only", help="comma-separated indices of METHODS to run (all by default)")
    args = parser.parse_args()
    for binary in (args.trainer, args.graft_server):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is missing: cargo build --release -p graft-trainer -p graft-server")

    # peers.py's SmolLM2 checkpoint (its LoRA adapters too, made once; unused here).
    files = peers.prepare(argparse.Namespace(
        work=args.work, model="smollm2", rank=16, adapters=1, peers="graft",
        convert_python=None, llama_cpp_src=None))
    hf = files["hf"]
    cfg = json.load(open(os.path.join(hf, "config.json")))
    from safetensors import safe_open

    with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
        base_parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    work = tempfile.mkdtemp(prefix="graft-methods-")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
    rng = random.Random(7)
    texts = [" ".join(corpus(max(3, args.seq // 40), rng)) for _ in range(args.batch * args.steps)]
    assert all(len(tok.encode(t).ids) >= args.seq for t in texts), "texts too short for --seq"
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    prompts = peers.prompts(hf, args.clients)

    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(METHODS))
    rows = []
    try:
        for index in chosen:
            label, method, rank = METHODS[index]
            method_work = os.path.join(work, f"method-{index}")
            os.makedirs(method_work)
            trained = train(args, label, method, hf, data, method_work)
            made = copies(trained["adapter"], args.clients, os.path.join(method_work, "served"))
            adapted, base = serve(args, hf, made, rank, prompts)
            rows.append((label, trained, adapted, base))
            print(f"{label}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mib = 1024 * 1024
    print(f"model SmolLM2-135M-Instruct ({base_parameters / 1e6:.1f}M parameters, "
          f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), f32 on the CPU, "
          f"{args.threads} threads; training {args.steps} steps of {args.batch} x {args.seq} tokens; "
          f"serving {args.clients} clients x {args.rounds} rounds x {args.max_tokens} tokens")
    print("| method | trainable parameters | % of the base | adapter file | training tokens/s | "
          f"training peak RSS | serving tokens/s, {args.clients} adapters / base only | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, trained, adapted, base in rows:
        size = trained["file_bytes"]
        size_text = f"{size / mib:.2f} MiB" if size >= mib else f"{size / 1024:.1f} KiB"
        print(f"| {label} | {trained['parameters']:,} | "
              f"{100 * trained['parameters'] / base_parameters:.4f} | {size_text} | "
              f"{trained['tokens_per_second']:.0f} | {trained['peak_rss'] / mib:.0f} MiB | "
              f"{adapted:.1f} / {base:.1f} | {adapted / base:.2f} |")


if __name__ == "__main__":
    main()
