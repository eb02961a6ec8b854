#!/usr/bin/env python3
"""Fails on an import cycle among a crate's modules.

At every folder of `src`, the folder's children (each file, and each sub-folder taken whole;
`lib.rs` and `mod.rs`, the folder's own module, aside) are the nodes, and X -> Y when code in X
names an item defined in Y: through `use`, or a path written inline (`crate::a::b`,
`super::x`). A re-export (`pub use`) is followed to where the item is defined, so importing
a sibling's type through the parent module counts as importing the sibling. A cycle among the
nodes of any folder fails the check: at `src` itself that is the crate's top-level modules
(module level), below it the files of one module (file level).

Test code (`#[cfg(test)] mod ...` and files only such a declaration names) is left out.

usage: import_cycles.py CRATE_SRC...
"""
import os
import re
import sys

ITEM = re.compile(
    r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+|extern\s+\"C\"\s+)*"
    r"(?:fn|struct|enum|trait|type|const|static|union|mod|macro_rules!)\s+([A-Za-z_][A-Za-z0-9_]*)",
    re.M)
USE = re.compile(r"^\s*(?:#\[[^\]]*\]\s*)*(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M)
INLINE = re.compile(r"(?<![A-Za-z0-9_:])([A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*([;{])")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    # String literals can hold `crate::` in messages: blank them.
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def expand(tree):
    """The paths of a use tree, with the name each binds: `a::{b, c::{d as e}, f::*}` ->
    (a::b, b), (a::c::d, e), (a::f, None)."""
    tree = re.sub(r"\s*(::|\{|\}|,)\s*", r"\1", tree.strip())
    out = []

    def walk(prefix, rest):
        if rest.startswith("{"):
            depth, start = 0, 1
            for i, ch in enumerate(rest):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        walk(prefix, rest[start:i])
                        return
                elif ch == "," and depth == 1:
                    walk(prefix, rest[start:i])
                    start = i + 1
            return
        if not rest:
            return
        head, sep, tail = rest.partition("::")
        if sep:
            walk(prefix + [head], tail)
            return
        parts = head.split()
        if parts[0] == "*":
            out.append((prefix, None))
        elif parts[0] == "self":
            out.append((prefix, parts[-1] if len(parts) == 3 else prefix[-1]))
        else:
            out.append((prefix + [parts[0]], parts[-1] if len(parts) == 3 else parts[0]))

    walk([], tree)
    return [(p, a) for p, a in out if p]


class Crate:
    def __init__(self, src):
        self.src = os.path.abspath(src)
        self.modules = {}  # module path (tuple) -> file
        self.tests = set()
        self.load(("crate",), os.path.join(self.src, "lib.rs"))

    def load(self, path, file):
        if not os.path.exists(file):
            return
        self.modules[path] = file
        text = strip_comments(open(file).read())
        tests = {m.group(1) for m in TEST_MOD.finditer(text)}
        folder = os.path.dirname(file) if os.path.basename(file) in ("lib.rs", "mod.rs") \
            else os.path.join(os.path.dirname(file), os.path.basename(file)[:-3])
        for m in re.finditer(r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text, re.M):
            name = m.group(1)
            if name in tests:
                continue
            for child in (os.path.join(folder, name + ".rs"), os.path.join(folder, name, "mod.rs")):
                if os.path.exists(child):
                    self.load(path + (name,), child)
                    break

    def code(self, path):
        text = strip_comments(open(self.modules[path]).read())
        m = TEST_MOD.search(text)
        if m and m.group(2) == "{":
            text = text[:m.start()]
        return text

    def absolute(self, module, segments, names=None):
        """`segments` as written in `module`, from the crate's root; None for a path into
        another crate. `names` are what the module's own `use` items bind."""
        segments = list(segments)
        if segments[0] == "crate":
            return segments
        if segments[0] in ("super", "self"):
            base = list(module)
            while segments and segments[0] in ("super", "self"):
                if segments.pop(0) == "super":
                    base = base[:-1]
            return base + segments
        if tuple(module) + (segments[0],) in self.modules:
            return list(module) + segments
        if names and segments[0] in names and names[segments[0]] != segments:
            return names[segments[0]] + segments[1:]
        return None

    def uses(self, module):
        """name -> absolute path, for the `use` items of `module` into this crate."""
        names = {}
        for m in USE.finditer(self.code(module)):
            for path, alias in expand(m.group(2)):
                full = self.absolute(module, path)
                if full and alias:
                    names[alias] = full
        return names

    def resolve(self, full, depth=0):
        """The module that defines what the absolute path `full` names, or None."""
        best = None
        for n in range(len(full), 0, -1):
            if tuple(full[:n]) in self.modules:
                best = n
                break
        if best is None:
            return None
        module = tuple(full[:best])
        rest = full[best:]
        if not rest or depth > 8:
            return module
        name = rest[0]
        defined = set(ITEM.findall(self.code(module)))
        if name in defined:
            return module
        reexported = self.uses(module).get(name)
        if reexported:
            return self.resolve(reexported + rest[1:], depth + 1) or module
        return module

    def edges(self):
        for module in self.modules:
            text = self.code(module)
            names = self.uses(module)
            paths = list(names.values())
            for m in USE.finditer(text):
                paths += [full for full in (self.absolute(module, p) for p, a in expand(m.group(2)) if a is None) if full]
            body = USE.sub("", text)
            for m in INLINE.finditer(body):
                full = self.absolute(module, m.group(1).split("::"), names)
                if full:
                    paths.append(full)
            for full in paths:
                target = self.resolve(full)
                if target and target != module:
                    yield module, target, "::".join(full)


def cycles(crate):
    found = []
    graphs = {}
    why = {}
    for source, target, named in crate.edges():
        # The folder both sit in: their longest common prefix; the nodes are the next segment.
        common = 0
        while common < min(len(source), len(target)) and source[common] == target[common]:
            common += 1
        if common == len(source) or common == len(target):
            continue  # a module and its own parent or child: that folder's own module
        folder = source[:common]
        graphs.setdefault(folder, {}).setdefault(source[common], set()).add(target[common])
        why.setdefault((folder, source[common], target[common]), set()).add(
            f"{'::'.join(source)} names {named}")
    for folder, graph in sorted(graphs.items()):
        state, stack = {}, []

        def visit(node):
            state[node] = 1
            stack.append(node)
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == 1:
                    ring = stack[stack.index(nxt):] + [nxt]
                    reasons = [r for a, b in zip(ring, ring[1:]) for r in sorted(why[(folder, a, b)])[:3]]
                    found.append("::".join(folder) + ": " + " -> ".join(ring)
                                 + "".join(f"\n    {r}" for r in reasons))
                elif nxt not in state:
                    visit(nxt)
            stack.pop()
            state[node] = 2

        for node in sorted(graph):
            if node not in state:
                visit(node)
    return found


def self_test():
    """The check finds a known cycle, through a re-export, and passes its absence."""
    import tempfile
    with tempfile.TemporaryDirectory() as src:
        files = {
            "lib.rs": "mod a;\nmod b;\nmod c;\npub use c::C;\n",
            "a.rs": "use crate::b::B;\npub struct A;\n",
            "b.rs": "pub struct B;\nfn f() -> crate::C { todo!() }\n",
            "c.rs": "pub struct C(super::a::A);\n",
        }
        for name, text in files.items():
            with open(os.path.join(src, name), "w") as f:
                f.write(text)
        found = cycles(Crate(src))
        assert len(found) == 1 and found[0].startswith("crate: a -> b -> c -> a"), found
        with open(os.path.join(src, "c.rs"), "w") as f:
            f.write("pub struct C;\n")
        assert cycles(Crate(src)) == [], "no cycle once c.rs names nothing"


def main():
    self_test()
    failed = False
    for src in sys.argv[1:]:
        crate = Crate(src)
        found = cycles(crate)
        for cycle in found:
            print(f"{src}: import cycle in {cycle}")
        failed |= bool(found)
        if not found:
            print(f"{src}: {len(crate.modules)} modules, no import cycle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
