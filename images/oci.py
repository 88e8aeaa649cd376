#!/usr/bin/env python3
"""The parts of images/build.sh that are easier in Python than in shell.

    cargo build --message-format=json … | oci.py cargo-bins      # "name<TAB>path" per binary
    oci.py export LAYOUT TAG REF_NAME FULL_NAME MTIME OUT.tar     # one image as an oci-archive
    oci.py describe ARCHIVE                                       # "digest compressed uncompressed"

`export` writes a byte-for-byte reproducible archive: only the blobs of that image, sorted,
with fixed owners, modes and mtimes, so equal images give equal files, not only equal digests.
"""

import hashlib
import io
import json
import struct
import sys
import tarfile

INDEX = "application/vnd.oci.image.index.v1+json"


def cargo_bins():
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("reason") != "compiler-artifact" or not message.get("executable"):
            continue
        if message["target"]["kind"] == ["bin"]:
            print(f"{message['target']['name']}\t{message['executable']}")


def blob_path(layout, digest):
    algorithm, hexdigest = digest.split(":", 1)
    return f"{layout}/blobs/{algorithm}/{hexdigest}"


def read_json(path):
    with open(path, "rb") as f:
        return json.load(f)


def manifest_of(layout, tag):
    for descriptor in read_json(f"{layout}/index.json")["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return descriptor
    sys.exit(f"{layout} has no image tagged {tag}")


def export(layout, tag, ref_name, full_name, mtime, out):
    descriptor = manifest_of(layout, tag)
    manifest = read_json(blob_path(layout, descriptor["digest"]))
    digests = [descriptor["digest"], manifest["config"]["digest"]]
    digests += [layer["digest"] for layer in manifest["layers"]]
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [
            {
                "mediaType": descriptor["mediaType"],
                "digest": descriptor["digest"],
                "size": descriptor["size"],
                "annotations": {
                    # The tag, as OCI layouts name images; containerd and `docker load` read
                    # the full name from the second.
                    "org.opencontainers.image.ref.name": ref_name,
                    "io.containerd.image.name": full_name,
                },
            }
        ],
    }
    mtime = int(mtime)

    def entry(name, size=0, directory=False):
        info = tarfile.TarInfo(name)
        info.mtime = mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        info.mode = 0o755 if directory else 0o644
        info.size = size
        return info

    def add_bytes(tar, name, data):
        tar.addfile(entry(name, len(data)), io.BytesIO(data))

    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
        tar.addfile(entry("blobs", directory=True))
        tar.addfile(entry("blobs/sha256", directory=True))
        for digest in sorted(set(digests)):
            path = blob_path(layout, digest)
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(0)
                tar.addfile(entry(f"blobs/sha256/{digest.split(':', 1)[1]}", size), f)


def describe(archive):
    """The image digest, its compressed size (what a pull moves) and its unpacked size."""
    with tarfile.open(archive) as tar:

        def blob(digest):
            return tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")

        index = json.load(tar.extractfile("index.json"))
        descriptor = index["manifests"][0]
        manifest = json.load(blob(descriptor["digest"]))
        compressed = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
        unpacked = 0
        for layer in manifest["layers"]:
            f = blob(layer["digest"])
            sha, tail = hashlib.sha256(), b""
            while chunk := f.read(1 << 20):
                sha.update(chunk)
                tail = (tail + chunk)[-4:]
            if sha.hexdigest() != layer["digest"].split(":", 1)[1]:
                sys.exit(f"{archive}: layer {layer['digest']} does not match its digest")
            # gzip's trailer holds the uncompressed size modulo 2^32; layers stay below 4 GiB.
            unpacked += struct.unpack("<I", tail)[0]
    print(descriptor["digest"], compressed, unpacked)


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "cargo-bins":
        cargo_bins()
    elif command == "export":
        export(*args)
    elif command == "describe":
        describe(*args)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
