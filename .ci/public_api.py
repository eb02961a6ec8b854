#!/usr/bin/env python3
"""The public API of the `firebrand` crate, from rustdoc's JSON, checked two ways.

1. No public item names a type or trait of the crates that are the library's own business
   (quinn, rustls, rcgen, bincode, ring): they stay private dependencies, free to change.
2. The list of public items, and of the public types that implement `serde::Serialize`, equals
   the committed snapshot `runtime/public-api.txt`, so that a change to the public API is a
   change to a reviewed file. `--bless` rewrites the snapshot.

Items under `#[doc(hidden)]` (`firebrand::internals`) are not public API and rustdoc leaves
them out. rustdoc's JSON output is unstable; `RUSTC_BOOTSTRAP=1` lets stable rustdoc write it.
"""
import json
import os
import subprocess
import sys

PRIVATE_DEPENDENCIES = {
    "quinn", "quinn_proto", "quinn_udp", "rustls", "rustls_pki_types", "tokio_rustls",
    "rcgen", "bincode", "ring",
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "runtime", "public-api.txt")


def rustdoc_json():
    env = dict(os.environ, RUSTC_BOOTSTRAP="1")
    subprocess.run(
        ["cargo", "rustdoc", "-q", "-p", "firebrand", "--features", "fly,kubernetes", "--",
         "-Z", "unstable-options", "--output-format", "json"],
        cwd=ROOT, env=env, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    with open(os.path.join(target, "doc", "firebrand.json")) as f:
        return json.load(f)


def references(value):
    """The ids of the paths (types, traits) a piece of an item's JSON names."""
    if isinstance(value, dict):
        if "path" in value and "id" in value and "args" in value:
            yield value["id"]
        for inner in value.values():
            yield from references(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from references(inner)


def main():
    doc = rustdoc_json()
    index, paths = doc["index"], doc["paths"]
    crates = {int(k): v["name"] for k, v in doc["external_crates"].items()}

    def crate_of(id_):
        entry = paths.get(str(id_))
        return crates.get(entry["crate_id"]) if entry and entry["crate_id"] else None

    # Walk what is reachable from the crate's root: modules' items, re-exports, and the
    # impls, fields, variants and associated items of what they hold.
    seen, named, problems, serialize = set(), [], [], []
    stack = [(doc["root"], "firebrand")]
    while stack:
        id_, path = stack.pop()
        if id_ in seen or str(id_) not in index:
            continue
        seen.add(id_)
        item = index[str(id_)]
        (kind, inner), = item["inner"].items()
        if kind == "impl" and (inner.get("blanket_impl") or inner.get("is_synthetic")):
            continue
        if kind == "use":
            if inner.get("id") is not None:
                target = index.get(str(inner["id"]))
                if target is None:
                    owner = crate_of(inner["id"])
                    if owner in PRIVATE_DEPENDENCIES:
                        problems.append(f"{path}::{inner['name']} re-exports {owner}'s {inner['source']}")
                    named.append(f"use {path}::{inner['name']} = {inner['source']}")
                else:
                    stack.append((inner["id"], f"{path}::{inner['name']}" if not inner["is_glob"] else path))
            continue
        if kind != "impl":
            named.append(f"{kind} {path}")
        for ref in references({k: v for k, v in inner.items() if k not in ("items", "impls", "implementations", "variants")}):
            owner = crate_of(ref)
            if owner in PRIVATE_DEPENDENCIES:
                problems.append(f"{kind} {path} names {owner}'s {'::'.join(paths[str(ref)]['path'])}")
        if kind == "impl":
            trait = inner.get("trait")
            if trait and paths.get(str(trait["id"]), {}).get("path", [])[-1:] == ["Serialize"]:
                serialize.append(path)
        children = []
        if kind == "module":
            children = inner["items"]
        elif kind in ("struct", "enum", "union"):
            children = inner.get("impls", []) + inner.get("variants", [])
            fields = inner.get("kind", {})
            if isinstance(fields, dict):
                for shape in fields.values():
                    if isinstance(shape, dict):
                        children += [f for f in shape.get("fields", []) if f is not None]
                    elif isinstance(shape, list):
                        children += [f for f in shape if f is not None]
        elif kind == "trait":
            children = inner["items"]
        elif kind == "impl":
            children = inner["items"]
        for child in children:
            name = index.get(str(child), {}).get("name")
            stack.append((child, f"{path}::{name}" if name else path))

    lines = sorted(set(named)) + [f"impl Serialize for {p}" for p in sorted(set(serialize))]
    snapshot = "".join(line + "\n" for line in lines)
    if problems:
        print("public items name private dependencies' types:", *sorted(set(problems)), sep="\n  ")
    if "--bless" in sys.argv:
        with open(SNAPSHOT, "w") as f:
            f.write(snapshot)
        print(f"wrote {SNAPSHOT}: {len(lines)} lines")
    else:
        with open(SNAPSHOT) as f:
            committed = f.read()
        if committed != snapshot:
            import difflib
            sys.stdout.writelines(difflib.unified_diff(
                committed.splitlines(True), snapshot.splitlines(True),
                "runtime/public-api.txt (committed)", "public API (this tree)"))
            print("the public API changed: review it, then `python3 .ci/public_api.py --bless`")
            sys.exit(1)
        print(f"public API: {len(lines)} lines, as in runtime/public-api.txt")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
