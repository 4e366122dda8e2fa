"""MkDocs hooks: pages that are generated from the code at build time, so they cannot fall behind it.

  <!-- config-reference -->   every config field (megatron_soaes.config.reference)
  <!-- import-graph -->       which package imports which, as a Mermaid picture (tools/package_graph.py)

Result tables (``<!-- table: NAME -->``) are committed text, checked against their results files by
tests/test_results.py (benchmarks/tables.py --write renders them)."""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- config-reference -->" in markdown:
        from megatron_soaes.config.reference import markdown as reference

        markdown = markdown.replace("<!-- config-reference -->", reference())
    if "<!-- import-graph -->" in markdown:
        if TOOLS not in sys.path:  # mkdocs loads hooks without the repository on the path
            sys.path.insert(0, TOOLS)
        from package_graph import mermaid, package_imports

        markdown = markdown.replace("<!-- import-graph -->", mermaid(package_imports()))
    return markdown
