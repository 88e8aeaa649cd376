#!/usr/bin/env bash
# Builds (or finds cached) the real binaries the integration tests run:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm, an
# S3-protocol server, and argocd-lua (Argo CD's Lua runtime, for the shipped health checks). Everything is built from the registries (Go module proxy, crates.io),
# never downloaded as a prebuilt binary, and cached by version outside the work tree:
#   ${GRAFT_TOOLS_DIR:-$HOME/.cache/graft/tools}/<tool>-<version>/
# A second run with the same versions rebuilds nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/controlplane/versions.env
source "$here/versions.env"
tools=${GRAFT_TOOLS_DIR:-$HOME/.cache/graft/tools}
mkdir -p "$tools"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
jobs=$(nproc)

log() { printf '[install] %s\n' "$*" >&2; }

# have DIR BIN...: true when every BIN is already in DIR.
have() {
  local dir=$1; shift
  for b in "$@"; do [[ -x "$dir/$b" ]] || return 1; done
}

# Builds into a temporary directory and renames it into place, so an interrupted build
# never leaves a half-filled cache entry that a later run would trust.
finish() { rm -rf "$2"; mv "$1" "$2"; }

build_kubernetes() {
  local v=$KUBERNETES_VERSION dest="$tools/kubernetes-$KUBERNETES_VERSION"
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  if have "$dest" "${bins[@]}"; then log "kubernetes $v cached"; return; fi
  log "building kubernetes $v (${bins[*]})"
  local work; work=$(mktemp -d)
  local minor=${v#v1.}; minor=${minor%%.*}
  local staging="v0.${v#v1.}"
  # k8s.io/kubernetes points every k8s.io/* staging module at ./staging; a wrapper module
  # replaces each of them with its published v0.X.Y twin so the main module builds.
  local gomod; gomod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  {
    echo "module graft.dev/tools/kubernetes"
    echo
    grep -E '^go [0-9.]+$' "$gomod"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
      | awk -v s="$staging" '{print "replace " $1 " => " $1 " " s}'
  } >"$work/go.mod"
  local pkgs=() b
  for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # @version on every package: a bare `go get pkg` would upgrade k8s.io/kubernetes to latest.
  (cd "$work" && go get "${pkgs[@]/%/@$v}" >/dev/null)
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  mkdir -p "$work/bin"
  (cd "$work" && go build -p "$jobs" -trimpath -ldflags "$ld" -o "$work/bin/" "${pkgs[@]}")
  finish "$work/bin" "$dest"
  rm -rf "$work"
}

build_etcd() {
  local v=$ETCD_VERSION dest="$tools/etcd-$ETCD_VERSION"
  if have "$dest" etcd; then log "etcd $v cached"; return; fi
  log "building etcd $v"
  local work; work=$(mktemp -d)
  # etcd's server module carries replace directives, so `go install pkg@v` refuses it;
  # a wrapper module builds it unchanged.
  printf 'module graft.dev/tools/etcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$v" >"$work/go.mod"
  (cd "$work" && go get "go.etcd.io/etcd/server/v3@$v" >/dev/null)
  mkdir -p "$work/bin"
  (cd "$work" && go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$work/bin/etcd" go.etcd.io/etcd/server/v3)
  finish "$work/bin" "$dest"
  rm -rf "$work"
}

build_helm() {
  local v=$HELM_VERSION dest="$tools/helm-$HELM_VERSION"
  if have "$dest" helm; then log "helm $v cached"; return; fi
  log "building helm $v"
  local work; work=$(mktemp -d)
  GOBIN="$work/bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$v"
  finish "$work/bin" "$dest"
  rm -rf "$work"
}

build_s3() {
  local v=$S3S_FS_VERSION dest="$tools/s3s-fs-$S3S_FS_VERSION"
  if have "$dest" s3s-fs; then log "s3s-fs $v cached"; return; fi
  log "building s3s-fs $v"
  local work; work=$(mktemp -d)
  CARGO_TARGET_DIR="$work/target" cargo install --quiet --locked --root "$work/root" \
    --features binary --version "=$v" s3s-fs
  finish "$work/root/bin" "$dest"
  rm -rf "$work"
}

# promtool checks the chart's alerting rules in CI (tests/monitoring/check.sh). Only the rule
# checker is built, without Prometheus' service-discovery plugins (`remove_all_sd`), which are
# most of its dependencies.
build_promtool() {
  local v=$PROMETHEUS_VERSION dest="$tools/prometheus-$PROMETHEUS_VERSION"
  if have "$dest" promtool; then log "promtool $v cached"; return; fi
  log "building promtool $v"
  local work; work=$(mktemp -d)
  # Prometheus' go.mod carries a replace directive, so `go install pkg@v` refuses it; a
  # wrapper module builds it unchanged, as for etcd.
  printf 'module graft.dev/tools/promtool\n\ngo 1.25\n\nrequire github.com/prometheus/prometheus %s\n' "$v" >"$work/go.mod"
  (cd "$work" && go get "github.com/prometheus/prometheus/cmd/promtool@$v" >/dev/null)
  mkdir -p "$work/bin"
  (cd "$work" && go build -p "$jobs" -trimpath -tags remove_all_sd -ldflags "-s -w" \
    -o "$work/bin/promtool" github.com/prometheus/prometheus/cmd/promtool)
  finish "$work/bin" "$dest"
  rm -rf "$work"
}

build_argocd_lua() {
  local v=$GOPHER_LUA_VERSION dest="$tools/argocd-lua-$GOPHER_LUA_VERSION-r$ARGOCD_LUA_REVISION"
  if have "$dest" argocd-lua; then log "argocd-lua $v cached"; return; fi
  log "building argocd-lua (gopher-lua $v)"
  local work; work=$(mktemp -d)
  cp "$here/argocd-lua/main.go" "$work/"
  printf 'module graft.dev/tools/argocd-lua\n\ngo 1.22\n' >"$work/go.mod"
  (cd "$work" && go get "github.com/yuin/gopher-lua@$v" >/dev/null)
  mkdir -p "$work/bin"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$work/bin/argocd-lua" .)
  finish "$work/bin" "$dest"
  rm -rf "$work"
}

t0=$SECONDS
# `install.sh promtool` builds only promtool; without arguments, the test harness's tools.
if [[ ${1:-} == promtool ]]; then
  build_promtool
else
  build_argocd_lua
  build_etcd
  build_kubernetes
  build_helm
  build_s3
fi
log "tools ready in $tools ($((SECONDS - t0)) s)"
