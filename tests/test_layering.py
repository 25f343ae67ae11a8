"""The package's import graph, read with ``ast`` (nothing is imported): layers depend only downward and
no module reaches itself again through its imports.

Layers (docs/ARCHITECTURE.md): ``core`` < ``hosts`` < ``webui`` < ``standalone`` < ``te_switch.__main__``.
The standalone wing may use the WebUI glue's host-free panel (``webui.ui``/``args``/``library``); the
WebUI glue never imports the standalone wing. Imports inside functions count the same as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "te_switch"
LAYERS = {"core": 0, "hosts": 1, "webui": 2, "standalone": 3}
TOP = 4  # te_switch.__main__, the entry point
WEBUI_ROOTS = ("modules", "modules_forge", "backend", "ldm_patched", "ldm", "sgm", "gradio")


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_names()


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from pkg import sub`` counts as ``pkg.sub`` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


GRAPH = {name: {m for m in imports_of(path) if m.startswith("te_switch")} for name, path in MODULES.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # te_switch itself: imports nothing
    if parts[1] == "__main__":
        return TOP
    return LAYERS.get(parts[1])


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if m != "te_switch" and layer(m) is None)
    assert not unplaced, f"modules outside core/hosts/webui/standalone: {unplaced}"
    assert not GRAPH["te_switch"], "te_switch/__init__.py imports nothing (importing the package is free)"


def test_imports_point_only_downward() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if layer(target) is not None and layer(module) is not None and layer(target) > layer(module)  # type: ignore[operator]
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        stack = list(GRAPH.get(start, ()))
        while stack:
            m = stack.pop()
            if m not in seen:
                seen.add(m)
                stack.extend(GRAPH.get(m, ()))
        return seen

    cycles = sorted(f"{a} <-> {b}" for a in GRAPH for b in GRAPH[a] if a in reaches(b))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_and_hosts_never_import_gradio_and_core_never_the_webui() -> None:
    bad = []
    for module, path in MODULES.items():
        roots = {m.split(".")[0] for m in imports_of(path)}
        forbidden = set(WEBUI_ROOTS) if layer(module) == LAYERS["core"] else {"gradio"}
        if layer(module) in (LAYERS["core"], LAYERS["hosts"]) and roots & forbidden:
            bad.append(f"{module}: {sorted(roots & forbidden)}")
    assert not bad, bad


def test_the_checker_sees_what_it_checks() -> None:
    """The graph is real: known edges are there, so an empty result above means something."""
    assert "te_switch.core.convert" in GRAPH["te_switch.hosts.engine"]
    assert "te_switch.webui.ui" in GRAPH["te_switch.standalone.page"]
    assert "te_switch.standalone.cli" in GRAPH["te_switch.__main__"]
    assert layer("te_switch.core.detect") == 0
    assert layer("te_switch.standalone.cli") == 3
