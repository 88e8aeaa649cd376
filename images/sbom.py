#!/usr/bin/env python3
"""Writes an image's SBOM as SPDX 2.3 JSON: the image contains one Graft binary, the Debian
packages its files come from and, for CUDA images, NVIDIA's PyPI wheels; the binary depends on
the Rust crates `cargo tree` lists for it (normal dependencies, no build scripts or proc-macros:
what is compiled into it).

    sbom.py --image NAME:TAG --binary graft-server --version 0.1.0 --revision SHA \
        --source URL --license Apache-2.0 --created 2024-01-01T00:00:00Z \
        --crates crates.txt --debian debian.txt [--wheels wheels.txt] --out sbom.spdx.json

crates.txt: `cargo tree --prefix none --format '{p}|{l}'` output; debian.txt: lines of
"name version architecture"; wheels.txt: lines of "name version". The output depends on its
inputs alone (no clock, no random namespace), so it is as reproducible as the image.
"""

import argparse
import hashlib
import json
import re

CRATE = re.compile(r"^(?P<name>\S+) v(?P<version>\S+)(?: \((?P<path>[^)]*)\))?\|(?P<license>.*?)(?: \(\*\))?$")


def spdx_id(*parts):
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", "-".join(parts))


def package(ident, name, version, *, purl=None, license="NOASSERTION", supplier="NOASSERTION",
            location="NOASSERTION", purpose=None):
    p = {
        "SPDXID": ident,
        "name": name,
        "versionInfo": version,
        "supplier": supplier,
        "downloadLocation": location,
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": license,
        "copyrightText": "NOASSERTION",
    }
    if purl:
        p["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl}]
    if purpose:
        p["primaryPackagePurpose"] = purpose
    return p


def crates(path):
    seen = {}
    with open(path) as f:
        for line in f:
            m = CRATE.match(line.strip())
            if m:
                seen[(m["name"], m["version"])] = (m["path"], m["license"] or "NOASSERTION")
    return seen


def spdx_license(expression):
    # Cargo's older "MIT/Apache-2.0" form is an SPDX OR.
    return expression.replace("/", " OR ") if expression else "NOASSERTION"


def main():
    a = argparse.ArgumentParser()
    for flag in ["image", "binary", "version", "revision", "source", "license", "created",
                 "crates", "debian", "out"]:
        a.add_argument(f"--{flag}", required=True)
    a.add_argument("--wheels")
    args = a.parse_args()

    image_id = spdx_id("image", args.image)
    binary_id = spdx_id("binary", args.binary)
    vcs = f"git+{args.source}@{args.revision}"
    packages = [
        package(image_id, args.image, args.image.rsplit(":", 1)[1], license=args.license,
                supplier="Organization: Graft", location=vcs, purpose="CONTAINER"),
        package(binary_id, args.binary, args.version, license=args.license,
                supplier="Organization: Graft", location=vcs, purpose="APPLICATION"),
    ]
    relationships = [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
         "relatedSpdxElement": image_id},
        {"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": binary_id},
    ]

    for (name, version), (path, license) in sorted(crates(args.crates).items()):
        if name == args.binary:
            continue
        ident = spdx_id("crate", name, version)
        if path:  # a crate of this workspace
            packages.append(package(ident, name, version, license=spdx_license(license),
                                    supplier="Organization: Graft", location=vcs,
                                    purpose="LIBRARY"))
        else:
            packages.append(package(
                ident, name, version, license=spdx_license(license),
                purl=f"pkg:cargo/{name}@{version}",
                location=f"https://crates.io/api/v1/crates/{name}/{version}/download",
                purpose="LIBRARY"))
        relationships.append({"spdxElementId": binary_id, "relationshipType": "DEPENDS_ON",
                              "relatedSpdxElement": ident})

    with open(args.debian) as f:
        for name, version, arch in sorted(tuple(line.split()) for line in f if line.strip()):
            ident = spdx_id("deb", name, version)
            purl = f"pkg:deb/debian/{name}@{version.replace(':', '%3A')}?arch={arch}&distro=debian-12"
            packages.append(package(ident, name, version, purl=purl, supplier="Organization: Debian",
                                    purpose="LIBRARY"))
            relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS",
                                  "relatedSpdxElement": ident})

    if args.wheels:
        with open(args.wheels) as f:
            for name, version in sorted(tuple(line.split()) for line in f if line.strip()):
                ident = spdx_id("pypi", name, version)
                packages.append(package(ident, name, version, purl=f"pkg:pypi/{name}@{version}",
                                        supplier="Organization: NVIDIA Corporation",
                                        location=f"https://pypi.org/project/{name}/{version}/",
                                        purpose="LIBRARY"))
                relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS",
                                      "relatedSpdxElement": ident})

    body = json.dumps([packages, relationships], sort_keys=True).encode()
    document = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": args.image,
        # Unique per content, and the same for the same content.
        "documentNamespace": f"{args.source}/spdx/{args.image.replace(':', '/')}/"
                             f"{hashlib.sha256(body).hexdigest()[:32]}",
        "creationInfo": {"created": args.created, "creators": ["Tool: graft-images-sbom"]},
        "packages": packages,
        "relationships": relationships,
    }
    with open(args.out, "w") as f:
        json.dump(document, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
