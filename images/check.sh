#!/usr/bin/env bash
# CI's proof that the images are real and run, without a container engine:
#  1. builds every image (images/build.sh);
#  2. requires that no binary names a path of this machine;
#  3. unpacks each CPU image (umoci) and runs it under runc as its own non-root user, with a
#     read-only root filesystem and no capabilities: the operator's `crd` (equal to crds/) and
#     `--help`; the trainer's `make-tiny-model` and a short `train` into a mounted directory;
#     the server on that model answering /readyz, a completion, and one with the new adapter;
#  4. runs the dynamic loader inside each CUDA image over its binary and libraries (as ldd does):
#     everything resolves but the driver's libcuda.so.1;
#  5. pushes each CPU image to a local registry with skopeo and reads the same digest back;
#  6. builds every image again and requires the same digests and the same archives;
#  7. checks that the chart's default images are the ones built.
# Disk: about 4 GB at most with the CUDA images (they are taken one at a time).
#
#     bash images/check.sh          # all five images
#     bash images/check.sh --cpu    # the CPU images only
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"
build_args=("$@")
registry=${GRAFT_IMAGE_REGISTRY:-ghcr.io/graft-dev}
version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]["version"])')

missing=()
for tool in umoci:umoci skopeo:skopeo runc:runc docker-registry:docker-registry; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  apt-get update -qq
  # The registry's package would start it as a service; nothing is started here but ours.
  policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    policy=/usr/sbin/policy-rc.d
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [[ -z $policy ]] || rm -f "$policy"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/graft-images-check.XXXXXX")
containers=()
registry_pid=
cleanup() {
  local id
  for id in "${containers[@]}"; do runc delete --force "$id" >/dev/null 2>&1 || true; done
  [[ -z $registry_pid ]] || kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "images/check: $*" >&2; exit 1; }
step() { echo "--- $*" >&2; }

# --- 1. build ---------------------------------------------------------------------------------
step "build"
bash images/build.sh "${build_args[@]}" --out "$work/a"
out=$work/a
(cd "$out" && sha256sum -- *.oci.tar *.spdx.json images.txt) >"$work/sums"

# Unpacks an image archive into a runtime bundle; the image's config goes to <bundle>.image.json
# and the runtime config umoci derived from it to <bundle>.spec.json.
unpack() { # archive bundle
  local tag
  mkdir -p "$2.layout"
  tar -xf "$1" -C "$2.layout"
  tag=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$2.layout/index.json")
  umoci unpack --image "$2.layout:$tag" "$2" >/dev/null
  skopeo inspect --config "oci-archive:$1" >"$2.image.json"
  cp "$2/config.json" "$2.spec.json"
  rm -rf "$2.layout"
}

# The bundle's runtime config: umoci's, tightened by runspec.py with the given options.
spec() { # bundle runspec-options...
  local bundle=$1
  shift
  cp "$bundle.spec.json" "$bundle/config.json"
  python3 "$here/runspec.py" "$bundle" "$bundle.image.json" "$@"
}

# What every image must be: user 65532 in its config and in /etc/passwd, no shell, and no
# executable but its binary and the dynamic loader.
check_rootfs() { # bundle binary
  local rootfs=$1/rootfs
  python3 - "$1.image.json" <<'EOF' || fail "$1: the image's user is not 65532:65532"
import json, sys
sys.exit(json.load(open(sys.argv[1]))["config"].get("User") != "65532:65532")
EOF
  grep -qx 'graft:x:65532:65532:graft:/tmp:/sbin/nologin' "$rootfs/etc/passwd" || fail "$1: no user 65532"
  local found
  found=$(find "$rootfs" \( -name sh -o -name bash -o -name dash -o -name ash -o -name busybox \) -print)
  [[ -z $found ]] || fail "$1 has a shell: $found"
  found=$(find "$rootfs" -type f -perm /111 ! -name '*.so*' ! -path "*/usr/local/bin/$2" -print)
  [[ -z $found ]] || fail "$1 has executables besides $2: $found"
  [[ -s $rootfs/etc/ssl/certs/ca-certificates.crt ]] || fail "$1 has no CA certificates"
}

# runc, as root, starting the container as the image's user (65532) with the tightened spec.
run() { # id bundle
  containers+=("$1")
  runc run --bundle "$2" "$1"
}

# --- 2. no machine paths ---------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-$root/target}
no_machine_paths() { # bundle
  local bin path
  for bin in "$1"/rootfs/usr/local/bin/*; do
    for path in "$root" "$target" "${CARGO_HOME:-$HOME/.cargo}" "$HOME/.cache"; do
      ! grep -qaF "$path/" "$bin" || fail "$bin names $path"
    done
  done
}

# --- 3. the CPU images run -------------------------------------------------------------------
operator=$work/graft-operator-$version
trainer=$work/graft-trainer-$version
server=$work/graft-server-$version
step "the CPU images: user 65532, no shell, no machine paths"
for b in "$operator" "$trainer" "$server"; do
  unpack "$out/$(basename "$b").oci.tar" "$b"
  check_rootfs "$b" "$(basename "${b%-"$version"}")"
  no_machine_paths "$b"
done

step "graft-operator: crd, --help"
spec "$operator" -- crd
run "graft-check-$$-crd" "$operator" >"$work/crd.yaml"
diff -q crds/graft.yaml "$work/crd.yaml" >/dev/null || fail "the image's graft-operator crd differs from crds/graft.yaml"
spec "$operator" -- --help
run "graft-check-$$-help" "$operator" >"$work/help.txt"
grep -q '^Usage: graft-operator' "$work/help.txt" || fail "graft-operator --help: $(cat "$work/help.txt")"

step "graft-trainer: make-tiny-model, train into a mounted directory"
data=$work/data
mkdir -p "$data"
cp examples/quickstart/corpus.txt examples/quickstart/train.jsonl "$data/"
cat >"$data/job.yaml" <<'YAML'
baseModel: {uri: 'file:///data/model'}
dataset: {uri: 'file:///data/train.jsonl', validationFraction: 0}
method: {quantization: nf4, lora: {rank: 4, alpha: 8, targetModules: [q_proj, v_proj]}}
training: {epochs: 1, learningRate: 0.02, batchSize: 4, maxSequenceLength: 32, seed: 1}
output: {uri: 'file:///data/adapter/'}
YAML
touch "$work/termination-log"
chown -R 65532:65532 "$data" "$work/termination-log"
# Kubernetes' emptyDirs: directories anyone may write.
emptydir() { mkdir -m 0777 "$work/$1" && echo "$work/$1"; }
spec "$trainer" --bind "$data:/data" --tmpfs /tmp --bind "$(emptydir trainer-cache):/var/cache/graft" \
  -- make-tiny-model --out /data/model --corpus /data/corpus.txt --seed 1
run "graft-check-$$-model" "$trainer" >"$work/model.log" 2>&1 || fail "make-tiny-model: $(cat "$work/model.log")"
[[ -s $data/model/config.json && -s $data/model/model.safetensors ]] || fail "make-tiny-model wrote no model"
spec "$trainer" --bind "$data:/data" --bind "$work/termination-log:/dev/termination-log" \
  --tmpfs /tmp --bind "$(emptydir trainer-cache-2):/cache" --env GRAFT_CACHE_DIR=/cache \
  -- train --config /data/job.yaml
run "graft-check-$$-train" "$trainer" >"$work/train.log" 2>&1 || fail "train: $(tail -5 "$work/train.log")"
adapter_sha=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["adapter"]["sha256"])' \
  "$work/termination-log") || fail "train's termination message: $(cat "$work/termination-log")"
[[ -s $data/adapter/graft.json ]] || fail "train published no adapter"
[[ $(sha256sum <"$data/adapter/adapter_model.safetensors" | cut -d' ' -f1) == "$adapter_sha" ]] ||
  fail "the adapter's sha256 is not the one the termination message gives"

step "graft-server: /readyz, a completion, a hot-loaded adapter's completion"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/admin"
echo "check-$$-token" >"$work/admin/token"
chown -R 65532:65532 "$work/admin"
spec "$server" --host-network --bind "$data:/data:ro" \
  --bind "$work/admin:/etc/graft/admin:ro" --tmpfs /tmp --bind "$(emptydir server-cache):/var/cache/graft" \
  -- --model file:///data/model --served-model-name tiny --listen "127.0.0.1:$port" \
  --admin-token-file /etc/graft/admin/token
containers+=("graft-check-$$-server")
runc run --bundle "$server" "graft-check-$$-server" >"$work/server.log" 2>&1 &
python3 - "$port" "check-$$-token" "$adapter_sha" <<'EOF' || fail "the server in its image: $(tail -20 "$work/server.log")"
import json, sys, time, urllib.request

port, token, sha = sys.argv[1:]
base = f"http://127.0.0.1:{port}"

def call(method, path, body=None, headers={}):
    req = urllib.request.Request(base + path, method=method, headers={"content-type": "application/json", **headers},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read()

deadline = time.time() + 60
while True:
    try:
        if call("GET", "/readyz")[0] == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("no /readyz within 60 s")
    time.sleep(0.2)
for model in ["tiny", "colours"]:
    if model == "colours":
        admin = {"Authorization": f"Bearer {token}"}
        versions = {"versions": [{"uri": "file:///data/adapter/", "sha256": sha, "weight": 100}]}
        call("PUT", "/admin/adapters/colours", versions, admin)
    status, body = call("POST", "/v1/completions",
                        {"model": model, "prompt": "Which animal is red?", "max_tokens": 4, "temperature": 0})
    answer = json.loads(body)
    assert status == 200 and answer["model"] == model and answer["usage"]["completion_tokens"] > 0, answer
    print(f"    {model}: {answer['choices'][0]['text']!r}", file=sys.stderr)
EOF
runc kill "graft-check-$$-server" TERM
wait

# --- 4. the CUDA images' libraries -----------------------------------------------------------
for name in graft-trainer graft-server; do
  archive=$out/$name-$version-cuda.oci.tar
  [[ -e $archive ]] || continue
  step "$name (CUDA): user 65532, no shell, no machine paths; the loader resolves all but libcuda"
  bundle=$work/$name-$version-cuda
  unpack "$archive" "$bundle"
  check_rootfs "$bundle" "$name"
  no_machine_paths "$bundle"
  for file in "/usr/local/bin/$name" $(cd "$bundle/rootfs" && ls usr/lib/x86_64-linux-gnu/lib*.so*); do
    # What ldd does: the loader, told to trace, lists each library and where it found it
    # (its --list option stops at the first missing one instead).
    spec "$bundle" --env LD_TRACE_LOADED_OBJECTS=1 --entrypoint /lib64/ld-linux-x86-64.so.2 -- "/${file#/}"
    run "graft-check-$$-ldd" "$bundle" >"$work/ldd.txt" 2>&1 || true
    runc delete --force "graft-check-$$-ldd" >/dev/null 2>&1 || true
    unresolved=$(grep -v '=> /' "$work/ldd.txt" | grep -v -e '^\s*/lib64/ld-linux' -e 'linux-vdso' \
      -e '^\s*libcuda.so.1 => not found$' || true)
    [[ -z $unresolved ]] || fail "$name (CUDA) $file: $unresolved"
    if [[ $file == /usr/local/bin/* ]]; then
      grep -q 'libcuda.so.1 => not found' "$work/ldd.txt" || fail "$name (CUDA) does not link libcuda"
      echo "    $(grep -c '=> /' "$work/ldd.txt") libraries resolved in the image: $(grep -o 'lib[a-zA-Z0-9_+-]*\.so[.0-9]*' "$work/ldd.txt" | sort -u | paste -sd' ')" >&2
    fi
  done
  rm -rf "$bundle"
done

# --- 5. a registry ---------------------------------------------------------------------------
step "skopeo copy to a registry, and the digest read back"
reg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$reg_port}
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
python3 - "$reg_port" <<'EOF' || fail "the registry did not start: $(cat "$work/registry.log")"
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
while read -r name tag digest _; do
  [[ $tag == "$version" ]] || continue
  skopeo copy --quiet --dest-tls-verify=false "oci-archive:$out/$name-$tag.oci.tar" \
    "docker://127.0.0.1:$reg_port/graft-dev/$name:$tag"
  pushed=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://127.0.0.1:$reg_port/graft-dev/$name:$tag")
  [[ $pushed == "$digest" ]] || fail "$name: the registry has $pushed, the archive $digest"
  echo "    $name:$tag $digest" >&2
done <"$out/images.txt"

# --- 6. reproducible -----------------------------------------------------------------------
step "build again: the same commit must give the same images"
rm -rf "$work"/graft-* "$out"/*-cuda.oci.tar
bash images/build.sh "${build_args[@]}" --out "$work/b"
diff "$out/images.txt" "$work/b/images.txt" || fail "the second build's digests differ"
(cd "$work/b" && sha256sum --check --quiet "$work/sums") || fail "the second build's files differ"
rm -rf "$work/b"

# --- 7. the chart names these images ---------------------------------------------------------
step "the chart's default images are these"
python3 - "$registry" "$version" <<'EOF' || fail "charts/graft does not default to the images built"
import re, sys
registry, version = sys.argv[1:]
values = open("charts/graft/values.yaml").read()
chart = open("charts/graft/Chart.yaml").read()
assert re.search(rf'^appVersion: "?{re.escape(version)}"?$', chart, re.M), "appVersion"
for key, want in [("repository", f"{registry}/graft-operator"), ("trainerImage", f"{registry}/graft-trainer:{version}"),
                  ("repository", f"{registry}/graft-server")]:
    assert re.search(rf"^\s+{key}: {re.escape(want)}$", values, re.M), want
EOF

echo "images:" >&2
awk '{printf "  %-15s %-12s %s  %6.1f MB compressed, %7.1f MB unpacked\n", $1, $2, $3, $4 / 1e6, $5 / 1e6}' \
  "$out/images.txt" >&2
