#!/usr/bin/env python3
"""Tightens the OCI runtime config `umoci unpack` derives from an image, the way the chart's
pods run: read-only root filesystem, no capabilities, no privilege escalation, the image's own
user (refused if it is root), and emptyDir-like tmpfs mounts.

    runspec.py BUNDLE IMAGE_CONFIG [--tmpfs /tmp] [--bind HOST:CONTAINER[:ro]] [--host-network]
        [--env NAME=VALUE] [--entrypoint PATH] -- ARGS...

IMAGE_CONFIG is the image's config (`skopeo inspect --config`); ARGS replace its Cmd (what
follows its Entrypoint), as a pod's `args` do; --entrypoint replaces the Entrypoint, as `command`.
"""

import argparse
import json
import sys


def main():
    a = argparse.ArgumentParser()
    a.add_argument("bundle")
    a.add_argument("image_config")
    a.add_argument("--tmpfs", action="append", default=[])
    a.add_argument("--bind", action="append", default=[])
    a.add_argument("--host-network", action="store_true")
    a.add_argument("--env", action="append", default=[], help="NAME=VALUE, as a pod's env")
    a.add_argument("--entrypoint", help="replace the image's Entrypoint too (a pod's `command`)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = a.parse_args(argv[:split])
    args.args = argv[split + 1:]

    path = f"{args.bundle}/config.json"
    with open(path) as f:
        spec = json.load(f)
    with open(args.image_config) as f:
        entrypoint = json.load(f)["config"].get("Entrypoint") or []
    process = spec["process"]
    user = process["user"]
    if user.get("uid", 0) == 0 or user.get("gid", 0) == 0:
        sys.exit(f"{args.bundle}: the image runs as root ({user})")

    process["args"] = ([args.entrypoint] if args.entrypoint else entrypoint) + args.args
    names = {e.split("=", 1)[0] for e in args.env}
    process["env"] = [e for e in process["env"] if e.split("=", 1)[0] not in names] + args.env
    process["terminal"] = False
    process["noNewPrivileges"] = True
    process["capabilities"] = {k: [] for k in ["bounding", "effective", "inheritable", "permitted", "ambient"]}
    process.pop("rlimits", None)
    spec["root"]["readonly"] = True
    for target in args.tmpfs:
        spec["mounts"].append({"destination": target, "type": "tmpfs", "source": "tmpfs",
                               "options": ["nosuid", "nodev", "mode=1777", "size=256m"]})
    for bind in args.bind:
        host, target, *mode = bind.split(":")
        spec["mounts"].append({"destination": target, "type": "bind", "source": host,
                               "options": ["rbind", "nosuid", "nodev", *(mode or ["rw"])]})
    if args.host_network:
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)


if __name__ == "__main__":
    main()
