#!/usr/bin/env python3
"""Training on one NVIDIA GPU, side by side: graft-trainer (built with `--features cuda`)
against Hugging Face transformers + PEFT (+ bitsandbytes for QLoRA), on a Llama-3-8B-shaped
model with random weights, the same rows of `--seq` tokens, batch, rank 16 and all seven target
modules, layer recomputation (gradient checkpointing) on for both.

    python tests/bench/gpu/make_model.py --out $MODEL --trainer $TRAINER
    python tests/bench/gpu/trainer_vs_peft.py --model $MODEL --trainer $TRAINER

Reports tokens/s (over the training loop, model loading excluded on both sides), peak GPU
memory of each process (polled from nvidia-smi every 50 ms: the same measure for both, CUDA
context included) and MFU = 4·N·tokens/s over --peak-tflops (800 by default): forward 2N and the
input-gradient half of the backward 2N, with N the model's parameters (frozen weights get no
weight gradient).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SIDE = textwrap.dedent(
    """
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    rows = json.load(open(args["rows"]))
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}, "attn_implementation": "sdpa"}
    if args["quantization"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args["model"], **kwargs)
    if args["quantization"] == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args["rank"], lora_alpha=2 * args["rank"],
        lora_dropout=args["dropout"], target_modules=args["targets"], task_type="CAUSAL_LM"))
    eval_rows = json.load(open(args["eval_rows"]))
    def evaluate():
        model.eval()
        with torch.no_grad():
            for i in range(0, len(eval_rows), args["batch"]):
                ids = torch.tensor(eval_rows[i:i + args["batch"]], device="cuda")
                model(input_ids=ids, labels=ids).loss.item()
        model.train()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = args["batch"]
    print("ready", flush=True)
    tokens = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(args["steps"]):
        ids = torch.tensor(rows[step * batch:(step + 1) * batch], device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()
        tokens += ids.numel()
        if args["eval_every"] and (step + 1) % args["eval_every"] == 0:
            evaluate()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_second": tokens / elapsed, "loss": loss.item()}))
    """
)


class GpuMemory:
    """Peak GPU memory of one process, polled from nvidia-smi."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, 0, False
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.done:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True).stdout
            for line in out.splitlines():
                pid, used = (x.strip() for x in line.split(","))
                if pid == str(self.pid):
                    self.peak = max(self.peak, int(used))
            time.sleep(0.05)

    def stop(self) -> int:
        self.done = True
        self.thread.join()
        return self.peak


def run(argv: list[str], **kwargs) -> tuple[str, str, int]:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, **kwargs)
        memory = GpuMemory(proc.pid)
        proc.wait()
        peak = memory.stop()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{argv[0]} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return stdout, stderr, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--trainer", required=True, help="graft-trainer built with --features cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--modes", default="nf4,none", help="quantization modes to compare")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--eval-rows", type=int, default=8, help="validation rows (0: no evaluation)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every this many steps")
    args = parser.parse_args()

    import torch

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    kv = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    params = (
        2 * cfg["vocab_size"] * cfg["hidden_size"]
        + cfg["num_hidden_layers"] * (
            2 * cfg["hidden_size"] ** 2 + 2 * cfg["hidden_size"] * kv
            + 3 * cfg["hidden_size"] * cfg["intermediate_size"]
        )
    )
    device = torch.cuda.get_device_name(0)

    work = tempfile.mkdtemp(prefix="graft-gpu-bench-")
    rng = random.Random(7)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    words = "the quick brown fox jumps over the lazy dog adapter rank layer".split()
    train_count = args.batch * args.steps
    texts = [" ".join(rng.choice(words) for _ in range(args.seq * 2))
             for _ in range(train_count + args.eval_rows)]
    rows = [tok.encode(t).ids[: args.seq] for t in texts]
    assert all(len(r) == args.seq for r in rows), "texts too short for --seq"
    rows_file = os.path.join(work, "rows.json")
    json.dump(rows[:train_count], open(rows_file, "w"))
    eval_file = os.path.join(work, "eval-rows.json")
    json.dump(rows[train_count:], open(eval_file, "w"))
    # graft takes its validation split from the dataset itself.
    fraction = args.eval_rows / len(texts)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")

    results = []
    for mode in args.modes.split(","):
        config = os.path.join(work, f"config-{mode}.yaml")
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""\
                baseModel: {{uri: 'file://{args.model}'}}
                dataset: {{uri: 'file://{data}', validationFraction: {fraction}}}
                method:
                  quantization: {mode}
                  lora: {{rank: {args.rank}, alpha: {2 * args.rank}, dropout: {args.dropout}, targetModules: {json.dumps(TARGETS)}}}
                training: {{epochs: 1, learningRate: 0.0001, batchSize: {args.batch},
                  gradientAccumulationSteps: 1, maxSequenceLength: {args.seq}, warmupSteps: 0,
                  scheduler: constant, seed: 1, checkpointEverySteps: 1000000,
                  gradientCheckpointing: true{f", evalEverySteps: {args.eval_every}" if args.eval_every else ""}}}
                output: {{uri: 'file://{work}/out-{mode}/'}}
                """))
        out, err, graft_mem = run([args.trainer, "train", "--device", "cuda", "--config", config,
                                   "--cache-dir", os.path.join(work, "cache")])
        steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(steps) == args.steps, f"graft ran {len(steps)} steps:\n{err[-2000:]}"
        graft_tps = steps[-1]["tokensPerSecond"]
        peft_args = json.dumps({"model": args.model, "rows": rows_file, "rank": args.rank,
                                "targets": TARGETS, "batch": args.batch, "steps": args.steps,
                                "quantization": mode, "dropout": args.dropout,
                                "eval_rows": eval_file,
                                "eval_every": args.eval_every if args.eval_rows else 0})
        out, err, peft_mem = run([sys.executable, "-c", PEFT_SIDE, peft_args])
        peft_tps = json.loads(out.strip().splitlines()[-1])["tokens_per_second"]
        model_out = subprocess.run(
            [args.trainer, "memory-model", "--config", os.path.join(args.model, "config.json"),
             "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
             "--quantization", mode], capture_output=True, text=True).stdout
        print(model_out)
        results.append((mode, graft_tps, graft_mem, peft_tps, peft_mem))

    mfu = lambda tps: 4 * params * tps / (args.peak_tflops * 1e12)
    print(f"device: {device}; model {params / 1e9:.2f}B parameters; batch {args.batch} x {args.seq} "
          f"tokens, {args.steps} steps, rank {args.rank}, 7 targets, bf16 compute, dropout "
          f"{args.dropout}, {args.eval_rows} validation rows every {args.eval_every} steps")
    print(f"{'':28}{'tokens/s':>10}{'peak MiB':>10}{'MFU':>8}")
    for mode, g_tps, g_mem, p_tps, p_mem in results:
        label = "QLoRA (nf4)" if mode == "nf4" else "LoRA (bf16)"
        print(f"{'graft ' + label:28}{g_tps:10.0f}{g_mem:10d}{mfu(g_tps):8.1%}")
        print(f"{'peft ' + label:28}{p_tps:10.0f}{p_mem:10d}{mfu(p_tps):8.1%}")
        print(f"  ratio graft/peft: speed {g_tps / p_tps:.2f}x, memory {g_mem / max(p_mem, 1):.2f}x")


if __name__ == "__main__":
    main()
