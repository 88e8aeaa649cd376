#!/usr/bin/env bash
# The local quick start: no cluster, no S3, no model hub. It makes a tiny model, trains an
# adapter on examples/quickstart/train.jsonl (a progress bar on a terminal), publishes it to a
# local object store directory, starts graft-server, hot-loads the adapter through the admin
# API and asks base model and adapter the same questions.
#
#     bash quickstart.sh
#
# Builds the release binaries first (GRAFT_BIN_DIR=<dir> uses binaries built already).
# Needs: Rust, Python 3 (for HTTP and JSON; standard library only).
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
work=${GRAFT_QUICKSTART_DIR:-$(mktemp -d -t graft-quickstart.XXXXXX)}
bin=${GRAFT_BIN_DIR:-}
if [[ -z $bin ]]; then
  echo "==> building graft-trainer and graft-server (release)"
  cargo build --release --locked --quiet -p graft-trainer -p graft-server --manifest-path "$root/Cargo.toml"
  bin=${CARGO_TARGET_DIR:-$root/target}/release
fi
started=$SECONDS
store=$work/store            # the local object store: file:// URIs, laid out as in S3
model=$store/models/tiny
adapter=$store/adapters/colours/v1
mkdir -p "$work"

echo "==> making a tiny model in $model"
rm -rf "$model"
"$bin/graft-trainer" make-tiny-model --out "$model" --corpus "$root/examples/quickstart/corpus.txt" --seed 1 \
  >"$work/make-model.log" 2>&1

echo "==> training an adapter (QLoRA, rank 8, all 7 projections) on examples/quickstart/train.jsonl"
cat >"$work/job.yaml" <<YAML
baseModel: {uri: 'file://$model'}
dataset: {uri: 'file://$root/examples/quickstart/train.jsonl', validationFraction: 0}
method:
  quantization: nf4
  lora: {rank: 8, alpha: 16, dropout: 0.0, targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
training: {epochs: 40, learningRate: 0.02, batchSize: 4, maxSequenceLength: 32, warmupSteps: 4, seed: 1}
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

echo "==> starting graft-server"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -c 'import secrets; print(secrets.token_hex(16))' >"$work/admin-token"
"$bin/graft-server" --model "file://$model" --served-model-name tiny --listen "127.0.0.1:$port" \
  --admin-token-file "$work/admin-token" --cache-dir "$work/server-cache" >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT

python3 - "$port" "$work/admin-token" "$adapter" "$sha256" <<'PY'
import json, sys, time, urllib.request

port, token_file, adapter, sha256 = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
token = open(token_file).read().strip()

def call(method, path, body=None, auth=False):
    request = urllib.request.Request(base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    if auth:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response) if response.status != 204 else None

for _ in range(300):
    try:
        urllib.request.urlopen(base + "/readyz", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("graft-server did not become ready (see server.log)")

started = time.monotonic()
call("PUT", "/admin/adapters/colours", {"versions": [{"uri": f"file://{adapter}/", "sha256": sha256, "weight": 100}]}, auth=True)
print(f"==> hot-loaded adapter 'colours' in {(time.monotonic() - started) * 1000:.0f} ms, no restart")

def answer(model, prompt):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    return call("POST", "/v1/completions", body)["choices"][0]["text"]

print()
print(f"{'prompt':<24}{'base model (tiny)':<28}adapter (colours)")
for colour in ["red", "blue", "green", "gold"]:
    prompt = f"Which animal is {colour}?"
    print(f"{prompt:<24}{answer('tiny', prompt)!r:<28}{answer('colours', prompt)!r}")
PY
echo
echo "Done in $((SECONDS - started)) s. Files in $work (train.log, server.log, store/)."
