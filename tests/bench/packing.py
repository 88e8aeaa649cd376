#!/usr/bin/env python3
"""Training throughput with `training.packing` against without, on a dataset of mixed lengths:
the same model, the same examples, the same epochs, batch size and sequence length.

    cargo build --release -p graft-trainer
    PYTHON=$(bash tests/oracle/venv.sh) ; $PYTHON tests/bench/packing.py

The model is made by `graft-trainer make-tiny-model` (random weights, a BPE tokenizer trained
on the benchmark text). The examples' lengths are drawn from a log-normal distribution (most
short, a long tail up to `--seq`), as chat and instruction datasets are. Unpacked, each batch
is padded to its longest example; packed, rows of up to `--seq` tokens hold several examples
each; `groupByLength` (unpacked, batches of similar lengths) is run too, as the other way
to cut padding. Tokens/s counts real tokens only (the trainer's `tokensPerSecond` counts no padding),
over the training loop's wall time (model loading excluded); both runs train the same real
tokens, so the ratio of tokens/s is the ratio of training times.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORDS = (
    "the a model adapter train token layer weight rank alpha cluster operator server "
    "deploy canary promote version object store bucket gradient optimizer schedule warmup "
    "cosine linear batch sequence attention head norm embedding vocabulary merge split"
).split()


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def run(trainer: str, config: str, cache: str, env: dict) -> tuple[list[dict], str]:
    proc = subprocess.run(
        [trainer, "train", "--config", config, "--cache-dir", cache],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"graft-trainer failed ({proc.returncode}):\n{proc.stderr}")
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return steps, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", default=os.path.join(ROOT, "target/release/graft-trainer"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=512, help="maxSequenceLength")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--median", type=int, default=64, help="median example length, tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not os.access(args.trainer, os.X_OK):
        sys.exit(f"{args.trainer} is missing: cargo build --release -p graft-trainer")

    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="graft-packing-bench-")
    rng = random.Random(7)
    model = os.path.join(work, "model")
    corpus_file = os.path.join(work, "corpus.txt")
    with open(corpus_file, "w") as f:
        f.write("\n".join(words(rng.randint(60, 120), rng) for _ in range(400)) + "\n")
    subprocess.run(
        [args.trainer, "make-tiny-model", "--out", model, "--corpus", corpus_file,
         "--vocab-size", str(args.vocab), "--hidden-size", str(args.hidden),
         "--intermediate-size", str(args.intermediate), "--layers", str(args.layers),
         "--heads", str(args.hidden // 32), "--kv-heads", str(args.hidden // 64),
         "--init-std", "0.02"],
        check=True, capture_output=True,
    )

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    # Log-normal lengths (σ 0.9: a tenth of the examples over 3x the median), at least 8
    # tokens, cut at `seq` as the trainer cuts them.
    targets = [
        max(8, round(args.median * math.exp(rng.gauss(0, 0.9)))) for _ in range(args.examples)
    ]
    texts, lengths = [], []
    for target in targets:
        text = words(target, rng)
        while len(tok.encode(text).ids) < min(target, args.seq):
            text += " " + words(8, rng)
        ids = tok.encode(text).ids
        lengths.append(min(len(ids), args.seq))
        texts.append(text)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    results = {}
    for name, packing, grouped in (
        ("unpacked", False, False),
        ("grouped", False, True),
        ("packed", True, False),
    ):
        config = os.path.join(work, f"{name}.yaml")
        write_config(config, args, model, data, os.path.join(work, name), packing, grouped)
        steps, stderr = run(args.trainer, config, os.path.join(work, f"cache-{name}"), env)
        rows = len(lengths)
        for line in stderr.splitlines():
            if "packed" in line and "rows" in line:
                rows = int(line.split(" into ")[1].split()[0])
        results[name] = {
            "steps": len(steps),
            "rows": rows,
            # Cumulative at the last step: real tokens over the loop's wall time.
            "tps": steps[-1]["tokensPerSecond"],
            "loss": steps[-1]["loss"],
        }

    real = sum(lengths) * args.epochs
    print(f"machine load before the runs (1-minute average): {load_before:.2f} on "
          f"{os.cpu_count()} cores")
    if load_before > 0.5:
        print("warning: the machine was busy; the figures below may be noisy")
    lengths.sort()
    print(f"dataset: {len(lengths)} examples, {sum(lengths)} tokens, lengths {lengths[0]}.."
          f"{lengths[-1]} (median {lengths[len(lengths) // 2]}), maxSequenceLength {args.seq}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; rank "
          f"{args.rank} on 7 targets, f32, batch {args.batch}, {args.epochs} epoch(s), "
          f"{args.threads} threads")
    print(f"{'':12}{'rows':>8}{'steps':>8}{'real tokens/s':>16}{'seconds':>10}{'last loss':>11}")
    for name, r in results.items():
        print(f"{name:12}{r['rows']:8}{r['steps']:8}{r['tps']:16.0f}{real / r['tps']:10.1f}"
              f"{r['loss']:11.3f}")
    packed = results["packed"]["tps"]
    print(f"ratio packed/unpacked: {packed / results['unpacked']['tps']:.2f}x real tokens/s "
          f"(packed/groupByLength: {packed / results['grouped']['tps']:.2f}x)")


def write_config(path, args, model, data, work, packing, grouped):
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            baseModel: {{uri: 'file://{model}'}}
            dataset: {{uri: 'file://{data}', validationFraction: 0}}
            method:
              quantization: none
              lora: {{rank: {args.rank}, alpha: {2 * args.rank}, dropout: 0, targetModules: {json.dumps(TARGETS)}}}
            training: {{epochs: {args.epochs}, learningRate: 0.001, batchSize: {args.batch},
              gradientAccumulationSteps: 1, maxSequenceLength: {args.seq}, warmupSteps: 0,
              scheduler: constant, seed: 1, checkpointEverySteps: 1000000,
              gradientCheckpointing: false, packing: {str(packing).lower()},
              groupByLength: {str(grouped).lower()}}}
            output: {{uri: 'file://{work}/out/'}}
            """))


if __name__ == "__main__":
    main()
