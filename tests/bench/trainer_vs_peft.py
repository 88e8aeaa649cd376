#!/usr/bin/env python3
"""Training throughput and peak memory on CPU: graft-trainer against Hugging Face PEFT + torch,
side by side on the same model, data, batch, sequence length, rank and target modules.

    cargo build --release -p graft-trainer
    PYTHON=$(bash tests/oracle/venv.sh) ; $PYTHON tests/bench/trainer_vs_peft.py

The model is made by `graft-trainer make-tiny-model` (a few million parameters, random
weights, a BPE tokenizer trained on the benchmark text). Both sides train plain LoRA (DoRA
with `--dora`) in f32
with AdamW and no gradient checkpointing on `--steps` optimizer steps of `--batch` rows of
exactly `--seq` tokens; each runs in its own process, and its peak RSS is that process's
(`ru_maxrss` from wait4). Throughput counts training tokens over the training loop's wall time
(model loading excluded on both sides: graft reports it per step, the PEFT side times its loop),
and again after the first step, whose allocations fault fresh memory in on both sides.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WORDS = (
    "the a model adapter train token layer weight rank alpha cluster operator server "
    "deploy canary promote version object store bucket gradient optimizer schedule warmup "
    "cosine linear batch sequence attention head norm embedding vocabulary merge split"
).split()


def corpus(lines: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) for _ in range(lines)]


def peak_rss_of(argv: list[str], **kwargs) -> tuple[str, str, int]:
    """Runs argv to completion; returns its stdout, stderr and peak RSS in bytes (wait4's
    rusage of exactly that child)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}):\n{stderr}")
    return stdout, stderr, usage.ru_maxrss * 1024


PEFT_SIDE = textwrap.dedent(
    """
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    rows = json.load(open(args["rows"]))
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args["rank"], lora_alpha=2 * args["rank"],
        lora_dropout=0.0, target_modules=args["targets"], task_type="CAUSAL_LM",
        use_dora=args["dora"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = args["batch"]
    tokens = 0
    start = time.perf_counter()
    first = None
    for step in range(args["steps"]):
        chunk = rows[(step * batch) % len(rows):][:batch]
        ids = torch.tensor(chunk)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()
        tokens += ids.numel()
        if first is None:
            first = (tokens, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_second": tokens / elapsed,
        "steady_tokens_per_second": (tokens - first[0]) / (elapsed - first[1]),
        "loss": loss.item()}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", default=os.path.join(ROOT, "target/release/graft-trainer"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--validation", type=float, default=0.1,
        help="also run graft with this validationFraction (evaluating every 10 steps and at the "
        "epoch's end) and print its peak RSS beside the run without; 0 skips it",
    )
    parser.add_argument("--dora", action="store_true", help="DoRA (use_dora) on both sides")
    args = parser.parse_args()
    if not os.access(args.trainer, os.X_OK):
        sys.exit(f"{args.trainer} is missing: cargo build --release -p graft-trainer")

    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="graft-bench-")
    rng = random.Random(7)
    model = os.path.join(work, "model")
    corpus_file = os.path.join(work, "corpus.txt")
    with open(corpus_file, "w") as f:
        f.write("\n".join(corpus(400, rng)) + "\n")
    subprocess.run(
        [args.trainer, "make-tiny-model", "--out", model, "--corpus", corpus_file,
         "--vocab-size", str(args.vocab), "--hidden-size", str(args.hidden),
         "--intermediate-size", str(args.intermediate), "--layers", str(args.layers),
         "--heads", str(args.hidden // 32), "--kv-heads", str(args.hidden // 64),
         "--init-std", "0.02"],
        check=True, capture_output=True,
    )
    cfg = json.load(open(os.path.join(model, "config.json")))
    params = (
        2 * cfg["vocab_size"] * cfg["hidden_size"]
        + cfg["num_hidden_layers"] * (
            2 * cfg["hidden_size"] ** 2
            + 2 * cfg["hidden_size"] * cfg["num_key_value_heads"] * cfg["head_dim"]
            + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
        )
    )

    # Exactly `seq` tokens per row, the same ids on both sides: the texts are long enough to be
    # cut at `seq` tokens, and the PEFT side gets graft's tokenizer's ids (transformers'
    # tokenizer gives the same ids, which the oracle tests check).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    # Corpus lines have at least 60 words, each one or more tokens.
    lines_per_text = max(3, args.seq // 50)
    texts = [
        " ".join(corpus(lines_per_text, rng)) for _ in range(args.batch * args.steps)
    ]
    rows = [tok.encode(t).ids[: args.seq] for t in texts]
    assert all(len(r) == args.seq for r in rows), "texts too short for --seq"
    rows_file = os.path.join(work, "rows.json")
    json.dump(rows, open(rows_file, "w"))
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")

    # graft: one epoch of steps·batch rows = `steps` optimizer steps.
    config = os.path.join(work, "config.yaml")
    write_config(config, args, model, data, work, validation=0)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out, err, graft_rss = peak_rss_of(
        [args.trainer, "train", "--config", config, "--cache-dir", os.path.join(work, "cache")], env=env
    )
    steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(steps) == args.steps, f"graft ran {len(steps)} steps:\n{err}"
    # Tokens per second over the whole loop: graft's figure at the last step is cumulative.
    graft_tps = steps[-1]["tokensPerSecond"]
    # After the first step (whose allocations fault fresh pages in, on both sides): every step
    # trains batch · seq tokens, and graft's elapsed time at a step is its tokens so far over
    # its cumulative rate.
    per_step = args.batch * args.seq
    elapsed = [(i + 1) * per_step / s["tokensPerSecond"] for i, s in enumerate(steps)]
    graft_steady = (len(steps) - 1) * per_step / (elapsed[-1] - elapsed[0])
    validated_rss = None
    if args.validation > 0:
        validated = os.path.join(work, "validated.yaml")
        write_config(validated, args, model, data, os.path.join(work, "validated"), args.validation)
        out, err, validated_rss = peak_rss_of(
            [args.trainer, "train", "--config", validated, "--cache-dir", os.path.join(work, "cache2")],
            env=env,
        )
        evaluated = [
            line for line in out.splitlines()
            if line.startswith("{") and json.loads(line).get("evalLoss") is not None
        ]
        assert evaluated, f"no evaluation ran:\n{out[-2000:]}\n{err[-2000:]}"

    peft_args = json.dumps({
        "model": model, "rows": rows_file, "rank": args.rank, "targets": TARGETS, "dora": args.dora,
        "batch": args.batch, "steps": args.steps, "threads": args.threads,
    })
    out, err, peft_rss = peak_rss_of([sys.executable, "-c", PEFT_SIDE, peft_args])
    peft = json.loads(out.strip().splitlines()[-1])

    mib = 1024 * 1024
    # Both sides use every core they are given: anything else running skews the ratio (torch's
    # threads suffer more from sharing cores than graft's), so say how busy the machine was
    # (after the runs the load is the benchmark's own).
    print(f"machine load before the runs (1-minute average): {load_before:.2f} on "
          f"{os.cpu_count()} cores")
    if load_before > 0.5:
        print("warning: the machine was busy; the figures below may not be a fair comparison")
    print(f"model: {params / 1e6:.2f}M parameters ({cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']}, vocab {cfg['vocab_size']}); batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps, rank {args.rank}, 7 targets, f32, {args.threads} threads")
    print(f"{'':22}{'tokens/s':>12}{'after step 1':>14}{'peak RSS MiB':>15}")
    print(f"{'graft-trainer':22}{graft_tps:12.0f}{graft_steady:14.0f}{graft_rss / mib:15.1f}")
    print(f"{'transformers + peft':22}{peft['tokens_per_second']:12.0f}"
          f"{peft['steady_tokens_per_second']:14.0f}{peft_rss / mib:15.1f}")
    print(f"ratio graft/peft: speed {graft_tps / peft['tokens_per_second']:.2f}x "
          f"(after step 1: {graft_steady / peft['steady_tokens_per_second']:.2f}x), "
          f"memory {graft_rss / peft_rss:.2f}x")
    if validated_rss is not None:
        print(f"graft peak RSS with validationFraction {args.validation} (evaluating every 10 steps): "
              f"{validated_rss / mib:.1f} MiB, {validated_rss / graft_rss:.2f}x the run without")


def write_config(path, args, model, data, work, validation):
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            baseModel: {{uri: 'file://{model}'}}
            dataset: {{uri: 'file://{data}', validationFraction: {validation}}}
            method:
              quantization: none
              lora: {{rank: {args.rank}, alpha: {2 * args.rank}, dropout: 0, useDora: {str(args.dora).lower()}, targetModules: {json.dumps(TARGETS)}}}
            training: {{epochs: 1, learningRate: 0.001, batchSize: {args.batch},
              gradientAccumulationSteps: 1, maxSequenceLength: {args.seq}, warmupSteps: 0,
              scheduler: constant, seed: 1, checkpointEverySteps: 1000000, gradientCheckpointing: false,
              evalEverySteps: 10}}
            output: {{uri: 'file://{work}/out/'}}
            """))


if __name__ == "__main__":
    main()
