"""The layout's rules, checked against the code: import graph, layering, class sizes, the README map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("gatewayd", "transports")
MAX_CLASS_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, wherever in the module the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_relay_speaks_only_link_and_smp_client() -> None:
    relay = graph()["gatewayd.relay"]
    assert {m for m in relay if m.startswith("transports")} == {"transports.link", "transports.smp"}


def test_transports_know_nothing_of_the_gateway_and_the_cloud_side_nothing_of_transports() -> None:
    edges = graph()
    assert not {m for name, deps in edges.items() if name.startswith("transports") for m in deps
                if m.startswith("gatewayd")}
    cloud_side = ("gatewayd.cloud", "gatewayd.mqtt", "gatewayd.jobdoc", "gatewayd.streams", "gatewayd.stream_download",
                  "gatewayd.http_download", "gatewayd.verify", "gatewayd.report", "gatewayd.shadow")
    assert {name: sorted(m for m in edges[name] if m.startswith("transports")) for name in cloud_side} == {
        name: [] for name in cloud_side}


def test_no_class_outside_the_emulators_is_longer_than_400_lines() -> None:
    long = {}
    for name, path in modules().items():
        if ".emulators" in name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def readme_map() -> dict[str, str]:
    """The "Where things are" section of the README: `module.py` (or `emulators/x.py`) -> what it owns."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    current = ""
    entries = {}
    for line in section.splitlines():
        folder = re.match(r"^(gatewayd|transports|gatewayd/emulators)/\s*$", line.strip())
        if folder:
            current = folder.group(1)
            continue
        entry = re.match(r"^\s*(\S+\.py)\s+(.+)$", line)
        if entry and current:
            entries[f"{current}/{entry.group(1)}"] = entry.group(2)
    return entries


def test_the_readme_map_names_every_module_once_and_nothing_else() -> None:
    listed = readme_map()
    actual = {str(p.relative_to(REPO)) for p in modules().values() if p.name != "__init__.py"}
    assert sorted(set(listed) - actual) == [], "the README lists modules that do not exist"
    assert sorted(actual - set(listed)) == [], "modules missing from the README's map"
