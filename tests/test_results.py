"""Published figures are traceable: every committed results file records where it came from, and the
result tables of the README and the manual are exactly what their results files say (benchmarks/tables.py)."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_results_file_records_commit_date_machine_and_command():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for f in files:
        data = json.loads(f.read_text())
        assert isinstance(data, dict) and "rows" in data, f"{f.name}: no provenance wrapper"
        p = data["provenance"]
        assert p["commit"] and p["date"] and p["command"], f.name
        assert p["machine"].get("cores") or p["machine"].get("gpu"), f.name


def test_every_page_table_is_its_results_file():
    import tables

    for page in tables.pages():
        assert tables.check(page.read_text(encoding="utf-8")) == [], page.name
    # the benchmarks page shows every results file the renderer knows
    bench = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    shown = {m["name"] for m in tables.MARK.finditer(bench)}
    renderable = {f.stem for f in (ROOT / "benchmarks" / "results").glob("*.json")
                  if any(f.stem.startswith(k) for k in tables.RENDER)}
    assert renderable and renderable <= shown, renderable - shown
    text = bench
    # and the check can fail: a changed figure is caught
    name = "train_throughput_cpu_tiny"
    body = tables.render(name)
    changed = text.replace(body, body.replace("| 1 |", "| 3 |", 1))
    assert changed != text and tables.check(changed) == [name]
