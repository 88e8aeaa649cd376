#!/usr/bin/env bash
# Builds Graft's container images without a container engine: OCI image archives of
# graft-operator, graft-trainer and graft-server (CPU) and graft-trainer, graft-server (CUDA),
# from the release binaries, on a root filesystem holding only what they need from Debian 12
# (images/debian.lock) and, for CUDA, NVIDIA's PyPI wheels (cuda/toolkit.txt).
#
#     bash images/build.sh              # all five images into ${CARGO_TARGET_DIR:-target}/images
#     bash images/build.sh --cpu        # the three CPU images (no CUDA toolkit, no nvcc)
#     bash images/build.sh --out DIR
#
# Each image is DIR/<name>-<tag>.oci.tar (an OCI image layout in a tar, for
# `skopeo copy oci-archive:…`) with its SBOM, DIR/<name>-<tag>.spdx.json, beside it;
# DIR/images.txt lists name, tag, digest and sizes. The same commit gives the same digests
# (images/README.md says how). GRAFT_IMAGE_REGISTRY (ghcr.io/graft-dev) names the images.
# Needs umoci, dpkg-deb, readelf, python3 and GNU tar; as root it installs what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"
umask 022
export LC_ALL=C TZ=UTC

variants=(cpu cuda)
out=${CARGO_TARGET_DIR:-$root/target}/images
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) variants=(cpu) ;;
    --out) out=$2; shift ;;
    *) echo "usage: $0 [--cpu] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

cache=${GRAFT_CACHE_DIR:-$HOME/.cache/graft}
registry=${GRAFT_IMAGE_REGISTRY:-ghcr.io/graft-dev}
# Every time in the images is the commit's (or SOURCE_DATE_EPOCH's, if set).
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
# shellcheck source=images/release-flags.sh
source "$here/release-flags.sh"
read -r version source license < <(python3 -c '
import tomllib
p = tomllib.load(open("Cargo.toml", "rb"))["workspace"]["package"]
print(p["version"], p["repository"], p["license"])')
revision=$(git rev-parse HEAD)
[[ -z $(git status --porcelain --untracked-files=no) ]] || revision+=-dirty
log() { echo "images: $*" >&2; }

apt_updated=
apt() {
  [[ -n $apt_updated ]] || { apt-get update -qq >&2; apt_updated=1; }
  apt-get "$@"
}
need() { # command, the Debian package that has it
  command -v "$1" >/dev/null && return
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "images: $1 is missing (apt-get install $2)" >&2
    exit 1
  fi
  apt install -y -qq --no-install-recommends "$2" >&2
}
need umoci umoci
need dpkg-deb dpkg
need readelf binutils
need strip binutils

work=$(mktemp -d "${TMPDIR:-/tmp}/graft-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# --- binaries ------------------------------------------------------------------------------
# Builds, then copies each binary to $work/bin/<variant>/ at once (the CPU and CUDA builds
# write the same target/release/graft-{trainer,server}), without its symbol table: a fifth of
# its size, and nvcc names its objects' symbols after temporary files (tmpxft_<pid>_…), which
# no two builds share. Panics still say where; backtraces show addresses.
release_bins() { # variant, cargo build arguments...
  local variant=$1 name path
  shift
  mkdir -p "$work/bin/$variant"
  cargo build --locked --message-format=json-render-diagnostics "$@" |
    python3 "$here/oci.py" cargo-bins >"$work/bins-$variant"
  while IFS=$'\t' read -r name path; do
    strip --strip-all -o "$work/bin/$variant/$name" "$path"
  done <"$work/bins-$variant"
}
log "release binaries (CPU)"
release_bins cpu --release -p graft-operator -p graft-trainer -p graft-server --bins
if [[ " ${variants[*]} " == *" cuda "* ]]; then
  log "release binaries (CUDA; cuda/check.sh builds the same, so after it this is a no-op)"
  # shellcheck source=cuda/env.sh
  (source cuda/env.sh && release_bins cuda "${cuda[@]}" --bins --test cuda)
  cuda_root=$(bash cuda/toolkit.sh)
fi
cpu_bins=(graft-operator graft-trainer graft-server)
cuda_bins=(graft-trainer graft-server)

# --- Debian packages -------------------------------------------------------------------------
debs=$cache/images/debian
mkdir -p "$debs" "$work/deb"
fetch_deb() { # name version arch sha256 file
  local tmp
  tmp=$(mktemp -d "$debs/.fetch.XXXXXX")
  if ! (cd "$tmp" && apt download -qq -o APT::Sandbox::User=root "$1=$2" >&2); then
    rm -rf "$tmp"
    echo "images: $1 $2 is not in the Debian archive apt sees; bash images/debian-lock.sh pins what is" >&2
    exit 1
  fi
  mv "$tmp"/*.deb "$5"
  rmdir "$tmp"
}
mapfile -t lock_pkgs < <(awk '!/^#/ {print $1}' "$here/debian.lock")
while read -r name deb_version arch sha256; do
  file=$debs/${name}_${deb_version//:/%3a}_$arch.deb
  if ! echo "$sha256  $file" | sha256sum --check --status 2>/dev/null; then
    log "downloading $name $deb_version"
    fetch_deb "$name" "$deb_version" "$arch" "$sha256" "$file"
    echo "$sha256  $file" | sha256sum --check --quiet
  fi
  dpkg-deb -x "$file" "$work/deb/$name"
  dpkg-deb -f "$file" >"$work/deb/$name.control"
done < <(grep -v '^#' "$here/debian.lock")

# --- root filesystems ----------------------------------------------------------------------
# Where a library comes from: "<package> <path in the image> <file here>". Debian's files keep
# their paths; the CUDA wheels' libraries go to /usr/lib/x86_64-linux-gnu, which the dynamic
# loader searches without a cache.
locate_lib() {
  local so=$1 dir pkg
  for pkg in "${lock_pkgs[@]}"; do
    for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
      if [[ -e $work/deb/$pkg/$dir/$so ]]; then
        echo "$pkg $dir/$so $work/deb/$pkg/$dir/$so"
        return
      fi
    done
  done
  if [[ -n ${cuda_root:-} && -e $cuda_root/lib/$so ]]; then
    echo "$(wheel_of "$so") usr/lib/x86_64-linux-gnu/$so $cuda_root/lib/$so"
    return
  fi
  echo "images: no package in images/debian.lock (or CUDA wheel) has $so" >&2
  exit 1
}
wheel_of() {
  case $1 in
    libcublas*) echo nvidia-cublas ;;
    libcurand*) echo nvidia-curand ;;
    libnvrtc*) echo nvidia-cuda-nvrtc ;;
    libcudart*) echo nvidia-cuda-runtime ;;
    *) echo "images: which wheel has $1? (images/build.sh: wheel_of)" >&2; exit 1 ;;
  esac
}
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }

# Every library the given ELF files need, transitively, as locate_lib lines. The driver's
# libcuda is the node's (the NVIDIA container runtime mounts it), never the image's.
closure() {
  local -A seen=()
  local queue=("$@") file so line
  while [[ ${#queue[@]} -gt 0 ]]; do
    file=${queue[0]}
    queue=("${queue[@]:1}")
    for so in $(needed "$file"); do
      [[ -z ${seen[$so]:-} && $so != libcuda.so.1 ]] || continue
      line=$(locate_lib "$so")
      seen[$so]=$line
      echo "$line"
      queue+=("${line##* }")
    done
  done
}

# Files every image has: the user, name resolution, CA certificates, os-release, the dynamic
# loader. The user is 65532 (the chart and the operator's pods run as it); its home is /tmp, the
# only place a pod with a read-only root filesystem may write.
base_files() {
  local r=$1
  mkdir -p "$r/etc/ssl/certs" "$r/tmp" "$r/var/cache/graft" "$r/lib64" "$r/usr/lib"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'graft:x:65532:65532:graft:/tmp:/sbin/nologin' >"$r/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'graft:x:65532:' >"$r/etc/group"
  echo 'hosts: files dns' >"$r/etc/nsswitch.conf"
  # What update-ca-certificates would make of every certificate the package ships.
  local crt
  for crt in "$work"/deb/ca-certificates/usr/share/ca-certificates/mozilla/*.crt; do
    cat "$crt"
    [[ $(tail -c1 "$crt") == "" ]] || echo
  done >"$r/etc/ssl/certs/ca-certificates.crt"
  cp "$work/deb/base-files/usr/lib/os-release" "$r/usr/lib/os-release"
  ln -s ../usr/lib/os-release "$r/etc/os-release"
  ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$r/lib64/ld-linux-x86-64.so.2"
  chmod 1777 "$r/tmp"
  chown 65532:65532 "$r/var/cache/graft"
  echo "base-files ca-certificates"
}

# Copies a closure's libraries into a root filesystem; prints the packages they came from.
install_libs() {
  local r=$1 pkg dest src
  while read -r pkg dest src; do
    mkdir -p "$r/$(dirname "$dest")"
    cp -L "$src" "$r/$dest"
    echo "$pkg"
  done
}

# dpkg's record (scanners read /var/lib/dpkg/status.d, as in distroless images) and the
# copyright file of each Debian package with files in the image.
package_records() {
  local r=$1 pkg doc
  mkdir -p "$r/var/lib/dpkg/status.d"
  for pkg; do
    [[ -e $work/deb/$pkg.control ]] || continue
    cp "$work/deb/$pkg.control" "$r/var/lib/dpkg/status.d/$pkg"
    # libgcc-s1 and libstdc++6 point their doc directory at gcc-12-base's.
    doc=$work/deb/$pkg/usr/share/doc/$pkg
    if [[ -L $doc ]]; then doc=$work/deb/$(readlink "$doc")/usr/share/doc/$(readlink "$doc"); fi
    mkdir -p "$r/usr/share/doc/$pkg"
    cp "$doc/copyright" "$r/usr/share/doc/$pkg/copyright"
  done
}

debian_list() { # packages → "name version arch" lines for the SBOM
  local pkg
  for pkg; do
    [[ -e $work/deb/$pkg.control ]] || continue
    awk -v n="$pkg" '/^Version:/ {v = $2} /^Architecture:/ {a = $2} END {print n, v, a}' \
      "$work/deb/$pkg.control"
  done
}

# Fixed owners, modes and times: a layer's bytes depend on its content alone.
normalize() {
  chmod -R u+rwX,go+rX,go-w "$1"
  chmod 1777 "$1/tmp" 2>/dev/null || true
  find "$1" -exec touch -h -d "@$epoch" {} +
}

# --- image assembly --------------------------------------------------------------------------
layout=$work/oci
umoci init --layout "$layout"
umoci new --image "$layout:empty"

# add_layer <from-tag> <to-tag> <what> <directory>: <to-tag> is <from-tag> plus one layer
# holding the directory's files. The directory is used up (hard-linked into the bundle, then
# removed: the CUDA libraries are most of a gigabyte).
add_layer() {
  local bundle=$work/bundle
  umoci tag --image "$layout:$1" "$2"
  rm -rf "$bundle"
  umoci unpack --image "$layout:$2" "$bundle" >/dev/null
  cp -al "$4/." "$bundle/rootfs/"
  rm -rf "$4"
  normalize "$bundle/rootfs"
  umoci repack --image "$layout:$2" --history.created "$created" \
    --history.created_by "images/build.sh: $3" "$bundle"
  rm -rf "$bundle"
}

describe() {
  case $1 in
    graft-operator) echo "Graft's Kubernetes operator: FineTuneJob and AdapterDeployment reconcilers" ;;
    graft-trainer) echo "Graft's LoRA / QLoRA trainer, run by FineTuneJobs" ;;
    graft-server) echo "Graft's OpenAI-compatible server of a base model and hot-swapped LoRA adapters" ;;
  esac
}

# The CPU base: what the three CPU binaries link, and the files every image has.
mkdir -p "$work/rootfs/base"
closure "${cpu_bins[@]/#/$work/bin/cpu/}" | sort -u >"$work/base-closure"
base_pkgs=$(
  base_files "$work/rootfs/base"
  install_libs "$work/rootfs/base" <"$work/base-closure"
)
base_pkgs=$(echo "$base_pkgs" | tr ' ' '\n' | sort -u)
# shellcheck disable=SC2086
package_records "$work/rootfs/base" $base_pkgs
add_layer empty base "Debian 12 libraries, CA certificates, user graft (65532)" "$work/rootfs/base"

if [[ -n ${cuda_root:-} ]]; then
  # The CUDA layer: the CUDA libraries the binaries link, and what those link that the base
  # lacks (the static kernels' libstdc++, glibc's compatibility stubs).
  mkdir -p "$work/rootfs/cuda"
  closure "${cuda_bins[@]/#/$work/bin/cuda/}" | sort -u >"$work/cuda-closure"
  while read -r pkg dest src; do
    grep -q " $dest " "$work/base-closure" || echo "$pkg $dest $src"
  done <"$work/cuda-closure" | install_libs "$work/rootfs/cuda" | sort -u >"$work/cuda-pkgs"
  # shellcheck disable=SC2046
  package_records "$work/rootfs/cuda" $(grep -vxF "$base_pkgs" "$work/cuda-pkgs")
  awk '{print $1}' "$work/cuda-closure" | sort -u | grep '^nvidia-' | while read -r wheel; do
    grep -E "^$wheel==" cuda/toolkit.txt | sed 's/==/ /'
  done >"$work/wheels"
  add_layer base cuda-base "CUDA 13.0 libraries from PyPI ($(awk '{print $1}' "$work/wheels" | paste -sd' '))" \
    "$work/rootfs/cuda"
fi

echo -n >"$out/images.txt"
for variant in "${variants[@]}"; do
  if [[ $variant == cpu ]]; then
    bins=("${cpu_bins[@]}") from=base tag=$version suffix='' features=() wheels=() cuda_pkgs=()
  else
    bins=("${cuda_bins[@]}") from=cuda-base tag=$version-cuda suffix=", CUDA 13"
    wheels=(--wheels "$work/wheels")
    mapfile -t cuda_pkgs <"$work/cuda-pkgs"
  fi
  for name in "${bins[@]}"; do
    image=$registry/$name:$tag
    log "$image"
    # The SBOM: the crates `cargo tree` resolves for this binary with this variant's features.
    [[ $variant == cpu ]] || features=(--features "$name/cuda")
    cargo tree --locked --quiet -p "$name" "${features[@]}" -e normal,no-proc-macro \
      --prefix none --format '{p}|{l}' >"$work/crates"
    # shellcheck disable=SC2086
    debian_list $base_pkgs "${cuda_pkgs[@]}" | sort -u >"$work/debian"
    app=$work/rootfs/$name-$variant
    mkdir -p "$app/usr/local/bin" "$app/usr/share/graft"
    cp "$work/bin/$variant/$name" "$app/usr/local/bin/$name"
    python3 "$here/sbom.py" --image "$image" --binary "$name" --version "$version" \
      --revision "$revision" --source "$source" --license "$license" --created "$created" \
      --crates "$work/crates" --debian "$work/debian" "${wheels[@]}" \
      --out "$app/usr/share/graft/sbom.spdx.json"
    cp "$app/usr/share/graft/sbom.spdx.json" "$out/$name-$tag.spdx.json"
    add_layer "$from" "$name-$variant" "$name" "$app"

    config=(--config.user 65532:65532 --config.entrypoint "/usr/local/bin/$name"
      --config.env PATH=/usr/local/bin --config.env HOME=/tmp
      --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt)
    case $name in
      graft-operator) config+=(--config.cmd run) ;;
      graft-server) config+=(--config.exposedports 8000/tcp --config.env GRAFT_CACHE_DIR=/var/cache/graft) ;;
      graft-trainer) config+=(--config.env GRAFT_CACHE_DIR=/var/cache/graft) ;;
    esac
    if [[ $variant == cuda ]]; then
      # The NVIDIA container runtime refuses a driver older than CUDA 13.0 with this reason;
      # GKE mounts the driver's libraries under /usr/local/nvidia.
      config+=(--config.env "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
        --config.env "NVIDIA_REQUIRE_CUDA=cuda>=13.0"
        --config.env LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib)
    fi
    annotations=(
      "org.opencontainers.image.title=$name"
      "org.opencontainers.image.description=$(describe "$name")$suffix"
      "org.opencontainers.image.version=$tag"
      "org.opencontainers.image.revision=$revision"
      "org.opencontainers.image.source=$source"
      "org.opencontainers.image.url=$source"
      "org.opencontainers.image.licenses=$license"
      "org.opencontainers.image.created=$created"
    )
    for a in "${annotations[@]}"; do
      config+=(--config.label "$a" --manifest.annotation "$a")
    done
    umoci config --image "$layout:$name-$variant" --no-history --created "$created" \
      --author "Graft" "${config[@]}"

    archive=$out/$name-$tag.oci.tar
    python3 "$here/oci.py" export "$layout" "$name-$variant" "$tag" "$image" \
      "$epoch" "$archive"
    read -r digest compressed unpacked < <(python3 "$here/oci.py" describe "$archive")
    printf '%s %s %s %s %s\n' "$name" "$tag" "$digest" "$compressed" "$unpacked" >>"$out/images.txt"
  done
done
log "done: $out"
awk '{printf "  %-15s %-12s %s  %5.1f MB compressed, %6.1f MB unpacked\n", $1, $2, $3, $4 / 1e6, $5 / 1e6}' \
  "$out/images.txt" >&2
