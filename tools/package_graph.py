#!/usr/bin/env python
"""Which megatron_soaes package imports which (module level or inside functions): the architecture test
keeps the graph free of cycles, and the manual draws it (docs/hooks.py).

  python tools/package_graph.py     # the graph as a Mermaid flowchart
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_soaes"


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "megatron_soaes" and len(parts) > 1 else None


def package_imports() -> dict[str, set[str]]:
    """package -> the other megatron_soaes packages it imports (module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        deps = graph.setdefault(src, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "megatron_soaes"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                dst = _package_of(n)
                if dst and dst != src and ((PKG / dst).is_dir() or (PKG / f"{dst}.py").exists()):
                    deps.add(dst)
    return graph


def mermaid(graph: dict[str, set[str]]) -> str:
    """The graph as a Mermaid flowchart (an arrow: a package imports the one it points to)."""
    lines = ["```mermaid", "flowchart TD"]
    lines += [f"    {a} --> {b}" for a in sorted(graph) for b in sorted(graph[a])]
    return "\n".join(lines + ["```"])


if __name__ == "__main__":
    print(mermaid(package_imports()))
