"""The structure the README's module map promises: which package may import which, no import
cycle between packages or inside ``launch/``, and no module that reads argv outside the CLI.

Every ``import`` statement counts, including those inside functions (a lazy import is still a
dependency a reader has to follow)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "parallel", "launch", "serve", "bench", "cli")


def _module_map() -> dict[str, set[str]]:
    """``package -> packages it may import``, read from the README's module map table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Module map"):]
    allowed = {}
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)/` \|.*\| ([^|]*) \|$", line)
        if match and match.group(1) in PACKAGES:
            allowed[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    return allowed


def _imports() -> dict[str, set[str]]:
    """``module (dotted, without relay.) -> modules of ours it imports``."""
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for file in (REPO / package).rglob("*.py"):
            if "gen" in file.relative_to(REPO).parts:
                continue  # generated gRPC stubs
            module = ".".join(file.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(file.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                for name in names:
                    if name.startswith("relay.") and name.split(".")[1] in PACKAGES:
                        targets.add(name[len("relay."):])
            out[module] = targets
    return out


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_readme_module_map_names_every_package():
    assert set(_module_map()) == set(PACKAGES)


def test_packages_import_only_what_the_module_map_allows():
    allowed = _module_map()
    wrong = []
    for module, targets in _imports().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in allowed[package]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_packages():
    edges = defaultdict(set)
    for module, targets in _imports().items():
        for target in targets:
            if target.split(".")[0] != module.split(".")[0]:
                edges[module.split(".")[0]].add(target.split(".")[0])
    assert _cycle(edges) is None, _cycle(edges)


def test_no_import_cycle_inside_launch():
    modules = {m for m in _imports() if m.startswith("launch.")}
    edges = {m: {t for t in targets if t in modules} for m, targets in _imports().items() if m in modules}
    assert _cycle(edges) is None, _cycle(edges)


def test_only_the_cli_parses_argv_and_only_launchers_read_rank_variables():
    """No rank re-parses flags: argparse and sys.argv belong to ``cli`` (and the bench / codegen
    entry points); RANK / WORLD_SIZE belong to the launchers."""
    offenders = []
    for file in REPO.glob("*/**/*.py"):
        rel = file.relative_to(REPO)
        if rel.parts[0] not in PACKAGES or "gen" in rel.parts:
            continue
        text = file.read_text()
        if rel.parts[0] not in ("cli", "bench") and rel.name != "codegen.py" and re.search(r"\bparse_args\(|ArgumentParser\(", text):
            offenders.append(f"{rel}: parses arguments")
        if rel.parts[0] != "launch" and re.search(r"environ\[\"(RANK|WORLD_SIZE|LOCAL_RANK)\"\]", text):
            offenders.append(f"{rel}: reads rank variables")
    assert not offenders, offenders
